"""What the scheduler hands a worker (a :class:`Job`: one run of a study) and what comes back (a
:class:`RunResult`, which is also a line of the study's summary)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
