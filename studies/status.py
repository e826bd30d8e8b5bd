"""``--status``: where a study stands, read-only from its MLflow runs (it creates no store) and its queue of cells
(whose heartbeats tell a live worker on another machine from a dead one): each cell done (its best mAP), running
(on which host, process and SLURM job, how many epochs logged), interrupted (the next invocation resumes it),
failed (why), stale (other code or data made it: it runs again) or waiting; for a search, its trials' runs."""

from __future__ import annotations

from collections import Counter

from dset import metric_names as M

from .console import table
from .execution.grid_run import CELLS_QUEUE, queue_key
from .execution.optuna_storage import storage_descriptor
from .execution.queue import ClaimView, queue_name, read_claims
from .planning.cells import Cell
from .planning.study import Study
from .processes import host
from .tracking import mlflow_runs, mlflow_store, schema
from .tracking.cell_state import classify_cell, stale_reason
from .tracking.mlflow_store import redact

STATES = ("done", "running", "interrupted", "failed", "stale", "waiting", "invalid")


def _where(host: str | None, pid, slurm_job: str | None) -> str:
    slurm = f", SLURM job {slurm_job}" if slurm_job and slurm_job != "none" else ""
    return f"{host or '?'} (pid {pid if pid is not None else '?'}{slurm})"


def cell_status(cell: Cell, existing: dict, stale_candidates: dict, keep_stale: bool, c, my_host: str,
                claim: ClaimView | None = None) -> tuple:
    """``(state, what)`` of one cell: one of :data:`STATES`, and a line saying where it stands. ``claim``: the
    cell's item in the study's queue (None: not read), which tells a live claimer from a dead one elsewhere."""
    if not cell.ok:
        return "invalid", cell.error or ""
    kind, run = classify_cell(cell, existing, stale_candidates, keep_stale,
                              alive=lambda r: not mlflow_runs.is_stale(r.data.tags, my_host))
    if kind == "new":
        if claim is not None and claim.state == "RUNNING" and not claim.dead:
            return "running", f"claimed by {_where(claim.host, claim.pid, None)}: starting"
        return "waiting", ""
    if kind == "stale":
        return "stale", f"{stale_reason(cell, run)}: runs again"
    tags, metrics = run.data.tags, run.data.metrics
    if kind == "finished":
        best = metrics.get(M.BEST_MAP)
        return "done", (f"best mAP {best:.4f}" if best is not None else tags.get(schema.TAG_STATUS, "finished"))
    epochs = len(mlflow_store.retry(c.get_metric_history, run.info.run_id, M.train_loss_metric("loss")))
    logged = f"{epochs} epoch(s) logged"
    where = _where(tags.get(schema.TAG_HOST), tags.get(schema.TAG_PID), tags.get(schema.TAG_SLURM_JOB))
    if kind == "elsewhere":
        if claim is not None and claim.dead:
            return "interrupted", (f"its worker on {where} stopped (no heartbeat), {logged}; a live invocation "
                                   "takes it over")
        if claim is not None and claim.state == "WAITING":
            return "interrupted", f"stopped on {where}, {logged}; queued again: the next claimer resumes it"
        return "running", f"on {where}, {logged}"
    if run.info.status == "FAILED":
        return "failed", tags.get(schema.TAG_ERROR, "failed")
    why = "its process is gone" if run.info.status == "RUNNING" else run.info.status.lower()
    return "interrupted", f"{why}, {logged}; the next invocation resumes it"


def cell_claims(study: Study, cells: list[Cell], storage: str | None, my_host: str) -> dict[str, ClaimView]:
    """``{cell id: ClaimView}`` from the study's queue of cells in ``storage`` (--storage, else the study's
    journal file); empty when it cannot be read (the status then rests on MLflow alone, and says so)."""
    keys = {queue_key(cell): cell.id for cell in cells}
    name = queue_name(study.name, CELLS_QUEUE, list(keys))
    views = read_claims(storage_descriptor(study, storage), name, my_host)
    return {keys[k]: v for k, v in views.items() if k in keys}


def study_status(study: Study, cells: list[Cell] | None, uri: str, keep_stale: bool, unfinished_code: int = 0,
                 storage: str | None = None) -> int:
    """Print where ``study`` stands in the MLflow store ``uri`` and its queue of cells in ``storage``; 0,
    ``unfinished_code`` when some cell is not done or some trial not finished (``--slurm --wait`` passes 1), or
    2 when the store cannot be read."""
    path = mlflow_store.sqlite_path(uri)
    if path is not None and not path.exists():
        print(f"study {study.name}: no MLflow store at {path}: nothing has run here yet")
        return unfinished_code
    try:
        c = mlflow_store.client(uri)
        exp = c.get_experiment_by_name(study.name)
        runs = mlflow_runs.find_child_runs(c, exp.experiment_id) if exp is not None else {}
        stale = mlflow_runs.find_stale_candidates(c, exp.experiment_id) if exp is not None else {}
    except Exception as exc:  # noqa: BLE001 - a status only reads: say why it could not
        print(f"error: cannot read the MLflow store {uri}: {exc}")
        return 2
    if cells is None:   # a search: its trials as MLflow has them
        counts = Counter(r.info.status for r in runs.values())
        print(f"study {study.name} (a search of {study.search.n_trials} trials): "
              + (", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trial has run"))
        return 0 if counts["FINISHED"] >= study.search.n_trials else unfinished_code
    my_host = host()
    try:
        claims, queue_note = cell_claims(study, cells, storage, my_host), ""
    except Exception as exc:  # noqa: BLE001 - the queue only refines what MLflow says
        claims, queue_note = {}, f" (queue unreadable: {redact(str(exc), storage)})"
    rows, counts = [], Counter()
    for cell in cells:
        state, what = cell_status(cell, runs, stale, keep_stale, c, my_host, claims.get(cell.id))
        counts[state] += 1
        rows.append([cell.id, state, what])
    print(f"study {study.name}: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
          + f" of {len(cells)} cells; MLflow {uri}{queue_note}")
    print(table(rows, ["cell", "state", ""]))
    return 0 if counts["done"] == len(cells) else unfinished_code
