"""What a run or a study knows about its COCO data before any work: the check of :mod:`dset.data.check` on the
configured splits (no image decoding), a refusal of unusable data with the check's report, and the likely causes
of a budget that cannot learn these data (``learning_risks``: kept in a run's summary, quoted by a study whose
RT-DETR baseline ends below its learning floor, and by the report's answer)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from .check import MEDIAN_BOX_PX, TARGET_STEPS, DataCheck, check_splits
from .errors import DatasetError

__all__ = ["check_configured_data", "refuse_unusable", "learning_risks"]


def check_configured_data(cfg: Config) -> DataCheck | None:
    """The check of the configured COCO data set (its train, val and test splits, ``data.classes``, counted at
    ``data.batch_size``); None for the built-in synthetic data, which is generated correct."""
    d = cfg.data
    if d.name != "coco":
        return None
    splits = {}
    for name in ("train", "val", "test"):
        split = getattr(d, name)
        if split.images is None and split.annotations is None and name == "test":
            continue
        if split.images is None or split.annotations is None:
            raise DatasetError(f"data.{name}: give both images and annotations (got images={split.images!r}, "
                               f"annotations={split.annotations!r})")
        splits[name] = (Path(split.images), Path(split.annotations))
    return check_splits(splits, classes=d.classes, batch_size=d.batch_size)


def refuse_unusable(check: DataCheck | None) -> None:
    """DatasetError carrying the check's whole report when the data set cannot be trained on."""
    if check is not None and not check.usable:
        raise DatasetError("the data set is not usable (python -m dset.data check gives this report):\n"
                           + check.format())


def learning_risks(check: DataCheck | None, image_size: int, epochs: int, steps_per_epoch: int,
                   class_heads_from_scratch: str | None = None) -> list[str]:
    """The reasons, each a sentence with the setting that would lift it, why this budget may not learn these
    data: objects below ``MEDIAN_BOX_PX`` at ``image_size`` (median training box), fewer than about
    ``TARGET_STEPS`` optimiser steps, and class heads that start from scratch (``class_heads_from_scratch``: what
    the head report says of them, None when they were loaded or carried over)."""
    risks = []
    suggestion = check.suggestion if check is not None else None
    if suggestion is not None:
        suggested = suggestion.values["data.image_size"]
        # the check's median box relative to the image it is resized with (sqrt(w h / (W H))), at the size asked
        relative = suggestion.numbers["median_box_px_at_size"] / suggested
        median_px = relative * image_size
        if median_px < MEDIAN_BOX_PX:
            risks.append(f"objects are small at data.image_size={image_size}: the median training box is "
                         f"{median_px:.1f} px (under {MEDIAN_BOX_PX:g}; the finest feature map has stride 8); "
                         f"the check suggests data.image_size={suggested}")
    steps = epochs * steps_per_epoch
    if steps < TARGET_STEPS:
        more = (f"; the check suggests train.epochs={suggestion.values['train.epochs']}"
                if suggestion is not None else "")
        risks.append(f"{steps} optimiser steps ({epochs} epochs x {steps_per_epoch}), under about {TARGET_STEPS} "
                     f"for a new data set{more}")
    if class_heads_from_scratch:
        risks.append(f"the class heads start from scratch: {class_heads_from_scratch} (model.class_map keeps the "
                     "checkpoint's rows of the classes both have)")
    return risks
