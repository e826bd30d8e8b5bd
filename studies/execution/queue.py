"""A study's work as a queue in Optuna's storage, so that any number of invocations share it.

Each unit of work (a grid cell, a stage-1 training) is an Optuna trial enqueued WAITING, with the user
attribute ``dset.queue_key`` saying what it stands for (a cell's fingerprint, a stage-1 cache key). An
invocation claims work with ``Study.ask()``, which moves exactly one WAITING trial to RUNNING (Optuna's
storage makes that atomic: a row lock in PostgreSQL, the journal's lock in a journal file), and tells the
trial COMPLETE or FAIL when the work ends. The storage is the study's journal file (one machine) or
``--storage postgresql://...`` (any number of machines).

Why this is safe without any lock of ours:
- Enqueueing is not exclusive: two invocations started at the same moment may both enqueue a cell. A claim
  therefore runs its cell only when no other trial of the same key is COMPLETE and no lower-numbered trial of
  it is WAITING or RUNNING; otherwise the claim is told FAIL with ``dset.yielded_to`` and dropped. Of several
  live trials of one key, exactly one (the lowest-numbered) runs.
- A dead worker's trial stays RUNNING. It is found dead by its process id (same host: the process is gone) or
  by Optuna's heartbeat (PostgreSQL and other RDB storages: no heartbeat for ``grace`` seconds, whichever
  machine ran it), told FAIL, and enqueued again with ``dset.requeued_from``. Whoever claims it next resumes
  the cell from its ``last.pt`` into the same MLflow run (the fingerprint finds both).

The queue's Optuna study is named after the study and a hash of its work keys, so invocations of one study
definition share one queue; another seed list or other code makes another queue (finished cells are still
found in MLflow and skipped). A COMPLETE trial's value is the run's wall time in seconds: Optuna needs a
value for a complete trial; nothing optimises it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from typing import Any

log = logging.getLogger("studies")

# We use Optuna's heartbeat with ask/tell (a thread of ours renews it) rather than with Study.optimize, which
# Optuna warns about; and its heartbeat arguments are marked experimental. Both warnings say nothing to a user.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", message=".*heartbeat_interval.* is an experimental feature")
warnings.filterwarnings("ignore", message=".*grace_period.* is an experimental feature")
warnings.filterwarnings("ignore", message=".*heartbeat_stale_trial_callback.* is an experimental feature")

ATTR_KEY = "dset.queue_key"            # what the trial stands for (a cell fingerprint, a stage-1 key)
ATTR_LABEL = "dset.cell"               # the cell id, for people reading the storage
ATTR_HOST = "dset.host"                # who claimed the trial: host and process id
ATTR_PID = "dset.pid"
ATTR_ERROR = "dset.error"              # why the work failed
ATTR_YIELDED = "dset.yielded_to"       # a duplicate claim, dropped: the trial number that has the work
ATTR_EMPTY = "dset.empty_claim"        # ask() found the queue empty (another invocation took the last item)
ATTR_REQUEUED_FROM = "dset.requeued_from"  # a dead worker's trial this one re-enqueues
ATTR_RETRY_OF = "dset.retry_of"        # the first trial of a chain of re-enqueued trials
CARRIED = (ATTR_KEY, ATTR_LABEL, ATTR_RETRY_OF)


def heartbeat_seconds() -> int:
    """How often a worker's claim is renewed in an RDB storage ($DSET_QUEUE_HEARTBEAT_S, default 30); a claim
    without a heartbeat for four times that is taken for dead."""
    return max(1, int(os.environ.get("DSET_QUEUE_HEARTBEAT_S", "30")))


def queue_name(study_name: str, part: str, keys: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]
    return f"{study_name}-{part}-{digest}"


def requeue(study, trial, why: str = "its worker died") -> None:
    """Enqueue a trial again whose worker died or stopped: the same parameters and work key (Optuna's
    ``heartbeat_stale_trial_callback`` signature)."""
    attrs = {k: trial.user_attrs[k] for k in CARRIED if k in trial.user_attrs}
    attrs.setdefault(ATTR_RETRY_OF, trial.number)
    attrs[ATTR_REQUEUED_FROM] = trial.number
    study.enqueue_trial(dict(trial.params), user_attrs=attrs, skip_if_exists=False)
    log.info("trial %d (%s) enqueued again: %s", trial.number, attrs.get(ATTR_LABEL, dict(trial.params)), why)


def requeued_numbers(trials) -> set[int]:
    """Numbers of trials that were re-enqueued (a dead worker's): they do not count as attempts."""
    return {t.user_attrs[ATTR_REQUEUED_FROM] for t in trials if ATTR_REQUEUED_FROM in t.user_attrs}


def reap_dead(ostudy, my_host: str) -> list[int]:
    """Fail the RUNNING trials whose worker is dead and enqueue them again; returns their numbers.

    Dead: claimed by a process of this host that no longer exists, or (RDB storages) without a heartbeat
    for the grace period, on any host. Two invocations reaping at once cannot both re-enqueue one trial:
    only one of them moves it from RUNNING to FAIL."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from .tracking import pid_alive

    reaped: list[int] = []
    storage = ostudy._storage  # Study has no public accessor for its storage
    for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get(ATTR_HOST) != my_host or ATTR_PID not in t.user_attrs:
            continue  # another machine's worker: only its heartbeat can tell
        if pid_alive(int(t.user_attrs[ATTR_PID])):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another invocation reaped it first
        requeue(ostudy, t)
        reaped.append(t.number)
    before = {t.number for t in ostudy.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():  # fail_stale_trials is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(ostudy)  # heartbeat: calls requeue() through the storage's callback
    reaped += sorted({t.number for t in ostudy.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before
                     - set(reaped))
    return reaped



class Heartbeat:
    """Renews this process's claims in an RDB storage every :func:`heartbeat_seconds`, from a daemon thread
    (the main thread may be busy training). A journal storage has no heartbeat: claims there are checked by
    process id (one machine)."""

    def __init__(self, storage) -> None:
        from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

        self.storage = storage
        self.enabled = isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        if not self.enabled:
            return
        self.storage.record_heartbeat(trial_id)
        with self.lock:
            self.trial_ids.add(trial_id)
        if self.thread is None:
            self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
            self.thread.start()

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while True:
            time.sleep(heartbeat_seconds())
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - a storage hiccup must not kill the thread
                    log.warning("heartbeat of trial %d failed: %s", trial_id, exc)


class WorkQueue:
    """One queue of work items (key -> label) in an Optuna study of the given storage."""

    def __init__(self, desc: dict, name: str, host: str, pid: int, complete_means_done: bool = True) -> None:
        """``complete_means_done=False``: a COMPLETE trial does not settle its key for good (a stage-1 checkpoint
        is done only while its cached file exists: its key may be enqueued and run again)."""
        import optuna

        from .search import open_storage, quiet_optuna

        quiet_optuna()
        self.name, self.host, self.pid = name, host, pid
        self.complete_means_done = complete_means_done
        storage = open_storage(desc, heartbeat=True)
        self.study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
        self.heartbeat = Heartbeat(self.study._storage)

    # ----- reading
    def trials(self) -> list:
        return self.study.get_trials(deepcopy=False)

    def by_key(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for t in self.trials():
            key = t.user_attrs.get(ATTR_KEY)
            if key is not None:
                out.setdefault(key, []).append(t)
        return out

    def outstanding(self, keys) -> tuple[int, int]:
        """(WAITING, RUNNING) trials among ``keys``' that are not yet complete."""
        from optuna.trial import TrialState

        waiting = running = 0
        for key, ts in self.by_key().items():
            if key not in keys or self.complete_means_done and any(t.state == TrialState.COMPLETE for t in ts):
                continue
            waiting += sum(t.state == TrialState.WAITING for t in ts)
            running += sum(t.state == TrialState.RUNNING for t in ts)
        return waiting, running

    # ----- writing
    def fill(self, items: dict[str, str]) -> list[str]:
        """Enqueue every item (key -> label) that has no complete or live trial; returns the keys enqueued."""
        from optuna.trial import TrialState

        have = self.by_key()
        settled = {TrialState.WAITING, TrialState.RUNNING}
        if self.complete_means_done:
            settled.add(TrialState.COMPLETE)
        added = []
        for key, label in items.items():
            if {t.state for t in have.get(key, [])} & settled:
                continue
            self.study.enqueue_trial({}, user_attrs={ATTR_KEY: key, ATTR_LABEL: label}, skip_if_exists=False)
            added.append(key)
        return added

    def claim(self, keys) -> Any | None:
        """Claim the next WAITING item among ``keys``: its Trial (user attribute ATTR_KEY says which), or None
        when none is waiting."""
        from optuna.trial import TrialState

        while True:
            if self.outstanding(keys)[0] == 0:
                return None
            trial = self.study.ask()
            key = trial.user_attrs.get(ATTR_KEY)
            if key is None:  # the queue emptied between the check and ask(): ask() made a fresh trial
                trial.set_user_attr(ATTR_EMPTY, True)
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr(ATTR_HOST, self.host)
            trial.set_user_attr(ATTR_PID, self.pid)
            self.heartbeat.add(trial._trial_id)
            holder = self._holder(key, trial.number)
            if holder is not None:
                trial.set_user_attr(ATTR_YIELDED, holder)
                self._end(trial, TrialState.FAIL)
                continue
            return trial

    def _holder(self, key: str, number: int) -> int | None:
        """The trial that has ``key``'s work instead of trial ``number``: a COMPLETE one, or a lower-numbered
        WAITING or RUNNING one (None: ``number`` has it)."""
        from optuna.trial import TrialState

        for t in sorted(self.by_key().get(key, []), key=lambda t: t.number):
            if t.number == number:
                continue
            if t.state == TrialState.COMPLETE and self.complete_means_done:
                return t.number
            if t.number < number and t.state in (TrialState.WAITING, TrialState.RUNNING):
                return t.number
        return None

    def complete(self, trial, seconds: float) -> None:
        self._end(trial, None, value=float(seconds))

    def fail(self, trial, error: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(ATTR_ERROR, error[:5000])
        self._end(trial, TrialState.FAIL)

    def _end(self, trial, state, value: float | None = None) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        self.heartbeat.remove(trial._trial_id)
        try:
            if value is not None:
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=state)
        except (UpdateFinishedTrialError, RuntimeError, ValueError) as exc:
            # reaped meanwhile (taken for dead): the re-enqueued copy finds the run finished in MLflow
            log.warning("queue %s: trial %d already ended elsewhere (%s)", self.name, trial.number, exc)

    def release(self, trial) -> None:
        """Give a claim back (this invocation is stopping): the trial is told FAIL and enqueued again, so that
        another invocation continues its work at once."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        self.heartbeat.remove(trial._trial_id)
        try:
            if self.study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                requeue(self.study, self.study._storage.get_trial(trial._trial_id), why="this invocation stopped")
        except UpdateFinishedTrialError:
            pass

    def reap(self) -> list[int]:
        return reap_dead(self.study, self.host)

    def error_of(self, key: str) -> str | None:
        """The newest error recorded for ``key``."""
        errors = [t for t in self.by_key().get(key, []) if ATTR_ERROR in t.user_attrs]
        return max(errors, key=lambda t: t.number).user_attrs[ATTR_ERROR] if errors else None
