"""Hungarian matcher (semantics of the reference RT-DETR ``HungarianMatcher``).

For each image, a one-to-one assignment between predictions (queries) and ground-truth objects that
minimises ``cost_bbox * L1 + cost_class * class_cost + cost_giou * (-GIoU)``. The cost matrix is computed
for the whole batch at once (``[B*Q, total targets]``), moved to the CPU once, and split per image for
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]

# Non-finite costs (only possible from NaN/inf predictions) are replaced by this before the assignment,
# so that a diverged model yields a NaN loss the training loop can see rather than a scipy error here.
_NONFINITE_COST = 1e8


class HungarianMatcher(nn.Module):
    """Match queries to targets.

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 cost between cxcywh boxes.
        cost_giou: weight of the negative generalised IoU cost.
        use_focal: sigmoid/focal class cost (RT-DETR) when True; otherwise ``-softmax(logits)[target]``.
        alpha, gamma: focal-cost parameters.

    ``forward(outputs, targets)``: ``outputs['pred_logits']`` ``[B, Q, C]``, ``outputs['pred_boxes']``
    ``[B, Q, 4]`` (cxcywh, normalised); ``targets`` a list of B dicts with ``labels`` ``[n]`` int64 and
    ``boxes`` ``[n, 4]`` (cxcywh, normalised). Returns a list of B pairs ``(index_i, index_j)`` of int64 CPU
    tensors: query indices (ascending) and the target indices matched to them, ``min(Q, n)`` pairs each.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        use_focal: bool = True,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.use_focal = bool(use_focal)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"use_focal={self.use_focal}, alpha={self.alpha}, gamma={self.gamma}"
        )

    def class_cost(self, logits: Tensor, tgt_ids: Tensor) -> Tensor:
        """Classification cost ``[N, T]`` for flattened logits ``[N, C]`` and target labels ``[T]``."""
        if self.use_focal:
            prob = logits.sigmoid()[:, tgt_ids]
            neg = (1 - self.alpha) * prob.pow(self.gamma) * -torch.log(1 - prob + 1e-8)
            pos = self.alpha * (1 - prob).pow(self.gamma) * -torch.log(prob + 1e-8)
            return pos - neg
        return -logits.softmax(-1)[:, tgt_ids]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        logits = outputs["pred_logits"]
        boxes = outputs["pred_boxes"]
        if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(
                f"HungarianMatcher: expected pred_logits [B, Q, C] and pred_boxes [B, Q, 4], got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        bs, num_queries = logits.shape[:2]
        if len(targets) != bs:
            raise ValueError(f"HungarianMatcher: {len(targets)} target dicts for a batch of {bs}")

        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in range(bs)]

        out_logits = logits.flatten(0, 1).float()  # [B*Q, C]
        out_bbox = boxes.flatten(0, 1).float()  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(device=logits.device, dtype=torch.int64)
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(device=boxes.device, dtype=torch.float32)

        cost_class = self.class_cost(out_logits, tgt_ids)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        # no degenerate-box check (a host read per call): predicted boxes come from a sigmoid (w, h > 0) and the
        # targets were sanitised when loaded
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox), check=False)
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(bs, num_queries, -1).cpu()
        cost = torch.nan_to_num(cost, nan=_NONFINITE_COST, posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)

        indices = []
        for i, c in enumerate(cost.split(sizes, dim=-1)):
            if sizes[i] == 0:
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
