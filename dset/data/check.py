"""``python -m dset.data check DATA``: a COCO-format data set checked before any training, and a budget suggested.

The check reads the annotation files as :class:`dset.data.coco.CocoDetection` does, without torch and without
opening an image (unless ``--read-images``): everything CocoDetection refuses is an error here (exit 2), what it
clips or drops is a warning, what it handles silently (0-based or non-contiguous category ids, crowd regions) is a
note. Errors beyond CocoDetection's: a split whose category ids differ from the validation split's and
``data.classes`` that differ from its names (:mod:`dset.data.loaders` refuses both), a split with no usable box.

The suggestion follows one rule, a floor for learning something, not a recipe:

- ``data.image_size`` (and ``model.eval_spatial_size``): the smallest S in 128, 160, ..., 640 at which, with each
  training image resized to S x S as training resizes it (aspect not kept), the median training box is at least
  16 px and the 10th percentile at least 8 px (RT-DETR's finest feature map has stride 8); 640 when no S reaches
  it. A box's size is sqrt(area): a w x h box of a W x H image is S * sqrt(w * h / (W * H)) px at S.
- ``model.decoder.num_queries``: the smallest of 50, 100, 200, 300 that is at least twice the 99th percentile of
  objects per training image; 300 when none is.
- ``train.epochs``: about 300 optimiser steps at the batch size, ceil(300 / ceil(images / batch)), at least 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config_checks import ConfigError
from ..data_file import DATA_FILE_NAME, SPLITS, read_data_file
from .check_report import boxes_per_category, format_check, split_stats
from .errors import DatasetError

IMAGE_SIZES = tuple(range(128, 641, 32))
QUERY_COUNTS = (50, 100, 200, 300)
MEDIAN_BOX_PX, P10_BOX_PX = 16.0, 8.0
TINY_BOX_PX = 8.0
TARGET_STEPS = 300
MIN_EPOCHS = 2
MAX_EXAMPLES = 5
RULE = (f"data.image_size: the smallest S in 128, 160, ..., 640 at which, with each training image resized to "
        f"S x S, the median box is >= {MEDIAN_BOX_PX:g} px (sqrt(area)) and the 10th percentile "
        f">= {P10_BOX_PX:g} px (the finest feature map has stride 8), else 640; model.decoder.num_queries: the "
        f"smallest of 50, 100, 200, 300 at least twice the 99th percentile of objects per training image, else "
        f"300; train.epochs: about {TARGET_STEPS} optimiser steps, ceil({TARGET_STEPS} / ceil(images / batch)), "
        f"at least {MIN_EPOCHS}. A floor for learning something, not a recipe.")
RULE_IN_BRIEF = (f"the smallest size at which the median box is >= {MEDIAN_BOX_PX:g} px and the 10th percentile >= "
                 f"{P10_BOX_PX:g} px; queries >= 2 x the 99th percentile of objects per image; about {TARGET_STEPS} "
                 f"steps (in full: --json, or dset/data/check.py)")
# COCO's 80 categories in its 91-id space (1..90 with gaps)
COCO_91_IDS = frozenset([*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
                         *range(72, 83), *range(84, 91)])
_SEVERITY_ORDER = {"error": 0, "warning": 1, "note": 2}


@dataclass
class Problem:
    severity: str           # "error" (CocoDetection refuses it, or training cannot use it) | "warning" | "note"
    code: str
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class Suggestion:
    values: dict[str, Any]      # configuration keys -> values
    rule: str
    numbers: dict[str, Any]     # what the rule used
    remarks: list[str] = field(default_factory=list)
    rule_in_brief: str = RULE_IN_BRIEF  # the one line the printed report gives

    def overrides(self) -> str:
        """The values as ``key=value`` overrides to paste on a command line."""
        return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in self.values.items())


@dataclass
class DataCheck:
    problems: list[Problem]
    suggestion: Suggestion | None
    overview: dict[str, Any]

    @property
    def usable(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def summary(self) -> dict[str, Any]:
        return self.overview

    def as_dict(self) -> dict[str, Any]:
        return {"usable": self.usable, "summary": self.overview, "problems": [asdict(p) for p in self.problems],
                "suggestion": asdict(self.suggestion) if self.suggestion else None}

    def format(self) -> str:
        return format_check(self)


class _Problems:
    """Problems grouped by (severity, code, description): a count and the first few examples."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str, str], Problem] = {}

    def add(self, severity: str, code: str, description: str, example: str, count: int = 1) -> None:
        p = self._by_key.setdefault((severity, code, description), Problem(severity, code, description))
        p.count += count
        if len(p.examples) < MAX_EXAMPLES:
            p.examples.append(example)

    def sorted(self) -> list[Problem]:
        return sorted(self._by_key.values(), key=lambda p: _SEVERITY_ORDER[p.severity])


@dataclass
class _Split:
    """One split as training would see it: the valid image records and the training boxes (clipped)."""

    name: str
    images_dir: Path
    annotations: Path
    categories: list[tuple[int, str]]                       # (id, name) in ascending id order
    images: list[dict] = field(default_factory=list)        # id, file_name, path, width, height, boxes
    boxes: list[tuple[int, int, float, float]] = field(default_factory=list)  # image index, category id, w, h
    num_annotations: int = 0
    num_crowd: int = 0
    num_dropped: int = 0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _span(ids) -> str:
    ids = sorted(ids)
    if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    if len(ids) <= 6:
        return str(ids)
    return f"{ids[0]}..{ids[-1]} ({len(ids)} ids)"


def _box(bbox) -> str:
    return "[" + ", ".join(f"{round(float(v), 2):g}" for v in bbox) + "]"


def _category_id_hint(used: set[int], category_ids: list[int]) -> str:
    """Why annotations' category ids miss the categories, when it looks like a known slip."""
    known = set(category_ids)
    said = f"ids {_span(used)} but categories {_span(category_ids)}"
    if not known:
        return said
    if all(u + 1 in known for u in used):
        return f"{said}: 0-based labels?"
    if all(u - 1 in known for u in used):
        return f"{said}: ids one too high?"
    if used <= set(range(len(category_ids))):
        return f"{said}: label positions 0..{len(category_ids) - 1} instead of category ids?"
    if used <= COCO_91_IDS and max(used) > max(known) and max(used) > 12:  # beyond COCO's first gap (12)
        return f"{said}: COCO's 91-id space (1..90 with gaps) against {len(known)} categories?"
    return said


def _load_json(split: str, path: Path, problems: _Problems) -> dict | None:
    where = f"{split}: {path}"
    if not path.is_file():
        problems.add("error", "file-missing", "annotation file not found", where)
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        problems.add("error", "not-json", "annotation file is not valid JSON", f"{where} ({exc})")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.add("error", "not-json", "annotation file cannot be read", f"{where} ({exc})")
        return None
    if not isinstance(data, dict):
        problems.add("error", "wrong-type", "a value has the wrong type",
                     f"{where}: the top level is a {type(data).__name__}, not an object")
        return None
    bad = False
    for key in ("images", "annotations", "categories"):
        if key not in data:
            problems.add("error", "missing-key", "a required key is missing", f"{where}: no '{key}'")
            bad = True
        elif not isinstance(data[key], list):
            problems.add("error", "wrong-type", "a value has the wrong type",
                         f"{where}: '{key}' is a {type(data[key]).__name__}, not a list")
            bad = True
    if bad:
        return None
    if not data["images"]:
        problems.add("error", "empty-split", "a split has no images", where)
        return None
    if not data["categories"]:
        problems.add("error", "no-categories", "'categories' is empty", where)
        return None
    return data


def _read_categories(split: str, path: Path, categories: list, problems: _Problems) -> list[tuple[int, str]]:
    names: dict[int, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat:
            problems.add("error", "missing-key", "a required key is missing", f"{split} categories[{i}] has no 'id'")
        elif not _is_int(cat["id"]):
            problems.add("error", "wrong-type", "a value has the wrong type",
                         f"{split} categories[{i}] id {cat['id']!r} is not an integer")
        elif cat["id"] in names:
            problems.add("error", "duplicate-category-id", "duplicate category ids",
                         f"{split} categories[{i}] id {cat['id']} ({path.name})")
        else:
            names[cat["id"]] = str(cat.get("name", cat["id"]))
    return sorted(names.items())


def _read_images(s: _Split, images: list, problems: _Problems) -> set:
    """Fill ``s.images`` with the valid records; return the ids of the invalid ones (their annotations are not
    reported again)."""
    folder_ok = s.images_dir.is_dir()
    if not folder_ok:
        problems.add("error", "images-folder-missing", "images folder not found", f"{s.name}: {s.images_dir}")
    seen_ids: set[int] = set()
    bad_ids: set = set()
    first_of_name: dict[str, int] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            problems.add("error", "wrong-type", "a value has the wrong type",
                         f"{s.name} images[{i}] is a {type(img).__name__}, not an object")
            continue
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        iid = img.get("id")
        if missing:
            problems.add("error", "missing-key", "a required key is missing", f"{s.name} images[{i}] has no {missing}")
        elif not _is_int(iid):
            problems.add("error", "wrong-type", "a value has the wrong type",
                         f"{s.name} images[{i}] id {iid!r} is not an integer")
        elif iid in seen_ids:
            problems.add("error", "duplicate-image-id", "duplicate image ids",
                         f"{s.name} images[{i}] id {iid} ({img['file_name']})")
            continue  # the first record of the id stands
        elif not (_is_number(img["width"]) and _is_number(img["height"]) and img["width"] > 0 and img["height"] > 0):
            problems.add("error", "invalid-image-size", "width/height not positive numbers",
                         f"{s.name} image {iid} {img['file_name']}: {img['width']!r}x{img['height']!r}")
        else:
            seen_ids.add(iid)
            name = str(img["file_name"])
            file = s.images_dir / name
            if folder_ok and not os.path.isfile(file):
                problems.add("error", "image-file-missing", "image files not found",
                             f"{s.name} image {iid}: {file}")
            if name in first_of_name:
                problems.add("warning", "duplicate-file-name", "file names used by more than one image of a split",
                             f"{s.name} images {first_of_name[name]} and {iid}: {name}")
            else:
                first_of_name[name] = iid
            s.images.append({"id": iid, "file_name": name, "path": file, "width": int(img["width"]),
                             "height": int(img["height"]), "boxes": 0})
            continue
        if isinstance(iid, (int, str)):
            bad_ids.add(iid)
    return bad_ids


def _read_annotations(s: _Split, annotations: list, bad_image_ids: set, problems: _Problems) -> None:
    index_of = {rec["id"]: i for i, rec in enumerate(s.images)}
    category_ids = [c for c, _ in s.categories]
    known_categories = set(category_ids)
    seen_ids: set[int] = set()
    used_categories: set[int] = set()
    unknown_category: list[str] = []
    s.num_annotations = len(annotations)
    for i, ann in enumerate(annotations):
        where = f"{s.name} annotations[{i}]"
        if not isinstance(ann, dict):
            problems.add("error", "wrong-type", "a value has the wrong type",
                         f"{where} is a {type(ann).__name__}, not an object")
            continue
        missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
        if missing:
            problems.add("error", "missing-key", "a required key is missing", f"{where} has no {missing}")
            continue
        if "id" in ann:
            if not _is_int(ann["id"]):
                problems.add("error", "wrong-type", "a value has the wrong type",
                             f"{where} id {ann['id']!r} is not an integer")
            elif ann["id"] in seen_ids:
                problems.add("error", "duplicate-annotation-id", "duplicate annotation ids", f"{where} id {ann['id']}")
            else:
                seen_ids.add(ann["id"])
        iid, cid, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
        if not _is_int(iid):
            if not (isinstance(iid, (int, float, str)) and iid in bad_image_ids):
                problems.add("error", "wrong-type", "a value has the wrong type",
                             f"{where} image_id {iid!r} is not an integer")
            continue
        if iid not in index_of:
            if iid not in bad_image_ids:
                problems.add("error", "unknown-image", "annotations whose image_id is not in 'images'",
                             f"{where} image_id {iid}")
            continue
        rec = s.images[index_of[iid]]
        aid = f"id {ann['id']}, " if _is_int(ann.get("id")) else ""
        where = f"{where} ({aid}image {iid} {rec['file_name']})"
        ok = True
        if not _is_int(cid):
            problems.add("error", "wrong-type", "a value has the wrong type",
                         f"{where} category_id {cid!r} is not an integer")
            ok = False
        else:
            used_categories.add(cid)
            if cid not in known_categories:
                unknown_category.append(f"{where} category_id {cid}")
                ok = False
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            problems.add("error", "invalid-bbox", "bbox is not 4 finite numbers [x, y, w, h]", f"{where} bbox {bbox!r}")
            ok = False
        if not ok:
            continue
        # CocoDetection's geometry: clip to the image, drop what has no area left
        x, y, w, h = (float(v) for v in bbox)
        width, height = rec["width"], rec["height"]
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            s.num_dropped += 1
            problems.add("warning", "degenerate-box", "boxes with no area, or none inside the image (dropped)",
                         f"{where} bbox {_box(bbox)} in {width}x{height}")
            continue
        if bool(ann.get("iscrowd", 0)):  # an ignore region in evaluation, unclipped: where it reaches is moot
            s.num_crowd += 1
            continue
        if x < 0 or y < 0 or x + w > width or y + h > height:
            problems.add("warning", "box-outside-image", "boxes outside the image (clipped in training)",
                         f"{where} bbox {_box(bbox)} in {width}x{height}")
        rec["boxes"] += 1
        s.boxes.append((index_of[iid], cid, x1 - x0, y1 - y0))
    if unknown_category:
        description = f"category_id not in 'categories' ({_category_id_hint(used_categories, category_ids)})"
        for example in unknown_category:
            problems.add("error", "unknown-category", description, example)


def _read_split(name: str, images_dir: Path, ann_file: Path, read_images: bool, problems: _Problems) -> _Split | None:
    """The split, or None when its file cannot be read as COCO at all (the problem is added)."""
    data = _load_json(name, ann_file, problems)
    if data is None:
        return None
    s = _Split(name, images_dir, ann_file, _read_categories(name, ann_file, data["categories"], problems))
    bad_image_ids = _read_images(s, data["images"], problems)
    if read_images:
        _read_image_files(s, problems)
    _read_annotations(s, data["annotations"], bad_image_ids, problems)

    ids = [c for c, _ in s.categories]
    if ids and ids != list(range(1, len(ids) + 1)):
        problems.add("note", "category-ids", "category ids are 0-based or non-contiguous: labels follow ascending "
                     "id order", f"{name}: ids {_span(ids)} -> labels 0..{len(ids) - 1}")
    if s.num_crowd:
        problems.add("note", "crowd-boxes", "crowd regions (iscrowd=1): ignore regions in evaluation, not training "
                     "targets", f"{name}: {s.num_crowd}", count=s.num_crowd)
    if not s.boxes:
        problems.add("error", "no-usable-box", "a split with no usable box (every box dropped or crowd, or none)",
                     f"{name}: {len(s.images)} images, {s.num_annotations} annotations")
    else:
        for rec in s.images:
            if not rec["boxes"]:
                problems.add("warning", "images-without-boxes", "images without boxes",
                             f"{name} image {rec['id']} {rec['file_name']}")
    return s


def _read_image_files(s: _Split, problems: _Problems) -> None:
    """Decode every image that exists, as CocoDetection.load_image does, and compare its size with the JSON's."""
    for rec in s.images:
        file = rec["path"]
        if not os.path.isfile(file):
            continue
        try:
            with Image.open(file) as im:
                size = im.convert("RGB").size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            problems.add("error", "image-unreadable", "images that cannot be read",
                         f"{s.name} image {rec['id']} {rec['file_name']}: {exc}")
            continue
        if size != (rec["width"], rec["height"]):
            problems.add("error", "image-size-mismatch", "image sizes that differ from the JSON's width/height",
                         f"{s.name} image {rec['id']} {rec['file_name']}: {size[0]}x{size[1]}, the JSON says "
                         f"{rec['width']}x{rec['height']}")


def _check_across(splits: dict[str, _Split], classes: list[str] | None, train: _Split | None,
                  problems: _Problems) -> None:
    """What one split cannot say: categories that differ, data.classes, files in two splits, idle classes."""
    # as dset.data.loaders: the validation split's categories are the reference; the ids must agree (labels), the
    # names only name them (the validation split's are used)
    ref = (splits["val"] if "val" in splits else next(iter(splits.values()))) if splits else None
    for s in splits.values():
        if s is ref:
            continue
        if [c for c, _ in s.categories] != [c for c, _ in ref.categories]:
            problems.add("error", "split-categories-differ", "splits with different category ids",
                         f"{s.name} ids {_span(c for c, _ in s.categories)} but {ref.name} ids "
                         f"{_span(c for c, _ in ref.categories)}")
        elif s.categories != ref.categories:
            problems.add("warning", "split-names-differ", f"splits naming the same category ids differently "
                         f"(the {ref.name} names are used)", f"{s.name} {s.categories} but {ref.name} {ref.categories}")
    if classes is not None and ref is not None and [n for _, n in ref.categories] != list(classes):
        problems.add("error", "classes-differ", "data.classes differ from the categories' names in id order",
                     f"data.classes {list(classes)} but {ref.name} has {[n for _, n in ref.categories]}")
    owner: dict[str, str] = {}
    for s in splits.values():
        for rec in s.images:
            path = os.path.normpath(os.path.abspath(rec["path"]))
            if path in owner and owner[path] != s.name:
                problems.add("warning", "file-in-two-splits", "the same image file in two splits (a leak)",
                             f"{rec['file_name']} in {owner[path]} and {s.name}")
            owner.setdefault(path, s.name)
    if train is not None and train.boxes:
        counts = boxes_per_category(train)
        for cid, name in train.categories:
            if not counts.get(cid):
                problems.add("warning", "class-without-train-box", "classes with no box in the training split",
                             f"{train.name}: {name} (id {cid})")


def _suggest(train: _Split, batch_size: int = 8) -> Suggestion:
    """The rule of the module's docstring applied to the training split's images and boxes."""
    # training squashes every image to S x S (no letterbox), so a box's sqrt(area) at size S is S times this
    relative = np.array([math.sqrt(w * h / (train.images[i]["width"] * train.images[i]["height"]))
                         for i, _, w, h in train.boxes])
    median_rel, p10_rel = float(np.median(relative)), float(np.percentile(relative, 10))
    fits = [s for s in IMAGE_SIZES if s * median_rel >= MEDIAN_BOX_PX and s * p10_rel >= P10_BOX_PX]
    size = fits[0] if fits else IMAGE_SIZES[-1]
    per_image = [r["boxes"] for r in train.images]
    p99, most = float(np.percentile(per_image, 99)), max(per_image)
    queries = next((q for q in QUERY_COUNTS if q >= 2 * p99), QUERY_COUNTS[-1])
    steps_per_epoch = math.ceil(len(train.images) / batch_size)
    epochs = max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch))
    remarks = []
    if not fits:
        remarks.append(f"the objects stay tiny at {size}: median {size * median_rel:.1f} px, 10th percentile "
                       f"{size * p10_rel:.1f} px (want {MEDIAN_BOX_PX:g} and {P10_BOX_PX:g})")
    if most > QUERY_COUNTS[-1]:
        remarks.append(f"an image has {most} objects, more than {QUERY_COUNTS[-1]} queries can find")
    numbers = {"training_images": len(train.images), "training_boxes": len(train.boxes),
               "median_box_px_at_size": round(size * median_rel, 1), "p10_box_px_at_size": round(size * p10_rel, 1),
               "objects_per_image_p99": round(p99, 1), "objects_per_image_max": most, "batch_size": batch_size,
               "steps_per_epoch": steps_per_epoch}
    values = {"data.image_size": size, "model.eval_spatial_size": [size, size], "model.decoder.num_queries": queries,
              "train.epochs": epochs}
    return Suggestion(values, RULE, numbers, remarks)


def check_splits(splits: dict[str, tuple[Path, Path]], classes: list[str] | None = None, read_images: bool = False,
                 batch_size: int = 8) -> DataCheck:
    """Check ``splits`` (split name -> (images folder, annotations JSON)); ``classes``: the names the data file
    gives, in category-id order."""
    return _check(splits, classes, read_images, batch_size, _Problems())


def _check(splits: dict[str, tuple[Path, Path]], classes: list[str] | None, read_images: bool, batch_size: int,
           problems: _Problems) -> DataCheck:
    read: dict[str, _Split] = {}
    for name, (images_dir, ann_file) in splits.items():
        s = _read_split(name, Path(images_dir), Path(ann_file), read_images, problems)
        if s is not None:
            read[name] = s
    train_name = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    train = read.get(train_name)
    _check_across(read, classes, train, problems)
    suggestion = _suggest(train, batch_size) if train is not None and train.boxes else None
    if suggestion and suggestion.numbers["median_box_px_at_size"] < TINY_BOX_PX:
        problems.add("warning", "tiny-boxes", f"training boxes under {TINY_BOX_PX:g} px (median) even at the "
                     "suggested size", f"{train.name}: median {suggestion.numbers['median_box_px_at_size']} px at "
                     f"{suggestion.values['data.image_size']}")
    categories = (read.get("val") or next(iter(read.values()))).categories if read else []
    overview = {"classes": [n for _, n in categories],
                "splits": {name: (split_stats([read[name]]) if name in read else None) for name in splits},
                "all": split_stats(list(read.values()))}
    return DataCheck(problems.sorted(), suggestion, overview)


def check_data_file(path: str | Path, read_images: bool = False, batch_size: int = 8) -> DataCheck:
    """Check the splits a data file (``data.yaml``) names, and its ``data.classes``."""
    path = Path(path)
    layer, _ = read_data_file(path)
    data = layer["data"]
    if data.get("name", "coco") != "coco":
        raise ConfigError(f"{path}: data.name is {data['name']!r}; the check reads COCO-format data (name: coco)")
    classes = data.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ConfigError(f"{path}: data.classes must be a list of names, got {classes!r}")
    problems = _Problems()
    splits: dict[str, tuple[Path, Path]] = {}
    for split in SPLITS:
        entry = data.get(split)
        if split == "test" and (entry is None or (isinstance(entry, dict) and not any(entry.values()))):
            continue
        parts = entry if isinstance(entry, dict) else {}
        if not (isinstance(parts.get("images"), str) and isinstance(parts.get("annotations"), str)):
            problems.add("error", "missing-split", "a split the data file must name is missing or incomplete",
                         f"{path}: data.{split} is {entry!r} (needs images and annotations)")
            continue
        splits[split] = (Path(parts["images"]), Path(parts["annotations"]))
    return _check(splits, classes, read_images, batch_size, problems)


def run(ns: argparse.Namespace) -> int:
    data = Path(ns.data)
    if not data.exists():
        raise DatasetError(f"{data}: not found (give a data file, a folder holding {DATA_FILE_NAME}, or a COCO JSON "
                           "with --images DIR)")
    if data.suffix == ".json":
        if ns.images is None:
            raise DatasetError(f"{data}: a COCO JSON is checked with its images folder: add --images DIR")
        result = check_splits({data.stem: (Path(ns.images), data)}, read_images=ns.read_images,
                              batch_size=ns.batch_size)
    else:
        if ns.images is not None:
            raise DatasetError(f"--images goes with a COCO JSON; {data} is a data file (it names its images folders)")
        if data.is_dir():
            if not (data / DATA_FILE_NAME).is_file():
                raise DatasetError(f"{data}: no {DATA_FILE_NAME} in this folder (give a data file, or a COCO JSON "
                                   "with --images DIR)")
            data = data / DATA_FILE_NAME
        result = check_data_file(data, read_images=ns.read_images, batch_size=ns.batch_size)
    print(result.format())
    if ns.json is not None:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
    return 0 if result.usable else 2


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def add_command(subparsers) -> None:
    p = subparsers.add_parser("check", help="check a COCO data set before training; suggest a budget floor",
                              description="Check a COCO-format data set as training would read it (exit 0: usable, "
                                          "2: not) and suggest image size, queries and epochs.")
    p.add_argument("data", help=f"a data file, a folder holding {DATA_FILE_NAME}, or a COCO JSON (with --images)")
    p.add_argument("--images", help="the images folder of a COCO JSON given as DATA (checked as one split)")
    p.add_argument("--read-images", action="store_true",
                   help="decode every image and compare its size with the JSON's (slow)")
    p.add_argument("--json", metavar="OUT", help="write the summary, problems and suggestion to this JSON file")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="the training batch size the epochs are counted at (default 8)")
    p.set_defaults(run=run)
