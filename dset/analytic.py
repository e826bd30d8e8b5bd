"""Closed-form compute and token counts, torch-free so that the report layer can use them too.

Multiply-adds (MACs); GFLOPs in the RT-DETR paper's convention are 2 x MACs. Norms, softmax and
biases are ignored. ``tests/test_measure.py`` checks these formulas against fvcore's counts of the
traced model within 2%.
"""

from __future__ import annotations

import math


def moe_ffn_macs_per_token(d_model: int, hidden_dim: int, num_experts: int, top_k: int) -> int:
    """Multiply-adds per token of a top-k MoE FFN: router ``d*E`` + ``top_k * 2 * d * hidden``.

    Biases, the softmax/top-k and the weighted combine are ignored (as fvcore ignores biases)."""
    return d_model * num_experts + top_k * 2 * d_model * hidden_dim


def ffn_macs(tokens: int, d_model: int, ffn_hidden: int, num_experts: int | None = None,
             top_k: int | None = None) -> int:
    """One FFN over ``tokens`` tokens: 2 N d h (dense) or N (d E + k 2 d h) with a top-k MoE (router + active
    experts, :func:`moe_ffn_macs_per_token`)."""
    if num_experts is None:
        return 2 * tokens * d_model * ffn_hidden
    return tokens * moe_ffn_macs_per_token(d_model, ffn_hidden, num_experts, top_k)


def aifi_layer_macs(tokens: int, d_model: int = 256, ffn_hidden: int = 1024, num_experts: int | None = None,
                    top_k: int | None = None) -> int:
    """One AIFI (post-norm transformer) layer on ``tokens`` tokens: Q/K/V and output projections
    4 N d^2, attention products 2 N^2 d, plus the FFN (:func:`ffn_macs`)."""
    n, d = tokens, d_model
    return 4 * n * d * d + 2 * n * n * d + ffn_macs(n, d, ffn_hidden, num_experts, top_k)


def keep_count(num_tokens: int, ratio: float, min_tokens: int) -> int:
    """Tokens the pruner keeps: ``K = min(N, max(min_tokens, ceil(ratio * N)))``; the epsilon forgives
    float rounding (``ceil(0.7 * 10)`` is 7, not 8)."""
    k = math.ceil(ratio * num_tokens - 1e-9)
    return int(min(num_tokens, max(min_tokens, k)))
