"""Error analysis beyond mAP (analysis/compute/detection_errors.py) and the per-class bootstrap
(analysis/compute/bootstrap.py).

A hand-built case whose answers are known (confusion counts, ground-truth boxes per size and class), the
rest checked against pycocotools' own numbers on the same input, and the per-class bootstrap against the
mAP bootstrap it refines (the synthetic case of tests/report_fixtures.py).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import report_fixtures as F

from analysis.compute import bootstrap, detection_errors

CAR, PERSON, BIKE, TRUCK = 1, 2, 3, 4  # truck: listed, no box anywhere
C, P, K, T, BG = 0, 1, 2, 3, 4         # matrix indices (category-id order, background last)


def _box(image_id, category_id, bbox, ann_id=None, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(map(float, bbox)),
            "area": float(bbox[2] * bbox[3]), "iscrowd": crowd}


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(map(float, bbox)), "score": score}


@pytest.fixture(scope="module")
def hand():
    """Four 200 x 200 images. Areas: small <= 32² = 1024, medium <= 96² = 9216, large above."""
    anns = [
        _box(1, CAR, [10, 10, 50, 50]),        # medium, found
        _box(1, PERSON, [100, 100, 20, 20]),   # small, found as a bike: a class confusion
        _box(2, BIKE, [0, 0, 120, 120]),       # large, found
        _box(2, CAR, [150, 150, 30, 30]),      # small, only a detection below the score threshold: missed
        _box(3, PERSON, [50, 50, 40, 40]),     # medium, found (and found again: a duplicate)
        _box(3, CAR, [120, 120, 60, 60], crowd=1),   # crowd: neither matched nor missed
        _box(4, PERSON, [0, 0, 40, 40]),       # G1, medium
        _box(4, PERSON, [20, 0, 40, 40]),      # G2, medium
    ]
    for i, a in enumerate(anns):
        a["id"] = i + 1
    gt = {"images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in (1, 2, 3, 4)],
          "annotations": anns,
          "categories": [{"id": CAR, "name": "car"}, {"id": PERSON, "name": "person"}, {"id": BIKE, "name": "bike"},
                         {"id": TRUCK, "name": "truck"}]}
    dets = [
        _det(1, CAR, [10, 10, 50, 50], 0.9),
        _det(1, BIKE, [100, 100, 20, 20], 0.8),     # on the person: [person, bike]
        _det(1, CAR, [150, 10, 30, 30], 0.7),       # on nothing: [background, car]
        _det(2, BIKE, [0, 0, 120, 120], 0.95),
        _det(2, CAR, [150, 150, 30, 30], 0.2),      # below 0.3: ignored by the matrix (not by AP)
        _det(3, PERSON, [52, 52, 40, 40], 0.6),     # IoU 0.82 with the person
        _det(3, PERSON, [54, 50, 40, 40], 0.4),     # the person is taken: [background, person]
        _det(3, CAR, [120, 120, 60, 60], 0.5),      # on the crowd box only: [background, car]
        _det(4, PERSON, [20, 0, 40, 40], 0.9),      # G2 exactly
        # IoU 0.667 with G2 (taken) and 0.538 with G1: the best box not yet matched is G1
        _det(4, PERSON, [12, 0, 40, 40], 0.8),
    ]
    return gt, dets


def test_confusion_matrix_counts(hand):
    gt, dets = hand
    a = detection_errors.analyse(gt, dets, name="hand")
    assert a.labels == ["car", "person", "bike", "truck", "background"]
    expected = np.zeros((5, 5), dtype=int)
    expected[C, C] = 1                # image 1's car
    expected[P, K] = 1                # the person detected as a bike
    expected[BG, C] = 2               # a car on nothing, a car on the crowd box
    expected[K, K] = 1
    expected[C, BG] = 1               # the car whose only detection scored 0.2
    expected[P, P] = 1 + 2            # image 3's person; G1 and G2 (not the same box twice)
    expected[BG, P] = 1               # the duplicate on image 3's person
    assert a.confusion.tolist() == expected.tolist()
    assert (a.score_threshold, a.iou_threshold) == (0.3, 0.5)
    # every non-crowd box is in exactly one row; every detection at or above the threshold in one column
    assert a.confusion[:BG].sum() == 7 and a.confusion[:, :BG].sum() == sum(d["score"] >= 0.3 for d in dets)
    # the thresholds are parameters: at 0.1 the low-scored car is found; at IoU 0.7, G1's detection (0.538) misses
    low = detection_errors.analyse(gt, dets, name="hand", score_threshold=0.1).confusion
    assert (low[C, C], low[C, BG]) == (2, 0)
    strict = detection_errors.analyse(gt, dets, name="hand", iou_threshold=0.7).confusion
    assert (strict[P, P], strict[P, BG], strict[BG, P]) == (2, 1, 2)


def test_ap_by_size_is_pycocotools_and_counts_the_boxes(hand):
    gt, dets = hand
    a = detection_errors.analyse(gt, dets, name="hand")
    ref = F.cocoeval(gt, dets)
    assert [a.ap_by_size[s] for s in detection_errors.SIZES] == pytest.approx(list(ref.stats[3:6]), abs=1e-12)
    assert 0 < a.ap_by_size["small"] < 1 and a.ap_by_size["large"] == pytest.approx(1.0)
    assert a.gt_by_size == {"small": 2, "medium": 4, "large": 1}   # the crowd car is not counted
    assert a.gt_by_class.tolist() == [2, 4, 1, 0]
    # a size without any box is NaN, where pycocotools says -1
    no_large = copy.deepcopy(gt)
    no_large["annotations"] = [x for x in no_large["annotations"] if x["area"] <= 96 ** 2]
    b = detection_errors.analyse(no_large, dets, name="hand")
    assert F.cocoeval(no_large, dets).stats[5] == -1 and math.isnan(b.ap_by_size["large"])
    assert b.gt_by_size["large"] == 0


def test_precision_recall_curves_are_cocoevals_precision(hand):
    gt, dets = hand
    a = detection_errors.analyse(gt, dets, name="hand")
    ref = np.asarray(F.cocoeval(gt, dets).eval["precision"])[:, :, :, 0, 2]   # area all, 100 detections
    ref = np.where(ref > -1, ref, np.nan)
    assert a.recall.tolist() == pytest.approx(np.linspace(0, 1, 101).tolist())
    np.testing.assert_array_equal(a.precision50, ref[0].T)
    np.testing.assert_allclose(a.precision, ref.mean(axis=0).T, rtol=0, atol=1e-15)
    assert np.isnan(a.precision50[T]).all() and np.isnan(a.precision[T]).all()   # truck: no ground truth
    # the bike: one box, found first at IoU 1: precision 1 (less pycocotools' epsilon) at every recall threshold
    assert a.precision50[K].tolist() == pytest.approx([1.0] * 101)


def test_the_bootstrap_evaluation_carries_the_same_analysis(hand):
    gt, dets = hand
    a, b = detection_errors.analyse(gt, dets, name="hand"), bootstrap.evaluate_run(gt, dets, name="hand").errors
    for field in ("image_ids", "recall", "precision50", "precision", "gt_by_class", "confusion"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.ap_by_size, a.gt_by_size, a.category_ids) == (b.ap_by_size, b.gt_by_size, b.category_ids)
    with pytest.raises(ValueError, match="run-7: detection 0 has category 9"):
        detection_errors.analyse(gt, [_det(1, 9, [0, 0, 5, 5], 0.5)], name="run-7")


def test_mean_over_runs(hand):
    gt, dets = hand
    one = detection_errors.analyse(gt, dets, name="s0")
    other = detection_errors.analyse(gt, [d for d in dets if d["image_id"] != 1], name="s1")
    m = detection_errors.mean_over_runs([one, other], "variant")
    assert m.n_runs == 2 and m.name == "variant"
    np.testing.assert_array_equal(m.confusion, (one.confusion + other.confusion) / 2)
    np.testing.assert_array_equal(m.precision50, (one.precision50 + other.precision50) / 2)
    assert m.ap_by_size["small"] == pytest.approx((one.ap_by_size["small"] + other.ap_by_size["small"]) / 2)
    fewer = copy.deepcopy(gt)
    fewer["images"] = fewer["images"][:3]
    fewer["annotations"] = [x for x in fewer["annotations"] if x["image_id"] != 4]
    with pytest.raises(ValueError, match="variant: runs s0 and s2 were evaluated on different images"):
        detection_errors.mean_over_runs(
            [one, detection_errors.analyse(fewer, [d for d in dets if d["image_id"] != 4], name="s2")], "variant")


# ------------------------------------------------------------------------------ per-class bootstrap
@pytest.fixture(scope="module")
def case():
    gt = F.synthetic_ground_truth(40, 4, seed=0, extra_category=True)
    good = F.synthetic_detections(gt, recall=0.9, jitter=0.05, false_per_image=1.0, seed=1)
    poor = F.synthetic_detections(gt, recall=0.6, jitter=0.15, false_per_image=3.0, seed=2)
    mid = F.synthetic_detections(gt, recall=0.75, jitter=0.1, false_per_image=2.0, seed=4)
    evs = {n: bootstrap.evaluate_run(gt, d, name=n) for n, d in (("good", good), ("poor", poor), ("mid", mid))}
    return gt, {"good": good, "poor": poor, "mid": mid}, evs


def _class_ap(gt: dict, dets: list[dict]) -> np.ndarray:
    """pycocotools' per-class AP@[.5:.95] (area all, 100 detections; NaN for a class without ground truth)."""
    prec = np.asarray(F.cocoeval(gt, dets).eval["precision"])[:, :, :, 0, 2]
    return np.array([prec[:, :, k][prec[:, :, k] > -1].mean() if (prec[:, :, k] > -1).any() else np.nan
                     for k in range(prec.shape[2])])


def test_class_deltas_observed_are_pycocotools_per_class_ap(case):
    gt, dets, evs = case
    deltas = bootstrap.paired_class_delta([evs["good"]], [evs["poor"]], n_resamples=300, seed=7)
    good, poor = _class_ap(gt, dets["good"]), _class_ap(gt, dets["poor"])
    assert [d.category_id for d in deltas] == [1, 2, 3, 4, 5]
    for k, d in enumerate(deltas[:4]):
        assert (d.variant_ap, d.baseline_ap) == pytest.approx((good[k], poor[k]), abs=1e-12)
        assert d.ap.delta == pytest.approx(good[k] - poor[k], abs=1e-12)
        assert d.n_gt == sum(a["category_id"] == k + 1 for a in gt["annotations"])
    # one seed a side: the interval is the quantiles of that class's AP differences on the same image draws
    w = bootstrap.image_weights(len(gt["images"]), 300, seed=7)
    for k in range(4):
        diff = (bootstrap.class_ap_replicates(evs["good"], w).mean(axis=2)[:, k]
                - bootstrap.class_ap_replicates(evs["poor"], w).mean(axis=2)[:, k])
        diff = diff[~np.isnan(diff)]
        assert (deltas[k].ap.low, deltas[k].ap.high) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])))
    assert any(d.ap.verdict == "better (95% CI above 0)" for d in deltas[:4])
    # the listed class without ground truth: no AP, no interval
    extra = deltas[4]
    assert math.isnan(extra.ap.delta) and extra.ap.verdict == "no interval" and extra.n_gt == 0


def test_class_replicates_average_to_the_map_replicates(case):
    gt, _, evs = case
    w = np.vstack([np.ones(len(gt["images"])), bootstrap.image_weights(len(gt["images"]), 200, seed=3)])
    for ev in evs.values():
        per_class = bootstrap.class_ap_replicates(ev, w)                # (resamples, categories, IoU thresholds)
        assert per_class.shape == (201, 5, 10) and np.isnan(per_class[:, 4]).all()
        m, m50 = bootstrap.map_replicates(ev, w)
        np.testing.assert_allclose(np.nanmean(per_class.mean(axis=2), axis=1), m, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.nanmean(per_class[:, :, 0], axis=1), m50, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(ev.observed_class_ap(), per_class[0])


def test_class_deltas_draw_the_seeds_as_the_map_delta_does(case):
    """Two seeds on the variant side: the observed class delta is the difference of the seed means, and with
    one category the per-class interval is the mAP interval (same image resamples, same seed draws)."""
    gt, dets, evs = case
    both = bootstrap.paired_class_delta([evs["good"], evs["mid"]], [evs["poor"]], n_resamples=300, seed=2)
    for k, d in enumerate(both):
        expected = (evs["good"].observed_class_ap()[k].mean() + evs["mid"].observed_class_ap()[k].mean()) / 2
        assert d.variant_ap == pytest.approx(expected, nan_ok=True) and d.n_variant == 2
    only = copy.deepcopy(gt)
    only["categories"] = [c for c in only["categories"] if c["id"] == 2]
    only["annotations"] = [a for a in only["annotations"] if a["category_id"] == 2]
    one = {n: bootstrap.evaluate_run(only, [d for d in ds if d["category_id"] == 2], name=n) for n, ds in dets.items()}
    (cls,) = bootstrap.paired_class_delta([one["good"], one["mid"]], [one["poor"]], n_resamples=300, seed=2)
    whole = bootstrap.paired_delta([one["good"], one["mid"]], [one["poor"]], n_resamples=300, seed=2)
    assert (cls.ap.delta, cls.ap.low, cls.ap.high) == pytest.approx((whole.map.delta, whole.map.low, whole.map.high))
