"""An Optuna search in an invocation: ask Optuna for a trial while a worker is free, train it as a cell, tell
Optuna its objective values (:mod:`.search`: sampler, pruner; :mod:`.optuna_storage`). Any number of invocations
share one search through Optuna's storage; a trial whose worker died is enqueued again and resumed."""

from __future__ import annotations

import logging

from ..console import say
from ..planning.cells import Cell, make_cell
from ..planning.study import Search, Study
from ..tracking import schema
from ..tracking.invocation_runs import InvocationRuns
from .claims import ATTR_HOST, ATTR_LABEL, ATTR_PID, ATTR_RETRY_OF, Heartbeat
from .jobs import JobMaker, RunResult
from .progress import Progress
from .queue import Queues
from .scheduler import Scheduler, Started
from .search import (
    ATTR_RUN_ID,
    create_study,
    objective_values,
    optuna_study_name,
    requeue_stale,
    sample,
    trial_counts,
)
from .stage1_run import run_stage1

log = logging.getLogger("studies")


class TrialSource:
    """Optuna's trials as jobs, until the search has ``n_trials`` (interrupted ones do not count)."""

    poll_s: float | None = None     # a result comes when a trial ends: nothing to look at meanwhile

    def __init__(self, ostudy, study: Study, runs: InvocationRuns, progress: Progress, jobs: JobMaker,
                 queues: Queues) -> None:
        self.ostudy = ostudy
        self.study = study
        self.search: Search = study.search
        self.runs = runs
        self.progress = progress
        self.jobs = jobs
        self.host, self.pid = queues.host, queues.pid
        # passed to each worker, which reports per-epoch values to its trial (and asks whether to prune)
        self.optuna = {"storage": queues.desc, "study_name": runs.optuna_name, "prune": self.search.prunable,
                       "pruner": self.search.pruner}
        self.heartbeat = Heartbeat(ostudy._storage)  # RDB storages: a dead worker's trial is re-enqueued

    def next_job(self) -> Started | None:
        from optuna.trial import TrialState

        while True:
            requeue_stale(self.ostudy, self.host)   # trials of workers that died meanwhile, on any machine
            counted, _ = trial_counts(self.ostudy)
            waiting = self.ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if counted >= self.search.n_trials and not waiting:
                return None
            trial = self.ostudy.ask()
            self.heartbeat.add(trial._trial_id)
            cell = self._cell_of(trial)
            started = self._start(trial, cell)
            if started is not None:
                return started

    def _cell_of(self, trial) -> Cell:
        """The trial's parameters sampled and resolved into a cell (named after the first trial of its chain of
        re-runs, which shares its run and checkpoint)."""
        root = trial.user_attrs.get(ATTR_RETRY_OF, trial.number)
        trial.set_user_attr(ATTR_HOST, self.host)
        trial.set_user_attr(ATTR_PID, self.pid)
        params = sample(trial, self.search.space)
        cell = make_cell(self.study, f"trial-{root}", params, self.study.seeds[0], extra={"trial": root})
        cell.trial, cell.trial_root = trial.number, root
        trial.set_user_attr(ATTR_LABEL, cell.id)
        return cell

    def _start(self, trial, cell: Cell) -> Started | None:
        """The trial's job, or None when the trial was settled without one."""
        from optuna.trial import TrialState

        if not cell.ok:
            run_id = self.runs.record_failure(cell, cell.error)
            self.ostudy.tell(trial, state=TrialState.FAIL)
            self.progress.settled(RunResult.failed_before_start(cell, cell.error, run_id))
            return None
        kind, run = self.runs.classify(cell)
        if kind == "elsewhere":  # a live process (this host) runs the same trial: leave it to it
            log.warning("trial %d: %s is running in process %s; told as FAIL here", trial.number, cell.id,
                        run.data.tags.get(schema.TAG_PID))
            self.ostudy.tell(trial, state=TrialState.FAIL)
            return None
        if kind == "finished":  # the same trial finished in MLflow before its result reached Optuna
            result = RunResult.found(cell, run, "done earlier")
            self._tell(trial, "completed", result.metrics)
            self.progress.settled(result)
            return None
        rid = self.runs.open_cell_run(cell, kind, run)
        trial.set_user_attr(ATTR_RUN_ID, rid)
        job = self.jobs.cell_job(cell, rid, optuna={**self.optuna, "trial_id": trial._trial_id})
        return Started(job, trial, cell)

    def finish(self, started: Started, result: RunResult) -> None:
        if result.worker_died:
            self.runs.fail_run(result.run_id, result.error)
        self._tell(started.trial, result.status, result.metrics)
        result.trial = started.trial.number
        self.progress.ran(result, started.seconds, resumed=started.job.resume)

    def keep_waiting(self, running: int) -> bool:
        return running > 0

    def _tell(self, trial, status: str, metrics: dict[str, float]) -> None:
        from optuna.trial import TrialState

        self.heartbeat.remove(trial._trial_id)
        if status == "pruned":
            self.ostudy.tell(trial, state=TrialState.PRUNED)
            return
        if status in ("completed", "stopped"):
            values = objective_values(self.search, metrics)
            if values is not None:
                self.ostudy.tell(trial, values)
                return
            missing = [o.metric for o in self.search.objectives if metrics.get(o.metric) is None]
            log.warning("trial %d: objective metric(s) %s missing (train.profile off, or no evaluation?): "
                        "told as FAIL", trial.number, missing)
        self.ostudy.tell(trial, state=TrialState.FAIL)


def _open_search(study: Study, runs: InvocationRuns, progress: Progress, queues: Queues):
    """The search's Optuna study (created or continued), tagged on the parent run; trials of dead workers
    enqueued again; the trials already done counted."""
    from optuna.trial import TrialState

    runs.tag_optuna_study(optuna_study_name(study), queues.describe())
    ostudy = create_study(study, queues.desc, worker_key=f"{queues.host}:{queues.pid}")
    requeued = requeue_stale(ostudy, queues.host)
    if requeued:
        say(f"interrupted trials {requeued} enqueued again (they continue from their checkpoints)")
    counted, _ = trial_counts(ostudy)
    progress.total = study.search.n_trials
    progress.done = max(0, counted - len([t for t in ostudy.get_trials(deepcopy=False)
                                          if t.state in (TrialState.WAITING, TrialState.RUNNING)]))
    if progress.done:
        say(f"{progress.done} of {progress.total} trials already done in Optuna study '{runs.optuna_name}'")
    return ostudy


def run_search(study: Study, runs: InvocationRuns, progress: Progress, jobs: JobMaker, queues: Queues,
               scheduler: Scheduler):
    """Trials until the search has ``search.n_trials`` of them; first the stage 1 they all start from. Returns
    the Optuna study (its best trials close the summary)."""
    ostudy = _open_search(study, runs, progress, queues)
    base = make_cell(study, "base", {}, study.seeds[0])
    jobs.prepare_data([base])
    stage1_errors = run_stage1([base], runs, jobs, queues, scheduler)
    if stage1_errors:  # no trial can start: recorded as one failed row, the study ends
        progress.record(RunResult(base.stage1.cell_id, "failed", error="; ".join(stage1_errors.values())))
        return ostudy
    scheduler.run(TrialSource(ostudy, study, runs, progress, jobs, queues))
    return ostudy
