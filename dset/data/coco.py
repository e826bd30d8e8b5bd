"""COCO-format detection data set (``instances_*.json`` + an image folder) and its collate function.

Targets follow RT-DETR: ``boxes`` are normalised (cx, cy, w, h) relative to the transformed image,
``labels`` are contiguous 0..C-1 in sorted category-id order. The original annotation dict is also kept as a
pycocotools ``COCO`` object (``dataset.coco``) for evaluation, where crowd regions still count as ignore regions.

Everything that can be checked without decoding images is checked at construction and raises
:class:`DatasetError` naming the file and the offending key/value.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .errors import DatasetError
from .transforms import basic_transforms


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read annotation file ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_int_id(value: Any, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{path}: {what} must be an integer, got {value!r}")
    return value


def _check_top_level(data: dict, path: Path, images_dir: Path) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing required key '{key}'")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    if not data["images"]:
        raise DatasetError(f"{path}: empty data set ('images' is an empty list)")
    if not data["categories"]:
        raise DatasetError(f"{path}: 'categories' is an empty list")
    if not images_dir.is_dir():
        raise DatasetError(f"images folder not found: {images_dir} (for {path})")


def _read_categories(categories: list, path: Path) -> dict[int, str]:
    """``{category id: name}``; ids must be unique integers."""
    cat_names: dict[int, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DatasetError(f"{path}: categories[{i}] has no 'id': {cat!r}")
        cid = _as_int_id(cat["id"], f"categories[{i}].id", path)
        if cid in cat_names:
            raise DatasetError(f"{path}: duplicate category id {cid} in 'categories'")
        cat_names[cid] = str(cat.get("name", cid))
    return cat_names


def _read_images(images: list, path: Path, images_dir: Path) -> list[dict]:
    """One record per image: id, file, size and (still empty) boxes and labels; every file must exist."""
    records: list[dict] = []
    seen_ids: set[int] = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise DatasetError(f"{path}: images[{i}] must be an object, got {img!r}")
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise DatasetError(f"{path}: images[{i}] is missing '{key}': {img!r}")
        iid = _as_int_id(img["id"], f"images[{i}].id", path)
        if iid in seen_ids:
            raise DatasetError(f"{path}: duplicate image id {iid} in 'images'")
        w, h = img["width"], img["height"]
        if not (_is_number(w) and _is_number(h) and w > 0 and h > 0):
            raise DatasetError(f"{path}: images[{i}] (id {iid}) has invalid width/height {w!r}/{h!r}")
        file = images_dir / str(img["file_name"])
        if not file.is_file():
            raise DatasetError(f"{path}: image file not found: {file} (image id {iid}, file_name {img['file_name']!r})")
        seen_ids.add(iid)
        records.append({"id": iid, "file": file, "width": int(w), "height": int(h), "boxes": [], "labels": []})
    return records


def _evaluation_ground_truth(data: dict, eval_anns: list[dict]) -> COCO:
    """A pycocotools ``COCO`` of the file with ``eval_anns`` as its annotations (its index built quietly)."""
    eval_data = {k: v for k, v in data.items() if k != "annotations"}
    eval_data["annotations"] = eval_anns
    eval_data.setdefault("info", {})
    coco = COCO()
    coco.dataset = eval_data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """Detection data set over a COCO instances JSON.

    Args:
        images_dir: folder that ``images[i].file_name`` is relative to.
        annotations_file: COCO instances JSON (keys ``images``, ``annotations``, ``categories``).
        transforms: callable ``(PIL image, {"boxes": BoundingBoxes xyxy, "labels": int64}) -> (image, target)``,
            e.g. :func:`dset.data.transforms.train_transforms`. ``None`` only converts to a float tensor and
            normalised cxcywh boxes (no resize). Whatever the transforms return, ``__getitem__`` guarantees a
            float32 [3, H, W] image in [0, 1] and normalised cxcywh boxes.

    ``__getitem__`` returns ``(image, target)`` with target keys ``boxes`` [N, 4] float32 normalised cxcywh,
    ``labels`` [N] int64, ``image_id`` int64 scalar, ``orig_size`` [2] = (w, h) of the file,
    ``size`` [2] = (w, h) after transforms.

    Training targets exclude ``iscrowd`` annotations and degenerate boxes (w or h <= 0 after clipping to the
    image; dropped with one warning that counts them); boxes reaching outside the image are clipped to it.
    ``coco`` (pycocotools) is the evaluation ground truth: the file's annotations as they are (crowd regions
    included, boxes not clipped) minus the degenerate ones; a missing ``area`` is filled with the box area, a
    missing ``iscrowd`` with 0 and a missing annotation ``id`` with a fresh one.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations_file: str | os.PathLike,
        transforms: Callable | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations_file)
        self.transforms = transforms
        self._default_transforms = basic_transforms()

        path = self.annotations_file
        data = _load_json(path)
        _check_top_level(data, path, self.images_dir)
        cat_names = _read_categories(data["categories"], path)
        self.category_ids: list[int] = sorted(cat_names)
        self.category_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}
        self.label_to_category_id: dict[int, int] = {i: c for i, c in enumerate(self.category_ids)}
        self.category_names: list[str] = [cat_names[c] for c in self.category_ids]
        self.num_classes: int = len(self.category_ids)
        self._images: list[dict] = _read_images(data["images"], path, self.images_dir)

        eval_anns, n_degenerate = self._read_annotations(data["annotations"], path)
        if n_degenerate:
            warnings.warn(
                f"{path}: dropped {n_degenerate} degenerate box(es) (w or h <= 0, or outside the image)",
                stacklevel=2,
            )
        self.num_dropped_boxes = n_degenerate
        self.coco = _evaluation_ground_truth(data, eval_anns)

        for rec in self._images:
            rec["boxes"] = torch.tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4)
            rec["labels"] = torch.tensor(rec["labels"], dtype=torch.int64)

    def _read_annotations(self, annotations: list, path: Path) -> tuple[list[dict], int]:
        """Validate the annotations, clip their boxes to the image and drop the degenerate ones. Non-crowd boxes
        go into the image records (the training targets); every kept annotation (crowd regions included, boxes
        not clipped) is returned for the evaluation ground truth, with the number of degenerate ones dropped."""
        index_of = {rec["id"]: i for i, rec in enumerate(self._images)}
        eval_anns: list[dict] = []
        used_ids = {a["id"] for a in annotations if isinstance(a, dict) and isinstance(a.get("id"), int)}
        next_id = max(used_ids, default=0) + 1
        seen_ids: set[int] = set()
        n_degenerate = 0
        for i, ann in enumerate(annotations):
            self._check_annotation(ann, i, path, index_of)
            if "id" in ann:
                aid = _as_int_id(ann["id"], f"annotations[{i}].id", path)
                if aid in seen_ids:
                    raise DatasetError(f"{path}: duplicate annotation id {aid}")
            else:
                aid = next_id
                next_id += 1
            seen_ids.add(aid)

            rec = self._images[index_of[ann["image_id"]]]
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(rec["width"])), min(y + h, float(rec["height"]))
            if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
                n_degenerate += 1
                continue
            crowd = bool(ann.get("iscrowd", 0))
            eval_ann = dict(ann)
            eval_ann["id"] = aid
            eval_ann["iscrowd"] = int(crowd)
            if not _is_number(eval_ann.get("area")):
                eval_ann["area"] = w * h
            eval_anns.append(eval_ann)
            if not crowd:
                rec["boxes"].append((x0, y0, x1, y1))
                rec["labels"].append(self.category_id_to_label[ann["category_id"]])
        return eval_anns, n_degenerate

    def _check_annotation(self, ann: Any, i: int, path: Path, index_of: dict[int, int]) -> None:
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{i}] must be an object, got {ann!r}")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise DatasetError(f"{path}: annotations[{i}] is missing '{key}'")
        iid = ann["image_id"]
        if iid not in index_of:
            raise DatasetError(f"{path}: annotations[{i}] has image_id {iid!r} that is not in 'images'")
        cid = ann["category_id"]
        if cid not in self.category_id_to_label:
            raise DatasetError(
                f"{path}: annotations[{i}] has category_id {cid!r} that is not in 'categories' "
                f"(known ids: {self.category_ids})"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{path}: annotations[{i}] has invalid bbox {bbox!r} (expected [x, y, w, h])")

    @property
    def image_ids(self) -> list[int]:
        return [r["id"] for r in self._images]

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of item ``index``; DatasetError naming the file if it cannot be decoded."""
        rec = self._images[index]
        file = rec["file"]
        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read image {file} (image id {rec['id']}): {e}") from e
        if im.size != (rec["width"], rec["height"]):
            raise DatasetError(
                f"image {file} (image id {rec['id']}) is {im.size[0]}x{im.size[1]} but {self.annotations_file} "
                f"says {rec['width']}x{rec['height']}"
            )
        return im

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = self._images[index]
        image = self.load_image(index)
        w, h = image.size
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(rec["boxes"].clone(), format="XYXY", canvas_size=(h, w)),
            "labels": rec["labels"].clone(),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        # guarantee the output contract whatever the transforms did
        if not (isinstance(image, torch.Tensor) and image.dtype == torch.float32):
            image, target = self._default_transforms(image, target)
        elif isinstance(target["boxes"], tv_tensors.BoundingBoxes):
            _, target = self._default_transforms(image, target)
        image = image.as_subclass(torch.Tensor)
        out_h, out_w = image.shape[-2:]
        return image, {
            "boxes": target["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4),
            "labels": target["labels"].to(torch.int64),
            "image_id": torch.tensor(rec["id"], dtype=torch.int64),
            "orig_size": torch.tensor([w, h], dtype=torch.int64),
            "size": torch.tensor([out_w, out_h], dtype=torch.int64),
        }


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack same-size images into [B, 3, H, W]; keep targets as a list of dicts."""
    images, targets = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_fn: images in a batch must have one size (resize in the transforms), got {sorted(shapes)}"
        )
    return torch.stack(images, 0), list(targets)
