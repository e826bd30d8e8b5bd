"""Small building blocks shared by the backbone, the encoder and the decoder.

Parameter names (``conv``/``norm``, ``layers.N``) follow the reference RT-DETR so that published
checkpoints load with strict key matching.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def make_activation(name: str | None) -> nn.Module:
    """Activation module by name; the reference uses in-place ReLU/SiLU, numerically identical."""
    if name is None:
        return nn.Identity()
    table = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU}
    key = name.lower()
    if key not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[key]()


class ConvNormLayer(nn.Module):
    """Conv2d (no bias by default) + BatchNorm2d + optional activation."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int,
                 padding: int | None = None, bias: bool = False, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride,
                              padding=(kernel_size - 1) // 2 if padding is None else padding, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (not after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    """Bias so that sigmoid(bias) == prior_prob (focal-loss style initialisation)."""
    return float(-math.log((1 - prior_prob) / prior_prob))
