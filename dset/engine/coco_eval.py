"""COCO box evaluation with pycocotools: a model's detections on a validation or test split and their COCO metrics
(:func:`evaluate_detections`, gathered over ranks under DDP), and the detections and ground truth a run keeps
for reports.

Conventions of :func:`coco_metrics` (state these with any number a report shows):
- AP/AR are fractions in [0, 1] (not percent), pycocotools COCOeval ``iouType="bbox"``, maxDets 100 for AP.
- ``mAP`` = AP@[.50:.05:.95]; ``mAP50`` / ``mAP75`` at a single IoU; ``mAP_small/medium/large`` use the
  ground truth's ``area`` field (COCO: < 32^2, 32^2..96^2, > 96^2 px); ``AR100`` = AR@[.50:.95], 100 dets.
- Every image of the ground truth is evaluated (an image without detections counts as misses) unless
  ``image_ids`` restricts the evaluation.
- A metric with no ground truth to measure (e.g. ``mAP_large`` when no GT box is large, or the AP of a class
  with no GT instance) is ``nan`` (pycocotools reports -1), as detectron2 does.
- ``iscrowd`` ground truth regions are ignore regions: detections matched to them are neither TP nor FP.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .distributed import DistInfo, all_gather_object, broadcast_object

if TYPE_CHECKING:
    from ..data.loaders import DataBundle

__all__ = ["METRIC_KEYS", "coco_metrics", "detections_from_predictions", "predict_detections", "evaluate_detections",
           "top_per_image_and_class", "ground_truth"]

# COCOeval.stats index of each summary metric
_STATS_INDEX = {
    "mAP": 0,
    "mAP50": 1,
    "mAP75": 2,
    "mAP_small": 3,
    "mAP_medium": 4,
    "mAP_large": 5,
    "AR100": 8,
}
METRIC_KEYS: tuple[str, ...] = tuple(_STATS_INDEX)


def _nan_if_negative(x: float) -> float:
    x = float(x)
    return float("nan") if x < 0 else x


def _category_name_map(coco_gt: COCO, category_names: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    cat_ids = sorted(coco_gt.getCatIds())
    if category_names is None:
        return {c: str(coco_gt.cats[c].get("name", c)) for c in cat_ids}
    if isinstance(category_names, Mapping):
        return {c: str(category_names.get(c, coco_gt.cats[c].get("name", c))) for c in cat_ids}
    names = list(category_names)
    if len(names) != len(cat_ids):
        raise ValueError(
            f"coco_metrics: category_names has {len(names)} names but the ground truth has {len(cat_ids)} "
            f"categories (names must be in sorted category-id order: {cat_ids})"
        )
    return dict(zip(cat_ids, map(str, names)))


def _empty_results(coco_gt: COCO) -> COCO:
    res = COCO()
    res.dataset = {
        "info": dict(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_metrics(
    coco_gt: COCO,
    detections: Sequence[Mapping[str, Any]],
    category_names: Mapping[int, str] | Sequence[str] | None = None,
    image_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """COCO bbox metrics of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: ground truth (e.g. ``CocoDetection.coco``).
        detections: dicts ``{image_id, category_id, bbox: [x, y, w, h], score}`` in original-image pixels
            (see :func:`detections_from_predictions`). May be empty.
        category_names: names for ``per_class_AP``: a mapping category_id -> name, or a sequence in sorted
            category-id order; default the names in ``coco_gt``.
        image_ids: evaluate only these images (default: every ground-truth image).

    Returns:
        ``{"mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR100"}`` as floats in [0, 1]
        (nan where there is no ground truth to measure) and ``"per_class_AP"``: {name: AP@[.5:.95]}.
    """
    names = _category_name_map(coco_gt, category_names)
    gt_img_ids = set(coco_gt.getImgIds())
    dets: list[dict] = []
    for i, d in enumerate(detections):
        try:
            x, y, w, h = (float(v) for v in d["bbox"])
            det = {
                "image_id": int(d["image_id"]),
                "category_id": int(d["category_id"]),
                "bbox": [x, y, w, h],
                "score": float(d["score"]),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"coco_metrics: detection {i} must have image_id, category_id, bbox [x, y, w, h] and score: {d!r}"
            ) from e
        if det["image_id"] not in gt_img_ids:
            raise ValueError(f"coco_metrics: detection {i} has image_id {det['image_id']} not in the ground truth")
        if det["category_id"] not in names:
            raise ValueError(
                f"coco_metrics: detection {i} has category_id {det['category_id']} not in the ground truth "
                f"categories {sorted(names)}"
            )
        dets.append(det)

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            missing = sorted(set(int(i) for i in image_ids) - gt_img_ids)
            if missing:
                raise ValueError(f"coco_metrics: image_ids not in the ground truth: {missing[:10]}")
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    out: dict[str, Any] = {k: _nan_if_negative(evaluator.stats[i]) for k, i in _STATS_INDEX.items()}

    # precision: [T iou thresholds, R recall thresholds, K categories, A area ranges, M maxDets]
    precision = evaluator.eval["precision"]
    area_all = evaluator.params.areaRngLbl.index("all")
    max_det = len(evaluator.params.maxDets) - 1
    per_class: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, area_all, max_det]
        p = p[p > -1]
        per_class[names[cat_id]] = float(np.mean(p)) if p.size else float("nan")
    out["per_class_AP"] = per_class
    return out


def _to_list(x: Any) -> list:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "tolist"):
        return x.tolist()
    return list(x)


def detections_from_predictions(
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[Any],
    label_to_category_id: Mapping[int, int],
) -> list[dict]:
    """Turn post-processed model outputs into COCO detection dicts for :func:`coco_metrics`.

    Args:
        results: one dict per image with ``labels`` [K] contiguous labels, ``boxes`` [K, 4] xyxy pixels on the
            original image, ``scores`` [K] (tensors or arrays).
        image_ids: the image id of each result (ints or scalar tensors), same order.
        label_to_category_id: contiguous label -> COCO category id (``CocoDetection.label_to_category_id``).

    Returns:
        ``[{image_id, category_id, bbox: [x, y, w, h], score}, ...]`` with Python numbers. Detections with a
        non-finite box or score are skipped with one warning that counts them.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"detections_from_predictions: {len(results)} results but {len(image_ids)} image ids")
    out: list[dict] = []
    n_non_finite = 0
    for res, image_id in zip(results, image_ids):
        image_id = int(image_id.item() if hasattr(image_id, "item") else image_id)
        labels = _to_list(res["labels"])
        boxes = _to_list(res["boxes"])
        scores = _to_list(res["scores"])
        if not (len(labels) == len(boxes) == len(scores)):
            raise ValueError(
                f"detections_from_predictions: image {image_id} has {len(labels)} labels, {len(boxes)} boxes, "
                f"{len(scores)} scores"
            )
        for label, (x0, y0, x1, y1), score in zip(labels, boxes, scores):
            label = int(label)
            if label not in label_to_category_id:
                raise ValueError(
                    f"detections_from_predictions: label {label} (image {image_id}) has no category id "
                    f"(labels 0..{len(label_to_category_id) - 1})"
                )
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1, score)):
                n_non_finite += 1
                continue
            out.append(
                {
                    "image_id": image_id,
                    "category_id": int(label_to_category_id[label]),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(score),
                }
            )
    if n_non_finite:
        warnings.warn(f"detections_from_predictions: skipped {n_non_finite} detection(s) with non-finite "
                      "box/score", stacklevel=2)
    return out


@torch.no_grad()
def predict_detections(
    model: torch.nn.Module,
    loader: Iterable,
    label_to_category_id: Mapping[int, int],
    device: torch.device | str = "cpu",
    num_top_queries: int = 300,
) -> tuple[list[dict], int]:
    """Run ``model`` in eval mode over ``loader`` and return its COCO detections and the image count.

    Boxes are post-processed (top-k over queries x classes) and scaled to each image's original size
    (``target['orig_size']``, (w, h)), so :func:`coco_metrics` scores them on the original images.
    """
    from ..models.postprocess import PostProcessor

    device = torch.device(device)
    was_training = model.training
    model.eval()
    detections: list[dict] = []
    n_images = 0
    try:
        for images, targets in loader:
            outputs = model(images.to(device, non_blocking=True))
            post = PostProcessor(outputs["pred_logits"].shape[-1], num_top_queries)
            sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            results = post({"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()},
                           sizes)
            detections += detections_from_predictions(results, [t["image_id"] for t in targets], label_to_category_id)
            n_images += len(targets)
    finally:
        model.train(was_training)
    return detections, n_images


@torch.no_grad()
def evaluate_detections(model: torch.nn.Module, loader: Iterable, bundle: DataBundle, device: torch.device,
                        dinfo: DistInfo | None = None, num_top_queries: int = 300,
                        detections_out: list | None = None, split: str = "val") -> dict:
    """COCO metrics of ``model`` (eval mode) on ``loader``, which reads ``split`` of ``bundle`` (``val``, the
    selection split, or ``test``, the scoring split), with ``<split>_images`` (the images scored); under DDP
    each rank predicts its shard, detections are gathered to rank 0 and the metrics broadcast back.
    ``detections_out`` (rank 0) receives the detections that were scored."""
    _, coco_dataset, image_ids = bundle.evaluated_split(split)
    dinfo = dinfo or DistInfo()
    detections, n_images = predict_detections(model, loader, bundle.label_to_category_id, device, num_top_queries)
    parts = all_gather_object((detections, n_images), dinfo)
    metrics = None
    if dinfo.is_main:
        all_dets = [d for p in parts for d in p[0]]
        if detections_out is not None:
            detections_out.extend(all_dets)
        metrics = coco_metrics(coco_dataset.coco, all_dets, bundle.category_names, image_ids=image_ids)
        metrics[f"{split}_images"] = sum(p[1] for p in parts)
    return broadcast_object(metrics, dinfo)


def top_per_image_and_class(detections: list[dict], limit: int) -> list[dict]:
    """The ``limit`` best-scored detections of each (image, category): all that COCOeval's maxDets=100 reads."""
    groups: dict[tuple, list[dict]] = {}
    for d in detections:
        groups.setdefault((d["image_id"], d["category_id"]), []).append(d)
    out = []
    for key in sorted(groups):
        out += sorted(groups[key], key=lambda d: -d["score"])[:limit]
    return out


def ground_truth(coco: COCO, image_ids: list[int]) -> dict:
    """The COCO ground truth of ``image_ids`` (images, their annotations, every category)."""
    ids = set(image_ids)
    return {"images": [coco.imgs[i] for i in image_ids],
            "annotations": [a for a in coco.dataset.get("annotations", []) if a["image_id"] in ids],
            "categories": list(coco.dataset.get("categories", []))}
