"""Claims on trials of Optuna's storage: who holds a trial (host and process id, user attributes), whether its
worker is dead (its process gone on this host, or, with an RDB storage, no heartbeat on any host), and enqueueing
the trial of a dead worker again so that its work is taken over. The work queues (:mod:`.queue`) and the search
(:mod:`.search`) both claim this way; docs/studies.md says why it is safe.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings

from ..processes import pid_alive

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
