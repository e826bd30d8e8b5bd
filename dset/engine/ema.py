"""Exponential moving average of model weights (as RT-DETR's ``ModelEMA``).

After every optimizer step, ``ema.update(model)`` sets each floating-point entry of the EMA model's
``state_dict`` (parameters AND buffers, e.g. BatchNorm statistics) to::

    v_ema = d * v_ema + (1 - d) * v_model,   d = decay * (1 - exp(-updates / warmup_steps))

where ``updates`` counts the updates so far (1 at the first update), so early on the EMA follows the
model closely and ``d`` approaches ``decay`` later. Integer buffers (BatchNorm's ``num_batches_tracked``,
the token pruner's epoch) are copied. ``warmup_steps = 0`` uses ``decay`` from the first update.

The EMA model is what training evaluates and what ``best.pt`` is chosen by. Its ``state_dict()`` is
``{"module": ..., "updates": ...}``, the layout of RT-DETR checkpoints' ``ema`` entry.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ModelEMA", "ema_decay"]


def ema_decay(updates: int, decay: float, warmup_steps: int) -> float:
    """The decay used by update number ``updates`` (1-based)."""
    if warmup_steps <= 0:
        return decay
    return decay * (1.0 - math.exp(-updates / warmup_steps))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 2000) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``; returns the decay used."""
        self.updates += 1
        d = ema_decay(self.updates, self.decay, self.warmup_steps)
        msd = unwrap(model).state_dict()
        ema_float, src_float = [], []
        for name, v in self.module.state_dict().items():
            src = msd[name].detach()
            if v.dtype.is_floating_point:
                ema_float.append(v)
                src_float.append(src.to(v.dtype))
            else:
                v.copy_(src)
        if ema_float:  # v += (1 - d) * (src - v), i.e. d * v + (1 - d) * src, in one fused pass
            torch._foreach_lerp_(ema_float, src_float, 1.0 - d)
        return d

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
