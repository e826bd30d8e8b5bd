"""Executing the runs of a study (:class:`~studies.execution.jobs.Job`): in this process, or in spawned worker
processes.

:func:`execute` trains with :func:`dset.engine.loop.fit` into an MLflow child run created beforehand by
the invoking process (so two workers can never create the same run), and returns a
:class:`~studies.execution.jobs.RunResult`. The two executors share one interface (``start``, ``wait_any``, ``free``,
``running``, ``terminate``): :class:`InlineExecutor` runs one job at a time in this process;
:class:`WorkerPool` runs up to N jobs at once in ``spawn`` processes; each limits torch to
``max(1, cores // N)`` threads, runs on its slot's device (:mod:`.devices`: a GPU of its own through
CUDA_VISIBLE_DEVICES) and exits when the invoking process disappears. MLflow's system metrics (CPU, memory,
and GPU utilisation and memory where there is one) are logged to the run while it trains.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from dset.config import config_from_dict, flatten, with_values

from .. import stop_signals
from ..tracking import mlflow_runs, mlflow_store, schema
from ..tracking.callback import MlflowCallback, final_metrics, system_metrics_monitor
from .devices import Slot
from .jobs import Job, RunResult
from .search import PruningCallback

log = logging.getLogger("studies")


def _status_of(summary: dict | None, pruned: bool) -> str:
    if pruned:
        return "pruned"
    return (summary or {}).get("status", "failed")


def _record_failure(c, job: Job, logged_params: bool, error: str) -> None:
    """A run that raised: FAILED with its error (and its parameters, when it failed before logging them)."""
    try:
        if not logged_params:
            logged = mlflow_store.retry(c.get_run, job.run_id).data.params
            mlflow_runs.log_params(c, job.run_id, flatten(job.config), logged)
        mlflow_runs.set_tags(c, job.run_id, {schema.TAG_STATUS: "failed", schema.TAG_ERROR: error})
        mlflow_store.retry(c.set_terminated, job.run_id, status="FAILED")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record the failure of %s in MLflow: %s", job.cell_id, exc)


def _pruning_callback(job: Job):
    """Optuna's per-epoch pruning for a trial that asks for it (None otherwise)."""
    if not (job.optuna and job.optuna.get("prune")):
        return None
    return PruningCallback(job.optuna["storage"], job.optuna["study_name"], job.optuna["trial_id"],
                           job.optuna["pruner"])


def _train(job: Job, callbacks: list) -> dict:
    """``fit`` with the job's configuration (without the progress bar where the job says so)."""
    from dset.engine.loop import fit

    cfg = config_from_dict(job.config)
    if not job.progress:
        cfg = with_values(cfg, {"run.progress": False})
    return fit(cfg, Path(job.out_dir), callbacks=callbacks, resume=job.resume)


def execute(job: Job) -> RunResult:
    """Train one run into its MLflow run; never raises except KeyboardInterrupt (the run is then KILLED)."""
    import torch

    if job.threads:
        torch.set_num_threads(job.threads)
    c = mlflow_store.client(job.tracking_uri)
    mlflow_store.retry(c.update_run, job.run_id, status="RUNNING")
    mlflow_runs.delete_tag(c, job.run_id, schema.TAG_ERROR)
    if job.device_shared is not None:
        mlflow_runs.set_tags(c, job.run_id, {schema.TAG_DEVICE_SHARED: str(job.device_shared).lower()})
    monitor = system_metrics_monitor(job.run_id, job.tracking_uri, resume=job.resume)
    out = Path(job.out_dir)
    cb = MlflowCallback(c, job.run_id, out, job.title, job.latency_note)
    pruning = None
    try:
        try:
            pruning = _pruning_callback(job)
            summary = _train(job, [cb] if pruning is None else [cb, pruning])
        finally:
            if monitor is not None:
                monitor.finish()
    except KeyboardInterrupt:
        mlflow_runs.set_tags(c, job.run_id, {schema.TAG_STATUS: "interrupted"})
        mlflow_store.retry(c.set_terminated, job.run_id, status="KILLED")
        raise
    except BaseException as exc:  # noqa: BLE001 - a failed run is recorded; the study goes on
        msg = f"{type(exc).__name__}: {exc}"
        log.debug("run %s failed:\n%s", job.cell_id, traceback.format_exc())
        _record_failure(c, job, cb.summary is not None, msg)  # before on_train_start: no params logged yet
        return RunResult.of_job(job, "failed", error=msg)
    status = _status_of(summary, pruning is not None and pruning.pruned)
    if status == "pruned":
        mlflow_runs.set_tags(c, job.run_id, {schema.TAG_STOP_REASON: "optuna_pruned"})
    mlflow_store.retry(c.set_terminated, job.run_id, status="FINISHED")
    return RunResult.of_job(job, status, metrics=final_metrics(summary))


# ------------------------------------------------------------------------------------------ processes
def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the invoking process is gone (its run stays RUNNING and is resumed later)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def worker_main(job: Job, conn) -> None:
    """Entry point of a spawned worker process: run the job, send the result back."""
    os.environ.update(job.env)  # before anything starts CUDA: the worker's GPU
    # SLURM signals every process of a task: a worker stops on the invocation's SIGUSR2 (time limit ahead) too,
    # saving its run's resume state and marking the run KILLED
    stop_signals.install((*stop_signals.STOP_SIGNALS, signal.SIGINT))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    mlflow_store.quiet_mlflow()
    if job.parent_pid:
        threading.Thread(target=_watch_parent, args=(job.parent_pid,), daemon=True).start()
    try:
        result = execute(job)
    except KeyboardInterrupt:
        result = RunResult.of_job(job, "interrupted", error="KeyboardInterrupt")
    except BaseException as exc:  # noqa: BLE001
        result = RunResult.of_job(job, "failed", error=f"{type(exc).__name__}: {exc}")
    try:
        conn.send(result)
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ executors
class InlineExecutor:
    """One job at a time in this process (``--workers 1``): the per-epoch progress bar stays visible. Its
    device was chosen before anything started CUDA (``main`` sets CUDA_VISIBLE_DEVICES). ``tag``: whatever
    the caller wants back with the job's result."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.job: tuple[Job, Any] | None = None

    @property
    def free(self) -> int:
        return 0 if self.job else 1

    @property
    def running(self) -> int:
        return 1 if self.job else 0

    def start(self, job: Job, tag: Any) -> None:
        job.device_shared = self.slot.shared
        job.latency_note = self.slot.note()
        self.job = (job, tag)

    def wait_any(self, timeout: float | None = None) -> list[tuple[Any, RunResult]]:
        """Run the job (``timeout`` does not apply: the job runs here) and return its tag and result."""
        (job, tag), self.job = self.job, None
        return [(tag, execute(job))]

    def terminate(self) -> None:
        self.job = None


class WorkerPool:
    """Up to ``len(slots)`` jobs at once, each in its own ``spawn`` process on its slot's device."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = list(slots)
        self.free_slots = list(range(len(self.slots)))
        self.ctx = mp.get_context("spawn")
        # process sentinel -> (job, tag, process, connection, slot index)
        self.processes: dict[Any, tuple[Job, Any, Any, Any, int]] = {}

    @property
    def free(self) -> int:
        return len(self.free_slots)

    @property
    def running(self) -> int:
        return len(self.processes)

    def start(self, job: Job, tag: Any) -> None:
        slot = self.free_slots.pop(0)
        device = self.slots[slot]
        job.env = {**job.env, **device.env}
        job.device_shared = device.shared
        job.latency_note = device.note()
        recv, send = self.ctx.Pipe(duplex=False)
        # not a daemon: a worker may start data-loader processes (data.num_workers > 0); it exits by itself
        # when this process disappears (_watch_parent), and terminate() ends it on Ctrl-C
        proc = self.ctx.Process(target=worker_main, args=(job, send), name=f"study-worker-{job.cell_id}", daemon=False)
        proc.start()
        send.close()
        self.processes[proc.sentinel] = (job, tag, proc, recv, slot)

    def wait_any(self, timeout: float | None = None) -> list[tuple[Any, RunResult]]:
        """Block until at least one job ends (or ``timeout`` seconds pass: then []); their tags and results (a
        worker that died without one: failed)."""
        ready = wait(list(self.processes), timeout=timeout)
        finished = []
        for sentinel in ready:
            job, tag, proc, recv, slot = self.processes.pop(sentinel)
            self.free_slots.append(slot)
            result = None
            try:
                if recv.poll():
                    result = recv.recv()
            except (EOFError, OSError):
                result = None
            proc.join()
            recv.close()
            if result is None:
                result = RunResult.of_job(job, "failed", worker_died=True,
                                          error=f"worker process exited with code {proc.exitcode} without a result")
            finished.append((tag, result))
        return finished

    def terminate(self, grace_s: float = 30.0) -> None:
        """Stop the running jobs: SIGTERM (a worker saves its resume state, marks its run KILLED and exits),
        SIGKILL after ``grace_s``. A run left RUNNING is resumed by the next invocation all the same."""
        for _job, _tag, proc, _recv, _slot in self.processes.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.time() + grace_s
        for _job, _tag, proc, _recv, _slot in self.processes.values():
            proc.join(timeout=max(0.1, deadline - time.time()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.processes.clear()
        self.free_slots = list(range(len(self.slots)))


def make_executor(slots: list[Slot]) -> InlineExecutor | WorkerPool:
    """One worker: jobs run in this process; more: each in a worker process of its own."""
    return InlineExecutor(slots[0]) if len(slots) == 1 else WorkerPool(slots)
