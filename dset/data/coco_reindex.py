"""A COCO instances file read into a :class:`~dset.data.conversion.SourceSet` with its categories re-indexed
(``convert --from coco``).

Rules:
- Categories are sorted by id and become 1..C in that order, names kept; 0-based, non-contiguous and COCO's
  91-id files alike. ``--classes a,b`` keeps only those (by name) in that order; annotations of the others are
  dropped, counted. Two categories with one id or one name are an error.
- Annotations whose ``category_id`` is not among the categories are dropped, counted; ``iscrowd``, ``area`` and
  ``segmentation`` are kept (``area`` defaults to the box's); annotation ids are renumbered 1..M.
- Boxes are clipped to the image; one with no area left is dropped. A box that is not four numbers is an error
  naming the annotation.
- Image entries are kept as they are (ids, extra keys such as a sequence id for ``--group-by field:NAME``);
  ``width`` / ``height`` come from the file header when missing. An image whose file is not in the images
  folder is dropped with its annotations, counted.
- Images folder: ``--images DIR``, else ``images/`` beside the JSON when there, else the JSON's folder.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..config_checks import ConfigError
from .conversion import SourceSet, coco_box, image_size
from .errors import DatasetError
from .split import read_coco_json

__all__ = ["read_coco", "default_images_dir"]


def default_images_dir(path: Path) -> Path:
    beside = path.parent / "images"
    return beside if beside.is_dir() else path.parent


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _categories(data: dict, path: Path, classes: list[str] | None) -> tuple[dict[Any, int], list[dict]]:
    """``({source category id: new id}, new categories)``."""
    cats = data["categories"]
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or not _is_number(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DatasetError(f"{path}: categories[{i}] needs a numeric 'id' and a 'name', got {cat!r:.120}")
    for key in ("id", "name"):
        seen = Counter(c[key] for c in cats)
        twice = sorted((v for v, n in seen.items() if n > 1), key=str)
        if twice:
            raise DatasetError(f"{path}: categories share the {key} {twice[0]!r}; each category needs its own "
                               f"{key}")
    ordered = sorted(cats, key=lambda c: c["id"])
    if classes is not None:
        by_name = {c["name"]: c for c in ordered}
        unknown = [n for n in classes if n not in by_name]
        if unknown:
            raise ConfigError(f"--classes {unknown} not among the categories of {path}: "
                              f"{[c['name'] for c in ordered]}")
        ordered = [by_name[n] for n in classes]
    new_id = {c["id"]: i + 1 for i, c in enumerate(ordered)}
    new_cats = []
    for c in ordered:
        entry = {"id": new_id[c["id"]], "name": c["name"]}
        if "supercategory" in c:
            entry["supercategory"] = c["supercategory"]
        new_cats.append(entry)
    return new_id, new_cats


def read_coco(src: str | Path, images_dir: str | Path | None = None, classes: list[str] | None = None) -> SourceSet:
    """The COCO instances file ``src`` (see the module doc) as a SourceSet."""
    path = Path(src)
    if not path.is_file():
        raise DatasetError(f"COCO annotation file not found: {path}" + (" (give the JSON file, not a folder)"
                                                                         if path.is_dir() else ""))
    images_root = Path(images_dir) if images_dir is not None else default_images_dir(path)
    if not images_root.is_dir():
        raise DatasetError(f"images folder not found: {images_root} (for {path}); give it with --images")
    data = read_coco_json(path)   # lists, unique image ids, annotations of listed images
    new_id, categories = _categories(data, path, classes)
    known = {c["id"] for c in data["categories"]}

    dropped: Counter[str] = Counter()
    noted: Counter[str] = Counter()
    images: list[dict] = []
    sizes: dict[Any, tuple[float, float]] = {}
    for img in data["images"]:
        file = images_root / img["file_name"]
        if not file.is_file():
            dropped["images whose file is missing"] += 1
            continue
        img = dict(img)
        if not (_is_number(img.get("width")) and _is_number(img.get("height"))
                and img["width"] > 0 and img["height"] > 0):
            img["width"], img["height"] = image_size(file)
            noted["images sized from the file (no width / height in the JSON)"] += 1
        sizes[img["id"]] = (img["width"], img["height"])
        images.append(img)

    annotations = []
    for i, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in sizes:
            continue  # its image was dropped, counted there
        cat = ann.get("category_id")
        if cat not in known:
            dropped[f"annotations with category_id {cat!r}, which is not in 'categories'"] += 1
            continue
        if cat not in new_id:
            dropped["annotations of categories not in --classes"] += 1
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{path}: annotations[{i}] (id {ann.get('id')!r}) 'bbox' must be four numbers "
                               f"[x, y, w, h], got {bbox!r:.80}")
        x, y, w, h = bbox
        width, height = sizes[ann["image_id"]]
        box = coco_box(x, y, x + w, y + h, width, height)
        if box is None:
            dropped["boxes with no area inside the image"] += 1
            continue
        if x < 0 or y < 0 or x + w > width or y + h > height:
            noted["boxes clipped to the image"] += 1
        area = ann.get("area")
        out = {"id": len(annotations) + 1, "image_id": ann["image_id"], "category_id": new_id[cat], "bbox": box,
               "area": area if _is_number(area) and area > 0 else round(box[2] * box[3], 4),
               "iscrowd": int(bool(ann.get("iscrowd", 0)))}
        if "segmentation" in ann:
            out["segmentation"] = ann["segmentation"]
        annotations.append(out)
    old_ids = list(new_id)   # in the new order
    if old_ids != list(range(1, len(old_ids) + 1)):
        noted[f"categories re-indexed: ids {_ids_text(old_ids)} -> 1..{len(old_ids)}"] += len(old_ids)
    return SourceSet(format="coco", path=path, layout="COCO instances JSON + images folder",
                     images_root=images_root, categories=categories, images=images, annotations=annotations,
                     options={"images": str(images_root.resolve()), "category_ids": new_id},
                     dropped=dropped, noted=noted,
                     licenses=data.get("licenses") if isinstance(data.get("licenses"), list) else None)


def _ids_text(ids: list) -> str:
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
