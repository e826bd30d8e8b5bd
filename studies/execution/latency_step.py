"""The latency a grid study's report compares: once every cell of a backbone has finished, its variants and its
RT-DETR baseline are timed side by side from their reported checkpoints by
:func:`dset.latency_benchmark.run_benchmark`, and one MLflow run per backbone (role ``benchmark``) records it.
Each backbone is measured once per set of cells, whichever invocation gets there first (docs/studies.md); a
failure is recorded in the benchmark run and printed, and the cells stay finished."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..console import format_duration, say
from ..planning.cells import Cell, variant_label
from ..tracking import mlflow_runs, mlflow_store, schema
from ..tracking.invocation_runs import InvocationRuns


@dataclass(frozen=True)
class BenchmarkSettings:
    """How each backbone is timed (part of the benchmark's key). 3 processes x 6 rounds keep both backbones of
    the ablation grid at 128 px near a minute on 2 CPU cores (10 rounds: 74 s)."""

    processes: int = 3
    rounds: int = 6
    warmup: int = 2
    batch_size: int = 1


def variant_slug(label: str) -> str:
    """A variant label as a part of an MLflow metric name ("DSET R18 (E+P+D+M0.3)" -> "DSET_R18_E_P_D_M0.3")."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_")


@dataclass
class BackbonePlan:
    """What one backbone's benchmark times: the variant label -> (cell, its finished MLflow run), baseline first."""

    backbone: str
    timed: dict[str, tuple[Cell, object]]
    image_size: int
    device: str

    def key(self, settings: BenchmarkSettings) -> str:
        payload = {"backbone": self.backbone, "fingerprints": sorted(c.fingerprint for c, _ in self.timed.values()),
                   "image_size": self.image_size, "device": self.device, **asdict(settings)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def plan_backbones(cells: list[Cell], runs: InvocationRuns) -> tuple[list[BackbonePlan], list[str]]:
    """The backbones ready to be timed (every cell finished, a baseline and at least one variant), and a line for
    each one that is not."""
    from dset.engine.distributed import DistInfo, resolve_device

    by_backbone: dict[str, list[Cell]] = {}
    for cell in cells:
        by_backbone.setdefault(cell.labels()["backbone"], []).append(cell)
    plans, skipped = [], []
    for backbone, group in by_backbone.items():
        found = {cell.id: runs.find_run(cell.fingerprint) if cell.ok else None for cell in group}
        unfinished = [c.id for c in group if found[c.id] is None or found[c.id].info.status != "FINISHED"]
        if unfinished:
            skipped.append(f"{backbone}: not every cell finished ({', '.join(unfinished)})")
            continue
        timed: dict[str, tuple[Cell, object]] = {}
        for cell in sorted(group, key=lambda c: c.seed):
            timed.setdefault(cell.labels()["variant"], (cell, found[cell.id]))
        baseline = variant_label(backbone, False, False, False)
        if baseline not in timed or len(timed) < 2:
            skipped.append(f"{backbone}: no {baseline} baseline and variant to compare")
            continue
        timed = {baseline: timed[baseline], **{k: v for k, v in timed.items() if k != baseline}}
        first = timed[baseline][0].config
        plans.append(BackbonePlan(backbone, timed, first.data.image_size,
                                  str(resolve_device(first.run.device, DistInfo()))))
    return plans, skipped


def _benchmark_runs(c, exp_id: str, key: str) -> list:
    from mlflow.entities import ViewType

    query = f"tags.`{schema.TAG_ROLE}` = '{schema.ROLE_BENCHMARK}' and tags.`{schema.TAG_BENCHMARK_KEY}` = '{key}'"
    return mlflow_store.retry(c.search_runs, [exp_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=1000)


def _claimed(run, host: str) -> bool:
    """A benchmark run that holds its key: finished, or running in a live invocation."""
    return run.info.status == "FINISHED" or (run.info.status == "RUNNING"
                                             and not mlflow_runs.is_stale(run.data.tags, host))


def _order(run) -> tuple:
    return (run.info.start_time or 0, run.info.run_id)


def benchmark_backbone(plan: BackbonePlan, settings: BenchmarkSettings, runs: InvocationRuns) -> str:
    """Time one backbone unless its key is measured or being measured (the older of two runs that start at the same
    moment measures, the other is deleted); a line saying what happened."""
    from dset.latency_benchmark import ModelSpec, run_benchmark

    c, key = runs.c, plan.key(settings)
    found = _benchmark_runs(c, runs.exp_id, key)
    for run in found:   # an invocation that died while measuring: its run is closed, the backbone measured again
        if run.info.status == "RUNNING" and not _claimed(run, runs.host):
            mlflow_store.retry(c.set_terminated, run.info.run_id, status="KILLED")
    holders = [r for r in found if _claimed(r, runs.host)]
    if holders:
        holder = min(holders, key=_order)
        state = "measured" if holder.info.status == "FINISHED" else "being measured by another invocation"
        return f"{plan.backbone}: already {state} (run {holder.info.run_id[:8]})"
    slugs = {variant_slug(label): label for label in plan.timed}
    tags = {schema.TAG_ROLE: schema.ROLE_BENCHMARK, schema.TAG_STUDY: runs.study.name,
            schema.TAG_BACKBONE: plan.backbone,
            schema.TAG_BENCHMARK_KEY: key, schema.TAG_BENCHMARK_BASELINE: next(iter(plan.timed)),
            schema.TAG_BENCHMARK_CELLS: json.dumps({label: cell.id for label, (cell, _) in plan.timed.items()}),
            schema.TAG_BENCHMARK_VARIANTS: json.dumps(slugs), schema.TAG_BENCHMARK_IMAGE_SIZE: plan.image_size,
            schema.TAG_BENCHMARK_BATCH: settings.batch_size, schema.TAG_BENCHMARK_PROCESSES: settings.processes,
            schema.TAG_BENCHMARK_ROUNDS: settings.rounds, schema.TAG_BENCHMARK_WARMUP: settings.warmup,
            schema.TAG_GIT_COMMIT: runs.commit, **runs.where,
            "mlflow.parentRunId": runs.parent_id, "mlflow.runName": f"latency {plan.backbone}"}
    rid = mlflow_store.retry(c.create_run, runs.exp_id, tags={k: str(v) for k, v in tags.items() if v is not None},
                             run_name=f"latency {plan.backbone}").info.run_id
    # two invocations that got here at the same moment: the older run measures, the other steps back
    holder = min((r for r in _benchmark_runs(c, runs.exp_id, key) if _claimed(r, runs.host)), key=_order)
    if holder.info.run_id != rid:
        mlflow_store.retry(c.delete_run, rid)
        return f"{plan.backbone}: being measured by another invocation (run {holder.info.run_id[:8]})"
    try:
        specs = [ModelSpec(label, checkpoint=run.data.tags[schema.TAG_CHECKPOINT_DIR])
                 for label, (_, run) in plan.timed.items()]
        result = run_benchmark(specs, plan.image_size, plan.device, settings.batch_size, settings.warmup,
                               settings.rounds, settings.processes)
    except Exception as exc:  # noqa: BLE001 - recorded in the benchmark run; the cells stay finished
        error = f"{type(exc).__name__}: {exc}"
        mlflow_runs.set_tags(c, rid, {schema.TAG_STATUS: "failed", schema.TAG_ERROR: error})
        mlflow_store.retry(c.set_terminated, rid, status="FAILED")
        return f"{plan.backbone}: FAILED ({error.splitlines()[0]}; the whole error is the run's {schema.TAG_ERROR} tag)"
    log_result(c, rid, result, slugs)
    mlflow_store.retry(c.set_terminated, rid, status="FINISHED")
    base = result["baseline"]
    changes = "; ".join(f"{label} {ch['latency_change_percent']:+.1f}% ({ch['latency_change_low_percent']:+.1f} to "
                        f"{ch['latency_change_high_percent']:+.1f})" for label, ch in result["changes"].items())
    return (f"{plan.backbone}: {base} {result['models'][base]['latency_ms']:.1f} ms; {changes} "
            f"[{result['processes']} processes x {result['rounds']} rounds, {format_duration(result['seconds'])}]")


def log_result(c, run_id: str, result: dict, slugs: dict[str, str]) -> None:
    """The benchmark's tags (what it was measured on), per-variant metrics and the whole result as an artifact."""
    mlflow_runs.set_tags(c, run_id, {
        schema.TAG_BENCHMARK_DEVICE: result["device"], schema.TAG_BENCHMARK_THREADS: result["threads"],
        schema.TAG_BENCHMARK_PRECISION: result["precision"], schema.TAG_BENCHMARK_INTERVAL: result["interval"],
        schema.TAG_STATUS: "completed"})
    metrics = {schema.BENCHMARK_SECONDS: result["seconds"]}
    for slug, label in slugs.items():
        values = {"latency_ms": result["models"][label]["latency_ms"]}
        change = result["changes"].get(label)   # the baseline has none
        if change is not None:
            values.update({"change_percent": change["latency_change_percent"],
                           "change_low_percent": change["latency_change_low_percent"],
                           "change_high_percent": change["latency_change_high_percent"]})
        metrics.update({schema.BENCHMARK_METRIC.format(variant=slug, quantity=q): v for q, v in values.items()})
    mlflow_runs.log_metrics(c, run_id, metrics, 0)
    with tempfile.TemporaryDirectory(prefix="dset_benchmark_") as tmp:
        path = Path(tmp) / schema.ARTIFACT_BENCHMARK
        path.write_text(json.dumps(result, indent=1))
        mlflow_store.retry(c.log_artifact, run_id, str(path))


def benchmark_grid(cells: list[Cell], runs: InvocationRuns, settings: BenchmarkSettings | None = None) -> None:
    """The latency benchmark of every backbone of a grid whose cells have all finished; prints a line per backbone.
    Never raises for a benchmark that fails: that is recorded and printed."""
    settings = settings or BenchmarkSettings()
    try:
        plans, skipped = plan_backbones(cells, runs)
    except Exception as exc:  # noqa: BLE001 - e.g. the store unreachable: say so, the cells stay finished
        say(f"latency benchmark: FAILED before timing ({type(exc).__name__}: {exc})")
        return
    lines = [f"{line}: not timed" for line in skipped]
    for plan in plans:
        say(f"latency benchmark {plan.backbone}: {len(plan.timed)} variants side by side at {plan.image_size} px, "
            f"{settings.processes} processes x {settings.rounds} rounds ...")
        try:
            lines.append(benchmark_backbone(plan, settings, runs))
        except Exception as exc:  # noqa: BLE001 - e.g. the store unreachable: say so, the cells stay finished
            lines.append(f"{plan.backbone}: FAILED ({type(exc).__name__}: {exc})")
    for line in lines:
        say(f"latency benchmark {line}")
