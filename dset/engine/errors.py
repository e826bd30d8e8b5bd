"""How a run fails: :class:`NonFiniteLossError`, and :func:`error_message`, the one line that tells a user
(and ``summary.json``) what went wrong. A failed checkpoint write is
:class:`dset.engine.checkpoint.CheckpointWriteError`."""

from __future__ import annotations

import re

__all__ = ["NonFiniteLossError", "error_message"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch, step and the loss terms concerned."""


def error_message(exc: BaseException) -> str:
    """One readable line for an exception: errors raised in a data-loader worker arrive with the worker's
    traceback in their message; keep its last line, without the exception's class path."""
    msg = str(exc)
    if "Original Traceback" in msg:
        lines = [line for line in msg.splitlines() if line.strip()]
        msg = lines[-1] if lines else msg
        msg = re.sub(r"^[\w.]*(Error|Exception): ", "", msg)   # "dset.data.DatasetError: ..." -> "..."
    return msg
