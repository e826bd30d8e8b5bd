"""Run a study end to end: ``python -m studies.run STUDY [key=value ...] [--workers N] [--devices 0,1] [--dry-run]
[--storage URL]``.

Examples::

    python -m studies.run --list
    python -m studies.run ablation_grid --dry-run                 # the 16 cells and the budget
    python -m studies.run ablation_grid                           # CPU budget, about 15 minutes on 2 cores
    python -m studies.run ablation_grid seeds=[0,1,2] --workers 2
    python -m studies.run ablation_grid budget=paper run.device=cuda
    python -m studies.run optuna_search n_trials=20 --workers 2
    python -m studies.run optuna_search --storage postgresql://user:pw@host/optuna   # on several machines
    python -m studies.run baselines model.decoder.num_queries=50

``key=value`` overrides are study settings (``seeds``, ``budget``, ``data``, ``n_trials``, ``out_dir``,
``presets``, ``name``, ``search.*``) or run-configuration keys (``model.*``, ``data.*``, ``train.*``,
``run.*``), applied to every run.

MLflow: the store is ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the working directory (what
``mlflow ui`` opens there). One experiment per study, one parent run per invocation, one nested child
run per cell or trial (names in ``studies/mlflow_schema.py``). Run outputs (checkpoints, metrics.jsonl)
stay in ``<out_dir>/<study>/<cell>-<fingerprint>/``.

Stage 1 (studies/pretrain.py): every cell fine-tunes from its backbone's RT-DETR checkpoint, trained here
first and cached ($DSET_CACHE_DIR/pretrained) or published (budget=paper); ``--dry-run`` shows which.

Any number of invocations of one study share its work through a queue in Optuna's storage
(``studies/queue.py``): the study's journal file on one machine, ``--storage postgresql://...`` across
machines that also share the MLflow store (``MLFLOW_TRACKING_URI=http://...`` of an ``mlflow server``), the
output folder and ``$DSET_CACHE_DIR``. Each cell, and each stage-1 training, runs exactly once; an invocation
ends when no cell is waiting or running anywhere, and takes over the cells of invocations that die (process
gone on this host, or no heartbeat for 4 x $DSET_QUEUE_HEARTBEAT_S seconds on any host). ``--workers N`` gives
each worker a GPU of its own (``--devices 0,2`` chooses them; ``studies/devices.py``).

Re-running a study skips finished runs (same fingerprint: resolved configuration, seed, stage 1, code version
and data digest), continues interrupted ones from their last checkpoint in the same MLflow run, and retries
failed ones. A cell finished by other code or on other data is stale: ``--dry-run`` marks it, a run redoes it
(``--keep-stale`` keeps it instead). Exit code:
0 when every run finished, 1 when some failed (listed at the end), 2 for a usage or configuration
error (before any work), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from dset.config import ConfigError, load_config
from dset.provenance import code_version, data_digest

from . import mlflow_schema as S
from .pretrain import PretrainError
from .spec import Cell, Study, StudyError, describe_budget, grid_cells, load_study, make_cell, study_names

log = logging.getLogger("studies")


# --------------------------------------------------------------------------------------------- output
def _say(text: str = "") -> None:
    """A line above any progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(text, flush=True)
    sys.stdout.flush()


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- listing
def list_studies() -> int:
    rows = []
    for name in study_names():
        try:
            st = load_study(name)
            size = (f"{len(grid_cells(st))} runs" if st.kind == "grid" else f"{st.search.n_trials} trials")
            rows.append([name, st.kind, size, st.budget or "none", st.description])
        except (StudyError, ConfigError) as exc:
            rows.append([name, "?", "?", "?", f"(invalid: {exc})"])
    print(_table(rows, ["study", "kind", "size", "budget", "description"]))
    from dset.config import PRESET_DIR

    budgets = sorted(p.stem[len("budget_"):] for p in PRESET_DIR.glob("budget_*.yaml"))
    print(f"\nbudgets (budget=NAME, dset/configs/budget_NAME.yaml): {', '.join(budgets)}")
    print("run one: python -m studies.run STUDY [key=value ...] [--workers N] [--dry-run] [--storage URL]")
    return 0


# ----------------------------------------------------------------------------------------- dry run
def _existing_runs_readonly(uri: str, experiment: str) -> tuple[dict, dict] | None:
    """Child runs by fingerprint and stale candidates by cell key when a local store exists (a dry run never
    creates one)."""
    from . import tracking as T

    path = T.sqlite_path(uri)
    if path is None or not path.exists():
        return None
    try:
        c = T.client(uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            return {}, {}
        return T.find_child_runs(c, exp.experiment_id), T.find_stale_candidates(c, exp.experiment_id)
    except Exception:  # noqa: BLE001 - a dry run only informs
        return None


def stale_reason(cell: Cell, run) -> str:
    """What differs between ``cell`` and an earlier run of the same cell (code version, data digest)."""
    tags = run.data.tags
    changed = [what for what, tag, key in (("code", S.TAG_CODE_VERSION, "code"), ("data", S.TAG_DATA_DIGEST, "data"))
               if tags.get(tag) != cell.provenance.get(key)]
    return " and ".join(changed) + " changed" if changed else "made differently"


def classify_cell(cell: Cell, by_fingerprint: dict, stale_candidates: dict, keep_stale: bool,
                  alive: Any = None) -> tuple[str, Any]:
    """What a study does with a valid cell: ("finished", run) skip it; ("elsewhere", run) a live process runs it;
    ("resume", run) continue its run; ("stale", old run) redo it, since other code or data made the finished
    run (with ``keep_stale``: "finished", the old run kept); ("new", None) run it. ``alive(run)``: the run's
    process still runs (None: never)."""
    run = by_fingerprint.get(cell.fingerprint)
    if run is not None:
        if run.info.status == "FINISHED":
            return "finished", run
        if run.info.status == "RUNNING" and alive is not None and alive(run):
            return "elsewhere", run
        return "resume", run
    old = stale_candidates.get(cell.cell_key)
    if old is not None:
        return ("finished", old) if keep_stale else ("stale", old)
    return "new", None


def _state(cell: Cell, existing: tuple[dict, dict] | None, keep_stale: bool) -> str:
    if not cell.ok:
        return "INVALID: " + (cell.error or "")
    if existing is None:
        return "new"
    kind, run = classify_cell(cell, *existing, keep_stale)
    if kind == "new":
        return "new"
    if kind == "stale":
        return f"STALE ({stale_reason(cell, run)}) -> rerun"
    if kind == "finished":
        if run.data.tags.get(S.TAG_FINGERPRINT) != cell.fingerprint:
            return f"stale ({stale_reason(cell, run)}), kept (--keep-stale)"
        return "finished (skipped)"
    return f"{run.info.status.lower()} -> resume"


def describe_stage1(cells: list[Cell]) -> list[str]:
    """Lines on stage 1 for the cells: per backbone, where its checkpoint comes from and whether it is cached."""
    from .pretrain import cache_root

    stages = {id(c.stage1): c.stage1 for c in cells if c.ok and c.stage1 is not None}
    lines = ["stage 1 (the RT-DETR checkpoint every cell fine-tunes from):"]
    lines += [f"  {st.describe()}" for st in sorted(stages.values(), key=lambda st: st.depth)]
    if any(st.kind == "train" for st in stages.values()):
        lines.append(f"  cache: {cache_root()} ($DSET_CACHE_DIR/pretrained moves it)")
    lines.append("stage 2: the cells below, each fine-tuned from its backbone's stage-1 checkpoint")
    return lines


def dry_run(study: Study, cells: list[Cell] | None, uri: str, storage: str | None, workers: int,
            keep_stale: bool = False) -> int:
    from .tracking import sqlite_path

    print(f"study {study.name} ({study.kind}) from {study.path}")
    if study.description:
        print(f"  {study.description}")
    if study.kind == "grid":
        n_base = len(cells) // len(study.seeds)
        print(f"  {n_base} cells x {len(study.seeds)} seed(s) {study.seeds} = {len(cells)} runs; "
              f"{workers} worker(s) at a time")
    sample_cfg = next((c.config for c in cells or [] if c.ok), None)
    if study.kind == "optuna":
        sample_cfg = make_cell(study, "base", {}, study.seeds[0]).config
    for line in describe_budget(study, sample_cfg):
        print(line)
    if study.config_overrides:
        print(f"overrides for every run: {' '.join(study.config_overrides)}")
    store = uri if sqlite_path(uri) is None or sqlite_path(uri).exists() else f"{uri} (created by the first run)"
    print(f"MLflow: {store}, experiment '{study.name}'; outputs in {study.study_dir}/")
    base_cell = cells if study.kind == "grid" else [make_cell(study, "base", {}, study.seeds[0])]
    for line in describe_stage1(base_cell):
        print(line)
    if study.kind == "grid":
        from .search import describe_storage, storage_descriptor

        print(f"queue of cells: {describe_storage(storage_descriptor(study, storage))} (every invocation of this "
              "study shares it; --storage postgresql://... for several machines)")
        existing = _existing_runs_readonly(uri, study.name)
        rows, errors = [], []
        for i, c in enumerate(cells, 1):
            lab = c.labels()
            if c.ok:
                state = _state(c, existing, keep_stale)
            else:
                if c.error not in errors:
                    errors.append(c.error)
                state = f"INVALID [{errors.index(c.error) + 1}]"
            rows.append([str(i), c.id, lab["variant"], str(c.seed), "-" if not c.ok else c.fingerprint[:8], state])
        print(_table(rows, ["#", "cell", "variant", "seed", "fp", "state"]))
        for i, e in enumerate(errors, 1):
            print(f"[{i}] {e}")
        if errors and all(not c.ok for c in cells):
            print("\nerror: every cell is invalid: nothing would run", file=sys.stderr)
            return 2
        return 0
    from .search import describe_pruning, describe_storage, optuna_study_name, storage_descriptor

    s = study.search
    print(f"Optuna: {s.n_trials} trials, study '{optuna_study_name(study)}' in "
          f"{describe_storage(storage_descriptor(study, storage))}; seed {study.seeds[0]}; "
          f"{workers} worker(s) at a time")
    print("objectives: " + ", ".join(f"{o.direction} {o.metric}" for o in s.objectives))
    name = s.sampler.get("name", "auto")
    if name == "auto":
        name = "nsga2" if len(s.objectives) > 1 else "tpe"
    print(f"sampler: {name} (seed {s.sampler.get('seed')})")
    print(describe_pruning(s))
    print("search space:")
    print(_table([[p.key, p.describe()] for p in s.space], ["parameter", "range"]))
    if sample_cfg is None:
        err = make_cell(study, "base", {}, study.seeds[0]).error
        print(f"\nerror: the base configuration is invalid: {err}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------ running
@dataclass
class Row:
    cell: str
    status: str
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    run_id: str | None = None
    trial: int | None = None


class InlineExecutor:
    """One job at a time in this process (``--workers 1``): the per-epoch progress bar stays visible. Its
    device was chosen before anything started CUDA (``main`` sets CUDA_VISIBLE_DEVICES)."""

    size = 1

    def __init__(self, slot) -> None:
        self.job = None
        self.slot = slot

    @property
    def free(self) -> int:
        return 0 if self.job else 1

    @property
    def running(self) -> dict:
        return {"job": self.job} if self.job else {}

    def start(self, job) -> None:
        job.device_shared = self.slot.shared
        job.latency_note = self.slot.note()
        self.job = job

    def wait_any(self, timeout: float | None = None) -> list[dict]:
        from .workers import execute

        job, self.job = self.job, None
        return [execute(job)]

    def terminate(self) -> None:
        self.job = None


class Runner:
    POLL_S = 2.0   # how often an idle invocation looks at the queue for work, or for claims of dead workers

    def __init__(self, study: Study, uri: str, workers: int, storage: str | None, keep_stale: bool = False,
                 slots: list | None = None) -> None:
        from . import tracking as T
        from .devices import Slot
        from .search import storage_descriptor

        self.T = T
        self.study = study
        self.uri = uri
        self.workers = workers
        self.storage = storage
        self.keep_stale = keep_stale
        self.host = T.host()
        self.pid = os.getpid()
        self.commit = T.git_commit()
        self.rows: list[Row] = []
        self.t0 = time.time()
        self.executed = 0
        self.durations: list[float] = []
        self.done = 0
        self.total = 0
        self.threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
        self.slots = slots or [Slot(None, "CPU", workers)] * workers
        self.queue_desc = storage_descriptor(study, storage)   # the queues of grid cells and stage 1 live here
        self.claims: dict = {}                                 # queue trials this invocation holds, by number
        self.queue = None

    # ----- MLflow set-up
    def open(self) -> None:
        T = self.T
        T.prepare_store(self.uri)
        self.c = T.client(self.uri)
        self.exp_id = T.get_experiment(self.c, self.study.name, self.uri)
        self.existing = T.find_child_runs(self.c, self.exp_id)
        self.stale_candidates = T.find_stale_candidates(self.c, self.exp_id)
        self._mark_stale_parents()
        tags = {S.TAG_ROLE: "parent", S.TAG_STUDY: self.study.name, S.TAG_GIT_COMMIT: self.commit,
                S.TAG_HOST: self.host, S.TAG_PID: str(self.pid), "mlflow.runName": f"{self.study.name} "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
                "dset.command": T.redact(" ".join(["python -m studies.run", *sys.argv[1:]]))}
        run = T.retry(self.c.create_run, self.exp_id, tags={k: str(v) for k, v in tags.items() if v is not None})
        self.parent_id = run.info.run_id
        st = self.study
        params = {"study.kind": st.kind, "study.budget": st.budget, "study.data": st.data, "study.seeds": st.seeds,
                  "study.presets": st.presets, "study.workers": self.workers, "study.file": str(st.path),
                  "study.overrides": " ".join(st.study_overrides + st.config_overrides) or "-",
                  "study.devices": ",".join(sl.label for sl in self.slots)}
        if st.search:
            params["study.n_trials"] = st.search.n_trials
        T.log_params(self.c, self.parent_id, params)
        try:
            T.retry(self.c.log_artifact, self.parent_id, str(st.path))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not log the study file: %s", exc)

    def _mark_stale_parents(self) -> None:
        T = self.T
        runs = T.retry(self.c.search_runs, [self.exp_id], filter_string=f"tags.`{S.TAG_ROLE}` = 'parent' and "
                       "attributes.status = 'RUNNING'", max_results=1000)
        for r in runs:
            if T.is_stale(r.data.tags, self.host):
                T.retry(self.c.set_terminated, r.info.run_id, status="KILLED")

    def close(self, status: str) -> None:
        T = self.T
        n_failed = sum(r.status == "failed" for r in self.rows)
        T.log_metrics(self.c, self.parent_id, {"runs_total": self.total, "runs_failed": n_failed,
                                               "runs_executed": self.executed,
                                               "wall_minutes": (time.time() - self.t0) / 60}, 0)
        T.retry(self.c.set_terminated, self.parent_id, status=status)

    # ----- runs
    def child_tags(self, cell: Cell) -> dict:
        lab = cell.labels()
        tags = {S.TAG_ROLE: "child", S.TAG_STUDY: self.study.name, S.TAG_CELL: cell.id, S.TAG_VARIANT: lab["variant"],
                S.TAG_BACKBONE: lab["backbone"], S.TAG_ENCODER_MOE: str(lab["encoder_moe"]).lower(),
                S.TAG_TOKEN_PRUNING: str(lab["token_pruning"]).lower(),
                S.TAG_DECODER_MOE: str(lab["decoder_moe"]).lower(), S.TAG_SEED: str(cell.seed),
                S.TAG_GIT_COMMIT: self.commit, S.TAG_FINGERPRINT: cell.fingerprint, S.TAG_CELL_KEY: cell.cell_key,
                S.TAG_CODE_VERSION: cell.provenance.get("code"), S.TAG_DATA_DIGEST: cell.provenance.get("data"),
                S.TAG_HOST: self.host, S.TAG_PID: str(self.pid), "mlflow.runName": cell.id}
        if cell.stage1 is not None:
            tags[S.TAG_INIT_SOURCE] = cell.stage1.init_source()
            if cell.stage1.checkpoint is not None:
                tags[S.TAG_INIT_CHECKPOINT] = str(cell.stage1.checkpoint.resolve())
        if cell.out_dir is not None:
            tags[S.TAG_CHECKPOINT_DIR] = str((cell.out_dir / "checkpoints").resolve())
        if cell.trial is not None:
            tags[S.TAG_TRIAL] = str(cell.trial)
            tags[S.TAG_OPTUNA_STUDY] = getattr(self, "optuna_name", None)
        return tags

    def classify(self, cell: Cell) -> tuple[str, Any]:
        """See :func:`classify_cell`: finished, elsewhere, resume, stale (the old run) or new."""
        return classify_cell(cell, self.existing, self.stale_candidates, self.keep_stale,
                             alive=lambda run: not self.T.is_stale(run.data.tags, self.host))

    def open_cell_run(self, cell: Cell, kind: str, run) -> str:
        """The MLflow run a cell trains into: ``run`` resumed, or a new one; a stale run it redoes is tagged
        as superseded by the new one (the report then skips it)."""
        if kind != "stale":
            return self.open_child(cell, run)
        rid = self.open_child(cell, None)
        self.T.set_tags(self.c, run.info.run_id, {S.TAG_SUPERSEDED_BY: rid})
        self.stale_candidates.pop(cell.cell_key, None)
        _say(f"-> {cell.id}: earlier run {run.info.run_id[:8]} is stale ({stale_reason(cell, run)}): redone")
        return rid

    def open_child(self, cell: Cell, run) -> str:
        """The MLflow run of ``cell``: ``run`` (resumed: same run id) or a new nested run."""
        T = self.T
        tags = self.child_tags(cell)
        if run is not None:
            rid = run.info.run_id
            T.delete_tag(self.c, rid, S.TAG_ERROR)
            T.delete_tag(self.c, rid, S.TAG_STATUS)
            tags.pop("mlflow.runName", None)
            T.set_tags(self.c, rid, tags)
            T.retry(self.c.update_run, rid, status="RUNNING")
            return rid
        tags["mlflow.parentRunId"] = self.parent_id
        new = T.retry(self.c.create_run, self.exp_id, tags={k: str(v) for k, v in tags.items() if v is not None},
                      run_name=cell.id)
        self.existing[cell.fingerprint] = T.retry(self.c.get_run, new.info.run_id)
        return new.info.run_id

    def lookup(self, cell: Cell) -> tuple[str, Any]:
        """What a claimed cell needs, read from MLflow now (another invocation may have finished it since this one
        started): ("finished", run), ("resume", run) (a run of its fingerprint that did not finish: this
        invocation holds the cell's claim, so nobody else runs it), ("stale", old run) or ("new", None)."""
        run = self.T.find_run(self.c, self.exp_id, cell.fingerprint) if cell.fingerprint else None
        if run is not None:
            return ("finished" if run.info.status == "FINISHED" else "resume"), run
        old = self.stale_candidates.get(cell.cell_key)
        if old is not None:
            return ("finished", old) if self.keep_stale else ("stale", old)
        return "new", None

    def record_failure(self, cell: Cell, error: str) -> Row:
        """A cell that cannot run (invalid configuration, failed stage 1): a FAILED run with the error."""
        T = self.T
        kind, run = self.lookup(cell)
        rid = self.open_cell_run(cell, kind, run) if kind != "finished" else self.open_child(cell, None)
        T.set_tags(self.c, rid, {S.TAG_STATUS: "failed", S.TAG_ERROR: error})
        T.retry(self.c.set_terminated, rid, status="FAILED")
        return Row(cell.id, "failed", error=error, run_id=rid, trial=cell.trial)

    # ----- the queue
    def drain(self, queue, items: dict, start, finish, what: str) -> None:
        """Claim and run ``queue``'s items (key -> object) until none is waiting or running anywhere.
        ``start(trial, item)`` returns the Job to run, or None when it settled the claim itself;
        ``finish(trial, result)`` records a job's result. While other invocations still run items, this one
        waits and takes over those whose worker died (``WorkQueue.reap``)."""
        from .queue import ATTR_KEY

        ex = self.executor()
        self._ex, self.queue, self.claims = ex, queue, {}
        keys = set(items)
        said_waiting = False
        while True:
            while ex.free > 0:
                trial = queue.claim(keys)
                if trial is None:
                    break
                job = start(trial, items[trial.user_attrs[ATTR_KEY]])
                if job is None:
                    continue
                job.meta["queue_trial"] = trial.number
                self.claims[trial.number] = trial
                ex.start(job)
            if ex.running:
                results = ex.wait_any(timeout=self.POLL_S if ex.free > 0 else None)
                for res in results:
                    finish(self.claims.pop(res["meta"]["queue_trial"]), res)
                if results or ex.free == 0:
                    continue
            waiting, running = queue.outstanding(keys)
            elsewhere = running - len(self.claims)
            if waiting:
                continue
            if elsewhere <= 0 and not ex.running:
                break
            if elsewhere > 0 and queue.reap():
                continue
            if elsewhere > 0 and not said_waiting:
                _say(f"waiting for {elsewhere} {what} that other invocations run (taken over if they die)")
                said_waiting = True
            if not ex.running:
                time.sleep(self.POLL_S)

    def release_claims(self) -> None:
        """Stopping: give this invocation's claims back to the queue, for others (or the next run) to resume."""
        if self.queue is None:
            return
        for trial in list(self.claims.values()):
            try:
                self.queue.release(trial)
            except Exception as exc:  # noqa: BLE001 - the next invocation reaps them by process id anyway
                log.warning("could not give back queue trial %d: %s", trial.number, exc)
        self.claims.clear()

    # ----- stage 1
    def run_stage1(self, cells: list[Cell]) -> dict[str, str]:
        """Train the stage-1 checkpoints the cells need and the cache lacks (each an MLflow run with role
        "pretrain") through a queue of their own, so that concurrent invocations train each once, and publish
        them into the cache. Returns the errors of those that are not available, by cache key: their cells are
        recorded as failed."""
        from .queue import ATTR_HOST, WorkQueue, queue_name

        stages = {c.stage1.key: c.stage1 for c in cells if c.ok and c.stage1 is not None
                  and c.stage1.kind == "train"}
        if not stages:
            return {}
        queue = WorkQueue(self.queue_desc, queue_name(self.study.name, "stage1", list(stages)), self.host, self.pid,
                          complete_means_done=False)
        errors: dict[str, str] = {}
        todo = {}
        for key, st in stages.items():
            if st.cached:
                continue
            done_elsewhere = [t.user_attrs.get(ATTR_HOST) for t in queue.by_key().get(key, [])
                              if t.state.name == "COMPLETE" and t.user_attrs.get(ATTR_HOST) != self.host]
            if done_elsewhere:  # the checkpoint is on another machine: cells here cannot start from it
                errors[key] = (f"stage 1 ({st.cell_id}) was trained on {done_elsewhere[-1]}, but {st.checkpoint} is "
                               f"not on this machine: give every machine the same $DSET_CACHE_DIR (a shared folder)")
                continue
            todo[key] = st
        if todo:
            _say(f"stage 1: training RT-DETR {', '.join(f'R{st.depth}' for st in todo.values())} first (cached "
                 f"for later studies: {', '.join(str(st.folder) for st in todo.values())})")
            queue.fill({key: st.cell_id for key, st in todo.items()})
            self._stage1_runs = self.T.find_child_runs(self.c, self.exp_id, role="pretrain")
            self._stage1_todo = todo
            self.drain(queue, todo, self._start_stage1, self._finish_stage1, "stage-1 trainings")
        for key, st in todo.items():
            if not st.cached:
                errors[key] = queue.error_of(key) or f"stage 1 ({st.cell_id}) failed: no checkpoint at {st.checkpoint}"
        return errors

    def _start_stage1(self, trial, st):
        from .workers import Job

        if st.cached:  # published by another invocation meanwhile
            self.queue.complete(trial, 0.0)
            return None
        rid = self._open_stage1_run(st, self._stage1_runs.get(st.key))
        resume = (st.partial_folder / "checkpoints" / "last.pt").is_file()
        _say(f"-> {st.cell_id}: RT-DETR R{st.depth}, budget {st.budget}" + (", resuming" if resume else ""))
        return Job(cell_id=st.cell_id, config=st.config.to_dict(), out_dir=str(st.partial_folder), run_id=rid,
                   tracking_uri=self.uri, resume=resume, title=f"{self.study.name} / stage 1: RT-DETR R{st.depth}",
                   threads=self.threads, progress=self.workers == 1 and sys.stderr.isatty(), parent_pid=self.pid,
                   meta={"stage1": st.key, "resume": resume, "t0": time.time()})

    def _finish_stage1(self, trial, res) -> None:
        from .pretrain import publish

        st = self._stage1_todo[res["meta"]["stage1"]]
        minutes = (time.time() - res["meta"]["t0"]) / 60
        if res.get("worker_died"):
            self._fail_run(res["run_id"], res["error"])
        if res["status"] == "completed":
            publish(st)
            self.T.set_tags(self.c, res["run_id"], {S.TAG_CHECKPOINT_DIR: str(st.folder / "checkpoints")})
        if st.cached:
            self.queue.complete(trial, minutes * 60)
            best = res.get("metrics", {}).get(S.BEST_MAP50)
            _say(f"   {st.cell_id} done in {minutes:.1f} min" + (f", mAP50 {best:.3f}" if best is not None
                                                                else "") + f": {st.checkpoint}")
        else:
            error = f"stage 1 ({st.cell_id}) failed: {res.get('error') or res['status'] + ', no best checkpoint'}"
            self.queue.fail(trial, error)
            _say(f"   {error}")

    def _open_stage1_run(self, st, run) -> str:
        """The MLflow run of a stage-1 training: an unfinished one of the same key resumed, or a new one."""
        T = self.T
        tags = {S.TAG_ROLE: "pretrain", S.TAG_STUDY: self.study.name, S.TAG_CELL: st.cell_id,
                S.TAG_BACKBONE: f"R{st.depth}", S.TAG_VARIANT: f"RT-DETR R{st.depth} (stage 1)",
                S.TAG_FINGERPRINT: st.key, S.TAG_STAGE1_KEY: st.key, S.TAG_SEED: str(st.config.run.seed),
                S.TAG_GIT_COMMIT: self.commit, S.TAG_CODE_VERSION: code_version(),
                S.TAG_DATA_DIGEST: data_digest(st.config), S.TAG_HOST: self.host, S.TAG_PID: str(self.pid),
                S.TAG_CHECKPOINT_DIR: str(st.partial_folder / "checkpoints")}
        if run is not None and run.info.status != "FINISHED":
            T.set_tags(self.c, run.info.run_id, tags)
            T.retry(self.c.update_run, run.info.run_id, status="RUNNING")
            return run.info.run_id
        tags["mlflow.parentRunId"] = self.parent_id
        new = T.retry(self.c.create_run, self.exp_id, tags={k: str(v) for k, v in tags.items() if v is not None},
                      run_name=st.cell_id)
        return new.info.run_id

    def make_job(self, cell: Cell, run_id: str, optuna: dict | None = None):
        from .workers import Job

        lab = cell.labels()
        resume = (cell.out_dir / "checkpoints" / "last.pt").is_file()
        cfg = cell.config
        if cell.stage1 is not None and cell.stage1.checkpoint is not None:  # stage 2: fine-tune from stage 1
            cfg = load_config(cfg, [f"model.checkpoint={cell.stage1.checkpoint.resolve()}"])
        return Job(cell_id=cell.id, config=cfg.to_dict(), out_dir=str(cell.out_dir), run_id=run_id,
                   tracking_uri=self.uri, resume=resume, title=f"{self.study.name} / {cell.id}: {lab['variant']}",
                   threads=self.threads, progress=self.workers == 1 and sys.stderr.isatty(), optuna=optuna,
                   parent_pid=self.pid,
                   meta={"trial": cell.trial, "resume": resume})

    def prepare_data(self, cells: list[Cell]) -> None:
        """Generate each synthetic data set the runs use once, here, before workers start (they would
        otherwise all build the same one at the same time)."""
        from dset.data.loaders import data_paths

        seen = set()
        for cell in cells:
            if not cell.ok or cell.config.data.name != "synthetic":
                continue
            key = repr(cell.config.data.synthetic)
            if key in seen:
                continue
            seen.add(key)
            try:
                data_paths(cell.config)
            except Exception as exc:  # noqa: BLE001 - the runs report it themselves
                log.warning("synthetic data for %s: %s", cell.id, exc)

    def started(self, cell: Cell, job) -> None:
        job.meta["t0"] = time.time()
        trial = f" (trial {cell.trial})" if cell.trial is not None and cell.id != f"trial-{cell.trial}" else ""
        if job.resume:
            _say(f"-> {cell.id}{trial}: resuming from {cell.out_dir / 'checkpoints' / 'last.pt'}")
        elif sys.stdout.isatty() or self.workers > 1:
            _say(f"-> {cell.id}{trial}: {cell.labels()['variant']}, started")

    def executor(self):
        if self.workers == 1:
            return InlineExecutor(self.slots[0])
        from .workers import WorkerPool

        return WorkerPool(self.slots)

    def progress(self, row: Row, resumed: bool = False, seconds: float | None = None) -> None:
        self.done += 1
        if seconds:
            self.durations.append(seconds)
        elapsed = time.time() - self.t0
        remaining = self.total - self.done
        # runs left x mean run time, shared by the workers
        eta = (sum(self.durations) / len(self.durations) * remaining / max(1, min(self.workers, remaining))
               if self.durations else None)
        m = row.metrics
        bits = [f"[{self.done}/{self.total}]", row.cell, row.status + (" (resumed)" if resumed else "")]
        if m.get(S.BEST_MAP) is not None:
            bits.append(f"mAP {m[S.BEST_MAP]:.4f}")
        if m.get(S.GFLOPS) is not None:
            bits.append(f"{m[S.GFLOPS]:.2f} GFLOPs")
        if row.error:
            bits.append(f"error: {row.error[:160]}")
        _say("  ".join(bits) + f"  | elapsed {_fmt_time(elapsed)}, ETA {_fmt_time(eta) if remaining else '0s'}")

    # ----- grid
    def run_grid(self, cells: list[Cell]) -> None:
        """Every cell through the study's queue (``studies.queue``): cells finished in MLflow are skipped, the
        others enqueued (unless another invocation did), then claimed one at a time by whichever invocation
        is free. Ends when no cell is waiting or running anywhere."""
        from .queue import WorkQueue, queue_name
        from .search import describe_storage

        self.total = len(cells)
        items: dict[str, Cell] = {}
        todo: dict[str, str] = {}
        for cell in cells:
            key = cell.fingerprint if cell.ok else f"invalid:{cell.id}"
            items[key] = cell
            if cell.ok:
                kind, run = classify_cell(cell, self.existing, self.stale_candidates, self.keep_stale)
                if kind == "finished":
                    self.rows.append(Row(cell.id, "done earlier", metrics=dict(run.data.metrics),
                                         run_id=run.info.run_id))
                    self.done += 1
                    continue
            todo[key] = cell.id
        if self.done:
            _say(f"{self.done} of {self.total} runs already finished: skipped")
        if todo:
            runnable = [items[k] for k in todo if items[k].ok]
            self.prepare_data(runnable)
            self.stage1_errors = self.run_stage1(runnable)
            queue = WorkQueue(self.queue_desc, queue_name(self.study.name, "cells", list(items)), self.host, self.pid)
            where = f"{queue.name} in {describe_storage(self.queue_desc)}"
            self.T.set_tags(self.c, self.parent_id, {S.TAG_QUEUE: where})
            queue.fill(todo)
            self.drain(queue, {k: items[k] for k in todo}, self._start_cell, self._finish_cell, "cells")
        self._rows_of_others([items[k] for k in todo])

    def _start_cell(self, trial, cell: Cell):
        error = cell.error if not cell.ok else (self.stage1_errors.get(cell.stage1.key) if cell.stage1 else None)
        if error:
            row = self.record_failure(cell, error)
            self.queue.fail(trial, error)
            self.rows.append(row)
            self.progress(row)
            return None
        kind, run = self.lookup(cell)
        if kind == "finished":  # finished by another invocation since this one read MLflow
            self.queue.complete(trial, 0.0)
            row = Row(cell.id, "done elsewhere", metrics=dict(run.data.metrics), run_id=run.info.run_id)
            self.rows.append(row)
            self.progress(row)
            return None
        rid = self.open_cell_run(cell, kind, run)
        job = self.make_job(cell, rid)
        self.started(cell, job)
        return job

    def _finish_cell(self, trial, res) -> None:
        self.executed += 1
        seconds = time.time() - res["meta"]["t0"]
        if res.get("worker_died"):
            self._fail_run(res["run_id"], res["error"])
        if res["status"] in ("completed", "stopped"):
            self.queue.complete(trial, seconds)
        elif res["status"] == "interrupted":
            self.queue.release(trial)
        else:
            self.queue.fail(trial, res.get("error") or res["status"])
        row = Row(res["cell"], res["status"], metrics=res.get("metrics") or {}, error=res.get("error"),
                  run_id=res["run_id"])
        self.rows.append(row)
        self.progress(row, resumed=res["meta"].get("resume", False), seconds=seconds)

    def _rows_of_others(self, cells: list[Cell]) -> None:
        """Rows for the cells that other invocations ran meanwhile (their MLflow runs, read now), so that the
        summary and the exit code cover the whole study."""
        mine = {r.cell for r in self.rows}
        for cell in cells:
            if cell.id in mine:
                continue
            if not cell.ok:
                self.rows.append(Row(cell.id, "failed", error=cell.error))
                continue
            run = self.T.find_run(self.c, self.exp_id, cell.fingerprint)
            if run is None:
                self.rows.append(Row(cell.id, "failed", error="no MLflow run: the queue ended without it"))
                continue
            status = {"FINISHED": "done elsewhere", "FAILED": "failed"}.get(run.info.status, run.info.status.lower())
            self.rows.append(Row(cell.id, status, metrics=dict(run.data.metrics), run_id=run.info.run_id,
                                 error=run.data.tags.get(S.TAG_ERROR)))

    def _fail_run(self, run_id: str, error: str) -> None:
        T = self.T
        T.set_tags(self.c, run_id, {S.TAG_STATUS: "failed", S.TAG_ERROR: error})
        T.retry(self.c.set_terminated, run_id, status="FAILED")

    # ----- optuna
    def run_optuna(self) -> None:
        from optuna.trial import TrialState

        from . import search as O

        st = self.study
        desc = O.storage_descriptor(st, self.storage)
        self.optuna_name = O.optuna_study_name(st)
        self.T.set_tags(self.c, self.parent_id, {S.TAG_OPTUNA_STUDY: self.optuna_name,
                                                 "dset.optuna_storage": O.describe_storage(desc)})
        ostudy = O.create_study(st, desc, worker_key=f"{self.host}:{self.pid}")
        from .queue import Heartbeat

        self.heartbeat = Heartbeat(ostudy._storage)  # RDB storages: a dead worker's trial is re-enqueued
        self.ostudy = ostudy
        requeued = O.requeue_stale(ostudy, self.host)
        if requeued:
            _say(f"interrupted trials {requeued} enqueued again (they continue from their checkpoints)")
        counted, _ = O.trial_counts(ostudy)
        self.total = st.search.n_trials
        self.done = max(0, counted - len([t for t in ostudy.get_trials(deepcopy=False)
                                           if t.state in (TrialState.WAITING, TrialState.RUNNING)]))
        if self.done:
            _say(f"{self.done} of {self.total} trials already done in Optuna study '{self.optuna_name}'")
        prune = st.search.prunable
        base = make_cell(st, "base", {}, st.seeds[0])
        self.prepare_data([base])
        stage1_errors = self.run_stage1([base])
        if stage1_errors:  # no trial can start: recorded as one failed row, the study ends
            self.rows.append(Row(base.stage1.cell_id, "failed", error="; ".join(stage1_errors.values())))
            return
        ex = self.executor()
        self._ex = ex
        trials: dict[int, Any] = {}
        while True:
            while ex.free > 0:
                O.requeue_stale(ostudy, self.host)   # trials of workers that died meanwhile, on any machine
                counted, _ = O.trial_counts(ostudy)
                waiting = ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if counted >= st.search.n_trials and not waiting:
                    break
                trial = ostudy.ask()
                self.heartbeat.add(trial._trial_id)
                root = trial.user_attrs.get(O.ATTR_RETRY_OF, trial.number)
                trial.set_user_attr(O.ATTR_HOST, self.host)
                trial.set_user_attr(O.ATTR_PID, self.pid)
                params = O.sample(trial, st.search.space)
                cell = make_cell(st, f"trial-{root}", params, st.seeds[0], extra={"trial": root})
                cell.trial, cell.trial_root = trial.number, root
                trial.set_user_attr(O.ATTR_CELL, cell.id)
                trials[trial.number] = trial
                if not cell.ok:
                    row = self.record_failure(cell, cell.error)
                    ostudy.tell(trial, state=TrialState.FAIL)
                    self.rows.append(row)
                    self.progress(row)
                    continue
                kind, run = self.classify(cell)
                if kind == "elsewhere":  # a live process (this host) runs the same trial: leave it to it
                    log.warning("trial %d: %s is running in process %s; told as FAIL here", trial.number, cell.id,
                                run.data.tags.get(S.TAG_PID))
                    ostudy.tell(trial, state=TrialState.FAIL)
                    continue
                if kind == "finished":  # the same trial finished in MLflow before its result reached Optuna
                    metrics = dict(run.data.metrics)
                    self._tell(ostudy, trial, "completed", metrics)
                    row = Row(cell.id, "done earlier", metrics=metrics, run_id=run.info.run_id, trial=trial.number)
                    self.rows.append(row)
                    self.progress(row)
                    continue
                rid = self.open_cell_run(cell, kind, run)
                trial.set_user_attr(O.ATTR_RUN_ID, rid)
                job = self.make_job(cell, rid, optuna={"storage": desc, "study_name": self.optuna_name,
                                                       "trial_id": trial._trial_id, "prune": prune,
                                                       "pruner": st.search.pruner})
                self.started(cell, job)
                ex.start(job)
            if not ex.running:
                break
            for res in ex.wait_any():
                self.executed += 1
                number = res["meta"]["trial"]
                if res.get("worker_died"):
                    self._fail_run(res["run_id"], res["error"])
                self._tell(ostudy, trials[number], res["status"], res.get("metrics") or {})
                row = Row(res["cell"], res["status"], metrics=res.get("metrics") or {}, error=res.get("error"),
                          run_id=res["run_id"], trial=number)
                self.rows.append(row)
                self.progress(row, resumed=res["meta"].get("resume", False),
                              seconds=time.time() - res["meta"]["t0"])

    def _tell(self, ostudy, trial, status: str, metrics: dict) -> None:
        from optuna.trial import TrialState

        from .search import objective_values

        self.heartbeat.remove(trial._trial_id)
        if status == "pruned":
            ostudy.tell(trial, state=TrialState.PRUNED)
            return
        if status in ("completed", "stopped"):
            values = objective_values(self.study.search, metrics)
            if values is not None:
                ostudy.tell(trial, values)
                return
            missing = [o.metric for o in self.study.search.objectives if metrics.get(o.metric) is None]
            log.warning("trial %d: objective metric(s) %s missing (train.profile off, or no evaluation?): "
                        "told as FAIL", trial.number, missing)
        ostudy.tell(trial, state=TrialState.FAIL)

    # ----- summary
    def summary(self) -> int:
        rows = []
        for r in self.rows:
            m = r.metrics
            label = r.cell if r.trial is None or r.cell == f"trial-{r.trial}" else f"{r.cell} (trial {r.trial})"
            rows.append([label, r.status,
                         _fmt(m.get(S.BEST_MAP), ".4f"), _fmt(m.get(S.BEST_MAP50), ".4f"), _fmt(m.get(S.GFLOPS), ".2f"),
                         _fmt(m.get(S.LATENCY_MS), ".1f"), _fmt(m.get(S.TRAIN_MINUTES), ".1f")])
        print()
        print(_table(rows, ["cell", "status", "mAP", "mAP50", "GFLOPs", "latency ms", "train min"]))
        if getattr(self, "ostudy", None) is not None:
            try:
                best = self.ostudy.best_trials
                names = ", ".join(o.metric for o in self.study.search.objectives)
                print(f"\nOptuna '{self.optuna_name}': best trials ({names}): "
                      + "; ".join(f"#{t.number} {[round(v, 4) for v in t.values]}" for t in best))
            except Exception:  # noqa: BLE001 - no completed trial yet
                pass
        failed = [r for r in self.rows if r.status == "failed"]
        print(f"\n{len(self.rows)} runs, {self.executed} executed in {_fmt_time(time.time() - self.t0)}; "
              f"MLflow experiment '{self.study.name}' at {self.uri}; its runs: {self.T.ui_link(self.uri, self.exp_id)}")
        if failed:
            print(f"\n{len(failed)} run(s) FAILED:", file=sys.stderr)
            for r in failed:
                print(f"  {r.cell}: {r.error}", file=sys.stderr)
            return 1
        return 0


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m studies.run", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("args", nargs="*", metavar="STUDY [key=value ...]",
                    help=f"a study ({', '.join(study_names())}) or a study YAML file, then overrides")
    ap.add_argument("--list", action="store_true", help="list the shipped studies and budgets")
    ap.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (default 1); with "
                    "GPUs each worker gets one of its own (round-robin, with a warning, when there are fewer GPUs)")
    ap.add_argument("--devices", default=None, metavar="0,2,...", help="the GPUs the workers use (indices among "
                    "the visible ones; default: all)")
    ap.add_argument("--dry-run", action="store_true", help="print the cells or the search space and the budget")
    ap.add_argument("--storage", default=None, help="Optuna storage URL holding the study's queue of cells and trials "
                    "(default: a journal file in the study's output folder, for one machine); "
                    "postgresql://user:pw@host/db shares a study between machines")
    ap.add_argument("--keep-stale", action="store_true", help="count a finished cell as done even when other code "
                    "or data made it (by default such a stale cell is run again; --dry-run marks it)")
    ap.add_argument("-v", "--verbose", action="store_true", help="per-epoch log lines of every run")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ns = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dset").setLevel(logging.INFO if ns.verbose else logging.WARNING)
    from .tracking import quiet_mlflow, tracking_uri

    quiet_mlflow()
    if ns.list:
        return list_studies()
    if not ns.args:
        ap.error("STUDY is required (python -m studies.run --list shows them)")
    if ns.workers < 1:
        ap.error("--workers must be >= 1")
    name, overrides = ns.args[0], ns.args[1:]
    if "=" in name:
        ap.error(f"the study must come first, got {name!r}")
    try:
        study = load_study(name, overrides)
        cells = grid_cells(study) if study.kind == "grid" else None
        if study.kind == "optuna":
            make_cell(study, "base", {}, study.seeds[0])   # stage 1 must be available before anything runs
    except (StudyError, ConfigError, PretrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uri = tracking_uri()
    from .devices import DeviceError, plan_for_invocation

    try:
        slots, device_warning = plan_for_invocation(ns.workers, ns.devices)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device_warning:
        log.warning("warning: %s", device_warning)
    if ns.dry_run:
        code = dry_run(study, cells, uri, ns.storage, ns.workers, ns.keep_stale)
        print("devices: " + ", ".join(f"worker {i + 1}: {sl.label}" for i, sl in enumerate(slots)))
        return code
    if cells is not None and cells and all(not c.ok for c in cells):
        print(f"error: every cell of {study.name} is invalid (nothing was run): {cells[0].error}", file=sys.stderr)
        return 2
    if study.kind == "optuna":
        base = make_cell(study, "base", {}, study.seeds[0])
        if not base.ok:
            print(f"error: the base configuration of {study.name} is invalid (nothing was run): {base.error}",
                  file=sys.stderr)
            return 2

    def _terminate(signum, frame):  # a scheduler's SIGTERM ends the study like Ctrl-C: runs marked KILLED
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, _terminate)
    if ns.workers == 1:  # this process trains: its GPU is chosen before anything starts CUDA
        os.environ.update(slots[0].env)
    runner = Runner(study, uri, ns.workers, ns.storage, ns.keep_stale, slots)
    n = len(cells) if cells is not None else study.search.n_trials
    _say(f"study {study.name}: {n} {'runs' if cells is not None else 'trials'}, {ns.workers} worker(s), "
         f"budget {study.budget}; MLflow {uri}; outputs {study.study_dir}/")
    runner.open()
    try:
        if study.kind == "grid":
            runner.run_grid(cells)
        else:
            runner.run_optuna()
    except KeyboardInterrupt:
        ex = getattr(runner, "_ex", None)
        if ex is not None:
            ex.terminate()
        runner.release_claims()
        runner.close("KILLED")
        print(f"\ninterrupted; run the same command again to resume ({runner.done}/{runner.total} done)",
              file=sys.stderr)
        return 130
    code = runner.summary()
    runner.close("FINISHED" if code == 0 else "FAILED")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
