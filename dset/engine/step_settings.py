"""How a training step runs on its device (``train.amp``, ``amp_dtype``, ``channels_last``, ``compile``): its
precision, the memory layout of its convolutions and what is compiled. None changes what the step computes
beyond rounding; ``tests/test_step_settings.py`` tests each for its effect. Why each: docs/training.md."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StepSettings"]


@dataclass(frozen=True)
class StepSettings:
    """``autocast_dtype``: the forward's autocast dtype (None: float32); ``loss_scaling``: a GradScaler scales
    the loss (float16 only: bfloat16 has float32's range); ``channels_last``: the model's 4-d weights and the
    input images in NHWC; ``compile``: the backbone is compiled (``nn.Module.compile``, so that its parameter
    names, and with them the checkpoints, stay the same)."""

    autocast_dtype: torch.dtype | None = None
    loss_scaling: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, train_cfg, device: torch.device) -> StepSettings:
        """From a ``TrainConfig`` on ``device``: mixed precision and channels-last apply on CUDA only."""
        cuda = device.type == "cuda"
        dtype = getattr(torch, train_cfg.amp_dtype) if train_cfg.amp and cuda else None
        return cls(dtype, dtype == torch.float16, bool(train_cfg.channels_last and cuda), bool(train_cfg.compile))

    @property
    def precision(self) -> str:
        """What the summary and the benches record: ``fp32``, ``bf16 autocast`` or ``fp16 autocast + loss scaling``."""
        if self.autocast_dtype is None:
            return "fp32"
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        return f"{name} autocast" + (" + loss scaling" if self.loss_scaling else "")

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.loss_scaling)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The layout, before the EMA copy and DDP (both then hold NHWC weights too)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def compile_model(self, model: nn.Module) -> None:
        """Compile the backbone in place, after the EMA copy: a deep copy of a compiled module would call the
        original's forward (``nn.Module.compile`` binds it)."""
        if self.compile:
            model.backbone.compile()

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
