"""torchvision.transforms.v2 pipelines for detection, as RT-DETR trains and evaluates.

Every pipeline is called as ``image, target = t(image, target)`` where ``image`` is a PIL image and
``target`` is ``{"boxes": tv_tensors.BoundingBoxes (XYXY, pixels), "labels": int64 tensor [N]}``.
It returns a float32 image tensor [3, H, W] in [0, 1] (RT-DETR uses no mean/std normalisation) and
``target["boxes"]`` as a plain float32 tensor [N, 4] of normalised (cx, cy, w, h), i.e. divided by the
transformed image's width/height. ``target["labels"]`` stays aligned with the boxes: every step that drops
boxes (SanitizeBoundingBoxes) drops the matching labels too.

Train pipeline (RT-DETR ``rtdetr_r*vd`` COCO recipe):
RandomPhotometricDistort(p=0.5) -> RandomZoomOut(fill=0) -> RandomIoUCrop(p=0.8) ->
SanitizeBoundingBoxes(min_size=1) -> RandomHorizontalFlip -> Resize((size, size)) ->
SanitizeBoundingBoxes -> ToImage/ToDtype(float32, scale) -> ConvertBoundingBoxFormat(CXCYWH) ->
NormalizeBoxes.

With ``data.stop_epoch`` (RT-DETRv2's policy) the strong steps (photometric distort, zoom-out, IoU crop) stop at
that epoch and the flip pipeline (flip -> resize) trains the remaining epochs (:class:`StopEpochPolicy`).

Eval pipeline: Resize((size, size)) -> ToImage/ToDtype -> CXCYWH -> NormalizeBoxes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = [
    "NormalizeBoxes",
    "RandomIoUCropP",
    "train_transforms",
    "eval_transforms",
    "flip_transforms",
    "StopEpochPolicy",
    "basic_transforms",
]


def _get_labels(inputs: Any) -> torch.Tensor:
    """labels_getter for SanitizeBoundingBoxes: inputs is ``(image, target)``.

    A module-level function (not a lambda) so the pipeline pickles into DataLoader workers.
    """
    return inputs[1]["labels"]


class NormalizeBoxes(v2.Transform):
    """Turn BoundingBoxes into a plain float32 tensor of coordinates divided by the canvas (w, h, w, h).

    The box format is kept (put ConvertBoundingBoxFormat("CXCYWH") before it for RT-DETR targets).
    The output is a plain tensor on purpose: normalised boxes no longer live on a pixel canvas, so later
    geometric transforms must not touch them.
    """

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = inpt.canvas_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=inpt.device)
        return inpt.as_subclass(torch.Tensor).to(torch.float32) / scale


class RandomIoUCropP(v2.Transform):
    """v2.RandomIoUCrop applied with probability ``p`` (v2's RandomIoUCrop has no ``p``; RT-DETR uses 0.8).

    A sample with no boxes is returned unchanged: RandomIoUCrop needs a box centre inside the crop and would
    otherwise loop until it samples its 'leave as is' option.
    Follow it with SanitizeBoundingBoxes: boxes whose centre falls outside the crop are zeroed, not removed.
    """

    def __init__(self, p: float = 0.8, **iou_crop_kwargs: Any) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomIoUCropP: p must be in [0, 1], got {p}")
        self.p = p
        self.crop = v2.RandomIoUCrop(**iou_crop_kwargs)

    def forward(self, *inputs: Any) -> Any:
        passthrough = inputs if len(inputs) > 1 else inputs[0]
        if self.p < 1.0 and torch.rand(1).item() >= self.p:
            return passthrough
        flat, _ = tree_flatten(passthrough)
        boxes = [x for x in flat if isinstance(x, tv_tensors.BoundingBoxes)]
        if not boxes or all(b.shape[0] == 0 for b in boxes):
            return passthrough
        return self.crop(*inputs)


def _to_model_input() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.CXCYWH),
        NormalizeBoxes(),
    ]


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"transform size must be a positive int (square side in pixels), got {size!r}")
    return size


def train_transforms(size: int = 640) -> v2.Compose:
    """RT-DETR training augmentation ending in a square ``size`` x ``size`` image and normalised cxcywh boxes."""
    size = _check_size(size)
    return v2.Compose(
        [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill=0),
            RandomIoUCropP(p=0.8),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_get_labels),
            v2.RandomHorizontalFlip(),
            v2.Resize((size, size)),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_get_labels),
            *_to_model_input(),
        ]
    )


def flip_transforms(size: int = 640) -> v2.Compose:
    """Horizontal flip and resize only: the light training pipeline (``data.augment: flip``), and what
    RT-DETRv2 keeps of its recipe once the strong augmentations stop (``data.stop_epoch``)."""
    size = _check_size(size)
    return v2.Compose([v2.RandomHorizontalFlip(), v2.Resize((size, size)),
                       v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_get_labels), *_to_model_input()])


class StopEpochPolicy:
    """RT-DETRv2's ``stop_epoch`` policy: the ``strong`` pipeline before ``stop_epoch``, the ``plain`` one from
    it on. ``set_epoch`` is called at the start of every epoch (:func:`dset.data.loaders.set_loader_epoch`);
    data-loader workers are started per epoch, so they receive the epoch's pipeline."""

    def __init__(self, strong: v2.Compose, plain: v2.Compose, stop_epoch: int) -> None:
        self.strong, self.plain, self.stop_epoch = strong, plain, int(stop_epoch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def active(self) -> v2.Compose:
        return self.strong if self.epoch < self.stop_epoch else self.plain

    def __call__(self, *inputs: Any) -> Any:
        return self.active(*inputs)


def eval_transforms(size: int = 640) -> v2.Compose:
    """Deterministic evaluation pipeline: resize to ``size`` x ``size`` (no aspect preservation, as RT-DETR)."""
    size = _check_size(size)
    return v2.Compose([v2.Resize((size, size)), *_to_model_input()])


def basic_transforms() -> v2.Compose:
    """No geometry: only to float [0, 1] and normalised cxcywh (what CocoDetection uses when transforms=None)."""
    return v2.Compose(_to_model_input())
