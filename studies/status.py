"""``--status``: where a study stands, read-only from its MLflow runs (it creates no store): each cell done (its
best mAP), running (on which host and process, how many epochs logged), interrupted (the next invocation resumes
it), failed (why), stale (other code or data made it: it runs again) or waiting; for a search, its trials' runs."""

from __future__ import annotations

from collections import Counter

from dset import metric_names as M

from .console import table
from .planning.cells import Cell
from .planning.study import Study
from .processes import host
from .tracking import mlflow_runs, mlflow_store, schema
from .tracking.cell_state import classify_cell, stale_reason

STATES = ("done", "running", "interrupted", "failed", "stale", "waiting", "invalid")


def cell_status(cell: Cell, existing: dict, stale_candidates: dict, keep_stale: bool, c, my_host: str) -> tuple:
    """``(state, what)`` of one cell: one of :data:`STATES`, and a line saying where it stands."""
    if not cell.ok:
        return "invalid", cell.error or ""
    kind, run = classify_cell(cell, existing, stale_candidates, keep_stale,
                              alive=lambda r: not mlflow_runs.is_stale(r.data.tags, my_host))
    if kind == "new":
        return "waiting", ""
    if kind == "stale":
        return "stale", f"{stale_reason(cell, run)}: runs again"
    tags, metrics = run.data.tags, run.data.metrics
    if kind == "finished":
        best = metrics.get(M.BEST_MAP)
        return "done", (f"best mAP {best:.4f}" if best is not None else tags.get(schema.TAG_STATUS, "finished"))
    epochs = len(mlflow_store.retry(c.get_metric_history, run.info.run_id, M.train_loss_metric("loss")))
    logged = f"{epochs} epoch(s) logged"
    if kind == "elsewhere":
        return "running", f"on {tags.get(schema.TAG_HOST, '?')} (pid {tags.get(schema.TAG_PID, '?')}), {logged}"
    if run.info.status == "FAILED":
        return "failed", tags.get(schema.TAG_ERROR, "failed")
    why = "its process is gone" if run.info.status == "RUNNING" else run.info.status.lower()
    return "interrupted", f"{why}, {logged}; the next invocation resumes it"


def study_status(study: Study, cells: list[Cell] | None, uri: str, keep_stale: bool) -> int:
    """Print where ``study`` stands in the MLflow store ``uri``; 0, or 2 when the store cannot be read."""
    path = mlflow_store.sqlite_path(uri)
    if path is not None and not path.exists():
        print(f"study {study.name}: no MLflow store at {path}: nothing has run here yet")
        return 0
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
        return 0
    my_host = host()
    rows, counts = [], Counter()
    for cell in cells:
        state, what = cell_status(cell, runs, stale, keep_stale, c, my_host)
        counts[state] += 1
        rows.append([cell.id, state, what])
    print(f"study {study.name}: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
          + f" of {len(cells)} cells; MLflow {uri}")
    print(table(rows, ["cell", "state", ""]))
    return 0
