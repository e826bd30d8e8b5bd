"""The signals that stop a running study as Ctrl-C does: a scheduler's SIGTERM (``scancel``, preemption) and
SLURM's warning before the time limit (SIGUSR2, ``sbatch --signal=USR2@S``). Each running cell saves its resume
state and is marked KILLED, the queue's claims go back; which signal did it is remembered, for a SLURM task to
requeue itself after SIGUSR2 (studies/slurm/task.py)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
stopped_by: int | None = None   # the signal that stopped this process's study (None: none did)


def _terminate(signum, frame):
    """A stop signal -> KeyboardInterrupt; a second signal while the study stops is ignored."""
    global stopped_by
    stopped_by = signum
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def install() -> None:
    """From now on, a stop signal ends the study (forked processes, e.g. data-loader workers, inherit it)."""
    global stopped_by
    stopped_by = None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _terminate)
