"""Stage 1 in an invocation: train the RT-DETR checkpoints that the cells need and the cache lacks, each once
across all invocations of the study (a queue of their own), and publish them into the cache
(:mod:`studies.planning.pretrain`)."""

from __future__ import annotations

from dset import metric_names as M
from dset.run_folder import RunFolder

from ..console import say
from ..planning.cells import Cell
from ..planning.pretrain import Stage1, publish
from ..tracking import schema
from ..tracking.invocation_runs import InvocationRuns
from .claims import ATTR_HOST
from .jobs import Job, JobMaker, RunResult
from .queue import Queues, WorkQueue
from .scheduler import QueueSource, Scheduler, Started


class Stage1Queue(QueueSource):
    """The stage-1 trainings as jobs: each trains into an MLflow run with role "pretrain"."""

    def __init__(self, queue: WorkQueue, todo: dict[str, Stage1], runs: InvocationRuns, jobs: JobMaker) -> None:
        super().__init__(queue, todo, "stage-1 trainings")
        self.runs = runs
        self.jobs = jobs
        self.earlier_runs = runs.stage1_runs()     # by stage-1 key: an unfinished one is resumed

    def start(self, trial, st: Stage1) -> Job | None:
        if st.cached:  # published by another invocation meanwhile
            self.queue.complete(trial, 0.0)
            return None
        rid = self.runs.open_stage1_run(st, self.earlier_runs.get(st.key))
        resume = RunFolder(st.partial_folder).resume_state.is_file()
        say(f"-> {st.cell_id}: RT-DETR R{st.depth}, budget {st.budget}" + (", resuming" if resume else ""))
        return self.jobs.job(st.cell_id, st.config.to_dict(), str(st.partial_folder), rid, resume,
                             f"stage 1: RT-DETR R{st.depth}")

    def finish_item(self, started: Started, result: RunResult) -> None:
        st: Stage1 = started.item
        minutes = started.seconds / 60
        if result.worker_died:
            self.runs.fail_run(result.run_id, result.error)
        if result.status == "completed":
            publish(st)
            self.runs.tag_run(result.run_id, {schema.TAG_CHECKPOINT_DIR: str(RunFolder(st.folder).checkpoints)})
        if st.cached:
            self.queue.complete(started.trial, minutes * 60)
            best = result.metrics.get(M.BEST_MAP50)
            say(f"   {st.cell_id} done in {minutes:.1f} min" + (f", mAP50 {best:.3f}" if best is not None
                                                               else "") + f": {st.checkpoint}")
        else:
            error = f"stage 1 ({st.cell_id}) failed: {result.error or result.status + ', no best checkpoint'}"
            self.queue.fail(started.trial, error)
            say(f"   {error}")


def _not_here(st: Stage1, queue: WorkQueue, host: str) -> str | None:
    """The error of a stage 1 trained on another machine whose cache this one cannot see (None: not so)."""
    done_elsewhere = [t.user_attrs.get(ATTR_HOST) for t in queue.by_key().get(st.key, [])
                      if t.state.name == "COMPLETE" and t.user_attrs.get(ATTR_HOST) != host]
    if not done_elsewhere:
        return None
    return (f"stage 1 ({st.cell_id}) was trained on {done_elsewhere[-1]}, but {st.checkpoint} is "
            f"not on this machine: give every machine the same $DSET_CACHE_DIR (a shared folder)")


def run_stage1(cells: list[Cell], runs: InvocationRuns, jobs: JobMaker, queues: Queues,
               scheduler: Scheduler) -> dict[str, str]:
    """Train the stage-1 checkpoints the cells need and the cache lacks (each an MLflow run with role
    "pretrain") through a queue of their own, so that concurrent invocations train each once, and publish
    them into the cache. Returns the errors of those that are not available, by cache key: their cells are
    recorded as failed."""
    stages = {c.stage1.key: c.stage1 for c in cells if c.ok and c.stage1 is not None
              and c.stage1.kind == "train"}
    if not stages:
        return {}
    queue = queues.open("stage1", list(stages), complete_means_done=False)
    errors: dict[str, str] = {}
    todo: dict[str, Stage1] = {}
    for key, st in stages.items():
        if st.cached:
            continue
        error = _not_here(st, queue, queues.host)
        if error:
            errors[key] = error
        else:
            todo[key] = st
    if todo:
        say(f"stage 1: training RT-DETR {', '.join(f'R{st.depth}' for st in todo.values())} first (cached "
            f"for later studies: {', '.join(str(st.folder) for st in todo.values())})")
        queue.fill({key: st.cell_id for key, st in todo.items()})
        scheduler.run(Stage1Queue(queue, todo, runs, jobs))
    for key, st in todo.items():
        if not st.cached:
            errors[key] = queue.error_of(key) or f"stage 1 ({st.cell_id}) failed: no checkpoint at {st.checkpoint}"
    return errors
