"""The synthetic shapes data set: exact boxes, determinism, caching, size spread, and that it loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dset.data import synthetic
from dset.data.synthetic import CLASS_NAMES, make_synthetic_coco, render_scene

SMALL = dict(num_train=6, num_val=3, image_size=96, seed=3, workers=1)


def _load(path):
    return json.loads(Path(path).read_text())


def test_boxes_are_tight_and_visible_pixels_have_object_colour():
    for seed in range(8):
        rng = np.random.default_rng(seed)
        img, objects, owner = render_scene(rng, 128, noise=False)
        assert 1 <= len(objects) <= 8
        for k, obj in enumerate(objects):
            x, y, w, h = obj.bbox
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
            assert obj.mask.shape == (h, w) and obj.area == int(obj.mask.sum())
            # tight: the mask touches all four sides of its box
            assert obj.mask[0].any() and obj.mask[-1].any() and obj.mask[:, 0].any() and obj.mask[:, -1].any()
            # visible pixels are this object's pixels, inside its box, and carry its colour family
            ys, xs = np.nonzero(owner == k)
            visible = ys.size
            assert visible >= 0.5 * obj.area  # the occlusion rule
            assert x <= xs.min() and xs.max() < x + w and y <= ys.min() and ys.max() < y + h
            assert obj.mask[ys - y, xs - x].all()
            mean = img[ys, xs].astype(float).mean(0)
            assert np.abs(mean - np.array(obj.color)).max() < 0.1 * 255 + 1


def test_class_colour_families_differ():
    rng = np.random.default_rng(0)
    hues = {}
    for name in CLASS_NAMES[:4]:
        hsv = [Image.fromarray(np.uint8(synthetic._class_color(rng, name))[None, None]).convert("HSV")
               .getpixel((0, 0))[0] for _ in range(50)]
        hues[name] = np.array(hsv, float) * 360 / 255
    # circular distance between the mean hues of different classes is large against the jitter
    means = {n: np.degrees(np.angle(np.exp(1j * np.radians(h)).mean())) % 360 for n, h in hues.items()}
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            d = abs(means[names[i]] - means[names[j]]) % 360
            assert min(d, 360 - d) > 40, (names[i], names[j], d)


def test_generation_writes_coco_and_is_deterministic(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", **SMALL)
    b = make_synthetic_coco(tmp_path / "b", **{**SMALL, "workers": 2})
    assert set(a) == {"train_images", "train_annotations", "val_images", "val_annotations", "root"}
    assert Path(a["root"]).name == Path(b["root"]).name  # same parameter hash
    ja, jb = _load(a["train_annotations"]), _load(b["train_annotations"])
    assert ja == jb and _load(a["val_annotations"]) == _load(b["val_annotations"])
    assert [c["name"] for c in ja["categories"]] == ["circle", "square", "triangle", "cross"]
    assert [c["id"] for c in ja["categories"]] == [1, 2, 3, 4]
    assert len(ja["images"]) == 6 and len(_load(a["val_annotations"])["images"]) == 3
    assert [im["id"] for im in _load(a["val_annotations"])["images"]] == [7, 8, 9]
    for im in ja["images"]:
        pa = np.asarray(Image.open(Path(a["train_images"]) / im["file_name"]))
        pb = np.asarray(Image.open(Path(b["train_images"]) / im["file_name"]))
        assert pa.shape == (96, 96, 3) and np.array_equal(pa, pb)
    per_image = Counter(ann["image_id"] for ann in ja["annotations"])
    assert all(1 <= per_image[im["id"]] <= 8 for im in ja["images"])
    for ann in ja["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96 and w > 0 and h > 0
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    assert sorted(ann["id"] for ann in ja["annotations"]) == list(range(1, len(ja["annotations"]) + 1))
    # no temporary folders left behind
    assert [p.name for p in (tmp_path / "a").iterdir()] == [Path(a["root"]).name]


def test_seed_changes_data(tmp_path):
    a = make_synthetic_coco(tmp_path, **SMALL)
    b = make_synthetic_coco(tmp_path, **{**SMALL, "seed": 4})
    assert a["root"] != b["root"]
    assert _load(a["train_annotations"])["annotations"] != _load(b["train_annotations"])["annotations"]


def test_cache_is_reused_and_incomplete_cache_regenerated(tmp_path, monkeypatch):
    first = make_synthetic_coco(tmp_path, **SMALL)
    calls = []
    real = synthetic._write_dataset
    monkeypatch.setattr(synthetic, "_write_dataset", lambda *a, **k: (calls.append(1), real(*a, **k)))
    assert make_synthetic_coco(tmp_path, **SMALL) == first
    assert calls == []
    # a damaged cache (an image deleted) is detected and rebuilt
    victim = next(Path(first["train_images"]).iterdir())
    victim.unlink()
    assert make_synthetic_coco(tmp_path, **SMALL) == first
    assert calls == [1] and victim.is_file()


def test_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_make_image", boom)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_coco(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DSET_CACHE_DIR", str(tmp_path / "cache"))
    paths = make_synthetic_coco(**SMALL)
    assert Path(paths["root"]).parent == tmp_path / "cache" / "synthetic"


def test_sizes_span_coco_ranges_and_all_classes_appear():
    areas, labels = [], []
    for i in range(40):
        _, objects, _ = render_scene(np.random.default_rng(i), 320)
        areas += [o.area for o in objects]
        labels += [o.label for o in objects]
    areas = np.array(areas)
    small, large = (areas < 32**2).mean(), (areas > 96**2).mean()
    assert small > 0.2 and large > 0.05 and 1 - small - large > 0.2
    assert set(labels) == {0, 1, 2, 3}
    assert len(areas) / 40 > 3  # several objects per image


def test_some_objects_overlap():
    overlaps = 0
    for i in range(30):
        _, objects, _ = render_scene(np.random.default_rng(i), 160)
        boxes = [o.bbox for o in objects]
        for p in range(len(boxes)):
            for q in range(p + 1, len(boxes)):
                (x0, y0, w0, h0), (x1, y1, w1, h1) = boxes[p], boxes[q]
                overlaps += min(x0 + w0, x1 + w1) > max(x0, x1) and min(y0 + h0, y1 + h1) > max(y0, y1)
    assert overlaps >= 5


def test_loads_in_coco_dataset(tmp_path):
    from dset.data.coco import CocoDetection
    from dset.data.transforms import eval_transforms

    paths = make_synthetic_coco(tmp_path, **SMALL)
    ds = CocoDetection(paths["val_images"], paths["val_annotations"], eval_transforms(64))
    assert ds.category_names == ["circle", "square", "triangle", "cross"] and len(ds) == 3
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["boxes"].shape[0] >= 1


def test_invalid_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco(tmp_path, num_classes=9)
    with pytest.raises(ValueError, match="max_objects"):
        make_synthetic_coco(tmp_path, min_objects=5, max_objects=2)


def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "dset.data.synthetic", "--out", str(tmp_path), "--num-train", "2", "--num-val", "1",
         "--image-size", "64", "--workers", "1"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    ).stdout
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert Path(lines["train_annotations"]).is_file() and Path(lines["val_images"]).is_dir()
    assert len(_load(lines["train_annotations"])["images"]) == 2
