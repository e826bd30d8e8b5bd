"""A study's work as a queue in Optuna's storage, so that any number of invocations share it: each unit of work
(a grid cell, a stage-1 training) is a trial enqueued WAITING, claimed by exactly one invocation with
``Study.ask()`` and told COMPLETE or FAIL when the work ends (docs/studies.md: how, and why that is safe).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..processes import pid_alive
from .claims import (
    ATTR_EMPTY,
    ATTR_ERROR,
    ATTR_HOST,
    ATTR_KEY,
    ATTR_LABEL,
    ATTR_PID,
    ATTR_YIELDED,
    Heartbeat,
    reap_dead,
    requeue,
)
from .optuna_storage import describe_storage, open_storage, quiet_optuna

log = logging.getLogger("studies")


def queue_name(study_name: str, part: str, keys: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]
    return f"{study_name}-{part}-{digest}"


@dataclass(frozen=True)
class Queues:
    """Where an invocation's queues live (an Optuna storage descriptor, :mod:`.optuna_storage`) and who claims
    their items: the study's queues of cells and of stage-1 trainings are opened here."""

    desc: dict
    study_name: str
    host: str
    pid: int

    def open(self, part: str, keys: list[str], complete_means_done: bool = True) -> WorkQueue:
        """The queue of the study's ``part`` ("cells", "stage1") over these work keys."""
        return WorkQueue(self.desc, queue_name(self.study_name, part, keys), self.host, self.pid,
                         complete_means_done=complete_means_done)

    def describe(self) -> str:
        return describe_storage(self.desc)


class WorkQueue:
    """One queue of work items (key -> label) in an Optuna study of the given storage."""

    def __init__(self, desc: dict, name: str, host: str, pid: int, complete_means_done: bool = True) -> None:
        """``complete_means_done=False``: a COMPLETE trial does not settle its key for good (a stage-1 checkpoint
        is done only while its cached file exists: its key may be enqueued and run again)."""
        import optuna

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


@dataclass(frozen=True)
class ClaimView:
    """Where a queued item stands, as ``--status`` reads it: its newest trial's state (WAITING, RUNNING, COMPLETE,
    FAIL), who claimed it, and whether that claimer is known to be dead (no heartbeat in an RDB storage, or its
    process gone on this host)."""

    state: str
    host: str | None = None
    pid: int | None = None
    dead: bool = False


def read_claims(desc: dict, name: str, my_host: str) -> dict[str, ClaimView]:
    """``{work key: ClaimView}`` of queue ``name`` (its newest trial per key), read without changing anything;
    empty when the queue does not exist (nothing has run)."""
    import optuna

    quiet_optuna()
    if "journal" in desc and not Path(desc["journal"]).exists():
        return {}
    storage = open_storage(desc, heartbeat=True)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {}
    stale = set()
    if hasattr(storage, "_get_stale_trial_ids"):   # Optuna's heartbeat (RDB storages): claims without a beat
        stale = set(storage._get_stale_trial_ids(study._study_id))
    newest: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get(ATTR_KEY)
        if key is not None and (key not in newest or t.number > newest[key].number):
            newest[key] = t
    views = {}
    for key, t in newest.items():
        host, pid = t.user_attrs.get(ATTR_HOST), t.user_attrs.get(ATTR_PID)
        dead = t.state.name == "RUNNING" and (t._trial_id in stale
                                              or host == my_host and pid is not None and not pid_alive(int(pid)))
        views[key] = ClaimView(t.state.name, host, None if pid is None else int(pid), dead)
    return views
