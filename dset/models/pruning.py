"""Learnable token pruning for the encoder: importance predictor, keep-ratio schedule, gather/scatter,
pruning loss.

Usage inside an encoder layer (tokens ``[B, N, C]``, position embedding ``[1 or B, N, C]``)::

    kept, kept_pos, keep_index, scores = pruner.select(tokens, pos)
    processed = layer(kept, pos_embed=kept_pos)            # attention + FFN on K <= N tokens
    tokens = pruner.merge(tokens, processed, keep_index)  # back to [B, N, C]
    loss = loss + 0.01 * pruner.importance_loss(scores, (H, W), targets)   # training only

Importance predictor: ``Linear(C, hidden_dim) -> GELU -> Linear(hidden_dim, 1)`` per token, giving
logits ``scores [B, N]``.

Keep-ratio schedule (per epoch; ``set_epoch(epoch)`` at the start of every epoch)::

    ratio(e) = 1.0                                          for e <  warmup_epochs
    ratio(e) = 1 - (1 - keep_ratio) * min(1, (e - warmup_epochs + 1) / ramp_epochs)   otherwise
             (ramp_epochs == 0: keep_ratio from epoch warmup_epochs on)

so the ramp takes exactly ``ramp_epochs`` epochs and the target ratio is reached at epoch
``warmup_epochs + ramp_epochs - 1``. Example with the defaults (10, 10, 0.7): epochs 0-9 -> 1.0,
epoch 10 -> 0.97, epoch 14 -> 0.85, epoch 19 and later -> 0.7.
The epoch lives in the registered buffer ``epoch`` (int64), so it is saved in ``state_dict`` and
checkpoints; a python copy is kept so that the forward never reads the buffer (no host sync) and is
refreshed by ``set_epoch`` and when a state dict is loaded, NOT when someone ``copy_``s into the buffer
directly. Hence: call ``set_epoch_all(model, epoch)`` on the training model AND on the EMA model every
epoch (RT-DETR's EMA averages floating-point entries only and would leave an EMA copy at epoch 0,
i.e. unpruned in evaluation).

EVAL MODE PRUNES TOO, at the scheduled ratio of the stored epoch: the module behaves the same in
``train()`` and ``eval()``. A freshly built model (epoch 0 < warmup) keeps every token; a model loaded
from a checkpoint prunes at the ratio of the epoch it was saved at. Call ``set_epoch`` to override.

Number of tokens kept: ``K = min(N, max(min_tokens, ceil(ratio * N)))``. It depends only on N and
the schedule (python numbers), so it needs no host-device synchronisation. When ``K == N`` nothing is
gathered and ``select``/``merge`` return their inputs unchanged (bit-exact with no pruning).

Gradient to the predictor. Top-k selection is not differentiable, so two paths train the predictor:
  1. ``importance_loss``: BCE-with-logits (plain, not focal; mean over all tokens) between the scores
     and a target map that marks the tokens whose cell centre lies in a ground-truth box, plus the
     cell holding each box centre (see ``importance_target_map``); the caller applies the weight
     (default 0.01);
  2. a straight-through factor on the kept tokens in ``select``:
     ``kept * (sigmoid(s) / sigmoid(s).detach())`` for the kept tokens' scores s. The factor is
     exactly 1.0 in the forward pass (``a / a == 1`` in IEEE arithmetic; scores are computed in
     float32 and clamped to [-30, 30] inside the factor so that sigmoid never underflows), so outputs
     are unchanged, while the detection loss reaches the predictor through every kept token
     (d factor / d s = 1 - sigmoid(s); zero where |s| > 30 because of the clamp). Pruned tokens get
     no gradient along this path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..analytic import keep_count

__all__ = ["ScheduledPruner", "TokenPruner", "padded_boxes", "keep_count", "scheduled_keep_ratio",
           "importance_target_map", "set_epoch_all"]

_FILLS = ("identity", "zero")


def scheduled_keep_ratio(epoch: int, keep_ratio: float, warmup_epochs: int, ramp_epochs: int) -> float:
    """The keep-ratio schedule described in the module docstring."""
    if epoch < warmup_epochs:
        return 1.0
    if ramp_epochs <= 0:
        return float(keep_ratio)
    progress = min(1.0, (epoch - warmup_epochs + 1) / ramp_epochs)
    return 1.0 - (1.0 - float(keep_ratio)) * progress


def padded_boxes(targets: Sequence[dict[str, torch.Tensor]],
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images' boxes (normalised cx, cy, w, h) padded to one tensor ``[B, M, 4]`` (float32) and the mask of
    real ones ``[B, M]``; M is the most boxes of any image (0 when none has any)."""
    B = len(targets)
    if device is None:
        device = targets[0]["boxes"].device if B > 0 else torch.device("cpu")
    n_max = max([int(t["boxes"].shape[0]) for t in targets] + [0])
    boxes = torch.zeros(B, n_max, 4, device=device)
    valid = torch.zeros(B, n_max, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):  # loop over images only (packing), not over tokens or boxes
        n = int(t["boxes"].shape[0])
        if n:
            boxes[b, :n] = t["boxes"].to(device=device, dtype=torch.float32).reshape(n, 4)
            valid[b, :n] = True
    return boxes, valid


def importance_target_map(
    spatial_shape: tuple[int, int],
    targets: Sequence[dict[str, torch.Tensor]],
    device: torch.device | None = None,
    include_centre_cell: bool = True,
) -> torch.Tensor:
    """Binary target map ``[B, H*W]`` (row-major, as ``feature.flatten(2)``) for ``importance_loss``.

    A token is 1 when its cell centre ``((j + 0.5) / W, (i + 0.5) / H)`` lies inside any of the
    image's boxes (normalised cx, cy, w, h; borders inclusive), and, with ``include_centre_cell``,
    also when its cell contains a box centre, so that boxes smaller than a cell still mark one token.
    Images without boxes give all zeros. Vectorised over boxes and tokens (boxes are padded per
    batch)."""
    H, W = int(spatial_shape[0]), int(spatial_shape[1])
    B = len(targets)
    boxes, valid = padded_boxes(targets, device)
    n_max = boxes.shape[1]
    if B == 0 or n_max == 0:
        return torch.zeros(B, H * W, device=boxes.device)
    device = boxes.device
    cx, cy, bw, bh = boxes.unbind(-1)  # [B, M]
    x0, x1 = cx - bw / 2, cx + bw / 2
    y0, y1 = cy - bh / 2, cy + bh / 2
    px = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W
    py = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H
    in_x = (px.view(1, 1, W) >= x0.unsqueeze(-1)) & (px.view(1, 1, W) <= x1.unsqueeze(-1))  # [B,M,W]
    in_y = (py.view(1, 1, H) >= y0.unsqueeze(-1)) & (py.view(1, 1, H) <= y1.unsqueeze(-1))  # [B,M,H]
    inside = in_y.unsqueeze(-1) & in_x.unsqueeze(-2)  # [B, M, H, W]
    if include_centre_cell:
        ci = (cy * H).floor().long().clamp_(0, H - 1)
        cj = (cx * W).floor().long().clamp_(0, W - 1)
        rows = torch.arange(H, device=device).view(1, 1, H, 1) == ci.view(B, n_max, 1, 1)
        cols = torch.arange(W, device=device).view(1, 1, 1, W) == cj.view(B, n_max, 1, 1)
        inside = inside | (rows & cols)
    inside = inside & valid.view(B, n_max, 1, 1)
    return inside.any(dim=1).reshape(B, H * W).float()


def set_epoch_all(model: nn.Module, epoch: int) -> int:
    """Call ``set_epoch(epoch)`` on every pruner (``ScheduledPruner``) inside ``model``; returns how many.

    Call it on EVERY copy that runs a forward (the training model and the EMA model): an EMA that
    only averages floating-point tensors never updates the integer ``epoch`` buffer, and the forward
    reads the python copy of the epoch, not the buffer."""
    n = 0
    for m in model.modules():
        if isinstance(m, ScheduledPruner):
            m.set_epoch(epoch)
            n += 1
    return n


class ScheduledPruner(nn.Module):
    """What both learnable pruners share: the keep-ratio schedule of the module docstring, the epoch it is at
    (buffer ``epoch`` plus a python mirror the forward reads), and the straight-through factor that lets the
    detection loss reach the importance predictor through the kept tokens.

    Subclasses: :class:`TokenPruner` (the AIFI layer's tokens) and
    :class:`dset.models.memory_pruning.MemoryPruner` (the decoder's multi-scale memory)."""

    def __init__(self, keep_ratio: float, min_tokens: int, warmup_epochs: int, ramp_epochs: int) -> None:
        super().__init__()
        if not (0.0 < float(keep_ratio) <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got keep_ratio={keep_ratio}")
        if int(warmup_epochs) < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got warmup_epochs={warmup_epochs}")
        if int(ramp_epochs) < 0:
            raise ValueError(f"ramp_epochs must be >= 0, got ramp_epochs={ramp_epochs}")
        self.keep_ratio = float(keep_ratio)
        self.min_tokens = int(min_tokens)
        self.warmup_epochs = int(warmup_epochs)
        self.ramp_epochs = int(ramp_epochs)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self._epoch = 0  # python mirror of the buffer: the forward never reads the tensor
        self.last_stats: dict[str, float] = {}

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got epoch={epoch}")
        self._epoch = epoch
        self.epoch.fill_(epoch)

    @property
    def target_epoch(self) -> int:
        """The first epoch that runs at the target keep ratio."""
        return self.warmup_epochs + max(self.ramp_epochs, 1) - 1

    def current_keep_ratio(self) -> float:
        return scheduled_keep_ratio(self._epoch, self.keep_ratio, self.warmup_epochs, self.ramp_epochs)

    def num_kept(self, num_tokens: int) -> int:
        return keep_count(num_tokens, self.current_keep_ratio(), self.min_tokens)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "epoch"
        if key in state_dict:
            self._epoch = int(state_dict[key])  # at load time, not in the forward

    @staticmethod
    def straight_through(kept: torch.Tensor, kept_scores: torch.Tensor) -> torch.Tensor:
        """``kept [B, K, C] * sigmoid(s) / sigmoid(s).detach()`` for the kept tokens' scores ``s [B, K]``:
        exactly ``kept`` in the forward pass, while the detection loss reaches the scores (module docstring,
        path 2)."""
        s = torch.sigmoid(kept_scores.float().clamp(-30.0, 30.0))
        return kept * (s / s.detach()).to(kept.dtype).unsqueeze(-1)


class TokenPruner(ScheduledPruner):
    """Keeps the ``K`` most important tokens of an encoder layer's input (see module docstring).

    Args:
        d_model: token width C.
        keep_ratio: final fraction of tokens kept, in (0, 1].
        min_tokens: never keep fewer than this many tokens (>= 1; all tokens if N is smaller).
        warmup_epochs: epochs at ratio 1.0 before the ramp (>= 0).
        ramp_epochs: epochs of the linear ramp from 1.0 to ``keep_ratio`` (>= 0).
        fill: what pruned positions hold after ``merge``: ``"identity"`` (their input features) or
            ``"zero"``.
        hidden_dim: width of the importance predictor's hidden layer.

    After each ``select`` the module holds ``last_stats`` = {tokens_before, tokens_after, keep_ratio
    (tokens_after / tokens_before), scheduled_keep_ratio} as python numbers (shapes only, no sync).
    """

    def __init__(
        self,
        d_model: int,
        keep_ratio: float = 0.7,
        min_tokens: int = 100,
        warmup_epochs: int = 10,
        ramp_epochs: int = 10,
        fill: str = "identity",
        hidden_dim: int = 128,
    ) -> None:
        super().__init__(keep_ratio, min_tokens, warmup_epochs, ramp_epochs)
        if int(d_model) < 1:
            raise ValueError(f"d_model must be >= 1, got d_model={d_model}")
        if int(min_tokens) < 1:
            raise ValueError(f"min_tokens must be >= 1, got min_tokens={min_tokens}")
        if fill not in _FILLS:
            raise ValueError(f"fill must be one of {_FILLS}, got fill={fill!r}")
        if int(hidden_dim) < 1:
            raise ValueError(f"hidden_dim must be >= 1, got hidden_dim={hidden_dim}")
        self.d_model = int(d_model)
        self.fill = fill
        self.predictor = nn.Sequential(
            nn.Linear(self.d_model, int(hidden_dim)), nn.GELU(), nn.Linear(int(hidden_dim), 1)
        )

    def extra_repr(self) -> str:
        return (
            f"keep_ratio={self.keep_ratio}, min_tokens={self.min_tokens}, warmup_epochs="
            f"{self.warmup_epochs}, ramp_epochs={self.ramp_epochs}, fill={self.fill!r}"
        )

    # ------------------------------------------------------------------ gather / scatter
    def score(self, tokens: torch.Tensor) -> torch.Tensor:
        """Importance logits ``[B, N]`` (float32)."""
        return self.predictor(tokens).squeeze(-1).float()

    def select(
        self, tokens: torch.Tensor, pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Keep the K highest-scoring tokens, in spatial (ascending index) order.

        Args: ``tokens [B, N, C]``, ``pos [1 or B, N, C]`` or None.
        Returns ``(kept_tokens [B, K, C], kept_pos [B, K, C], keep_index [B, K] (int64, ascending),
        scores [B, N])``. When ``K == N`` the inputs are returned unchanged (``pos`` keeps its own
        batch dimension, e.g. [1, N, C]) and ``keep_index`` is ``arange(N)`` per image."""
        B, N, C = tokens.shape
        scores = self.score(tokens)
        ratio = self.current_keep_ratio()
        K = keep_count(N, ratio, self.min_tokens)
        self.last_stats = {
            "tokens_before": N,
            "tokens_after": K,
            "keep_ratio": K / N if N else 1.0,
            "scheduled_keep_ratio": ratio,
        }
        if K == N:
            keep_index = torch.arange(N, device=tokens.device).unsqueeze(0).expand(B, N)
            return tokens, pos, keep_index, scores
        keep_index = scores.topk(K, dim=1, sorted=False).indices.sort(dim=1).values  # [B, K]
        gather_idx = keep_index.unsqueeze(-1).expand(B, K, C)
        kept = self.straight_through(tokens.gather(1, gather_idx), scores.gather(1, keep_index))
        kept_pos = None
        if pos is not None:
            kept_pos = pos.expand(B, N, C).gather(1, gather_idx)
        return kept, kept_pos, keep_index, scores

    def merge(
        self, original: torch.Tensor, processed_kept: torch.Tensor, keep_index: torch.Tensor
    ) -> torch.Tensor:
        """Scatter the processed kept tokens back to ``[B, N, C]``; pruned positions hold their input
        features (fill ``identity``) or zeros (fill ``zero``). Differentiable w.r.t. both inputs.
        When nothing was pruned (K == N) returns ``processed_kept`` itself."""
        B, N, C = original.shape
        K = processed_kept.shape[1]
        if K == N:
            return processed_kept
        dtype = torch.promote_types(original.dtype, processed_kept.dtype)  # e.g. fp32 + fp16 -> fp32
        base = original if self.fill == "identity" else torch.zeros_like(original)
        index = keep_index.unsqueeze(-1).expand(B, K, C)
        return base.to(dtype).scatter(1, index, processed_kept.to(dtype))

    # ------------------------------------------------------------------ loss
    def importance_loss(
        self,
        scores: torch.Tensor,
        spatial_shape: tuple[int, int],
        targets: list[dict[str, torch.Tensor]],
        include_centre_cell: bool = True,
    ) -> torch.Tensor:
        """Mean BCE-with-logits between ``scores [B, H*W]`` and ``importance_target_map`` (tokens
        covered by a GT box = 1). Unweighted: the caller applies the loss weight (default 0.01)."""
        target = importance_target_map(spatial_shape, targets, scores.device, include_centre_cell)
        if target.shape != scores.shape:
            raise ValueError(
                f"scores shape {tuple(scores.shape)} does not match spatial_shape {tuple(spatial_shape)} "
                f"for {len(targets)} targets"
            )
        return F.binary_cross_entropy_with_logits(scores.float(), target)
