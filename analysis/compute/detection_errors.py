"""Error analysis beyond mAP, from one run's detections and its ground truth: per-class precision-recall
curves, AP by object size and a detection confusion matrix.

Input is what a run logs (``eval/detections.json``, ``eval/ground_truth.json``): a COCO ground-truth dict,
a detection list ``[{image_id, category_id, bbox [x, y, w, h], score}]`` and the evaluated image ids.
:func:`coco_evaluation` checks them (errors name the run) and runs pycocotools' ``COCOeval`` once, over
COCO's four area ranges ('all', 'small', 'medium', 'large'); :func:`analysis_of` reads everything here from
that one evaluation, and :func:`analysis.compute.bootstrap.evaluate_run` reads its mAP data from the same one, so a
run is evaluated once per report.

- Precision-recall: pycocotools' accumulated ``eval['precision']`` [IoU T, recall R, class K, area A,
  maxDets M] at area 'all' and 100 detections: the interpolated precision at the 101 recall thresholds
  0:0.01:1, per class, at IoU 0.50 and averaged over IoU 0.50:0.05:0.95. pycocotools writes -1 for a class
  without ground truth ("no such point"): NaN here. Beyond the highest recall a class reaches, pycocotools
  writes 0, and so does this.
- AP by size: ``COCOeval.stats[3:6]`` (AP@[.5:.95] for area small < 32², medium 32²..96², large > 96² pixels,
  from the annotations' ``area`` field, bounds inclusive as pycocotools has them; NaN where pycocotools
  says -1: no box of that size), with the ground-truth boxes pycocotools scored in each range.
- Confusion matrix (as YOLO/ultralytics define it, not a COCO quantity): per image, detections with score
  >= ``score_threshold`` in descending score (ties: logged order), each matched to the not-yet-matched
  non-crowd ground-truth box of any class with the highest IoU, if that IoU >= ``iou_threshold``. Counts
  ``[ground-truth class, predicted class]``, classes in category-id order, then "background": a ground-truth
  box no detection matched counts in the background column (missed), a detection that matched none in the
  background row (false positive). Crowd boxes are neither matched nor missed.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace

import numpy as np

SCORE_THRESHOLD = 0.3
IOU_THRESHOLD = 0.5
SIZES = ("small", "medium", "large")  # pycocotools' area range labels after 'all'
MAX_DETS = 100                        # pycocotools' largest maxDets: the one its AP uses


@dataclass(frozen=True, eq=False)
class ErrorAnalysis:
    """One run's errors beyond mAP (or, from :func:`mean_over_runs`, the mean over a variant's seeds).

    ``precision50[k, r]`` and ``precision[k, r]``: class ``category_ids[k]`` at recall ``recall[r]``, IoU 0.50
    and the mean over IoU 0.50:0.95 (NaN: no ground truth of the class); ``gt_by_class[k]`` its ground-truth
    boxes (non-crowd) on the evaluated images. ``ap_by_size`` and ``gt_by_size``
    map each of ``SIZES`` to AP@[.5:.95] (NaN: no box of that size) and to the ground-truth boxes scored in
    that range. ``confusion[i, j]``: ground-truth class ``i`` detected as class ``j``, index ``K`` =
    background (counts; a mean per run over ``n_runs`` runs)."""

    name: str
    image_ids: np.ndarray
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]
    recall: np.ndarray
    precision50: np.ndarray
    precision: np.ndarray
    gt_by_class: np.ndarray
    ap_by_size: dict[str, float]
    gt_by_size: dict[str, int]
    confusion: np.ndarray
    score_threshold: float
    iou_threshold: float
    n_runs: int = 1

    @property
    def labels(self) -> list[str]:
        """The confusion matrix's row and column names: the class names, then "background"."""
        return list(self.category_names) + ["background"]


def coco_evaluation(ground_truth: dict, detections: list[dict], image_ids=None, name: str = "run"):
    """Check ``ground_truth`` (a COCO dict with images, annotations and categories) and ``detections``, then
    run pycocotools' ``COCOeval`` (bbox) over ``image_ids`` (default: every ground-truth image) and COCO's
    four area ranges: ``evaluate()`` and ``accumulate()``. Errors name ``name`` (the run) and say what is
    wrong. Returns the ``COCOeval`` (its ``cocoGt``/``cocoDt`` hold the boxes)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for key in ("images", "annotations", "categories"):
        if not isinstance(ground_truth.get(key), list):
            raise ValueError(f"{name}: the ground truth has no '{key}' list")
    gt_images = {int(im["id"]) for im in ground_truth["images"]}
    ids = sorted(gt_images if image_ids is None else {int(i) for i in image_ids})
    if not ids:
        raise ValueError(f"{name}: no evaluated images")
    absent = sorted(set(ids) - gt_images)
    if absent:
        raise ValueError(f"{name}: image ids {absent[:10]} are not in the ground truth")
    cat_ids = {int(c["id"]) for c in ground_truth["categories"]}
    if not cat_ids:
        raise ValueError(f"{name}: the ground truth has no categories")
    evaluated = set(ids)
    dets = []
    for j, d in enumerate(detections):
        try:
            det = {"image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
                   "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{name}: detection {j} needs image_id, category_id, bbox [x, y, w, h] and score: "
                             f"{d!r}") from exc
        if det["image_id"] not in evaluated:
            raise ValueError(f"{name}: detection {j} is on image {det['image_id']}, not an evaluated image")
        if det["category_id"] not in cat_ids:
            raise ValueError(f"{name}: detection {j} has category {det['category_id']}, not in the ground truth")
        dets.append(det)

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()  # pycocotools marks the annotations it evaluates: give it copies, not the caller's dicts
        gt.dataset = {**ground_truth, "annotations": [dict(a) for a in ground_truth["annotations"]]}
        gt.createIndex()
        dt = COCO()
        dt.dataset = {"images": ground_truth["images"], "categories": ground_truth["categories"], "annotations": []}
        if dets:
            dt = gt.loadRes(dets)
        else:
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
    if list(ev.params.areaRngLbl) != ["all", *SIZES] or ev.params.maxDets[-1] != MAX_DETS:
        raise ValueError(f"{name}: unexpected pycocotools parameters: area ranges {ev.params.areaRngLbl}, "
                         f"maxDets {ev.params.maxDets}")
    return ev


def analyse(ground_truth: dict, detections: list[dict], image_ids=None, name: str = "run",
            score_threshold: float = SCORE_THRESHOLD, iou_threshold: float = IOU_THRESHOLD) -> ErrorAnalysis:
    """The error analysis of one run (see the module docstring), from its ground truth and detections."""
    return analysis_of(coco_evaluation(ground_truth, detections, image_ids, name), name, score_threshold,
                       iou_threshold)


def analysis_of(ev, name: str = "run", score_threshold: float = SCORE_THRESHOLD,
                iou_threshold: float = IOU_THRESHOLD) -> ErrorAnalysis:
    """The error analysis from a ``COCOeval`` that :func:`coco_evaluation` ran (evaluated and accumulated)."""
    p = ev.params
    area = {label: j for j, label in enumerate(p.areaRngLbl)}
    m = list(p.maxDets).index(MAX_DETS)
    # [T, R, K] at area 'all', 100 detections; -1 (a class without ground truth) -> NaN
    prec = np.asarray(ev.eval["precision"], dtype=float)[:, :, :, area["all"], m]
    prec = np.where(prec > -1, prec, np.nan)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    ap_by_size = {s: float(v) if v > -1 else float("nan") for s, v in zip(SIZES, ev.stats[3:6])}
    cats = ev.cocoGt.cats
    return ErrorAnalysis(
        name=name, image_ids=np.asarray(p.imgIds, dtype=np.int64), category_ids=tuple(int(c) for c in p.catIds),
        category_names=tuple(str(cats[c].get("name", c)) for c in p.catIds),
        recall=np.asarray(p.recThrs, dtype=float), precision50=prec[0].T.copy(), precision=prec.mean(axis=0).T,
        gt_by_class=_gt_counts(ev, "all"), ap_by_size=ap_by_size,
        gt_by_size={s: int(_gt_counts(ev, s).sum()) for s in SIZES},
        confusion=_confusion(ev, score_threshold, iou_threshold), score_threshold=float(score_threshold),
        iou_threshold=float(iou_threshold))


def _gt_counts(ev, area_label: str) -> np.ndarray:
    """Per class, the ground-truth boxes pycocotools scored in area range ``area_label`` (not ignored: not
    crowd, area inside the range), counted from its ``evalImgs`` (category, then area range, then image)."""
    p = ev.params
    n_img, n_area, a = len(p.imgIds), len(p.areaRng), list(p.areaRngLbl).index(area_label)
    counts = np.zeros(len(p.catIds), dtype=np.int64)
    for k in range(len(p.catIds)):
        start = (k * n_area + a) * n_img
        counts[k] = sum(int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                        for e in ev.evalImgs[start:start + n_img] if e is not None)
    return counts


def _confusion(ev, score_threshold: float, iou_threshold: float) -> np.ndarray:
    """The (K+1) x (K+1) confusion matrix of the module docstring, from the boxes ``ev`` evaluated."""
    from pycocotools import mask as mask_utils

    cat_index = {int(c): k for k, c in enumerate(ev.params.catIds)}
    background = len(cat_index)
    out = np.zeros((background + 1, background + 1), dtype=np.int64)
    for image_id in ev.params.imgIds:
        gts = [a for a in ev.cocoGt.imgToAnns.get(image_id, [])
               if not a.get("iscrowd", 0) and int(a["category_id"]) in cat_index]
        dts = [d for d in ev.cocoDt.imgToAnns.get(image_id, []) if d["score"] >= score_threshold]
        gt_class = np.array([cat_index[int(a["category_id"])] for a in gts], dtype=np.int64)
        matched = np.zeros(len(gts), dtype=bool)
        if dts and gts:
            iou = np.asarray(mask_utils.iou([d["bbox"] for d in dts], [a["bbox"] for a in gts], [0] * len(gts)))
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")  # descending score, ties in logged order
        for i in order:
            predicted = cat_index[int(dts[i]["category_id"])]
            if gts:
                candidates = np.where(matched, -1.0, iou[i])
                g = int(np.argmax(candidates))  # the highest IoU; ties: the first box
                if candidates[g] >= iou_threshold:
                    matched[g] = True
                    out[gt_class[g], predicted] += 1
                    continue
            out[background, predicted] += 1
        np.add.at(out[:, background], gt_class[~matched], 1)
    return out


def mean_over_runs(analyses: list[ErrorAnalysis], name: str) -> ErrorAnalysis:
    """The mean of several runs' analyses (a variant's seeds): curves, AP by size and confusion counts
    averaged per run. The runs must share images, classes and thresholds (else ValueError naming them)."""
    if not analyses:
        raise ValueError(f"{name}: no runs to average")
    ref = analyses[0]
    for a in analyses[1:]:
        if not np.array_equal(a.image_ids, ref.image_ids) or a.category_ids != ref.category_ids:
            raise ValueError(f"{name}: runs {ref.name} and {a.name} were evaluated on different images or classes")
        if (a.score_threshold, a.iou_threshold) != (ref.score_threshold, ref.iou_threshold):
            raise ValueError(f"{name}: runs {ref.name} and {a.name} have different confusion-matrix thresholds")
    if len(analyses) == 1:
        return replace(ref, name=name)

    def mean(field: str) -> np.ndarray:
        return np.mean([getattr(a, field) for a in analyses], axis=0)

    return ErrorAnalysis(
        name=name, image_ids=ref.image_ids, category_ids=ref.category_ids, category_names=ref.category_names,
        recall=ref.recall, precision50=mean("precision50"), precision=mean("precision"),
        ap_by_size={s: float(np.mean([a.ap_by_size[s] for a in analyses])) for s in SIZES},
        gt_by_class=ref.gt_by_class, gt_by_size=ref.gt_by_size, confusion=mean("confusion"),
        score_threshold=ref.score_threshold, iou_threshold=ref.iou_threshold, n_runs=sum(a.n_runs for a in analyses))
