"""Side-by-side latency with an interval that includes the between-process spread.

A variant's latency against its baseline's is only worth comparing when both are measured under the same
conditions, and the conditions of one process (its threads' placement, its memory layout, the clocks while it
ran) differ from the next one's by more than many effects worth measuring. So:

- In one process the models are timed interleaved (:func:`dset.measure.measure_latency`): warm-up rounds, then
  ``rounds`` rounds, each calling every runner once in an order shuffled afresh (seeded by the process's index).
  A runner is a model in one precision and mode (:mod:`dset.inference_modes`; default fp32 eager only, then the
  runners are named as their models). Eval mode, ``torch.inference_mode``, the same random images for every
  runner, the pruning schedules at their end (target sparsity,
  :meth:`~dset.models.detector.Detector.set_deployed_epoch`); CUDA events time each call on a GPU.
- That is repeated in ``processes`` separate processes, one after the other (``python -m dset.latency_benchmark
  --worker REQUEST RESULT``), each building or loading the models itself.
- The change of a runner against the baseline (the first runner): in each process, the median over its rounds
  of the per-round log ratio ``log(variant ms / baseline ms)`` (both timed in the same round); the estimate is the
  mean of the ``processes`` medians, the 95% interval Student's t over them,
  ``mean +- t(0.975, K - 1) * sd / sqrt(K)``, both shown as a change in percent, ``100 * (exp(x) - 1)``. A
  process's median carries its own round-to-round noise and what sets it apart from the other processes, so
  their spread, and the interval, include both. (A bootstrap that
  resamples 3 processes would understate their spread by (K - 1) / K and take only a handful of values.) With one
  process the interval is the paired bootstrap over its rounds (:func:`dset.measure.paired_latency_change`), and
  the result says that it leaves the between-process spread out.
- A runner's latency is the median (p50) of all its timed calls, every process's rounds together; p90 as well.
  A combination that cannot run on the device (CUDA graphs on a CPU) is listed under ``not_timed`` with why.

:func:`run_benchmark` returns what was measured and how: the environment (device, driver, torch, CUDA, cuDNN),
threads, batch, precisions and modes, image size, processes, rounds, warm-up, the interval's method; per runner its
model, precision, mode, p50, p90 and per-process medians; per variant its change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

PRECISION = "fp32"   # what run_benchmark times by default (eager, no autocast): the study's benchmark
LEVEL = 0.95
INTERVAL_PROCESSES = "Student t over the processes' median per-round log ratios (between-process spread included)"
INTERVAL_ONE_PROCESS = "bootstrap over the rounds of one process (between-process spread not included)"


class LatencyBenchmarkError(RuntimeError):
    """A benchmark that could not run (a model that cannot be built or loaded, a worker that failed)."""


@dataclass(frozen=True)
class ModelSpec:
    """How a worker process gets one model: ``config`` (a preset name, a YAML path or a configuration dict) with
    ``overrides``, and/or ``checkpoint`` (a training checkpoint, ``best.pt``/``last.pt`` or its run folder, whose EMA
    weights are loaded; its own configuration is used when ``config`` is None). ``epoch``: the pruning schedules'
    epoch (None: the end of each ramp, the target sparsity)."""

    label: str
    config: str | dict | None = None
    overrides: tuple[str, ...] = ()
    checkpoint: str | None = None
    epoch: int | None = None

    def __post_init__(self) -> None:
        if self.config is None and self.checkpoint is None:
            raise ValueError(f"model {self.label!r}: give a config, a checkpoint or both")


def build_benchmark_model(spec: ModelSpec) -> torch.nn.Module:
    """The model ``spec`` describes, in eval mode, its pruning schedules set to ``spec.epoch`` (default: their end)."""
    from .config import load_config
    from .evaluate import _checkpoint_path
    from .models.detector import build_model

    state = None
    config = spec.config
    if spec.checkpoint is not None:
        path = _checkpoint_path(spec.checkpoint)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "ema" not in ckpt or "config" not in ckpt:
            raise LatencyBenchmarkError(f"model {spec.label!r}: {path} is not a dset training checkpoint "
                                        "(no 'config' and 'ema' entries)")
        state = ckpt["ema"]["module"]
        if config is None:
            config = ckpt["config"]
    if isinstance(config, dict):
        # the weights come from the checkpoint: the files the run started from need not exist any more
        model_section = {**config.get("model", {}), "checkpoint": None}
        model_section["backbone"] = {**model_section.get("backbone", {}), "pretrained": None}
        config = {**config, "model": model_section}
        from .config import config_from_dict

        cfg = load_config(config_from_dict(config), list(spec.overrides))
    else:
        cfg = load_config(config, list(spec.overrides))
    model = build_model(cfg, load_weights=state is None)
    if state is not None:
        model.load_state_dict(state)
    model.set_deployed_epoch(spec.epoch)
    return model.eval()


def time_in_this_process(specs: list[ModelSpec], size: int, device: str = "cpu", batch_size: int = 1,
                         warmup: int = 3, rounds: int = 10, order_seed: int = 0,
                         precisions: tuple[str, ...] = (PRECISION,), modes: tuple[str, ...] = ("eager",)) -> dict:
    """One process's share: build every model, time its runners (each precision and mode) interleaved
    (:func:`dset.measure.measure_latency`, the order shuffled every round with ``order_seed``); per runner the
    milliseconds of each timed round, what it runs, and its model's sparse mechanisms as timed
    (:func:`dset.measure.sparse_summary`: the keep ratios in force); ``not_timed``: runners that cannot run here."""
    models = {spec.label: build_benchmark_model(spec) for spec in specs}
    return time_models(models, size, device, batch_size, warmup, rounds, order_seed, precisions, modes)


def time_models(models: dict[str, torch.nn.Module], size: int, device: str = "cpu", batch_size: int = 1,
                warmup: int = 3, rounds: int = 10, order_seed: int = 0, precisions: tuple[str, ...] = (PRECISION,),
                modes: tuple[str, ...] = ("eager",)) -> dict:
    """:func:`time_in_this_process` of models already built (what :func:`summarise` reads)."""
    from .measure import environment, measure_latency, sparse_summary

    timing = measure_latency(models, size, device, batch_size, warmup, rounds, order_seed=order_seed,
                             precisions=precisions, modes=modes)
    timed = [label for label, t in timing.items() if "not_timed" not in t]
    env = environment(device)
    return {"device": env["device"], "environment": env, "threads": torch.get_num_threads(),
            "timer": next((timing[label]["timer"] for label in timed), None),
            "rounds_ms": {label: timing[label]["latency_ms_rounds"] for label in timed},
            "runners": {label: {k: t[k] for k in ("model", "precision", "precision_as_run", "mode")}
                        for label, t in timing.items()},
            "not_timed": {label: t["not_timed"] for label, t in timing.items() if "not_timed" in t},
            "sparse": {label: sparse_summary(models[t["model"]]) for label, t in timing.items()}}


# ---------------------------------------------------------------------------------------------- statistics
def change_between_processes(baseline_ms: list[list[float]], model_ms: list[list[float]],
                             level: float = LEVEL) -> dict:
    """A model's latency change against the baseline's, from rounds timed side by side in several processes
    (``baseline_ms[k][i]`` and ``model_ms[k][i]``: round i of process k): the t-interval over the processes'
    median per-round log ratios (see the module docstring), in percent."""
    from scipy import stats

    if len(baseline_ms) != len(model_ms) or len(baseline_ms) < 2:
        raise ValueError(f"an interval between processes needs the same processes (at least 2) for both models, got "
                         f"{len(baseline_ms)} and {len(model_ms)}")
    medians = []
    for k, (base, model) in enumerate(zip(baseline_ms, model_ms)):
        if len(base) != len(model) or not base:
            raise ValueError(f"process {k}: paired latency needs the same rounds for both models, got {len(base)} "
                             f"and {len(model)} timings")
        medians.append(float(np.median(np.log(np.asarray(model, dtype=float) / np.asarray(base, dtype=float)))))
    n = len(medians)
    mean = statistics.fmean(medians)
    half = float(stats.t.ppf(1 - (1 - level) / 2, n - 1)) * statistics.stdev(medians) / math.sqrt(n)
    percent = lambda x: 100 * (math.exp(x) - 1)  # noqa: E731
    return {"latency_change_percent": percent(mean), "latency_change_low_percent": percent(mean - half),
            "latency_change_high_percent": percent(mean + half),
            "latency_change_by_process_percent": [percent(m) for m in medians],
            "processes": n, "rounds": len(baseline_ms[0]), "level": level, "interval": INTERVAL_PROCESSES}


def summarise(labels: list[str], per_process: list[dict], settings: dict, level: float = LEVEL) -> dict:
    """The benchmark's result from each process's timings (:func:`time_in_this_process`): per model the median
    of all its timed rounds and each process's median; per variant (every model but the first, the baseline) its
    change with an interval (:func:`change_between_processes`, or within the one process)."""
    from .measure import paired_latency_change

    rounds = {label: [p["rounds_ms"][label] for p in per_process] for label in labels}
    models = {}
    for label in labels:
        pooled = [ms for process in rounds[label] for ms in process]
        median = statistics.median(pooled)
        models[label] = {**per_process[0].get("runners", {}).get(label, {}),
                         "latency_ms": median, "latency_ms_p50": median,
                         "latency_ms_p90": float(np.percentile(pooled, 90)),
                         "fps": 1000.0 * settings["batch_size"] / median,
                         "latency_ms_by_process": [statistics.median(ms) for ms in rounds[label]],
                         "latency_ms_rounds": rounds[label], "sparse": per_process[0]["sparse"][label]}
    baseline = labels[0]
    changes = {}
    for label in labels[1:]:
        if len(per_process) > 1:
            changes[label] = change_between_processes(rounds[baseline], rounds[label], level)
        else:
            changes[label] = {**paired_latency_change(rounds[baseline][0], rounds[label][0], level),
                              "processes": 1, "interval": INTERVAL_ONE_PROCESS}
        changes[label]["baseline"] = baseline
    first = per_process[0]
    precisions = sorted({m["precision"] for m in models.values() if "precision" in m}) or [PRECISION]
    return {**settings, "device": first["device"], "environment": first.get("environment"),
            "threads": first["threads"], "timer": first.get("timer"),
            "precision": precisions[0] if len(precisions) == 1 else ",".join(precisions),
            "not_timed": first.get("not_timed", {}), "runners": first.get("runners", {}),
            "processes": len(per_process), "level": level,
            "interval": INTERVAL_PROCESSES if len(per_process) > 1 else INTERVAL_ONE_PROCESS,
            "baseline": baseline, "models": models, "changes": changes}


# ------------------------------------------------------------------------------------------------- runner
@dataclass
class BenchmarkRequest:
    """What every worker process is asked to do (written as JSON for it)."""

    specs: list[dict]
    image_size: int
    device: str = "cpu"
    batch_size: int = 1
    warmup: int = 3
    rounds: int = 10
    threads: int = 1
    precisions: tuple[str, ...] = (PRECISION,)
    modes: tuple[str, ...] = ("eager",)


def run_benchmark(specs: list[ModelSpec], size: int = 640, device: str = "cpu", batch_size: int = 1, warmup: int = 3,
                  rounds: int = 10, processes: int = 3, threads: int | None = None,
                  timeout_s: float | None = None, precisions: tuple[str, ...] = (PRECISION,),
                  modes: tuple[str, ...] = ("eager",)) -> dict:
    """Time ``specs`` in each of ``precisions`` and ``modes`` side by side in ``processes`` separate processes, one
    after the other (the first timed runner is the baseline); see the module docstring. ``threads``: torch's
    intra-op threads in each process (default: this process's). Raises :class:`LatencyBenchmarkError` when a
    worker fails, with its error output."""
    if len(specs) < 1 or len({s.label for s in specs}) != len(specs):
        raise ValueError(f"the benchmark needs models with distinct labels, got {[s.label for s in specs]}")
    if processes < 1 or rounds < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"processes and rounds must be >= 1, warmup >= 0, batch_size >= 1; got processes={processes}, "
                         f"rounds={rounds}, warmup={warmup}, batch_size={batch_size}")
    threads = threads or torch.get_num_threads()
    started = time.perf_counter()
    request = BenchmarkRequest([asdict(s) for s in specs], size, device, batch_size, warmup, rounds, threads,
                               tuple(precisions), tuple(modes))
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    per_process = []
    with tempfile.TemporaryDirectory(prefix="dset_latency_") as tmp:
        request_path = Path(tmp) / "request.json"
        request_path.write_text(json.dumps(asdict(request)))
        for k in range(processes):
            result_path = Path(tmp) / f"process{k}.json"
            cmd = [sys.executable, "-m", "dset.latency_benchmark", "--worker", str(request_path), str(result_path),
                   "--order-seed", str(k)]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise LatencyBenchmarkError(f"latency benchmark process {k + 1}/{processes} ran past {timeout_s} s"
                                            ) from None
            if proc.returncode != 0 or not result_path.is_file():
                lines = proc.stderr.strip().splitlines() or ["(no error output)"]
                # the exception's own line first, then the traceback's end
                raise LatencyBenchmarkError(f"latency benchmark process {k + 1}/{processes} failed (exit "
                                            f"{proc.returncode}): {lines[-1]}\n" + "\n".join(lines[-30:]))
            per_process.append(json.loads(result_path.read_text()))
    result = _summarise_timed(per_process, size, batch_size, rounds, warmup, precisions, modes)
    result["seconds"] = time.perf_counter() - started
    return result


def _summarise_timed(per_process: list[dict], size: int, batch_size: int, rounds: int, warmup: int,
                     precisions: tuple[str, ...], modes: tuple[str, ...]) -> dict:
    """:func:`summarise` of the runners that ran (the first is the baseline); an error when none could."""
    settings = {"image_size": size, "batch_size": batch_size, "rounds": rounds, "warmup": warmup,
                "precisions": list(precisions), "modes": list(modes)}
    labels = list(per_process[0]["rounds_ms"])
    if not labels:
        raise LatencyBenchmarkError(f"nothing could run on {per_process[0]['device']}: " + "; ".join(
            f"{label}: {why}" for label, why in per_process[0]["not_timed"].items()))
    return summarise(labels, per_process, settings)


def time_protocol(models: dict[str, torch.nn.Module], specs: list[ModelSpec], size: int, device: str,
                  batch_sizes: tuple[int, ...], warmup: int, rounds: int, processes: int,
                  precisions: tuple[str, ...], modes: tuple[str, ...]) -> dict[int, dict]:
    """The deployed-latency protocol at each batch size: every model in every precision and mode timed
    interleaved, in ``processes`` separate processes (:func:`run_benchmark`, models built from ``specs``) or, with
    0, in this process on ``models`` (the interval then leaves the between-process spread out)."""
    out = {}
    for batch_size in batch_sizes:
        if processes:
            out[batch_size] = run_benchmark(specs, size, device, batch_size, warmup, rounds, processes,
                                            precisions=precisions, modes=modes)
        else:
            timed = time_models(models, size, device, batch_size, warmup, rounds, 0, precisions, modes)
            out[batch_size] = _summarise_timed([timed], size, batch_size, rounds, warmup, precisions, modes)
    return out


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m dset.latency_benchmark --worker REQUEST RESULT --order-seed K``: one process's timings."""
    ap = argparse.ArgumentParser(prog="python -m dset.latency_benchmark", description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("REQUEST", "RESULT"), required=True,
                    help="the request JSON written by run_benchmark, and where to write this process's timings")
    ap.add_argument("--order-seed", type=int, default=0, help="seed of the shuffled order of each round")
    args = ap.parse_args(argv)
    request_path, result_path = (Path(p) for p in args.worker)
    request = BenchmarkRequest(**json.loads(request_path.read_text()))
    torch.set_num_threads(request.threads)
    torch.manual_seed(0)
    specs = [ModelSpec(**{**s, "overrides": tuple(s["overrides"])}) for s in request.specs]
    timings = time_in_this_process(specs, request.image_size, request.device, request.batch_size, request.warmup,
                                   request.rounds, order_seed=args.order_seed,
                                   precisions=tuple(request.precisions), modes=tuple(request.modes))
    result_path.write_text(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
