"""What the converters (:mod:`.voc`, :mod:`.yolo`, :mod:`.coco_reindex`) share: the data set read from a source
(:class:`SourceSet`: COCO entries before the split, with what was dropped and why), image sizes from the file
headers, boxes clipped to the image, and :func:`save`, which splits (or keeps the source's split) and writes the
layout of :func:`dset.data.split.write_splits`, returning a :class:`ConversionResult`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..config_checks import ConfigError
from .errors import DatasetError
from .split import SPLIT_ORDER, SplitRule, WrittenSplits, split_images, summary_lines, write_splits

__all__ = ["IMAGE_SUFFIXES", "SourceSet", "ConversionResult", "image_size", "coco_box",
           "parse_classes", "categories_of", "save"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass
class SourceSet:
    """A data set read from a source, before the split. ``images`` are COCO image entries (``file_name``
    relative to ``images_root``), ``annotations`` COCO annotations, ``categories`` ids 1..C in class order.
    ``source_split`` maps train / val (/ test) to image ids when the source is already split."""
    format: str
    path: Path
    layout: str
    images_root: Path
    categories: list[dict]
    images: list[dict]
    annotations: list[dict]
    source_split: dict[str, list[int]] | None = None
    source_split_from: str = ""
    options: dict[str, Any] = field(default_factory=dict)   # converter options worth recording (difficult=...)
    dropped: Counter[str] = field(default_factory=Counter)  # what was left out, by reason
    noted: Counter[str] = field(default_factory=Counter)    # what was kept but is worth knowing, by what
    licenses: list | None = None


@dataclass
class ConversionResult:
    """A finished conversion: the files written and what the converter left out or noticed."""
    written: WrittenSplits
    source: dict[str, Any]
    dropped: dict[str, int]
    noted: dict[str, int]

    def summary(self) -> str:
        lines = [f"source: {self.source['format']} {self.source['path']} ({self.source['layout']})",
                 *summary_lines(self.written)]
        lines += [f"dropped: {n} {reason}" for reason, n in self.dropped.items()]
        lines += [f"noted: {n} {what}" for what, n in self.noted.items()]
        return "\n".join(lines)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file's header (no decode); DatasetError naming the file if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def coco_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> list[float] | None:
    """The corners clipped to the image as COCO ``[x, y, w, h]`` (to 1/10000 pixel), or None when no area is
    left."""
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    x0, y0, x1, y1 = (round(float(v), 4) for v in (x0, y0, x1, y1))
    return [x0, y0, round(x1 - x0, 4), round(y1 - y0, 4)]


def parse_classes(text: str | list[str] | None) -> list[str] | None:
    """``--classes a,b,c`` as a list (order kept); ConfigError on an empty or repeated name."""
    if text is None:
        return None
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    if not names or any(not n for n in names):
        raise ConfigError(f"--classes must be names separated by commas, got {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--classes names {repeated} more than once")
    return names


def categories_of(classes: list[str]) -> list[dict]:
    return [{"id": i + 1, "name": name} for i, name in enumerate(classes)]


def _parts(source: SourceSet, image_parts: dict[str, list[dict]]) -> dict[str, tuple[list, list]]:
    by_image: dict[Any, list[dict]] = {}
    for ann in source.annotations:
        by_image.setdefault(ann["image_id"], []).append(ann)
    return {s: (imgs, [a for img in imgs for a in by_image.get(img["id"], [])]) for s, imgs in image_parts.items()}


def save(source: SourceSet, dst: str | os.PathLike, rule: SplitRule | None = None, resplit: bool = False,
         copy: bool = False) -> ConversionResult:
    """Split ``source`` (its own split when it has one, unless ``resplit``; else ``rule``, default
    :class:`SplitRule`) and write it to ``dst``. A rule with a split source and no ``resplit`` is a
    ConfigError: the source is already split."""
    if not source.images:
        raise DatasetError(f"{source.path}: no images found ({source.layout})")
    if source.source_split is not None and not resplit:
        if rule is not None:
            raise ConfigError(f"{source.path} is already split ({source.source_split_from}); --val, --test, "
                              "--group-by and --seed apply only with --resplit")
        missing = [s for s in ("train", "val") if not source.source_split.get(s)]
        if missing:
            raise DatasetError(f"{source.path}: the source's split ({source.source_split_from}) has no images for "
                               f"{' and '.join(missing)}; add them, or split it anew with --resplit")
        entry = {img["id"]: img for img in source.images}
        listed = [i for ids in source.source_split.values() for i in ids]
        if len(set(listed)) < len(listed):
            raise DatasetError(f"{source.source_split_from}: an image is listed in more than one split")
        image_parts = {s: [entry[i] for i in source.source_split[s]] for s in SPLIT_ORDER
                       if source.source_split.get(s)}
        unlisted = len(entry) - sum(len(ids) for ids in image_parts.values())
        if unlisted:
            source.dropped["images that the source's split does not list"] += unlisted
        split = {"by": "source", "from": source.source_split_from}
    else:
        image_parts, split = split_images(source.images, rule or SplitRule(), where=str(source.path))
    module = {"voc": "voc", "yolo": "yolo", "coco": "coco_reindex"}[source.format]
    info = {"description": f"{source.format} -> COCO by dset.data convert", "converter": f"dset.data.{module}",
            "source": str(source.path.resolve())}
    described = {"format": source.format, "path": str(source.path.resolve()), "layout": source.layout,
                 **source.options}
    written = write_splits(dst, source.images_root, _parts(source, image_parts), source.categories, info,
                           {"source": described, "split": split}, copy=copy, licenses=source.licenses)
    return ConversionResult(written=written, source=described, dropped=dict(source.dropped),
                            noted=dict(source.noted))
