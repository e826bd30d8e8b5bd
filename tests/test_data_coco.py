"""CocoDetection, collate_fn and the v2 transform pipelines on tiny hand-made COCO files."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from data_helpers import tiny_coco, write_coco, write_image
from torchvision import tv_tensors

from dset.data.coco import CocoDetection, collate_fn
from dset.data.errors import DatasetError
from dset.data.transforms import NormalizeBoxes, eval_transforms, train_transforms


@pytest.fixture
def tiny(tmp_path):
    return tiny_coco(tmp_path)


def _load(images_dir, ann_file, transforms=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDetection(images_dir, ann_file, transforms)


def test_category_mapping_is_sorted_and_contiguous(tiny):
    ds = _load(*tiny[:2])
    assert ds.category_ids == [3, 7]
    assert ds.category_names == ["cat", "dog"]
    assert ds.label_to_category_id == {0: 3, 1: 7}
    assert ds.num_classes == 2
    assert len(ds) == 2 and ds.image_ids == [11, 12]


def test_item_without_transforms_exact_targets(tiny):
    ds = _load(*tiny[:2])
    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert torch.allclose(image, torch.full_like(image, 128 / 255))
    # dog [8,4,16,12] -> cxcywh (16, 10, 16, 12) / (64, 48, 64, 48); cat [40,30,40,30] clipped to
    # x 40..64, y 30..48 -> (52, 39, 24, 18); degenerate and crowd boxes are gone
    expected = torch.tensor([[16 / 64, 10 / 48, 16 / 64, 12 / 48], [52 / 64, 39 / 48, 24 / 64, 18 / 48]])
    assert torch.allclose(t["boxes"], expected, atol=1e-6)
    assert t["labels"].tolist() == [1, 0] and t["labels"].dtype == torch.int64
    assert t["image_id"].dtype == torch.int64 and t["image_id"].ndim == 0 and int(t["image_id"]) == 11
    assert t["orig_size"].tolist() == [64, 48] and t["size"].tolist() == [64, 48]


def test_image_without_objects(tiny):
    ds = _load(*tiny[:2])
    image, t = ds[1]
    assert image.shape == (3, 60, 80)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert int(t["image_id"]) == 12


def test_degenerate_boxes_one_warning_with_count(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(*tiny[:2])
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1
    assert "dropped 1 degenerate" in msgs[0] and "instances.json" in msgs[0]
    assert ds.num_dropped_boxes == 1


def test_pycocotools_ground_truth_keeps_crowd(tiny):
    ds = _load(*tiny[:2])
    coco = ds.coco
    assert sorted(coco.getImgIds()) == [11, 12]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[11]))
    assert sorted(a["id"] for a in anns) == [1, 2, 4]  # the degenerate box is not in the GT
    assert [a["iscrowd"] for a in anns if a["id"] == 4] == [1]


def test_eval_transforms_resize_keeps_normalised_boxes(tiny):
    ds = _load(*tiny[:2], eval_transforms(32))
    image, t = ds[0]
    assert image.shape == (3, 32, 32)
    assert t["size"].tolist() == [32, 32] and t["orig_size"].tolist() == [64, 48]
    plain = _load(*tiny[:2])[0][1]["boxes"]
    assert torch.allclose(t["boxes"], plain, atol=1e-5)


def test_collate(tiny):
    ds = _load(*tiny[:2], eval_transforms(32))
    images, targets = collate_fn([ds[0], ds[1]])
    assert images.shape == (2, 3, 32, 32)
    assert [int(t["image_id"]) for t in targets] == [11, 12]
    with pytest.raises(ValueError, match="one size"):
        collate_fn([_load(*tiny[:2])[0], _load(*tiny[:2])[1]])


def test_normalize_boxes_transform():
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), format="CXCYWH", canvas_size=(50, 100))
    out = NormalizeBoxes()(boxes)
    assert type(out) is torch.Tensor
    assert torch.allclose(out, torch.tensor([[0.1, 0.4, 0.3, 0.8]]))


def test_train_transforms_keep_labels_aligned(tmp_path):
    """White (class 0) and black (class 1) rectangles on grey: after every random augmentation the pixel at
    each surviving box's centre must still be bright for label 0 and dark for label 1."""
    white, black = (255, 255, 255), (0, 0, 0)
    rects = [(4, 4, 30, 24, white), (40, 10, 70, 40, black), (10, 50, 40, 90, black), (60, 60, 120, 90, white)]
    write_image(tmp_path / "im" / "x.png", 128, 96, color=(128, 128, 128), rects=rects)
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1 if c == white else 2, "bbox": [x0, y0, x1 - x0, y1 - y0]}
        for i, (x0, y0, x1, y1, c) in enumerate(rects)
    ]
    path = write_coco(tmp_path, {
        "images": [{"id": 1, "file_name": "x.png", "width": 128, "height": 96}],
        "categories": [{"id": 1, "name": "white"}, {"id": 2, "name": "black"}],
        "annotations": anns,
    })
    ds = CocoDetection(tmp_path / "im", path, train_transforms(64))
    torch.manual_seed(0)
    checked = 0
    for _ in range(40):
        image, t = ds[0]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        boxes, labels = t["boxes"], t["labels"]
        assert boxes.shape[0] == labels.shape[0]
        assert boxes.shape[1] == 4 and ((boxes >= 0) & (boxes <= 1 + 1e-6)).all()
        assert (boxes[:, 2:] > 0).all()
        bright, dark = [], []
        for (cx, cy, w, h), label in zip(boxes.tolist(), labels.tolist()):
            if w * 64 < 6 or h * 64 < 6:
                continue  # too small for a clean centre pixel after resizing
            v = image[:, int(cy * 64), int(cx * 64)].mean().item()
            (bright if label == 0 else dark).append(v)
        if bright and dark:
            assert min(bright) > max(dark), (bright, dark)
            checked += 1
    assert checked >= 10


def test_train_transforms_image_without_boxes(tiny):
    ds = _load(*tiny[:2], train_transforms(32))
    torch.manual_seed(1)
    for _ in range(10):
        image, t = ds[1]
        assert image.shape == (3, 32, 32) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


# ----------------------------------------------------------------------------------------- validation errors


def _base(tmp_path):
    write_image(tmp_path / "images" / "a.png", 32, 32)
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
    }


def test_error_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="not found.*nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_error_malformed_json(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match="bad.json.*malformed JSON"):
        CocoDetection(tmp_path, tmp_path / "bad.json")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_error_missing_key(tmp_path, key):
    data = _base(tmp_path)
    del data[key]
    path = write_coco(tmp_path, data)
    with pytest.raises(DatasetError, match=f"instances.json.*missing required key '{key}'"):
        CocoDetection(tmp_path / "images", path)


def test_error_unknown_image_id(tmp_path):
    data = _base(tmp_path)
    data["annotations"][0]["image_id"] = 99
    with pytest.raises(DatasetError, match="instances.json.*image_id 99"):
        CocoDetection(tmp_path / "images", write_coco(tmp_path, data))


def test_error_unknown_category(tmp_path):
    data = _base(tmp_path)
    data["annotations"][0]["category_id"] = 5
    with pytest.raises(DatasetError, match="instances.json.*category_id 5"):
        CocoDetection(tmp_path / "images", write_coco(tmp_path, data))


def test_error_empty_dataset(tmp_path):
    data = _base(tmp_path)
    data["images"], data["annotations"] = [], []
    with pytest.raises(DatasetError, match="instances.json.*empty"):
        CocoDetection(tmp_path / "images", write_coco(tmp_path, data))


def test_error_missing_image_file(tmp_path):
    data = _base(tmp_path)
    data["images"].append({"id": 2, "file_name": "gone.png", "width": 32, "height": 32})
    with pytest.raises(DatasetError, match="gone.png"):
        CocoDetection(tmp_path / "images", write_coco(tmp_path, data))


def test_error_corrupt_image_on_load(tmp_path):
    data = _base(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = CocoDetection(tmp_path / "images", write_coco(tmp_path, data))  # existence is fine
    with pytest.raises(DatasetError, match="cannot read image.*a.png"):
        ds[0]


def test_error_bad_bbox(tmp_path):
    data = _base(tmp_path)
    data["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(DatasetError, match=r"annotations\[0\].*bbox"):
        CocoDetection(tmp_path / "images", write_coco(tmp_path, data))


def test_error_image_size_mismatch(tmp_path):
    data = _base(tmp_path)
    data["images"][0]["width"] = 40
    ds = CocoDetection(tmp_path / "images", write_coco(tmp_path, data))
    with pytest.raises(DatasetError, match="a.png.*32x32.*40x32"):
        ds[0]


def test_json_file_read_once(tmp_path, monkeypatch):
    data = _base(tmp_path)
    path = write_coco(tmp_path, data)
    opened = []
    real_open = open

    def counting_open(file, *a, **k):
        if str(file).endswith(".json"):
            opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    ds = CocoDetection(tmp_path / "images", path)
    assert opened == [str(path)]
    assert ds.coco.getAnnIds() == [1]
    assert json.loads(path.read_text())["annotations"][0]["bbox"] == [1, 1, 5, 5]
