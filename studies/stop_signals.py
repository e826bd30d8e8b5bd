"""The signals that stop a running study as Ctrl-C does: a scheduler's SIGTERM (``scancel``, preemption) and
SLURM's warning before the time limit (SIGUSR2, ``sbatch --signal=USR2@S``). Each running cell saves its resume
state and is marked KILLED, the queue's claims go back; which signal did it is remembered, for a SLURM task to
requeue itself after SIGUSR2 (studies/slurm/task.py)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
stopped_by: int | None = None   # the signal that stopped this process's study (None: none did)
_installed: tuple = ()          # the signals install() gave to _terminate


def _terminate(signum, frame):
    """A stop signal -> one KeyboardInterrupt; later ones are ignored, so that the clean-up is not interrupted."""
    global stopped_by
    stopped_by = signum
    for sig in _installed:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def install(signals: tuple = STOP_SIGNALS) -> None:
    """From now on, each of ``signals`` ends the study (forked processes, e.g. data-loader workers, inherit it);
    a worker process adds SIGINT, which Python's default already turns into KeyboardInterrupt in the invocation."""
    global stopped_by, _installed
    stopped_by, _installed = None, tuple(signals)
    for sig in _installed:
        signal.signal(sig, _terminate)
