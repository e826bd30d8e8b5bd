"""DAIR-V2X (camera, 2D boxes) -> COCO instances converter.

Input layout (DAIR-V2X-I ``single-infrastructure-side``, or the ``infrastructure-side`` / ``vehicle-side``
folder of DAIR-V2X-C, which share it)::

    SRC/image/{frame}.jpg            (.jpeg / .png also accepted)
    SRC/label/camera/{frame}.json    a JSON list of objects, each with "type" and
                                     "2d_box": {"xmin", "ymin", "xmax", "ymax"} (strings or numbers, pixels)

Frames are the label files; each must have its image. Images without a label file are not converted.

Split, first match wins:
1. ``split_file``: a JSON object with lists under "train" and "val" (other keys such as "test" are ignored),
   e.g. DAIR-V2X's ``single-infrastructure-split-data.json``; or a ``.txt`` file is an error (give the folder's
   train.txt/val.txt instead);
2. ``SRC/train.txt`` and ``SRC/val.txt``: one frame per line;
3. ``SRC/split.json``: as in 1;
4. otherwise a deterministic split by sequence, so that adjacent frames of one recording never land in both
   train and val: the sequences are ``SRC/data_info.json``'s ``batch_id`` groups where that file lists the
   frames (DAIR-V2X's own index), else runs of consecutive frame ids (a gap in the numbering starts a new
   sequence). The sequences, sorted, are shuffled with ``random.Random(seed)`` and go to val whole until it holds
   ``round(val_fraction * n)`` frames (at least one sequence, never all of them); one sequence alone cannot be
   split, which is an error asking for a split file.
Split entries may be frame ids ("000123") or paths ("image/000123.jpg"): the file stem is the frame id.
Listed frames must exist; frames that a split file does not list are left out (and counted).

Classes (COCO category ids 1..8): Car, Truck, Van, Bus, Pedestrian, Cyclist, Motorcyclist, Trafficcone.
Types match case-insensitively, ignoring spaces, '_' and '-'. Rules for the other DAIR-V2X types:
- "Barrowlist" (and "Barrow") -> Cyclist.
- Ignore regions: "PedestrianIgnore" -> Pedestrian and "CarIgnore" -> Car, written with ``iscrowd: 1``: a type
  becomes a crowd region only through this explicit list, so pycocotools neither rewards nor penalises
  detections on it, and the training data set (CocoDetection) never uses it as a target.
- Known types with no class here are dropped: Tricyclist, OtherIgnore, Unknown(s)_movable,
  Unknown(s)_unmovable. Any other type is dropped too and reported as unknown.
Boxes are clipped to the image; boxes with no area left are dropped and counted. ``area`` is the box area.

Images stay where they are: ``DST/images`` is a symbolic link to ``SRC/image`` (``images="copy"`` copies the
files instead), and ``file_name`` is the image's name, so the result loads as
``CocoDetection(DST/images, DST/train.json)`` (and ``DST/val.json``). Each image entry keeps its ``frame_id``
and each annotation its original ``dair_type``. Image ids are 1..N over all converted frames sorted by id.

Command line: ``python -m dset.data.dair_v2x SRC DST [--val-fraction F] [--seed S] [--split-file F] [--copy]``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError
from .json_files import read_json, write_json_atomic

__all__ = ["DAIR_V2X_CLASSES", "CLASS_MAP", "IGNORE_REGION_TYPES", "DROPPED_TYPES", "convert_dair_v2x"]

DAIR_V2X_CLASSES: tuple[str, ...] = (
    "Car", "Truck", "Van", "Bus", "Pedestrian", "Cyclist", "Motorcyclist", "Trafficcone",
)
_CATEGORY_ID = {name: i + 1 for i, name in enumerate(DAIR_V2X_CLASSES)}

# normalised type -> class name (normalised: lower case without spaces, '_' and '-')
CLASS_MAP: dict[str, str] = {name.lower(): name for name in DAIR_V2X_CLASSES}
CLASS_MAP.update({"barrowlist": "Cyclist", "barrow": "Cyclist"})
IGNORE_REGION_TYPES: dict[str, str] = {"pedestrianignore": "Pedestrian", "carignore": "Car"}
DROPPED_TYPES: frozenset[str] = frozenset(
    {"tricyclist", "otherignore", "unknownmovable", "unknownunmovable", "unknownsmovable", "unknownsunmovable"}
)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _norm_type(t: str) -> str:
    return re.sub(r"[\s_\-]", "", t).lower()


def _frame_of(entry: Any) -> str:
    return Path(str(entry).strip()).stem


def _read_split(src: Path, split_file: Path | None) -> tuple[list[str], list[str], str] | None:
    def from_json(path: Path) -> tuple[list[str], list[str], str]:
        data = read_json(path, "cannot read split file")
        if not (isinstance(data, dict) and isinstance(data.get("train"), list) and isinstance(data.get("val"), list)):
            raise DatasetError(f"{path}: split file must be a JSON object with lists under 'train' and 'val'")
        return [_frame_of(x) for x in data["train"]], [_frame_of(x) for x in data["val"]], str(path)

    def from_txt(path: Path) -> list[str]:
        return [_frame_of(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    if split_file is not None:
        split_file = Path(split_file)
        if not split_file.is_file():
            raise DatasetError(f"split file not found: {split_file}")
        if split_file.suffix.lower() != ".json":
            raise DatasetError(
                f"{split_file}: split_file must be a JSON file with 'train' and 'val' lists "
                f"(for text lists put train.txt and val.txt in {src})"
            )
        return from_json(split_file)
    if (src / "train.txt").is_file() and (src / "val.txt").is_file():
        return from_txt(src / "train.txt"), from_txt(src / "val.txt"), f"{src / 'train.txt'} + {src / 'val.txt'}"
    if (src / "split.json").is_file():
        return from_json(src / "split.json")
    return None


def _find_image(image_dir: Path, frame: str) -> Path | None:
    for ext in _IMAGE_EXTS:
        p = image_dir / f"{frame}{ext}"
        if p.is_file():
            return p
    return None


def _parse_box(obj: Any, label_file: Path, k: int) -> tuple[str, tuple[float, float, float, float]]:
    if not isinstance(obj, dict) or "type" not in obj or "2d_box" not in obj:
        raise DatasetError(f"{label_file}: object {k} must have 'type' and '2d_box', got {obj!r}")
    box = obj["2d_box"]
    if not isinstance(box, dict):
        raise DatasetError(f"{label_file}: object {k} has a '2d_box' that is not an object: {box!r}")
    try:
        xyxy = tuple(float(box[key]) for key in ("xmin", "ymin", "xmax", "ymax"))
    except KeyError as e:
        raise DatasetError(f"{label_file}: object {k} '2d_box' is missing {e}: {box!r}") from e
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{label_file}: object {k} '2d_box' has a non-numeric value: {box!r}") from e
    if any(v != v or v in (float("inf"), float("-inf")) for v in xyxy):
        raise DatasetError(f"{label_file}: object {k} '2d_box' has a non-finite value: {box!r}")
    return str(obj["type"]), xyxy  # type: ignore[return-value]


def _sequences(src: Path, labelled: list[str]) -> tuple[list[list[str]], str]:
    """The labelled frames grouped by the recording they come from, and how they were grouped."""
    info_path = src / "data_info.json"
    if info_path.is_file():
        info = read_json(info_path, "cannot read")
        if not isinstance(info, list):
            raise DatasetError(f"{info_path}: expected a JSON list of frame entries")
        batch_of = {}
        for k, entry in enumerate(info):
            if not isinstance(entry, dict) or "image_path" not in entry or "batch_id" not in entry:
                raise DatasetError(f"{info_path}: entry {k} lacks 'image_path' or 'batch_id'")
            batch_of[_frame_of(entry["image_path"])] = str(entry["batch_id"])
        unlisted = [f for f in labelled if f not in batch_of]
        if unlisted:
            raise DatasetError(f"{info_path}: {len(unlisted)} labelled frame(s) are not listed, e.g. {unlisted[0]!r}")
        groups: dict[str, list[str]] = {}
        for f in labelled:
            groups.setdefault(batch_of[f], []).append(f)
        return [groups[b] for b in sorted(groups)], f"{info_path.name} batch_id"
    runs: list[list[str]] = []
    previous = None
    for f in labelled:  # sorted
        number = int(f) if f.isdigit() else None
        if runs and number is not None and previous is not None and number == previous + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
        previous = number
    return runs, "runs of consecutive frame ids"


def _split_by_sequence(src: Path, labelled: list[str], val_fraction: float,
                       seed: int) -> tuple[list[str], list[str], str]:
    """``(train frames, val frames, where the split came from)``: whole sequences to val (see the module doc)."""
    sequences, grouping = _sequences(src, labelled)
    split_source = (f"split by sequence ({grouping}: {len(sequences)} sequences), {1 - val_fraction:.0%}/"
                    f"{val_fraction:.0%} of frames, seed {seed}")
    if val_fraction == 0:
        return list(labelled), [], split_source
    if len(sequences) < 2:
        raise DatasetError(f"{src}: all {len(labelled)} frames form one sequence ({grouping}), which cannot be split "
                           f"into train and val without putting adjacent frames in both; give a split file")
    order = list(sequences)
    random.Random(seed).shuffle(order)
    target = round(val_fraction * len(labelled))
    val: list[str] = []
    taken = 0
    while taken < len(order) - 1 and (taken == 0 or len(val) < target):
        val += order[taken]
        taken += 1
    train = [f for seq in order[taken:] for f in seq]
    return sorted(train), sorted(val), split_source


def _choose_frames(src: Path, label_dir: Path, labelled: list[str], split_file: str | os.PathLike | None,
                   val_fraction: float, seed: int) -> tuple[list[str], list[str], str, int]:
    """``(train frames, val frames, where the split came from, labelled frames the split leaves out)``."""
    split = _read_split(src, Path(split_file) if split_file is not None else None)
    if split is None:
        return (*_split_by_sequence(src, labelled, val_fraction, seed), 0)
    train_frames, val_frames, split_source = split
    labelled_set = set(labelled)
    for name, frames in (("train", train_frames), ("val", val_frames)):
        missing = [f for f in frames if f not in labelled_set]
        if missing:
            raise DatasetError(
                f"{split_source}: {len(missing)} {name} frame(s) have no label file in {label_dir}, "
                f"e.g. {missing[0]!r}"
            )
    both = sorted(set(train_frames) & set(val_frames))
    if both:
        raise DatasetError(f"{split_source}: {len(both)} frame(s) are in both train and val, e.g. {both[0]!r}")
    train_frames, val_frames = sorted(set(train_frames)), sorted(set(val_frames))
    unlisted = len(labelled_set - set(train_frames) - set(val_frames))
    return train_frames, val_frames, split_source, unlisted


@dataclass
class _LeftOut:
    """The objects a conversion left out, over both splits."""
    dropped: Counter[str] = field(default_factory=Counter)    # known types with no class here
    unknown: Counter[str] = field(default_factory=Counter)    # types this converter does not know
    degenerate: int = 0                                       # boxes with no area left after clipping


def _read_frame(frame: str, image_dir: Path, label_dir: Path) -> tuple[Path, int, int, list]:
    """``(image file, width, height, label objects)`` of one frame."""
    img_path = _find_image(image_dir, frame)
    label_file = label_dir / f"{frame}.json"
    if img_path is None:
        raise DatasetError(f"{label_file}: image for frame {frame!r} not found in {image_dir}")
    try:
        with Image.open(img_path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image {img_path}: {e}") from e
    objects = read_json(label_file, "malformed label JSON")
    if not isinstance(objects, list):
        raise DatasetError(f"{label_file}: label JSON must be a list of objects, got {type(objects).__name__}")
    return img_path, width, height, objects


def _frame_boxes(objects: list, label_file: Path, width: int, height: int,
                 left_out: _LeftOut) -> list[tuple[str, int, list[float], str]]:
    """``(class, iscrowd, [x, y, w, h] clipped to the image, DAIR-V2X type)`` of each object kept."""
    boxes = []
    for k, obj in enumerate(objects):
        dair_type, (x0, y0, x1, y1) = _parse_box(obj, label_file, k)
        t = _norm_type(dair_type)
        if t in CLASS_MAP:
            cls, iscrowd = CLASS_MAP[t], 0
        elif t in IGNORE_REGION_TYPES:
            cls, iscrowd = IGNORE_REGION_TYPES[t], 1
        else:
            (left_out.dropped if t in DROPPED_TYPES else left_out.unknown)[dair_type] += 1
            continue
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            left_out.degenerate += 1
            continue
        boxes.append((cls, iscrowd, [x0, y0, x1 - x0, y1 - y0], dair_type))
    return boxes


def _convert_split(frames: list[str], image_id: dict[str, int], image_dir: Path, label_dir: Path,
                   left_out: _LeftOut) -> tuple[list[dict], list[dict], Counter[str], int]:
    """``(COCO images, COCO annotations, objects per class, crowd regions)`` of one split's frames."""
    coco_images, coco_anns = [], []
    counts: Counter[str] = Counter()
    n_crowd = 0
    for frame in frames:
        img_path, width, height, objects = _read_frame(frame, image_dir, label_dir)
        iid = image_id[frame]
        coco_images.append({"id": iid, "file_name": img_path.name, "width": width, "height": height, "frame_id": frame})
        for cls, iscrowd, bbox, dair_type in _frame_boxes(objects, label_dir / f"{frame}.json", width, height,
                                                          left_out):
            coco_anns.append({"id": len(coco_anns) + 1, "image_id": iid, "category_id": _CATEGORY_ID[cls],
                              "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": iscrowd, "dair_type": dair_type})
            if iscrowd:
                n_crowd += 1
            else:
                counts[cls] += 1
    return coco_images, coco_anns, counts, n_crowd


def _place_images(image_dir: Path, images_dir: Path, images: str, file_names: list[str]) -> None:
    """``images_dir`` becomes a link to ``image_dir`` (``images="symlink"``) or a folder with copies of the files."""
    target = image_dir.resolve()
    if images == "symlink":
        if images_dir.is_symlink():
            if images_dir.resolve() != target:
                images_dir.unlink()
        elif images_dir.exists():
            raise DatasetError(f"{images_dir} exists and is not a link to {target}; remove it or use images='copy'")
        if not images_dir.is_symlink():
            images_dir.symlink_to(target, target_is_directory=True)
    else:
        if images_dir.is_symlink():
            images_dir.unlink()
        images_dir.mkdir(exist_ok=True)
        for name in file_names:
            shutil.copy2(image_dir / name, images_dir / name)


def convert_dair_v2x(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_file: str | os.PathLike | None = None,
    images: str = "symlink",
    verbose: bool = True,
) -> dict[str, Any]:
    """Convert a DAIR-V2X camera folder to ``DST/train.json`` + ``DST/val.json`` (COCO) and ``DST/images``.

    Returns ``{"train_annotations", "val_annotations", "images_dir", "num_train_images", "num_val_images",
    "annotations": {"train": {class: n}, "val": {class: n}}, "crowd_regions": {"train": n, "val": n},
    "dropped_types": {type: n}, "unknown_types": {type: n}, "degenerate_boxes": n, "unlisted_frames": n,
    "split_source": str}``. Prints a summary when ``verbose``.
    """
    src, dst = Path(src), Path(dst)
    image_dir, label_dir = src / "image", src / "label" / "camera"
    if not image_dir.is_dir():
        raise DatasetError(f"DAIR-V2X image folder not found: {image_dir}")
    if not label_dir.is_dir():
        raise DatasetError(f"DAIR-V2X camera label folder not found: {label_dir}")
    if images not in ("symlink", "copy"):
        raise ValueError(f"images must be 'symlink' or 'copy', got {images!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    labelled = sorted(p.stem for p in label_dir.glob("*.json"))
    if not labelled:
        raise DatasetError(f"no label files (*.json) in {label_dir}")
    train_frames, val_frames, split_source, unlisted = _choose_frames(src, label_dir, labelled, split_file,
                                                                      val_fraction, seed)

    image_id = {f: i + 1 for i, f in enumerate(sorted(set(train_frames) | set(val_frames)))}
    categories = [{"id": _CATEGORY_ID[n], "name": n, "supercategory": "traffic"} for n in DAIR_V2X_CLASSES]
    left_out = _LeftOut()
    outputs: dict[str, dict] = {}
    per_class: dict[str, dict[str, int]] = {}
    crowd: dict[str, int] = {}
    for split_name, frames in (("train", train_frames), ("val", val_frames)):
        coco_images, coco_anns, counts, crowd[split_name] = _convert_split(frames, image_id, image_dir, label_dir,
                                                                           left_out)
        outputs[split_name] = {
            "info": {"description": f"DAIR-V2X camera 2D boxes ({split_name})", "source": str(src.resolve()),
                     "split": split_source},
            "licenses": [],
            "images": coco_images,
            "annotations": coco_anns,
            "categories": categories,
        }
        per_class[split_name] = {n: counts[n] for n in DAIR_V2X_CLASSES}

    # everything read and checked: write
    dst.mkdir(parents=True, exist_ok=True)
    images_dir = dst / "images"
    _place_images(image_dir, images_dir, images,
                  [img["file_name"] for split_name in ("train", "val") for img in outputs[split_name]["images"]])
    for split_name in ("train", "val"):
        write_json_atomic(dst / f"{split_name}.json", outputs[split_name])

    if left_out.unknown:
        warnings.warn(f"DAIR-V2X {src}: dropped objects of unknown type(s) {dict(left_out.unknown)}", stacklevel=2)
    summary = {
        "train_annotations": str(dst / "train.json"),
        "val_annotations": str(dst / "val.json"),
        "images_dir": str(images_dir),
        "num_train_images": len(train_frames),
        "num_val_images": len(val_frames),
        "annotations": per_class,
        "crowd_regions": crowd,
        "dropped_types": dict(left_out.dropped),
        "unknown_types": dict(left_out.unknown),
        "degenerate_boxes": left_out.degenerate,
        "unlisted_frames": unlisted,
        "split_source": split_source,
    }
    if verbose:
        _print_summary(summary)
    return summary


def _print_summary(s: dict[str, Any], file=sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"split: {s['split_source']}")
    p(f"images: train {s['num_train_images']}, val {s['num_val_images']}"
      + (f" ({s['unlisted_frames']} labelled frames not in the split)" if s["unlisted_frames"] else ""))
    p(f"{'class':<14}{'train':>8}{'val':>8}")
    for name in DAIR_V2X_CLASSES:
        p(f"{name:<14}{s['annotations']['train'][name]:>8}{s['annotations']['val'][name]:>8}")
    p(f"{'crowd regions':<14}{s['crowd_regions']['train']:>8}{s['crowd_regions']['val']:>8}")
    if s["dropped_types"]:
        p(f"dropped (no class): {s['dropped_types']}")
    if s["unknown_types"]:
        p(f"dropped (unknown type): {s['unknown_types']}")
    if s["degenerate_boxes"]:
        p(f"dropped degenerate boxes: {s['degenerate_boxes']}")
    p(f"written: {s['train_annotations']}, {s['val_annotations']}, images: {s['images_dir']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dset.data.dair_v2x", description="DAIR-V2X camera labels -> COCO")
    ap.add_argument("src", help="DAIR-V2X folder holding image/ and label/camera/")
    ap.add_argument("dst", help="output folder: train.json, val.json, images/")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-file", default=None, help="JSON with 'train' and 'val' frame lists")
    ap.add_argument("--copy", action="store_true", help="copy images into DST/images instead of linking")
    args = ap.parse_args(argv)
    try:
        convert_dair_v2x(args.src, args.dst, val_fraction=args.val_fraction, seed=args.seed,
                         split_file=args.split_file, images="copy" if args.copy else "symlink")
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
