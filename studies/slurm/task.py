"""What each task of a study's SLURM job array runs (pickled by submitit, called on the node): one invocation of
the study, ``python -m studies.run STUDY ... --storage URL``, in the task's own process. Stopped by SLURM's warning
signal (SIGUSR2, ``slurm.signal_delay_s`` before the time limit), the invocation has saved its cell's resume state
and given its claim back; the task then requeues itself (``scontrol requeue``) and, running again, takes up the
queue where it was. Cancelled (``scancel``: SIGTERM), it stops the same way and is not requeued: the other tasks
take its cell over."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable

from .. import stop_signals
from ..tracking.mlflow_store import redact


class StudyTaskError(RuntimeError):
    """The invocation ended with a failed run or an error: the array task is recorded as FAILED by SLURM."""


class StudyTask:
    def __init__(self, entry: Callable[[list[str]], int], argv: list[str], cwd: str, env: dict[str, str],
                 requeue: bool) -> None:
        self.entry = entry           # studies.run.main (pickled by reference)
        self.argv = list(argv)       # the arguments of ``python -m studies.run`` (no --slurm, --wait)
        self.cwd = cwd               # the submission's folder: relative out_dir and data paths mean the same
        self.env = dict(env)         # MLFLOW_TRACKING_URI and the like, as the submission resolved them
        self.requeue = requeue

    def __call__(self, index: int) -> int:
        os.chdir(self.cwd)
        os.environ.update(self.env)
        code = self.entry(self.argv)
        if stop_signals.stopped_by == signal.SIGUSR2 and self.requeue:
            requeue_this_job()
            return code
        if code != 0:
            command = redact(shlex.join(["python", "-m", "studies.run", *self.argv]))
            raise StudyTaskError(f"task {index}: {command} exited with {code}")
        return code


def requeue_this_job() -> None:
    """Put this job back in SLURM's queue (it is ended and started again from its script)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("slurm: signalled outside a SLURM job: nothing to requeue", file=sys.stderr)
        return
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        print(f"slurm: scontrol requeue {job} failed (exit {out.returncode}): {out.stderr.strip()}; the other "
              "tasks take its cell over", file=sys.stderr)
    else:
        print(f"slurm: job {job} requeued; its cell resumes from its last checkpoint", file=sys.stderr)
