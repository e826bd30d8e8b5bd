"""Learnable pruning of the decoder's multi-scale memory: DSET's fourth switch, ``model.memory_pruning``.

Why here. In RT-DETR R18 at 640 px the decoder does about 7 GFLOPs (11% of the model) over all 8,400 memory
tokens: the input projection, ``enc_output``, the encoder score and box heads, and every decoder layer's
``value_proj``. The AIFI layer and the FFNs that the other switches make sparse are about 3%. Pruning the memory
is what makes that work shrink with the keep ratio.

What it does (``RTDETRDecoder`` with a ``MemoryPruner``):
  1. An importance predictor scores every memory token from the encoder's output features (before the decoder's
     input projection): ``Linear(C, 1)`` (``hidden_dim = 0``, the default: it costs 0.004 GFLOPs at 640 px, where
     a hidden layer of 32 costs 0.14), or ``Linear(C, h) -> GELU -> Linear(h, 1)``.
  2. Each level keeps its own top ``K_l = ceil(r * N_l)`` tokens (``r`` the scheduled keep ratio, raised so that
     ``sum K_l`` is at least ``min_tokens`` and the decoder's ``num_queries``), in ascending order. Per level, not
     one global top-k, so that every scale keeps a share (small objects live on stride 8, large ones on stride
     32) and the shapes are known without reading the scores (no host synchronisation).
  3. Only the kept tokens are projected (the input projection in evaluation; in training it runs on the whole map
     so that its BatchNorm sees the reference's batch statistics), scored by ``enc_output`` and the score head;
     the queries are drawn only from kept tokens; the box head runs on the ``num_queries`` selected tokens (it is
     per token: the same boxes as running it on all, as the reference does, then gathering).
  4. Every decoder layer's ``value_proj`` runs on the kept tokens only (:class:`SparseValue`); deformable
     attention samples dense per-level maps, in which pruned positions hold zero (``fill="zero"``, the default)
     or their encoder output features without the value projection (``fill="encoder_features"``). Both cost no
     multiply-adds. Neither is Sparse DETR's: there, unselected tokens keep their backbone features and every
     token, selected or not, goes through the value projection; here the projection is what pruning saves.

Schedule, epoch and straight-through gradient: as the encoder's token pruner (:mod:`dset.models.pruning`): keep
ratio 1.0 for ``warmup_epochs`` then a linear ramp over ``ramp_epochs``; eval prunes at the ratio of the stored
epoch. At keep ratio 1.0 (warm-up) nothing is gathered: the memory is the reference's, only the box head runs on
the selected tokens.

Supervision (the caller weights it, ``model.memory_pruning.loss_weight``):
  - ``"bce"``: BCE-with-logits, mean over all tokens of all levels, against the map of tokens whose cell centre
    lies in a ground-truth box (plus each box centre's cell): :func:`dset.models.pruning.importance_target_map`;
  - ``"gaussian_focal"``: a context-aware soft target, :func:`context_target_map` (1 inside a box, a Gaussian
    decay over a context band around it), with CenterNet's penalty-reduced focal loss (:func:`context_focal_loss`).
    Inspired by the original DSET's context supervision but not the same: that code uses a varifocal / focal-BCE
    loss (alpha 0.75, gamma 2) with a context band by Euclidean distance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .pruning import ScheduledPruner, importance_target_map, padded_boxes

__all__ = ["MemoryPruner", "MemorySelection", "SparseValue", "context_target_map", "context_focal_loss"]

_FILLS = ("zero", "encoder_features")
_SUPERVISIONS = ("bce", "gaussian_focal")
# the context band's Gaussian: exp(-u^2 / (2 sigma^2)) with u = 0 at the box border and 1 at the band's outer
# edge, so the target falls from 1 to exp(-2) = 0.14 across the band, then to 0
_CONTEXT_SIGMA = 0.5


@dataclass
class SparseValue:
    """The memory as the decoder's deformable attention gets it after pruning: the kept tokens, their positions
    in the full memory, and what the pruned positions hold. ``MSDeformableAttention`` projects ``kept`` and
    scatters it into the dense maps it samples (:meth:`scatter`)."""

    kept: torch.Tensor             # [B, K, C]
    index: torch.Tensor            # [B, K] int64, positions in the full memory (level-major), ascending
    length: int                    # N, tokens of the full memory
    fill: torch.Tensor | None      # [B, N, C] what pruned positions hold; None: zeros

    def scatter(self, projected_kept: torch.Tensor) -> torch.Tensor:
        """``[B, K, C']`` (the kept tokens after a projection) -> ``[B, N, C']`` with the fill elsewhere."""
        B, K, C = projected_kept.shape
        index = self.index.unsqueeze(-1).expand(B, K, C)
        if self.fill is None:
            return projected_kept.new_zeros(B, self.length, C).scatter_(1, index, projected_kept)
        return self.fill.to(projected_kept.dtype).scatter(1, index, projected_kept)


@dataclass
class MemorySelection:
    """What :meth:`MemoryPruner.select` chose: per level, the kept positions ``[B, K_l]`` (ascending, within the
    level); their positions in the full memory ``index [B, K]``; and the scores of every token ``[B, N]``."""

    level_index: list[torch.Tensor]
    index: torch.Tensor
    scores: torch.Tensor
    pruned: bool                   # False when every token is kept (then nothing is gathered)


def context_target_map(spatial_shape: tuple[int, int], targets: Sequence[dict[str, torch.Tensor]],
                       context_ratio: float = 0.5, device: torch.device | None = None) -> torch.Tensor:
    """Soft target ``[B, H*W]`` in [0, 1]: the original DSET's box-plus-context map.

    For a token's cell centre and a box, ``d = max(|x - cx| / (w/2), |y - cy| / (h/2))`` (1 on the box border).
    Inside the box (d <= 1) and in the cell holding the box centre the target is 1; in the context band
    ``1 < d <= 1 + context_ratio`` it is ``exp(-u^2 / (2 * 0.5^2))`` with ``u = (d - 1) / context_ratio``; beyond,
    0. Over several boxes, the maximum. ``context_ratio = 0`` gives the hard box map of the BCE option."""
    H, W = int(spatial_shape[0]), int(spatial_shape[1])
    hard = importance_target_map((H, W), targets, device)  # box interiors and centre cells: 1
    boxes, valid = padded_boxes(targets, hard.device)
    if boxes.shape[1] == 0 or context_ratio <= 0:
        return hard
    cx, cy, bw, bh = (v.unsqueeze(-1).unsqueeze(-1) for v in boxes.unbind(-1))  # [B, M, 1, 1]
    px = ((torch.arange(W, device=hard.device, dtype=torch.float32) + 0.5) / W).view(1, 1, 1, W)
    py = ((torch.arange(H, device=hard.device, dtype=torch.float32) + 0.5) / H).view(1, 1, H, 1)
    # a degenerate box (zero width or height) has no band in that direction
    dx = (px - cx).abs() / (bw / 2).clamp_min(1e-6)
    dy = (py - cy).abs() / (bh / 2).clamp_min(1e-6)
    d = torch.maximum(dx, dy)  # [B, M, H, W]
    u = (d - 1.0) / context_ratio
    band = torch.exp(-u.square() / (2 * _CONTEXT_SIGMA ** 2)) * ((d > 1.0) & (u <= 1.0))
    band = (band * valid.view(*valid.shape, 1, 1)).amax(dim=1).reshape(hard.shape)
    return torch.maximum(hard, band)


def context_focal_loss(scores: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
                       beta: float = 4.0) -> torch.Tensor:
    """CenterNet's focal loss on a soft target (the original DSET's choice for its context map): positives are the
    tokens with target 1, ``-(1 - p)^alpha log p``; every other token ``-(1 - t)^beta p^alpha log(1 - p)``; summed
    and divided by the number of positives (at least 1). ``p = sigmoid(scores)``, computed in log space."""
    scores = scores.float()
    log_p = F.logsigmoid(scores)
    log_not_p = F.logsigmoid(-scores)
    p = torch.sigmoid(scores)
    positive = target >= 1.0
    pos_loss = -((1 - p) ** alpha) * log_p
    neg_loss = -((1 - target) ** beta) * (p ** alpha) * log_not_p
    loss = torch.where(positive, pos_loss, neg_loss).sum()
    return loss / positive.sum().clamp_min(1)


class MemoryPruner(ScheduledPruner):
    """Scores the decoder's memory tokens and keeps the top share of each level (module docstring).

    Args:
        d_model: token width C.
        keep_ratio: final share of each level's tokens kept, in (0, 1].
        min_tokens: never keep fewer tokens in all (the decoder also never keeps fewer than its queries).
        warmup_epochs, ramp_epochs: the schedule of :mod:`dset.models.pruning`.
        fill: what pruned positions give deformable attention: ``"zero"`` or ``"encoder_features"``.
        hidden_dim: the predictor's hidden width; 0: a single linear layer.
        supervision: ``"bce"`` or ``"gaussian_focal"`` (module docstring).
        context_ratio: the Gaussian target's context band, as a share of the box's half-size.
    """

    def __init__(self, d_model: int, keep_ratio: float = 0.3, min_tokens: int = 0, warmup_epochs: int = 1,
                 ramp_epochs: int = 0, fill: str = "zero", hidden_dim: int = 0, supervision: str = "bce",
                 context_ratio: float = 0.5) -> None:
        super().__init__(keep_ratio, min_tokens, warmup_epochs, ramp_epochs)
        if int(d_model) < 1:
            raise ValueError(f"d_model must be >= 1, got d_model={d_model}")
        if int(min_tokens) < 0:
            raise ValueError(f"min_tokens must be >= 0, got min_tokens={min_tokens}")
        if fill not in _FILLS:
            raise ValueError(f"fill must be one of {_FILLS}, got fill={fill!r}")
        if int(hidden_dim) < 0:
            raise ValueError(f"hidden_dim must be >= 0, got hidden_dim={hidden_dim}")
        if supervision not in _SUPERVISIONS:
            raise ValueError(f"supervision must be one of {_SUPERVISIONS}, got supervision={supervision!r}")
        if float(context_ratio) < 0:
            raise ValueError(f"context_ratio must be >= 0, got context_ratio={context_ratio}")
        self.fill = fill
        self.supervision = supervision
        self.context_ratio = float(context_ratio)
        if int(hidden_dim) == 0:
            self.predictor = nn.Linear(int(d_model), 1)
        else:
            self.predictor = nn.Sequential(nn.Linear(int(d_model), int(hidden_dim)), nn.GELU(),
                                           nn.Linear(int(hidden_dim), 1))

    def extra_repr(self) -> str:
        return (f"keep_ratio={self.keep_ratio}, min_tokens={self.min_tokens}, warmup_epochs={self.warmup_epochs}, "
                f"ramp_epochs={self.ramp_epochs}, fill={self.fill!r}, supervision={self.supervision!r}")

    def level_counts(self, level_sizes: Sequence[int], floor: int = 0) -> list[int]:
        """Tokens kept per level: ``ceil(r * N_l)``, with ``r`` the scheduled ratio raised so that the total is at
        least ``max(min_tokens, floor)`` (all tokens when that is more than there are)."""
        total = sum(level_sizes)
        need = max(self.min_tokens, int(floor))
        ratio = max(self.current_keep_ratio(), need / total if total else 1.0)
        return [min(n, math.ceil(ratio * n - 1e-9)) for n in level_sizes]

    def select(self, tokens: torch.Tensor, level_sizes: Sequence[int], floor: int = 0) -> MemorySelection:
        """Score ``tokens [B, N, C]`` (the levels concatenated, level-major) and choose the kept ones per level."""
        B, N, _ = tokens.shape
        scores = self.predictor(tokens).squeeze(-1).float()
        counts = self.level_counts(level_sizes, floor)
        kept = sum(counts)
        self.last_stats = {"tokens_before": N, "tokens_after": kept, "keep_ratio": kept / N if N else 1.0,
                           "scheduled_keep_ratio": self.current_keep_ratio()}
        if kept == N:
            index = torch.arange(N, device=tokens.device).unsqueeze(0).expand(B, N)
            return MemorySelection([], index, scores, pruned=False)
        level_index, global_index, start = [], [], 0
        for level_scores, k, n in zip(scores.split(list(level_sizes), dim=1), counts, level_sizes):
            idx = level_scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
            level_index.append(idx)
            global_index.append(idx + start)
            start += n
        return MemorySelection(level_index, torch.cat(global_index, dim=1), scores, pruned=True)

    def importance_loss(self, scores: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                        targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The unweighted supervision loss of ``scores [B, N]`` over the levels ``spatial_shapes``."""
        if self.supervision == "gaussian_focal":
            target = torch.cat([context_target_map(s, targets, self.context_ratio, scores.device)
                                for s in spatial_shapes], dim=1)
        else:
            target = torch.cat([importance_target_map(s, targets, scores.device) for s in spatial_shapes], dim=1)
        if target.shape != scores.shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} does not match the levels {list(spatial_shapes)} "
                             f"for {len(targets)} targets")
        if self.supervision == "gaussian_focal":
            return context_focal_loss(scores, target)
        return F.binary_cross_entropy_with_logits(scores.float(), target)
