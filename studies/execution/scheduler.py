"""The executor loop that grids, stage-1 trainings and Optuna searches share: start the next job while a
worker is free, hand each result back to where the job came from, until no job is left and none runs.

Where jobs come from is a :class:`JobSource`: a :class:`QueueSource` claims the items of a
:class:`~studies.execution.queue.WorkQueue` (grid cells, stage-1 trainings) that any number of invocations share;
a search asks Optuna for trials (:mod:`.search_run`). A :class:`Scheduler` runs the sources of an invocation one
after the other on its executor, and stops them on Ctrl-C."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..console import say
from .claims import ATTR_KEY
from .jobs import Job, RunResult
from .queue import WorkQueue

log = logging.getLogger("studies")

POLL_S = 2.0   # how often an idle invocation looks at the queue for work, or for claims of dead workers


@dataclass
class Started:
    """A job on its way, and what its source needs back with the result."""

    job: Job
    trial: Any                    # its queue claim or its Optuna trial
    item: Any = None              # what it trains: a Cell, a Stage1
    started_at: float = field(default_factory=time.time)

    @property
    def seconds(self) -> float:
        return time.time() - self.started_at


class Executor(Protocol):
    """:class:`~studies.execution.workers.InlineExecutor` or :class:`~studies.execution.workers.WorkerPool`."""

    @property
    def free(self) -> int: ...

    @property
    def running(self) -> int: ...

    def start(self, job: Job, tag: Any) -> None: ...

    def wait_any(self, timeout: float | None = None) -> list[tuple[Any, RunResult]]: ...

    def terminate(self) -> None: ...


class JobSource(Protocol):
    poll_s: float | None          # how long to wait for a result while workers are free (None: until one comes)

    def next_job(self) -> Started | None:
        """The next job to start (None: none now)."""

    def finish(self, started: Started, result: RunResult) -> None:
        """Record a job's result."""

    def keep_waiting(self, running: int) -> bool:
        """Nothing was started or finished: whether to go on (after a pause, maybe) or stop."""


def run_jobs(executor: Executor, source: JobSource) -> None:
    """Start the source's jobs while the executor has room and hand their results back, until the source has
    no job to start and gives up waiting."""
    while True:
        while executor.free > 0:
            started = source.next_job()
            if started is None:
                break
            executor.start(started.job, started)
        if executor.running:
            finished = executor.wait_any(timeout=source.poll_s if executor.free > 0 else None)
            for started, result in finished:
                source.finish(started, result)
            if finished or executor.free == 0:
                continue
        if not source.keep_waiting(executor.running):
            return


class QueueSource:
    """Jobs from a shared queue's items (key -> object): claimed one at a time until none is waiting or running
    anywhere. While other invocations still run items, this one waits and takes over those whose worker died
    (``WorkQueue.reap``). Subclasses say how an item becomes a job (:meth:`start`) and what its result means
    (:meth:`finish_item`)."""

    poll_s: float | None = POLL_S

    def __init__(self, queue: WorkQueue, items: dict[str, Any], what: str) -> None:
        self.queue = queue
        self.items = items
        self.keys = set(items)
        self.what = what                       # for the waiting message: "cells", "stage-1 trainings"
        self.claims: dict[int, Any] = {}       # queue trials this invocation holds, by number
        self.said_waiting = False

    def start(self, trial, item) -> Job | None:
        """The job of a claimed item, or None when the claim was settled without one."""
        raise NotImplementedError

    def finish_item(self, started: Started, result: RunResult) -> None:
        raise NotImplementedError

    def next_job(self) -> Started | None:
        while True:
            trial = self.queue.claim(self.keys)
            if trial is None:
                return None
            item = self.items[trial.user_attrs[ATTR_KEY]]
            job = self.start(trial, item)
            if job is None:
                continue
            self.claims[trial.number] = trial
            return Started(job, trial, item)

    def finish(self, started: Started, result: RunResult) -> None:
        self.claims.pop(started.trial.number)
        self.finish_item(started, result)

    def keep_waiting(self, running: int) -> bool:
        waiting, running_anywhere = self.queue.outstanding(self.keys)
        elsewhere = running_anywhere - len(self.claims)
        if waiting:
            return True
        if elsewhere <= 0 and not running:
            return False
        if elsewhere > 0 and self.queue.reap():
            return True
        if elsewhere > 0 and not self.said_waiting:
            say(f"waiting for {elsewhere} {self.what} that other invocations run (taken over if they die)")
            self.said_waiting = True
        if not running:
            time.sleep(POLL_S)
        return True

    def release_claims(self) -> None:
        """Stopping: give this invocation's claims back to the queue, for others (or the next run) to resume."""
        for trial in list(self.claims.values()):
            try:
                self.queue.release(trial)
            except Exception as exc:  # noqa: BLE001 - the next invocation reaps them by process id anyway
                log.warning("could not give back queue trial %d: %s", trial.number, exc)
        self.claims.clear()


class Scheduler:
    """Runs an invocation's job sources on its executor, one after the other; :meth:`stop` (Ctrl-C, SIGTERM) ends
    the workers and gives the claims of the queue being worked on back."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.queue_source: QueueSource | None = None    # the queue whose items are being claimed now

    def run(self, source: JobSource) -> None:
        if isinstance(source, QueueSource):
            self.queue_source = source
        run_jobs(self.executor, source)

    def stop(self) -> None:
        self.executor.terminate()
        if self.queue_source is not None:
            self.queue_source.release_claims()
