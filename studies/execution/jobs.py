"""What the scheduler hands a worker (a :class:`Job`: one run of a study), how an invocation makes one
(:class:`JobMaker`), and what comes back (a :class:`RunResult`, which is also a line of the study's summary)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from dset.config import with_values
from dset.run_folder import RunFolder

from ..console import say
from ..planning.cells import Cell

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


@dataclass
class RunResult:
    """How one run of a study ended: what a worker sends back, and a line of the summary.

    ``status``: completed, stopped, pruned, failed or interrupted (a worker's); "done earlier" or "done
    elsewhere" for a run that this invocation found finished instead of running it."""

    cell: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    run_id: str | None = None
    trial: int | None = None         # the Optuna trial number
    worker_died: bool = False        # the worker process ended without sending a result

    @classmethod
    def of_job(cls, job: Job, status: str, error: str | None = None, metrics: dict[str, float] | None = None,
               worker_died: bool = False) -> RunResult:
        return cls(job.cell_id, status, metrics=metrics or {}, error=error, run_id=job.run_id,
                   worker_died=worker_died)

    @classmethod
    def found(cls, cell: Cell, run, status: str) -> RunResult:
        """The row of a cell whose finished MLflow ``run`` this invocation found instead of running it."""
        return cls(cell.id, status, metrics=dict(run.data.metrics), run_id=run.info.run_id, trial=cell.trial)

    @classmethod
    def failed_before_start(cls, cell: Cell, error: str, run_id: str) -> RunResult:
        """The row of a cell that could not run (invalid configuration, failed stage 1), recorded in ``run_id``."""
        return cls(cell.id, "failed", error=error, run_id=run_id, trial=cell.trial)


class JobMaker:
    """The jobs of one invocation: what they share (the study, the MLflow store, torch threads per worker, the
    progress bar, the invoking process that workers watch), a cell's job (stage 2: fine-tuned from its stage-1
    checkpoint) and the synthetic data they read, made once before the workers start."""

    def __init__(self, study_name: str, tracking_uri: str, workers: int, pid: int) -> None:
        self.study_name = study_name
        self.tracking_uri = tracking_uri
        self.workers = workers
        self.pid = pid
        self.threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None

    def job(self, cell_id: str, config: dict, out_dir: str, run_id: str, resume: bool, title: str,
            optuna: dict | None = None) -> Job:
        return Job(cell_id=cell_id, config=config, out_dir=out_dir, run_id=run_id, tracking_uri=self.tracking_uri,
                   resume=resume, title=f"{self.study_name} / {title}", threads=self.threads,
                   progress=self.workers == 1 and sys.stderr.isatty(), optuna=optuna, parent_pid=self.pid)

    def cell_job(self, cell: Cell, run_id: str, optuna: dict | None = None) -> Job:
        """The job of a cell (stage 2: fine-tuned from its stage-1 checkpoint); says that it starts."""
        resume_state = RunFolder(cell.out_dir).resume_state
        cfg = cell.config
        if cell.stage1 is not None and cell.stage1.checkpoint is not None:  # stage 2: fine-tune from stage 1
            cfg = with_values(cfg, {"model.checkpoint": str(cell.stage1.checkpoint.resolve())})
        job = self.job(cell.id, cfg.to_dict(), str(cell.out_dir), run_id, resume_state.is_file(),
                       f"{cell.id}: {cell.labels()['variant']}", optuna=optuna)
        trial = f" (trial {cell.trial})" if cell.trial is not None and cell.id != f"trial-{cell.trial}" else ""
        if job.resume:
            say(f"-> {cell.id}{trial}: resuming from {resume_state}")
        elif sys.stdout.isatty() or self.workers > 1:
            say(f"-> {cell.id}{trial}: {cell.labels()['variant']}, started")
        return job

    @staticmethod
    def prepare_data(cells: list[Cell]) -> None:
        """Generate each synthetic data set the runs use once, here, before workers start (they would
        otherwise all build the same one at the same time)."""
        from dset.data.loaders import data_paths

        seen = set()
        for cell in cells:
            if not cell.ok or cell.config.data.name != "synthetic":
                continue
            key = repr(cell.config.data.synthetic)
            if key in seen:
                continue
            seen.add(key)
            try:
                data_paths(cell.config)
            except Exception as exc:  # noqa: BLE001 - the runs report it themselves
                log.warning("synthetic data for %s: %s", cell.id, exc)
