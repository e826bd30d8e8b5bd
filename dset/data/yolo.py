"""YOLO labels read into a :class:`~dset.data.conversion.SourceSet` (``convert --from yolo``).

Layout: every image under ``SRC`` whose path has an ``images`` folder; its label file is the same path with the
last ``images`` replaced by ``labels`` and the suffix by ``.txt`` (Ultralytics' rule): ``images/`` + ``labels/``
mirrors, ``images/{train,val,test}/`` + ``labels/{train,val,test}/``, or ``{train,val,test}/images`` +
``{train,val,test}/labels``. A ``train`` / ``val`` (``valid``) / ``test`` folder next to ``images`` is the
source's split; either every image has one or none.

Classes: ``--classes`` (names of class 0, 1, ...), else ``names`` in ``SRC/data.yaml`` or ``SRC/dataset.yaml``
(a list, or a mapping 0..C-1 -> name), else ``classes.txt`` (``SRC/`` or ``SRC/labels/``), one name a line.
YOLO class k becomes category id k + 1.

Label lines: ``k cx cy w h`` normalised to 0..1 (or ``k x1 y1 x2 y2 ...``, a polygon, whose bounding box is
taken); pixels are ``cx * width`` etc. with the size from the image file's header. Boxes are clipped to the image,
one with no area left is dropped. An empty label file is an image without objects (kept); a missing one too, but
counted. A malformed line, a class index out of range or coordinates far outside 0..1 (pixels, not normalised)
are errors naming file and line.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import yaml

from .conversion import IMAGE_SUFFIXES, SourceSet, categories_of, coco_box, image_size
from .errors import DatasetError

__all__ = ["read_yolo", "read_class_names"]

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "test": "test"}
_MAX_NORMALISED = 1.5   # beyond this a coordinate is pixels, not a fraction of the image


def read_class_names(src: Path) -> tuple[list[str], str] | None:
    """``(names, the file they came from)`` from ``data.yaml`` / ``dataset.yaml`` or ``classes.txt``, or None."""
    for name in ("data.yaml", "dataset.yaml"):
        path = src / name
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DatasetError(f"{path}: cannot read the YOLO data file ({e})") from e
        names = data.get("names") if isinstance(data, dict) else None
        if names is None:
            continue
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise DatasetError(f"{path}: 'names' keys must be the class indices 0..{len(names) - 1}, got "
                                   f"{sorted(names, key=str)}")
            names = [names[k] for k in range(len(names))]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise DatasetError(f"{path}: 'names' must be a list (or index -> name mapping) of class names, got "
                               f"{names!r:.120}")
        return [n.strip() for n in names], str(path)
    for path in (src / "classes.txt", src / "labels" / "classes.txt"):
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            while lines and not lines[-1].strip():
                lines.pop()
            if not lines or any(not line.strip() for line in lines):
                raise DatasetError(f"{path}: one class name a line, no empty lines (line k is class k - 1)")
            return [line.strip() for line in lines], str(path)
    return None


def _label_path(rel: Path) -> tuple[Path, str | None] | None:
    """``(label file relative to SRC, split or None)`` for an image path relative to SRC, or None when the path
    has no ``images`` folder."""
    parts = rel.parts
    at = [i for i, p in enumerate(parts[:-1]) if p == "images"]
    if not at:
        return None
    k = at[-1]
    label = Path(*parts[:k], "labels", *parts[k + 1:]).with_suffix(".txt")
    split = None
    if k + 2 < len(parts) and parts[k + 1] in _SPLIT_NAMES:
        split = _SPLIT_NAMES[parts[k + 1]]
    elif k > 0 and parts[k - 1] in _SPLIT_NAMES:
        split = _SPLIT_NAMES[parts[k - 1]]
    return label, split


def _read_labels(path: Path, num_classes: int, width: int, height: int) -> list[tuple[int, tuple]]:
    """``(class index, (x0, y0, x1, y1) in pixels)`` of each line of one label file."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the label file ({e})") from e
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise DatasetError(f"{where}: a label line is 'class cx cy w h' (or 'class x1 y1 x2 y2 ...', a "
                               f"polygon), got {len(fields)} fields: {line.strip()!r:.80}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DatasetError(f"{where}: not a number in {line.strip()!r:.80}") from None
        k = values[0]
        if not k.is_integer():
            raise DatasetError(f"{where}: class index must be a whole number, got {fields[0]!r}")
        if not 0 <= k < num_classes:
            raise DatasetError(f"{where}: class index {int(k)} is out of range; there are {num_classes} class "
                               f"names (0..{num_classes - 1})")
        coords = values[1:]
        if not all(math.isfinite(v) and -(_MAX_NORMALISED - 1) <= v <= _MAX_NORMALISED for v in coords):
            raise DatasetError(f"{where}: coordinates must be fractions of the image size (0..1), got "
                               f"{' '.join(fields[1:])!r:.80}")
        if len(fields) == 5:
            cx, cy, w, h = coords
            if w < 0 or h < 0:
                raise DatasetError(f"{where}: width and height must not be negative, got {fields[3]} {fields[4]}")
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = coords[0::2], coords[1::2]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        out.append((int(k), (x0 * width, y0 * height, x1 * width, y1 * height)))
    return out


def read_yolo(src: str | Path, classes: list[str] | None = None) -> SourceSet:
    """The YOLO folder ``src`` (see the module doc) as a SourceSet."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"YOLO folder not found: {src}")
    if classes is not None:
        classes_from = "--classes"
    else:
        found = read_class_names(src)
        if found is None:
            raise DatasetError(f"{src}: no class names: give --classes a,b,c, or write 'names' in {src}/data.yaml "
                               f"or one name a line in {src}/classes.txt")
        classes, classes_from = found
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    found_images = [(p, _label_path(p.relative_to(src))) for p in files]
    found_images = [(p, lab) for p, lab in found_images if lab is not None]
    if not found_images:
        raise DatasetError(f"{src}: no images in an 'images' folder (images/ + labels/, or images/train/ + "
                           "labels/train/ ...)")
    with_split = [p for p, (_, split) in found_images if split is not None]
    if with_split and len(with_split) < len(found_images):
        other = next(p for p, (_, split) in found_images if split is None)
        raise DatasetError(f"{src}: some images are in train / val / test folders ({with_split[0]}) and some are "
                           f"not ({other}); put every image in one, or none")

    dropped: Counter[str] = Counter()
    noted: Counter[str] = Counter()
    images, annotations = [], []
    split: dict[str, list[int]] = {}
    for image_id, (path, (label_rel, part)) in enumerate(found_images, start=1):
        width, height = image_size(path)
        images.append({"id": image_id, "file_name": path.relative_to(src).as_posix(), "width": width,
                       "height": height})
        if part is not None:
            split.setdefault(part, []).append(image_id)
        label = src / label_rel
        if not label.is_file():
            noted["images without a label file (kept without boxes)"] += 1
            continue
        for k, (x0, y0, x1, y1) in _read_labels(label, len(classes), width, height):
            box = coco_box(x0, y0, x1, y1, width, height)
            if box is None:
                dropped["boxes with no area inside the image"] += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": k + 1,
                                "bbox": box, "area": round(box[2] * box[3], 4), "iscrowd": 0})
    layout = "images/ + labels/" + (f", split into {' / '.join(split)} folders" if split else "")
    return SourceSet(format="yolo", path=src, layout=layout, images_root=src, categories=categories_of(classes),
                     images=images, annotations=annotations, source_split=split or None,
                     source_split_from=("the folders " + ", ".join(split)) if split else "",
                     options={"classes_from": classes_from}, dropped=dropped, noted=noted)
