"""The NaN/inf check of the training loss without a host read per step (``train.loss_check_every``).

Each step's total loss stays on the device: :meth:`LossCheck.record` keeps, with device operations only, the
first step whose loss was not finite; :meth:`LossCheck.check` reads it back (one host sync), every ``every`` steps
and at the end of every epoch, before the epoch's state is saved. A non-finite loss is found at most ``every - 1``
steps late; those steps' updates are lost with the run anyway (it fails, and the newest saved state is the last
epoch's). With ``every=1`` every step is read at once, and the error also names the loss terms that were not finite.
"""

from __future__ import annotations

import math

import torch

from .distributed import DistInfo, any_rank
from .errors import NonFiniteLossError

__all__ = ["LossCheck"]


class LossCheck:
    def __init__(self, every: int, dinfo: DistInfo) -> None:
        self.every, self.dinfo = every, dinfo
        self._first_bad: torch.Tensor | None = None   # index into _where of the first non-finite loss, -1: none
        self._where: list[str] = []   # the unchecked steps, as the error would name them
        self._last: torch.Tensor | None = None

    def record(self, loss: torch.Tensor, loss_dict: dict, where: str) -> float | None:
        """Note one step's total ``loss`` (``where``: the step, as an error names it); check when ``every`` steps
        are unchecked. Returns the newest loss when this step read it back, else None."""
        loss = loss.detach()
        if self.every == 1:
            return _finite_loss(loss, loss_dict, self.dinfo, where)
        # the step's index as a Python scalar: a tensor made from it would be a host-to-device copy every step
        bad = ~torch.isfinite(loss)
        if self._first_bad is None:
            self._first_bad = torch.where(bad, len(self._where), -1)
        else:
            self._first_bad = torch.where(bad & (self._first_bad < 0), len(self._where), self._first_bad)
        self._where.append(where)
        self._last = loss
        return self.check() if len(self._where) >= self.every else None

    def check(self) -> float | None:
        """Read the unchecked steps back (every rank together): raise :class:`NonFiniteLossError` naming the
        first non-finite one; else return the newest loss (None when nothing was recorded since the last check)."""
        if self._first_bad is None:
            return None
        first = int(self._first_bad.item())
        value, device = float(self._last.float().item()), self._last.device
        where, self._first_bad, self._where, self._last = self._where, None, [], None
        if any_rank(first >= 0, device, self.dinfo):
            found = f"found by the check every {self.every} steps (train.loss_check_every; 1 names the loss terms)"
            if first >= 0:
                raise NonFiniteLossError(f"non-finite loss at {where[first]}, {found}")
            raise NonFiniteLossError(f"non-finite loss on another process by {where[-1]}, {found}")
        return value


def _finite_loss(loss: torch.Tensor, loss_dict: dict, dinfo: DistInfo, where: str) -> float:
    """The total loss as a number; a :class:`NonFiniteLossError` naming ``where`` and the non-finite terms when
    it is NaN/inf here or on another process (every rank stops together)."""
    value = float(loss.float().item())
    if not any_rank(not math.isfinite(value), loss.device, dinfo):
        return value
    bad = [f"{k}={float(t.detach().float().item())}" for k, t in loss_dict.items()
           if not math.isfinite(float(t.detach().float().item()))]
    if bad:
        raise NonFiniteLossError(f"non-finite loss at {where}: {', '.join(bad)} (total loss {value})")
    raise NonFiniteLossError(f"non-finite loss at {where} on another process (rank 0's total loss {value})")
