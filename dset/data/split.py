"""The split of a COCO-format data set into train / val (/ test), and the layout every converter writes.

Rule: images are grouped (``--group-by image | folder | prefix | field:NAME``, see :func:`group_key`); whole
groups go to one side. The group keys, sorted, are shuffled with ``random.Random(seed)``; then test (when its
fraction is above 0), val and train are filled in that order: each takes, in the shuffled order, every group that
brings its image count closer to its fraction of all images (or, when none does, the one group closest to it),
leaving at least one group for each split after it; train gets the rest. Same input and seed: the same files,
byte for byte.

Layout written (:func:`write_splits`): ``DST/images`` (a link to the image folder, or copies with ``copy``),
``DST/train.json``, ``DST/val.json`` (and ``DST/test.json``), ``DST/data.yaml`` (:mod:`dset.data_file`). Each
JSON's ``info.split`` and the data file's ``dataset.split`` record the rule: ``{by, seed, fractions, groups}``.

Command line: ``python -m dset.data split ANNOTATIONS.json --images DIR DST [--val F] [--test F]
[--group-by ...] [--seed N] [--copy]`` splits one COCO file; categories, ids and boxes stay as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..config_checks import ConfigError
from ..data_file import DATA_FILE_NAME, write_data_file
from .errors import DatasetError
from .json_files import read_json, write_json_atomic

__all__ = ["SplitRule", "SplitCounts", "WrittenSplits", "group_key", "split_images", "write_splits",
           "read_coco_json", "split_coco_file", "add_split_arguments", "rule_from_args", "summary_lines",
           "add_command"]

SPLIT_ORDER = ("train", "val", "test")
# a stem's sequence prefix: everything up to its last '_' or '-' that digits (and nothing else) follow
_PREFIX = re.compile(r"^(.+)[_-]\d+$")


@dataclass(frozen=True)
class SplitRule:
    """Fractions of the images for val and test (train gets the rest), the group key and the seed."""
    val: float = 0.2
    test: float = 0.0
    group_by: str = "image"
    seed: int = 0

    def check(self) -> None:
        if not 0.0 < self.val < 1.0:
            raise ConfigError(f"--val must be above 0 and below 1 (a data set needs a val split), got {self.val}")
        if not 0.0 <= self.test < 1.0:
            raise ConfigError(f"--test must be in [0, 1), got {self.test}")
        if self.val + self.test >= 1.0:
            raise ConfigError(f"--val {self.val} + --test {self.test} leave nothing for train; their sum must be "
                              "below 1")
        by = self.group_by
        if by not in ("image", "folder", "prefix") and not (by.startswith("field:") and by[len("field:"):]):
            raise ConfigError(f"--group-by must be image, folder, prefix or field:NAME, got {by!r}")

    def fractions(self) -> dict[str, float]:
        out = {"train": round(1.0 - self.val - self.test, 6), "val": self.val}
        if self.test > 0:
            out["test"] = self.test
        return out


def group_key(image: dict, group_by: str, where: str = "") -> str:
    """The group of one COCO image entry: ``image`` its file; ``folder`` the folder of its ``file_name``;
    ``prefix`` its file stem up to the last ``_``/``-`` followed by digits (``street1_0004`` -> ``street1``; a
    stem without that pattern is its own group); ``field:NAME`` the entry's ``NAME`` (missing: DatasetError)."""
    name = PurePosixPath(str(image.get("file_name", "")))
    if group_by == "image":
        return str(name)
    if group_by == "folder":
        return str(name.parent)
    if group_by == "prefix":
        match = _PREFIX.match(name.stem)
        # the folder too, so that one stem pattern in two folders stays two groups
        return str(name.parent / match.group(1)) if match else str(name)
    key = group_by[len("field:"):]
    if key not in image:
        raise DatasetError(f"{where}: image {image.get('id')!r} ({image.get('file_name')!r}) has no {key!r} key "
                           f"(--group-by {group_by}); every image needs it, or choose another --group-by")
    return json.dumps(image[key], sort_keys=True)  # one text per value, so that ints and strings sort together


def split_images(images: list[dict], rule: SplitRule, where: str = "") -> tuple[dict[str, list[dict]], dict]:
    """``({split: image entries, in their input order}, split record)`` by ``rule`` (see the module doc)."""
    rule.check()
    groups: dict[str, list[dict]] = {}
    for image in images:
        groups.setdefault(group_key(image, rule.group_by, where), []).append(image)
    order = sorted(groups)
    random.Random(rule.seed).shuffle(order)
    fractions = rule.fractions()
    filled = [s for s in ("test", "val") if s in fractions]
    needed = len(filled) + 1
    if len(order) < needed:
        names = " / ".join(s for s in SPLIT_ORDER if s in fractions)
        raise DatasetError(
            f"{where}: {len(images)} image(s) form {len(order)} group(s) by {rule.group_by}, and {names} need at "
            f"least {needed} (whole groups go to one split); choose a finer --group-by (e.g. image or prefix)")
    total = len(images)
    pool = order
    group_of_split: dict[str, list[str]] = {}
    for i, split in enumerate(filled):
        reserve = needed - i - 1          # the groups the splits after this one need
        target = fractions[split] * total
        taken, rest, count = [], [], 0
        for key in pool:
            size = len(groups[key])
            if len(pool) - len(taken) - 1 >= reserve and abs(count + size - target) < abs(count - target):
                taken.append(key)
                count += size
            else:
                rest.append(key)
        if not taken:  # every group overshoots: the one closest to the target (first in shuffled order on ties)
            closest = min(rest, key=lambda k: abs(len(groups[k]) - target))
            taken, rest = [closest], [k for k in rest if k != closest]
        group_of_split[split], pool = taken, rest
    group_of_split["train"] = pool
    split_of = {key: split for split, keys in group_of_split.items() for key in keys}
    parts: dict[str, list[dict]] = {s: [] for s in SPLIT_ORDER if s in fractions}
    for image in images:
        parts[split_of[group_key(image, rule.group_by, where)]].append(image)
    record = {"by": rule.group_by, "seed": rule.seed, "fractions": fractions, "groups": len(order)}
    return parts, record


@dataclass
class SplitCounts:
    """What one split holds: images, boxes (``iscrowd`` 0), ignore regions (``iscrowd`` 1), boxes per class."""
    images: int = 0
    boxes: int = 0
    ignored: int = 0
    empty_images: int = 0
    per_class: dict[str, int] = field(default_factory=dict)


@dataclass
class WrittenSplits:
    """A written data set: its folder, data file, the folder ``DST/images`` shows, classes, split and counts."""
    dst: Path
    data_file: Path
    images_from: Path
    copied: bool
    classes: list[str]
    split: dict
    counts: dict[str, SplitCounts]


def _place_images(images_root: Path, link: Path, file_names: list[str], copy: bool) -> None:
    """``link`` becomes a symbolic link to ``images_root`` or (``copy``) a folder with copies of the files."""
    target = images_root.resolve()
    if not link.is_symlink() and link.is_dir() and link.resolve() == target:
        return  # DST/images is the image folder itself (DST is the source folder)
    if copy:
        if link.is_symlink():
            link.unlink()
        for name in file_names:
            (link / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(images_root / name, link / name)
        return
    if link.is_symlink():
        if link.resolve() == target:
            return
        link.unlink()
    elif link.exists():
        raise DatasetError(f"{link} exists and is not a link to {target}; remove it, or copy the images (--copy)")
    link.symlink_to(target, target_is_directory=True)


def _counts(images: list[dict], annotations: list[dict], names: dict[int, str]) -> SplitCounts:
    counts = SplitCounts(images=len(images), per_class={n: 0 for n in names.values()})
    with_boxes = set()
    for ann in annotations:
        if ann.get("iscrowd", 0):
            counts.ignored += 1
            continue
        counts.boxes += 1
        counts.per_class[names[ann["category_id"]]] += 1
        with_boxes.add(ann["image_id"])
    counts.empty_images = sum(1 for img in images if img["id"] not in with_boxes)
    return counts


def write_splits(dst: str | os.PathLike, images_root: str | os.PathLike, parts: dict[str, tuple[list, list]],
                 categories: list[dict], info: dict, record: dict, copy: bool = False,
                 licenses: list | None = None) -> WrittenSplits:
    """Write ``DST/images`` (linked to ``images_root``, or copies), ``DST/{split}.json`` for each of ``parts``
    (``{split: (image entries, annotations)}``) with ``info`` (``info["split"]`` is ``record["split"]``) and
    ``DST/data.yaml`` whose ``dataset`` is ``record``. Classes are the category names in id order."""
    dst, images_root = Path(dst), Path(images_root)
    cats = sorted(categories, key=lambda c: c["id"])
    names = {c["id"]: str(c["name"]) for c in cats}
    dst.mkdir(parents=True, exist_ok=True)
    link = dst / "images"
    _place_images(images_root, link, [img["file_name"] for images, _ in parts.values() for img in images], copy)
    splits: dict[str, tuple[Path, Path]] = {}
    counts: dict[str, SplitCounts] = {}
    for split in SPLIT_ORDER:
        if split not in parts:
            continue
        images, annotations = parts[split]
        path = dst / f"{split}.json"
        write_json_atomic(path, {"info": {**info, "split": record["split"]}, "licenses": licenses or [],
                           "images": images, "annotations": annotations, "categories": cats})
        splits[split] = (link, path)
        counts[split] = _counts(images, annotations, names)
    data_file = write_data_file(dst / DATA_FILE_NAME, splits, list(names.values()), record=record)
    return WrittenSplits(dst=dst, data_file=data_file, images_from=images_root.resolve(), copied=copy,
                         classes=list(names.values()), split=record["split"], counts=counts)


def summary_lines(written: WrittenSplits) -> list[str]:
    """A table of images, boxes and boxes per class for each split, then where the files went."""
    splits = list(written.counts)
    rule = written.split
    if rule.get("by") == "source":
        lines = [f"split: the source's own ({rule.get('from')})"]
    else:
        shares = ", ".join(f"{s} {f:g}" for s, f in rule["fractions"].items())
        lines = [f"split: by {rule['by']}, seed {rule['seed']}, {rule['groups']} groups; asked {shares}"]
    width = max([len("images without boxes"), *(len(c) + 2 for c in written.classes)])
    lines.append(f"{'':<{width}}" + "".join(f"{s:>9}" for s in splits))
    rows = [("images", "images"), ("images without boxes", "empty_images"), ("boxes", "boxes"),
            ("ignore regions", "ignored")]
    for label, attr in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{getattr(written.counts[s], attr):>9}" for s in splits))
    for name in written.classes:
        lines.append(f"{'  ' + name:<{width}}" + "".join(f"{written.counts[s].per_class[name]:>9}" for s in splits))
    how = "copies of" if written.copied else "a link to"
    lines.append(f"written: {written.data_file} ({', '.join(f'{s}.json' for s in splits)}; images: {how} "
                 f"{written.images_from})")
    return lines


# ----------------------------------------------------------------------------------------- the split command
def read_coco_json(path: Path) -> dict:
    """A COCO instances file, its lists checked enough to split it; DatasetError naming the file and key."""
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    data = read_json(path, "cannot read COCO JSON")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {data.get(key)!r:.60}")
    if not data["images"]:
        raise DatasetError(f"{path}: 'images' is an empty list")
    ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DatasetError(f"{path}: images[{i}] needs an 'id' and a 'file_name', got {img!r:.120}")
        if img["id"] in ids:
            raise DatasetError(f"{path}: images[{i}] repeats image id {img['id']!r}")
        ids.add(img["id"])
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DatasetError(f"{path}: categories[{i}] needs 'id' and 'name', got {cat!r:.120}")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{i}] must be an object, got {ann!r:.80}")
        if ann.get("image_id") not in ids:
            raise DatasetError(f"{path}: annotations[{i}] has image_id {ann.get('image_id')!r}, which is not in "
                               "'images'")
    return data


def split_coco_file(annotations: str | os.PathLike, images_dir: str | os.PathLike, dst: str | os.PathLike,
                    rule: SplitRule | None = None, copy: bool = False) -> WrittenSplits:
    """Split one COCO file by ``rule`` into ``DST/{train,val[,test]}.json`` + ``DST/images`` + ``DST/data.yaml``.
    Categories, image and annotation ids and boxes are kept; each annotation follows its image."""
    path, images_dir = Path(annotations), Path(images_dir)
    rule = rule or SplitRule()
    data = read_coco_json(path)
    if not images_dir.is_dir():
        raise DatasetError(f"images folder not found: {images_dir} (for {path})")
    image_parts, split = split_images(data["images"], rule, where=str(path))
    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    parts = {s: (imgs, [a for img in imgs for a in by_image.get(img["id"], [])]) for s, imgs in image_parts.items()}
    info = {"description": f"{path.name} split by dset.data split", "converter": "dset.data.split",
            "source": str(path.resolve())}
    record = {"source": {"format": "coco", "path": str(path.resolve()), "images": str(images_dir.resolve())},
              "split": split}
    return write_splits(dst, images_dir, parts, data["categories"], info, record, copy=copy,
                        licenses=data.get("licenses") if isinstance(data.get("licenses"), list) else None)


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """``--val``, ``--test``, ``--group-by``, ``--seed``; left out, they are None (:func:`rule_from_args`)."""
    rule = SplitRule()
    parser.add_argument("--val", type=float, default=None, help=f"fraction of images for val (default {rule.val})")
    parser.add_argument("--test", type=float, default=None,
                        help=f"fraction of images for test (default {rule.test:g}: no test split)")
    parser.add_argument("--group-by", default=None, metavar="image|folder|prefix|field:NAME",
                        help="whole groups go to one split: each image (default), its folder, its file-name "
                             "prefix before _NNNN, or an image entry's key")
    parser.add_argument("--seed", type=int, default=None, help=f"seed of the shuffle (default {rule.seed})")


def rule_from_args(ns: argparse.Namespace) -> SplitRule | None:
    """The split rule the options give, or None when none of them is given."""
    given = {k: getattr(ns, k) for k in ("val", "test", "group_by", "seed") if getattr(ns, k) is not None}
    return SplitRule(**given) if given else None


def _run(ns: argparse.Namespace) -> int:
    written = split_coco_file(ns.annotations, ns.images, ns.dst, rule_from_args(ns), copy=ns.copy)
    print("\n".join(summary_lines(written)))
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser("split", help="split one COCO file into train / val (/ test) with a data file",
                              description="Split one COCO instances file into DST/train.json, DST/val.json (and "
                                          "DST/test.json), DST/images and DST/data.yaml; whole groups of images "
                                          "go to one split.")
    p.add_argument("annotations", help="the COCO instances JSON")
    p.add_argument("--images", required=True, help="the folder its file_name entries are relative to")
    p.add_argument("dst", help="output folder")
    add_split_arguments(p)
    p.add_argument("--copy", action="store_true", help="copy the images into DST/images instead of linking")
    p.set_defaults(run=_run)
