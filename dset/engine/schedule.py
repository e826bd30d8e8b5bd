"""Learning-rate schedule: linear warm-up, then cosine annealing, per optimizer step.

The schedule is a multiplicative FACTOR applied to each parameter group's own base learning rate
(``group["initial_lr"]``), so groups with different rates (pretrained at ``train.lr_pretrained``, new
components at ``train.lr``) keep their ratio at every step. (The original DSET code's warm-up wrote one
absolute rate into every group, which raised the pretrained backbone to the new components' rate.)

``factor(step)`` for the optimizer step with index ``step`` (0-based), ``W`` warm-up steps, ``T`` total steps::

    step <  W:  (step + 1) / W                                                    linear warm-up to 1
    step >= W:  m + (1 - m) * 0.5 * (1 + cos(pi * (step - W) / max(1, T - W)))   cosine from 1 to m

with ``m = train.min_lr_ratio``. ``W = 0`` starts the cosine immediately.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "build_scheduler"]


class WarmupCosine:
    """The factor function (a picklable object, so ``LambdaLR.state_dict`` records its settings)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"WarmupCosine: need warmup_steps >= 0 and total_steps >= 1, "
                             f"got {warmup_steps}, {total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupCosine: min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (f"WarmupCosine(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
                f"min_ratio={self.min_ratio})")


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step with :class:`WarmupCosine` for every group.

    Call ``scheduler.step()`` after each ``optimizer.step()``; step ``s`` then runs at
    ``initial_lr * factor(s)`` in every group.
    """
    fn = WarmupCosine(warmup_steps, total_steps, min_ratio)
    return LambdaLR(optimizer, lr_lambda=[fn] * len(optimizer.param_groups))
