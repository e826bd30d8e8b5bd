"""Box conversions, IoU and generalised IoU (semantics of the reference RT-DETR / DETR box ops).

Formats: ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is (x1, y1, x2, y2).
Pairwise functions take ``[N, 4]`` and ``[M, 4]`` xyxy boxes and return ``[N, M]``; the ``elementwise_``
variants take two ``[N, 4]`` tensors and return ``[N]`` (equal to the diagonal of the pairwise result,
without building the ``N x N`` matrix).

Degenerate boxes (x2 < x1 or y2 < y1) make GIoU meaningless, so the GIoU functions raise a ``ValueError``
for them. The check is written as ``x2 < x1`` so that NaN coordinates do NOT trip it: a diverged model's NaN
predictions flow through as NaN values (and a NaN loss the training loop can detect) instead of being
reported as a misleading "degenerate box" error.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
]


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    cx, cy, w, h = x.unbind(-1)
    half_w, half_h = 0.5 * w, 0.5 * h
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    x1, y1, x2, y2 = x.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes, ``[..., 4] -> [...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_xyxy(boxes: Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected xyxy boxes of shape [N, 4], got {tuple(boxes.shape)}")
    bad = boxes[:, 2:] < boxes[:, :2]  # NaN compares False: NaN is not reported as degenerate
    if bool(bad.any()):
        rows = bad.any(dim=1).nonzero().flatten()
        first = rows[0].item()
        raise ValueError(
            f"{name}: {rows.numel()} degenerate box(es) with x2 < x1 or y2 < y1 "
            f"(first at row {first}: {boxes[first].tolist()}); boxes must be xyxy with non-negative size"
        )


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes: returns ``(iou [N, M], union [N, M])``."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes, ``[N, M]``, in [-1, 1].

    GIoU = IoU - (enclosing area - union) / enclosing area. ``check`` refuses degenerate boxes, at the cost of a
    host read; ``check=False`` is for boxes that cannot be degenerate (the training step's: predicted from a
    sigmoid, targets sanitised at loading), so that a CUDA step does not wait on it.
    """
    if check:
        _check_xyxy(boxes1, "generalized_box_iou boxes1")
        _check_xyxy(boxes2, "generalized_box_iou boxes2")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU of corresponding xyxy boxes (``boxes1[i]`` with ``boxes2[i]``): returns ``(iou [N], union [N])``."""
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"elementwise_box_iou: shapes differ, {tuple(boxes1.shape)} vs {tuple(boxes2.shape)}")
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union, union


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True) -> Tensor:
    """Generalised IoU of corresponding xyxy boxes, ``[N]`` (the diagonal of :func:`generalized_box_iou`);
    ``check`` as there."""
    if check:
        _check_xyxy(boxes1, "elementwise_generalized_box_iou boxes1")
        _check_xyxy(boxes2, "elementwise_generalized_box_iou boxes2")
    iou, union = elementwise_box_iou(boxes1, boxes2)
    lt = torch.minimum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.maximum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[:, 0] * wh[:, 1]
    return iou - (enclosing - union) / enclosing
