"""Executing one run of a study (a :class:`Job`): in this process, or in a spawned worker process.

:func:`execute` trains with :func:`dset.engine.train.fit` into an MLflow child run created beforehand by
the invoking process (so two workers can never create the same run), and returns a small result dict.
:class:`WorkerPool` runs up to N jobs at once in ``spawn`` processes; each limits torch to
``max(1, cores // N)`` threads, runs on its slot's device (``studies.devices``: a GPU of its own through
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
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from dset.config import flatten

from . import mlflow_schema as S

log = logging.getLogger("studies")


@dataclass
class Job:
    cell_id: str
    config: dict                     # Config.to_dict() of the resolved configuration
    out_dir: str
    run_id: str
    tracking_uri: str
    resume: bool
    title: str
    threads: int | None = None       # torch threads (None: leave torch's default)
    progress: bool = True            # fit's per-epoch progress bar
    latency_note: str = ""
    optuna: dict | None = None       # {"storage": desc, "study_name", "trial_id", "prune": bool, "pruner": {...}}
    parent_pid: int | None = None
    env: dict = field(default_factory=dict)    # environment of the worker process (CUDA_VISIBLE_DEVICES)
    device_shared: bool | None = None          # the run's device is shared with other workers of this invocation
    meta: dict = field(default_factory=dict)   # whatever the scheduler wants back with the result


def _status_of(summary: dict | None, pruned: bool) -> str:
    if pruned:
        return "pruned"
    return (summary or {}).get("status", "failed")


def execute(job: Job) -> dict[str, Any]:
    """Train one run into its MLflow run; never raises except KeyboardInterrupt (the run is then KILLED)."""
    import torch

    from dset.config import config_from_dict
    from dset.engine.train import fit

    from . import tracking as T

    if job.threads:
        torch.set_num_threads(job.threads)
    c = T.client(job.tracking_uri)
    T.retry(c.update_run, job.run_id, status="RUNNING")
    T.delete_tag(c, job.run_id, S.TAG_ERROR)
    if job.device_shared is not None:
        T.set_tags(c, job.run_id, {S.TAG_DEVICE_SHARED: str(job.device_shared).lower()})
    monitor = T.system_metrics_monitor(job.run_id, job.tracking_uri, resume=job.resume)
    out = Path(job.out_dir)
    cb = T.MlflowCallback(c, job.run_id, out, job.title, job.latency_note)
    callbacks = [cb]
    pruning = None
    t0 = time.time()
    result: dict[str, Any] = {"cell": job.cell_id, "run_id": job.run_id, "meta": job.meta}
    try:
        cfg = config_from_dict(job.config)
        if not job.progress:
            from dset.config import load_config

            cfg = load_config(cfg, ["run.progress=false"])
        if job.optuna and job.optuna.get("prune"):
            from .search import PruningCallback

            pruning = PruningCallback(job.optuna["storage"], job.optuna["study_name"], job.optuna["trial_id"],
                                      job.optuna["pruner"])
            callbacks.append(pruning)
        try:
            summary = fit(cfg, out, callbacks=callbacks, resume=job.resume)
        finally:
            if monitor is not None:
                monitor.finish()
    except KeyboardInterrupt:
        T.set_tags(c, job.run_id, {S.TAG_STATUS: "interrupted"})
        T.retry(c.set_terminated, job.run_id, status="KILLED")
        raise
    except BaseException as exc:  # noqa: BLE001 - a failed run is recorded; the study goes on
        msg = f"{type(exc).__name__}: {exc}"
        log.debug("run %s failed:\n%s", job.cell_id, traceback.format_exc())
        try:
            if cb.summary is None:  # failed before on_train_start: log the params we have
                T.log_params(c, job.run_id, flatten(job.config), T.retry(c.get_run, job.run_id).data.params)
            T.set_tags(c, job.run_id, {S.TAG_STATUS: "failed", S.TAG_ERROR: msg})
            T.retry(c.set_terminated, job.run_id, status="FAILED")
        except Exception as exc2:  # noqa: BLE001
            log.warning("could not record the failure of %s in MLflow: %s", job.cell_id, exc2)
        result.update(status="failed", error=msg, metrics={}, seconds=time.time() - t0)
        return result
    status = _status_of(summary, pruning is not None and pruning.pruned)
    if status == "pruned":
        T.set_tags(c, job.run_id, {S.TAG_STOP_REASON: "optuna_pruned"})
    T.retry(c.set_terminated, job.run_id, status="FINISHED")
    metrics = T.final_metrics(summary, T.read_records(out / "metrics.jsonl"))
    result.update(status=status, error=None, metrics=metrics, seconds=time.time() - t0,
                  stop_reason=summary.get("stop_reason"))
    return result


# ------------------------------------------------------------------------------------------ processes
def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the invoking process is gone (its run stays RUNNING and is resumed later)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def _interrupt_once(signum, frame) -> None:
    """SIGTERM/SIGINT -> one KeyboardInterrupt (the run is then marked KILLED); later signals are ignored
    so that the clean-up is not interrupted in turn."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def worker_main(job: Job, conn) -> None:
    """Entry point of a spawned worker process: run the job, send the result back."""
    os.environ.update(job.env)  # before anything starts CUDA: the worker's GPU
    signal.signal(signal.SIGTERM, _interrupt_once)
    signal.signal(signal.SIGINT, _interrupt_once)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from .tracking import quiet_mlflow

    quiet_mlflow()
    if job.parent_pid:
        threading.Thread(target=_watch_parent, args=(job.parent_pid,), daemon=True).start()
    try:
        result = execute(job)
    except KeyboardInterrupt:
        result = {"cell": job.cell_id, "run_id": job.run_id, "meta": job.meta, "status": "interrupted",
                  "error": "KeyboardInterrupt", "metrics": {}}
    except BaseException as exc:  # noqa: BLE001
        result = {"cell": job.cell_id, "run_id": job.run_id, "meta": job.meta, "status": "failed",
                  "error": f"{type(exc).__name__}: {exc}", "metrics": {}}
    try:
        conn.send(result)
    finally:
        conn.close()


class WorkerPool:
    """Up to ``len(slots)`` jobs at once, each in its own ``spawn`` process on its slot's device."""

    def __init__(self, slots: list) -> None:
        self.slots = list(slots)
        self.size = len(slots)
        self.free_slots = list(range(self.size))
        self.ctx = mp.get_context("spawn")
        self.running: dict[Any, tuple[Job, Any, Any, int]] = {}   # sentinel -> (job, process, connection, slot)

    @property
    def free(self) -> int:
        return len(self.free_slots)

    def start(self, job: Job) -> None:
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
        self.running[proc.sentinel] = (job, proc, recv, slot)

    def wait_any(self, timeout: float | None = None) -> list[dict]:
        """Block until at least one job ends (or ``timeout`` seconds pass: then []); the results (a worker
        that died without one: failed)."""
        ready = wait(list(self.running), timeout=timeout)
        results = []
        for sentinel in ready:
            job, proc, recv, slot = self.running.pop(sentinel)
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
                result = {"cell": job.cell_id, "run_id": job.run_id, "meta": job.meta, "status": "failed",
                          "error": f"worker process exited with code {proc.exitcode} without a result",
                          "metrics": {}, "worker_died": True}
            results.append(result)
        return results

    def terminate(self, grace_s: float = 30.0) -> None:
        """Stop the running jobs: SIGTERM (a worker saves its resume state, marks its run KILLED and exits),
        SIGKILL after ``grace_s``. A run left RUNNING is resumed by the next invocation all the same."""
        for _job, proc, _recv, _slot in self.running.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.time() + grace_s
        for _job, proc, _recv, _slot in self.running.values():
            proc.join(timeout=max(0.1, deadline - time.time()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.running.clear()
        self.free_slots = list(range(self.size))
