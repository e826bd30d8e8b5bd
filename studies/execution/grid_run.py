"""A grid study in an invocation: every cell through the study's queue (:mod:`.queue`), shared with any other
invocation of the same study. Cells finished in MLflow are skipped, the others enqueued (unless another invocation
did), then claimed one at a time by whichever invocation is free. Ends when no cell is waiting or running anywhere;
the summary then covers the whole study."""

from __future__ import annotations

from ..console import say
from ..planning.cells import Cell
from ..tracking import schema
from ..tracking.invocation_runs import InvocationRuns
from .jobs import Job, JobMaker, RunResult
from .learning_floor import baselines_below_floor
from .progress import Progress
from .queue import Queues, WorkQueue
from .scheduler import QueueSource, Scheduler, Started
from .stage1_run import run_stage1

CELLS_QUEUE = "cells"   # the part of the study's queues that holds its grid cells


def queue_key(cell: Cell) -> str:
    """A cell's work key in the queue: its fingerprint (an invalid cell's id, so that it is listed too)."""
    return cell.fingerprint if cell.ok else f"invalid:{cell.id}"


class CellQueue(QueueSource):
    """The grid's cells as jobs."""

    def __init__(self, queue: WorkQueue, items: dict[str, Cell], stage1_errors: dict[str, str],
                 runs: InvocationRuns, progress: Progress, jobs: JobMaker) -> None:
        super().__init__(queue, items, "cells")
        self.stage1_errors = stage1_errors     # by stage-1 key: the cells of a stage 1 that failed cannot run
        self.runs = runs
        self.progress = progress
        self.jobs = jobs

    def start(self, trial, cell: Cell) -> Job | None:
        error = cell.error if not cell.ok else (self.stage1_errors.get(cell.stage1.key) if cell.stage1 else None)
        if error:
            run_id = self.runs.record_failure(cell, error)
            self.queue.fail(trial, error)
            self.progress.settled(RunResult.failed_before_start(cell, error, run_id))
            return None
        kind, run = self.runs.lookup(cell)
        if kind == "finished":  # finished by another invocation since this one read MLflow
            self.queue.complete(trial, 0.0)
            self.progress.settled(RunResult.found(cell, run, "done elsewhere"))
            return None
        return self.jobs.cell_job(cell, self.runs.open_cell_run(cell, kind, run))

    def finish_item(self, started: Started, result: RunResult) -> None:
        seconds = started.seconds
        if result.worker_died:
            self.runs.fail_run(result.run_id, result.error)
        if result.status in ("completed", "stopped"):
            self.queue.complete(started.trial, seconds)
        elif result.status == "interrupted":
            self.queue.release(started.trial)
        else:
            self.queue.fail(started.trial, result.error or result.status)
        self.progress.ran(result, seconds, resumed=started.job.resume)


def _results_of_others(cells: list[Cell], runs: InvocationRuns, progress: Progress) -> None:
    """Rows for the cells that other invocations ran meanwhile (their MLflow runs, read now), so that the
    summary and the exit code cover the whole study."""
    mine = {r.cell for r in progress.results}
    for cell in cells:
        if cell.id in mine:
            continue
        if not cell.ok:
            progress.record(RunResult(cell.id, "failed", error=cell.error))
            continue
        run = runs.find_run(cell.fingerprint)
        if run is None:
            progress.record(RunResult(cell.id, "failed", error="no MLflow run: the queue ended without it"))
            continue
        status = {"FINISHED": "done elsewhere", "FAILED": "failed"}.get(run.info.status, run.info.status.lower())
        progress.record(RunResult(cell.id, status, metrics=dict(run.data.metrics), run_id=run.info.run_id,
                                  error=run.data.tags.get(schema.TAG_ERROR)))


def run_grid(cells: list[Cell], runs: InvocationRuns, progress: Progress, jobs: JobMaker, queues: Queues,
             scheduler: Scheduler) -> None:
    """Every cell of the grid, run here or by another invocation (see the module docstring)."""
    progress.total = len(cells)
    items: dict[str, Cell] = {}
    todo: dict[str, str] = {}
    for cell in cells:
        key = queue_key(cell)
        items[key] = cell
        if cell.ok:
            kind, run = runs.classify_at_start(cell)
            if kind == "finished":
                progress.skipped(RunResult.found(cell, run, "done earlier"))
                continue
        todo[key] = cell.id
    if progress.done:
        say(f"{progress.done} of {progress.total} runs already finished: skipped")
    if todo:
        runnable = [items[k] for k in todo if items[k].ok]
        jobs.prepare_data(runnable)
        stage1_errors = run_stage1(runnable, runs, jobs, queues, scheduler)
        queue = queues.open(CELLS_QUEUE, list(items))
        runs.tag_parent({schema.TAG_QUEUE: f"{queue.name} in {queues.describe()}"})
        queue.fill(todo)
        scheduler.run(CellQueue(queue, {k: items[k] for k in todo}, stage1_errors, runs, progress, jobs))
    _results_of_others([items[k] for k in todo], runs, progress)
    progress.notes += baselines_below_floor(cells, progress.results, runs.study.targets.learning_floor_map,
                                            runs.learning_risks)
