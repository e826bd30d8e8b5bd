"""Which host an invocation runs on and whether a process still lives: what a queue claim and an MLflow run record
of the process that holds them, so that the work of a process that died is taken over."""

from __future__ import annotations

import os
import socket


def host() -> str:
    """The name an invocation records as its host ($DSET_HOSTNAME, else the machine's): process ids are
    checked only for claims of this host; other hosts' claims die by their heartbeat."""
    return os.environ.get("DSET_HOSTNAME") or socket.gethostname()


def slurm_job() -> str:
    """This process's SLURM job as ``squeue`` and ``sacct`` name it (``ARRAY_TASK`` for a task of an array), or
    ``none`` outside SLURM: recorded beside the host and process id, for ``--status``."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or "none"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
