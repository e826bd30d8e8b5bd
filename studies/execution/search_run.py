"""An Optuna search in an invocation: ask Optuna for a trial while a worker is free, train it as a cell, tell
Optuna its objective values (``studies/search.py``: storage, sampler, pruner). Any number of invocations share
one search through Optuna's storage; a trial whose worker died is enqueued again and resumed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import mlflow_schema as S
from . import search as O
from .jobs import RunResult
from .progress import say
from .queue import ATTR_HOST, ATTR_LABEL, ATTR_PID, ATTR_RETRY_OF, Heartbeat
from .scheduler import Started
from .spec import Cell, make_cell
from .stage1_run import run_stage1

if TYPE_CHECKING:
    from .invocation import Invocation

log = logging.getLogger("studies")


class TrialSource:
    """Optuna's trials as jobs, until the search has ``n_trials`` (interrupted ones do not count)."""

    poll_s: float | None = None     # a result comes when a trial ends: nothing to look at meanwhile

    def __init__(self, inv: Invocation, ostudy, desc: dict) -> None:
        self.inv = inv
        self.ostudy = ostudy
        self.search = inv.study.search
        # passed to each worker, which reports per-epoch values to its trial (and asks whether to prune)
        self.optuna = {"storage": desc, "study_name": inv.runs.optuna_name, "prune": self.search.prunable,
                       "pruner": self.search.pruner}
        self.heartbeat = Heartbeat(ostudy._storage)  # RDB storages: a dead worker's trial is re-enqueued

    def next_job(self) -> Started | None:
        from optuna.trial import TrialState

        while True:
            O.requeue_stale(self.ostudy, self.inv.host)   # trials of workers that died meanwhile, on any machine
            counted, _ = O.trial_counts(self.ostudy)
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
        inv = self.inv
        root = trial.user_attrs.get(ATTR_RETRY_OF, trial.number)
        trial.set_user_attr(ATTR_HOST, inv.host)
        trial.set_user_attr(ATTR_PID, inv.pid)
        params = O.sample(trial, self.search.space)
        cell = make_cell(inv.study, f"trial-{root}", params, inv.study.seeds[0], extra={"trial": root})
        cell.trial, cell.trial_root = trial.number, root
        trial.set_user_attr(ATTR_LABEL, cell.id)
        return cell

    def _start(self, trial, cell: Cell) -> Started | None:
        """The trial's job, or None when the trial was settled without one."""
        from optuna.trial import TrialState

        inv = self.inv
        if not cell.ok:
            result = inv.runs.record_failure(cell, cell.error)
            self.ostudy.tell(trial, state=TrialState.FAIL)
            inv.progress.settled(result)
            return None
        kind, run = inv.runs.classify(cell)
        if kind == "elsewhere":  # a live process (this host) runs the same trial: leave it to it
            log.warning("trial %d: %s is running in process %s; told as FAIL here", trial.number, cell.id,
                        run.data.tags.get(S.TAG_PID))
            self.ostudy.tell(trial, state=TrialState.FAIL)
            return None
        if kind == "finished":  # the same trial finished in MLflow before its result reached Optuna
            result = inv.runs.result_of(cell, run, "done earlier")
            self._tell(trial, "completed", result.metrics)
            inv.progress.settled(result)
            return None
        rid = inv.runs.open_cell_run(cell, kind, run)
        trial.set_user_attr(O.ATTR_RUN_ID, rid)
        job = inv.cell_job(cell, rid, optuna={**self.optuna, "trial_id": trial._trial_id})
        return Started(job, trial, cell)

    def finish(self, started: Started, result: RunResult) -> None:
        if result.worker_died:
            self.inv.runs.fail_run(result.run_id, result.error)
        self._tell(started.trial, result.status, result.metrics)
        result.trial = started.trial.number
        self.inv.progress.ran(result, started.seconds, resumed=started.job.resume)

    def keep_waiting(self, running: int) -> bool:
        return running > 0

    def _tell(self, trial, status: str, metrics: dict[str, float]) -> None:
        from optuna.trial import TrialState

        self.heartbeat.remove(trial._trial_id)
        if status == "pruned":
            self.ostudy.tell(trial, state=TrialState.PRUNED)
            return
        if status in ("completed", "stopped"):
            values = O.objective_values(self.search, metrics)
            if values is not None:
                self.ostudy.tell(trial, values)
                return
            missing = [o.metric for o in self.search.objectives if metrics.get(o.metric) is None]
            log.warning("trial %d: objective metric(s) %s missing (train.profile off, or no evaluation?): "
                        "told as FAIL", trial.number, missing)
        self.ostudy.tell(trial, state=TrialState.FAIL)


def _open_search(inv: Invocation, desc: dict):
    """The search's Optuna study (created or continued), tagged on the parent run; trials of dead workers
    enqueued again; the trials already done counted."""
    from optuna.trial import TrialState

    st = inv.study
    inv.runs.tag_optuna_study(O.optuna_study_name(st), O.describe_storage(desc))
    ostudy = O.create_study(st, desc, worker_key=f"{inv.host}:{inv.pid}")
    inv.optuna_study = ostudy
    requeued = O.requeue_stale(ostudy, inv.host)
    if requeued:
        say(f"interrupted trials {requeued} enqueued again (they continue from their checkpoints)")
    counted, _ = O.trial_counts(ostudy)
    progress = inv.progress
    progress.total = st.search.n_trials
    progress.done = max(0, counted - len([t for t in ostudy.get_trials(deepcopy=False)
                                          if t.state in (TrialState.WAITING, TrialState.RUNNING)]))
    if progress.done:
        say(f"{progress.done} of {progress.total} trials already done in Optuna study '{inv.runs.optuna_name}'")
    return ostudy


def run_search(inv: Invocation) -> None:
    """Trials until the search has ``search.n_trials`` of them; first the stage 1 they all start from."""
    st = inv.study
    desc = inv.queue_desc
    ostudy = _open_search(inv, desc)
    base = make_cell(st, "base", {}, st.seeds[0])
    inv.prepare_data([base])
    stage1_errors = run_stage1(inv, [base])
    if stage1_errors:  # no trial can start: recorded as one failed row, the study ends
        inv.progress.record(RunResult(base.stage1.cell_id, "failed", error="; ".join(stage1_errors.values())))
        return
    inv.run(TrialSource(inv, ostudy, desc))
