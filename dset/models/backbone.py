"""PResNet-vd backbone (ResNet-18/34 with the 'd' tweaks), as used by RT-DETR.

Variant d: a deep stem of three 3x3 convolutions (3->32->32->64) and, in downsampling blocks, an
average-pool shortcut followed by a 1x1 convolution. Module names match the reference so that the
PResNet-vd ImageNet weights and RT-DETR checkpoints load with strict keys.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvNormLayer, make_activation

BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
STAGE_CHANNELS = [64, 128, 256, 512]
STAGE_STRIDES = [4, 8, 16, 32]


class BasicBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, stride: int, identity_shortcut: bool, act: str = "relu"):
        super().__init__()
        # The reference calls this flag `shortcut`: True means "use the identity", False a projection.
        self.identity_shortcut = identity_shortcut
        if not identity_shortcut:
            if stride == 2:
                self.short = nn.Sequential(OrderedDict([
                    ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
                    ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
                ]))
            else:
                self.short = ConvNormLayer(ch_in, ch_out, 1, stride)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        short = x if self.identity_shortcut else self.short(x)
        return self.act(out + short)


class Blocks(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, count: int, first_stride: int, act: str = "relu"):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(BasicBlock(ch_in, ch_out, stride=first_stride if i == 0 else 1,
                                          identity_shortcut=i > 0, act=act))
            ch_in = ch_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """PResNet-vd; returns the feature maps of the stages in ``return_idx`` (default strides 8, 16, 32)."""

    def __init__(self, depth: int = 18, return_idx: tuple[int, ...] = (1, 2, 3), act: str = "relu",
                 freeze_at: int = -1):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(
                f"model.backbone.depth: {depth} is not supported; expected one of {sorted(BLOCKS_PER_STAGE)}")
        self.depth = depth
        stem = [(3, 32, 3, 2, "conv1_1"), (32, 32, 3, 1, "conv1_2"), (32, 64, 3, 1, "conv1_3")]
        self.conv1 = nn.Sequential(OrderedDict(
            (name, ConvNormLayer(c_in, c_out, k, s, act=act)) for c_in, c_out, k, s, name in stem))
        ch_in = 64
        self.res_layers = nn.ModuleList()
        for i, count in enumerate(BLOCKS_PER_STAGE[depth]):
            # the first stage follows the stem's max-pool and keeps stride 4
            self.res_layers.append(Blocks(ch_in, STAGE_CHANNELS[i], count, first_stride=1 if i == 0 else 2, act=act))
            ch_in = STAGE_CHANNELS[i]
        self.return_idx = tuple(return_idx)
        self.out_channels = [STAGE_CHANNELS[i] for i in self.return_idx]
        self.out_strides = [STAGE_STRIDES[i] for i in self.return_idx]
        if freeze_at >= 0:
            for p in self.conv1.parameters():
                p.requires_grad_(False)
            for stage in self.res_layers[:freeze_at]:
                for p in stage.parameters():
                    p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
