"""A grid study in an invocation: every cell through the study's queue (``studies/queue.py``), shared with
any other invocation of the same study. Cells finished in MLflow are skipped, the others enqueued (unless
another invocation did), then claimed one at a time by whichever invocation is free. Ends when no cell is
waiting or running anywhere; the summary then covers the whole study."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import mlflow_schema as S
from .jobs import Job, RunResult
from .progress import say
from .queue import WorkQueue, queue_name
from .scheduler import QueueSource, Started
from .search import describe_storage
from .spec import Cell
from .stage1_run import run_stage1

if TYPE_CHECKING:
    from .invocation import Invocation


class CellQueue(QueueSource):
    """The grid's cells as jobs."""

    def __init__(self, inv: Invocation, queue: WorkQueue, items: dict[str, Cell],
                 stage1_errors: dict[str, str]) -> None:
        super().__init__(queue, items, "cells")
        self.inv = inv
        self.stage1_errors = stage1_errors     # by stage-1 key: the cells of a stage 1 that failed cannot run

    def start(self, trial, cell: Cell) -> Job | None:
        inv = self.inv
        error = cell.error if not cell.ok else (self.stage1_errors.get(cell.stage1.key) if cell.stage1 else None)
        if error:
            result = inv.runs.record_failure(cell, error)
            self.queue.fail(trial, error)
            inv.progress.settled(result)
            return None
        kind, run = inv.runs.lookup(cell)
        if kind == "finished":  # finished by another invocation since this one read MLflow
            self.queue.complete(trial, 0.0)
            inv.progress.settled(inv.runs.result_of(cell, run, "done elsewhere"))
            return None
        return inv.cell_job(cell, inv.runs.open_cell_run(cell, kind, run))

    def finish_item(self, started: Started, result: RunResult) -> None:
        seconds = started.seconds
        if result.worker_died:
            self.inv.runs.fail_run(result.run_id, result.error)
        if result.status in ("completed", "stopped"):
            self.queue.complete(started.trial, seconds)
        elif result.status == "interrupted":
            self.queue.release(started.trial)
        else:
            self.queue.fail(started.trial, result.error or result.status)
        self.inv.progress.ran(result, seconds, resumed=started.job.resume)


def _results_of_others(inv: Invocation, cells: list[Cell]) -> None:
    """Rows for the cells that other invocations ran meanwhile (their MLflow runs, read now), so that the
    summary and the exit code cover the whole study."""
    mine = {r.cell for r in inv.progress.results}
    for cell in cells:
        if cell.id in mine:
            continue
        if not cell.ok:
            inv.progress.record(RunResult(cell.id, "failed", error=cell.error))
            continue
        run = inv.runs.find_run(cell.fingerprint)
        if run is None:
            inv.progress.record(RunResult(cell.id, "failed", error="no MLflow run: the queue ended without it"))
            continue
        status = {"FINISHED": "done elsewhere", "FAILED": "failed"}.get(run.info.status, run.info.status.lower())
        inv.progress.record(RunResult(cell.id, status, metrics=dict(run.data.metrics), run_id=run.info.run_id,
                                      error=run.data.tags.get(S.TAG_ERROR)))


def run_grid(inv: Invocation, cells: list[Cell]) -> None:
    """Every cell of the grid, run here or by another invocation (see the module docstring)."""
    inv.progress.total = len(cells)
    items: dict[str, Cell] = {}
    todo: dict[str, str] = {}
    for cell in cells:
        key = cell.fingerprint if cell.ok else f"invalid:{cell.id}"
        items[key] = cell
        if cell.ok:
            kind, run = inv.runs.classify_at_start(cell)
            if kind == "finished":
                inv.progress.skipped(inv.runs.result_of(cell, run, "done earlier"))
                continue
        todo[key] = cell.id
    if inv.progress.done:
        say(f"{inv.progress.done} of {inv.progress.total} runs already finished: skipped")
    if todo:
        runnable = [items[k] for k in todo if items[k].ok]
        inv.prepare_data(runnable)
        stage1_errors = run_stage1(inv, runnable)
        queue = WorkQueue(inv.queue_desc, queue_name(inv.study.name, "cells", list(items)), inv.host, inv.pid)
        inv.runs.tag_parent({S.TAG_QUEUE: f"{queue.name} in {describe_storage(inv.queue_desc)}"})
        queue.fill(todo)
        inv.run(CellQueue(inv, queue, {k: items[k] for k in todo}, stage1_errors))
    _results_of_others(inv, [items[k] for k in todo])
