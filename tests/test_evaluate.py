"""coco_metrics and detections_from_predictions against hand-computed COCO AP values."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from pycocotools.coco import COCO

from dset.engine.coco_eval import METRIC_KEYS, coco_metrics, detections_from_predictions

# Image 1 (200x200): a small cat (20x20 = 400 px^2), a medium dog (50x40 = 2000), a large cat (120x100).
# Image 2 (200x200): a medium dog. Categories: 3 cat, 7 dog.
GT_BOXES = {
    1: [(3, [10, 10, 20, 20]), (7, [60, 20, 50, 40]), (3, [40, 80, 120, 100])],
    2: [(7, [100, 100, 50, 40])],
}


def make_gt(extra_anns=()) -> COCO:
    anns = []
    for image_id, objs in GT_BOXES.items():
        for cat, box in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    for a in extra_anns:
        anns.append({"id": len(anns) + 1, **a})
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in GT_BOXES],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def perfect_detections(score=0.9):
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": score}
            for i, objs in GT_BOXES.items() for c, b in objs]


def test_perfect_detections_give_one():
    m = coco_metrics(make_gt(), perfect_detections())
    for key in METRIC_KEYS:
        assert m[key] == pytest.approx(1.0), key
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


def test_quiet(capsys):
    coco_metrics(make_gt(), perfect_detections())
    coco_metrics(make_gt(), [])
    assert capsys.readouterr().out == ""


def test_shifted_box_lowers_ap_by_known_amount():
    # shift the large cat 10 px right: IoU = (110*100) / (2*120*100 - 110*100) = 11000/13000 = 0.846,
    # a match at IoU thresholds 0.50..0.80 (7 of 10), a miss + false positive at 0.85..0.95.
    # cat AP@t: 1.0 for t <= 0.80; for t >= 0.85 the small cat (score 0.9) is found first, the shifted box
    # (score 0.8) is a false positive: recall stays 0.5 -> 101-point interpolated AP = 51/101.
    dets = perfect_detections()
    large = next(d for d in dets if d["bbox"] == [40, 80, 120, 100])
    large["bbox"] = [50, 80, 120, 100]
    large["score"] = 0.8
    m = coco_metrics(make_gt(), dets)
    cat_ap = (7 * 1.0 + 3 * 51 / 101) / 10
    assert m["per_class_AP"]["cat"] == pytest.approx(cat_ap, abs=1e-6)
    assert m["per_class_AP"]["dog"] == pytest.approx(1.0)
    assert m["mAP"] == pytest.approx((cat_ap + 1.0) / 2, abs=1e-6)
    assert m["mAP50"] == pytest.approx(1.0) and m["mAP75"] == pytest.approx(1.0)
    # large area range holds only that cat: AP_large = 7/10
    assert m["mAP_large"] == pytest.approx(0.7, abs=1e-6)
    assert m["mAP_small"] == pytest.approx(1.0) and m["mAP_medium"] == pytest.approx(1.0)


def test_missing_class_gives_zero_for_it():
    dets = [d for d in perfect_detections() if d["category_id"] == 7]
    m = coco_metrics(make_gt(), dets, category_names={3: "Cat", 7: "Dog"})
    assert m["per_class_AP"] == {"Cat": 0.0, "Dog": pytest.approx(1.0)}
    assert m["mAP"] == pytest.approx(0.5)
    assert m["mAP_small"] == 0.0 and m["mAP_large"] == 0.0 and m["mAP_medium"] == pytest.approx(1.0)
    assert m["AR100"] == pytest.approx(0.5)


def test_empty_detections_give_zeros():
    m = coco_metrics(make_gt(), [])
    for key in METRIC_KEYS:
        assert m[key] == 0.0, key
    assert m["per_class_AP"] == {"cat": 0.0, "dog": 0.0}


def test_no_ground_truth_in_range_is_nan():
    # evaluating image 2 only: no small or large GT there, no cat either
    m = coco_metrics(make_gt(), perfect_detections(), image_ids=[2])
    assert math.isnan(m["mAP_small"]) and math.isnan(m["mAP_large"])
    assert m["mAP_medium"] == pytest.approx(1.0) and m["mAP"] == pytest.approx(1.0)
    assert math.isnan(m["per_class_AP"]["cat"]) and m["per_class_AP"]["dog"] == pytest.approx(1.0)


def test_detection_on_crowd_region_is_ignored():
    crowd = {"image_id": 2, "category_id": 3, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 1}
    dets = perfect_detections(score=0.5) + [
        {"image_id": 2, "category_id": 3, "bbox": [5, 5, 30, 30], "score": 0.99}  # inside the crowd region
    ]
    assert coco_metrics(make_gt([crowd]), dets)["mAP"] == pytest.approx(1.0)
    # the same detection without the crowd region is a high-scoring false positive
    assert coco_metrics(make_gt(), dets)["per_class_AP"]["cat"] < 0.9


def test_images_without_detections_count_as_misses():
    dets = [d for d in perfect_detections() if d["image_id"] == 1]
    m = coco_metrics(make_gt(), dets)
    assert m["per_class_AP"]["dog"] == pytest.approx(51 / 101, abs=1e-6)  # 1 of 2 dogs found, precision 1


def test_bad_detection_input():
    with pytest.raises(ValueError, match="image_id 5"):
        coco_metrics(make_gt(), [{"image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="category_id 4"):
        coco_metrics(make_gt(), [{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="detection 0"):
        coco_metrics(make_gt(), [{"image_id": 1, "category_id": 3, "score": 1.0}])


def test_detections_from_predictions():
    results = [
        {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
         "scores": torch.tensor([0.75, 0.5])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "scores": torch.zeros(0)},
    ]
    dets = detections_from_predictions(results, [torch.tensor(11), 12], {0: 3, 1: 7})
    assert dets == [
        {"image_id": 11, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.75},
        {"image_id": 11, "category_id": 3, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.5},
    ]
    with pytest.raises(ValueError, match="label 2"):
        detections_from_predictions(
            [{"labels": torch.tensor([2]), "boxes": torch.zeros(1, 4), "scores": torch.ones(1)}], [1], {0: 3, 1: 7}
        )


def test_round_trip_from_predictions_is_perfect():
    label_of = {3: 0, 7: 1}
    results, ids = [], []
    for image_id, objs in GT_BOXES.items():
        boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objs], dtype=torch.float32)
        results.append({"labels": torch.tensor([label_of[c] for c, _ in objs]), "boxes": boxes,
                        "scores": torch.full((len(objs),), 0.9)})
        ids.append(image_id)
    dets = detections_from_predictions(results, ids, {0: 3, 1: 7})
    assert coco_metrics(make_gt(), dets)["mAP"] == pytest.approx(1.0)


def test_predict_detections_scores_a_model_that_predicts_the_ground_truth(tmp_path):
    """The model loop: post-processed boxes are scaled to the original sizes and scored per image seen."""
    import torch

    from dset.data.coco import CocoDetection, collate_fn
    from dset.data.synthetic import make_synthetic_coco
    from dset.data.transforms import eval_transforms
    from dset.engine.coco_eval import coco_metrics, predict_detections

    paths = make_synthetic_coco(root=tmp_path, num_train=2, num_val=3, image_size=96, seed=3)
    ds = CocoDetection(paths["val_images"], paths["val_annotations"], transforms=eval_transforms(64))

    class Oracle(torch.nn.Module):
        """Returns each image's ground truth as confident predictions (padded with empty queries)."""

        def forward(self, images):
            logits = torch.full((images.shape[0], 10, ds.num_classes), -20.0)
            boxes = torch.full((images.shape[0], 10, 4), 0.5)
            for b, (_, target) in enumerate(self.batch):
                n = len(target["labels"])
                logits[b, torch.arange(n), target["labels"]] = 20.0
                boxes[b, :n] = target["boxes"]
            return {"pred_logits": logits, "pred_boxes": boxes}

    oracle = Oracle()
    batches = []
    for i in range(len(ds)):
        batches.append(collate_fn([ds[i]]))

    def loader():
        for images, targets in batches:
            oracle.batch = [(None, t) for t in targets]
            yield images, targets

    detections, n_images = predict_detections(oracle, loader(), ds.label_to_category_id, num_top_queries=10)
    assert n_images == 3
    metrics = coco_metrics(ds.coco, detections, ds.category_names)
    # boxes went through a 64 px resize and back to the original size: up to rounding, perfect
    assert metrics["mAP50"] == pytest.approx(1.0)
    assert metrics["mAP"] > 0.9
    assert len({d["image_id"] for d in detections}) == 3
