"""DAIR-V2X -> COCO converter on a tiny fixture in the DAIR-V2X camera layout (real JPEGs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from dset.data.coco import CocoDetection
from dset.data.dair_v2x import DAIR_V2X_CLASSES, convert_dair_v2x
from dset.data.errors import DatasetError

W, H = 96, 64


def _obj(t, xmin, ymin, xmax, ymax, as_str=True):
    conv = (lambda v: f"{v:.6f}") if as_str else (lambda v: v)
    return {"type": t, "occluded_state": 0, "truncated_state": 0, "alpha": 0.0,
            "2d_box": {"xmin": conv(xmin), "ymin": conv(ymin), "xmax": conv(xmax), "ymax": conv(ymax)}}


FRAMES = {
    "000000": [_obj("Car", 10, 10, 40, 30), _obj("pedestrian", 50, 20, 60, 50, as_str=False)],
    "000001": [_obj("Truck", 0, 0, 30, 20), _obj("Barrowlist", 40, 30, 50, 60), _obj("Tricyclist", 5, 5, 15, 15)],
    "000002": [_obj("Van", 80, 40, 120, 80), _obj("PedestrianIgnore", 1, 1, 9, 9), _obj("Spaceship", 1, 1, 5, 5)],
    "000003": [_obj("Bus", 5, 5, 50, 40), _obj("Cyclist", 60, 10, 70, 30), _obj("Motorcyclist", 70, 30, 80, 50)],
    "000004": [_obj("TrafficCone", 20, 40, 24, 48), _obj("car", 30, 30, 30, 40)],
    "000005": [],
    "000006": [_obj("Car", 1, 2, 3, 4)],
    "000007": [_obj("Car", 2, 2, 12, 12)],
    "000008": [_obj("Car", 3, 3, 13, 13)],
    "000009": [_obj("Car", 4, 4, 14, 14)],
}


def make_dair(root: Path, frames=FRAMES, data_info: bool = True) -> Path:
    """The DAIR-V2X layout; ``data_info.json`` puts frames 2k and 2k+1 in one recording (batch_id k)."""
    (root / "image").mkdir(parents=True)
    (root / "label" / "camera").mkdir(parents=True)
    for frame, objs in frames.items():
        Image.new("RGB", (W, H), (100, 120, 140)).save(root / "image" / f"{frame}.jpg", quality=80)
        (root / "label" / "camera" / f"{frame}.json").write_text(json.dumps(objs))
    if data_info:
        (root / "data_info.json").write_text(json.dumps(
            [{"image_path": f"image/{f}.jpg", "batch_id": f"{int(f) // 2:03d}"} for f in frames]))
    return root


def convert(src, dst, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_dair_v2x(src, dst, verbose=False, **kw)


def _anns_by_frame(coco):
    frame_of = {im["id"]: im["frame_id"] for im in coco["images"]}
    out = {}
    for a in coco["annotations"]:
        out.setdefault(frame_of[a["image_id"]], []).append(a)
    return out


def test_conversion_classes_crowd_clipping(tmp_path):
    src = make_dair(tmp_path / "src")
    s = convert(src, tmp_path / "out", split_file=None)
    train, val = (json.loads(Path(s[k]).read_text()) for k in ("train_annotations", "val_annotations"))
    assert [(c["id"], c["name"]) for c in train["categories"]] == list(enumerate(DAIR_V2X_CLASSES, start=1))
    assert s["num_train_images"] == 8 and s["num_val_images"] == 2
    assert len(train["images"]) == 8 and len(val["images"]) == 2
    frames = {im["frame_id"] for im in train["images"] + val["images"]}
    assert frames == set(FRAMES)
    ids = sorted(im["id"] for im in train["images"] + val["images"])
    assert ids == list(range(1, 11))
    for im in train["images"] + val["images"]:
        assert (im["width"], im["height"]) == (W, H) and im["file_name"] == f"{im['frame_id']}.jpg"

    anns = _anns_by_frame({"images": train["images"] + val["images"],
                           "annotations": [a for a in train["annotations"] + val["annotations"]]})
    cat = {name: i for i, name in enumerate(DAIR_V2X_CLASSES, start=1)}
    car, ped = anns["000000"]
    assert car["category_id"] == cat["Car"] and car["bbox"] == [10.0, 10.0, 30.0, 20.0] and car["area"] == 600.0
    assert ped["category_id"] == cat["Pedestrian"] and ped["iscrowd"] == 0
    # Barrowlist -> Cyclist; Tricyclist dropped
    assert [(a["category_id"], a["dair_type"]) for a in anns["000001"]] == [
        (cat["Truck"], "Truck"), (cat["Cyclist"], "Barrowlist")]
    # Van clipped to the 96x64 image; PedestrianIgnore is a crowd region of Pedestrian; unknown type dropped
    van, ign = anns["000002"]
    assert van["bbox"] == [80.0, 40.0, 16.0, 24.0]
    assert ign["category_id"] == cat["Pedestrian"] and ign["iscrowd"] == 1
    # case-insensitive 'TrafficCone'; the zero-width car is dropped
    assert [a["category_id"] for a in anns["000004"]] == [cat["Trafficcone"]]
    assert "000005" not in anns  # an image without objects is kept, with no annotations

    assert s["dropped_types"] == {"Tricyclist": 1}
    assert s["unknown_types"] == {"Spaceship": 1}
    assert s["degenerate_boxes"] == 1
    total = {n: s["annotations"]["train"][n] + s["annotations"]["val"][n] for n in DAIR_V2X_CLASSES}
    assert total == {"Car": 5, "Truck": 1, "Van": 1, "Bus": 1, "Pedestrian": 1, "Cyclist": 2,
                     "Motorcyclist": 1, "Trafficcone": 1}
    assert s["crowd_regions"]["train"] + s["crowd_regions"]["val"] == 1
    # unique annotation ids per file
    for coco in (train, val):
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def _split_frames(s, split):
    return sorted(im["frame_id"] for im in json.loads(Path(s[f"{split}_annotations"]).read_text())["images"])


def test_default_split_keeps_each_recording_whole_deterministic_and_seeded(tmp_path):
    src = make_dair(tmp_path / "src")
    a = convert(src, tmp_path / "a", seed=0)
    b = convert(src, tmp_path / "b", seed=0)
    c = convert(src, tmp_path / "c", seed=3)
    assert _split_frames(a, "val") == _split_frames(b, "val")
    assert _split_frames(a, "val") != _split_frames(c, "val")       # seeds 0 and 3 choose other recordings
    assert "batch_id" in a["split_source"]
    for s, fraction in ((a, 0.2), (c, 0.2), (convert(src, tmp_path / "d", val_fraction=0.5), 0.5)):
        batches = {split: {int(f) // 2 for f in _split_frames(s, split)} for split in ("train", "val")}
        assert not batches["train"] & batches["val"]          # no recording in both
        assert len(_split_frames(s, "val")) == pytest.approx(fraction * 10, abs=1)


def test_split_without_data_info_follows_gaps_in_frame_ids(tmp_path):
    frames = {f: [_obj("Car", 2, 2, 12, 12)] for f in ("000010", "000011", "000012", "000050", "000051", "000090")}
    s = convert(make_dair(tmp_path / "src", frames, data_info=False), tmp_path / "out", val_fraction=0.3)
    assert "consecutive" in s["split_source"]
    runs = [{"000010", "000011", "000012"}, {"000050", "000051"}, {"000090"}]
    val = set(_split_frames(s, "val"))
    assert val and all(run <= val or not run & val for run in runs)


def test_one_recording_cannot_be_split(tmp_path):
    frames = {f"{i:06d}": [_obj("Car", 2, 2, 12, 12)] for i in range(4)}
    with pytest.raises(DatasetError, match="one sequence"):
        convert(make_dair(tmp_path / "src", frames, data_info=False), tmp_path / "out")


def test_txt_split(tmp_path):
    src = make_dair(tmp_path / "src")
    (src / "train.txt").write_text("000000\n000001\nimage/000002.jpg\n")
    (src / "val.txt").write_text("000003\n\n")
    s = convert(src, tmp_path / "out")
    train = json.loads(Path(s["train_annotations"]).read_text())
    val = json.loads(Path(s["val_annotations"]).read_text())
    assert [im["frame_id"] for im in train["images"]] == ["000000", "000001", "000002"]
    assert [im["frame_id"] for im in val["images"]] == ["000003"]
    assert s["unlisted_frames"] == 6


def test_json_split_file(tmp_path):
    src = make_dair(tmp_path / "src")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["000004", "000005"], "val": ["000006"], "test": ["000007"]}))
    s = convert(src, tmp_path / "out", split_file=split)
    assert s["num_train_images"] == 2 and s["num_val_images"] == 1
    split.write_text(json.dumps({"train": ["000004", "999999"], "val": []}))
    with pytest.raises(DatasetError, match="999999"):
        convert(src, tmp_path / "out2", split_file=split)


def test_output_loads_in_coco_dataset(tmp_path):
    src = make_dair(tmp_path / "src")
    s = convert(src, tmp_path / "out")
    assert Path(s["images_dir"]).is_symlink()
    ds = CocoDetection(s["images_dir"], s["train_annotations"])
    assert ds.num_classes == 8 and ds.category_names == list(DAIR_V2X_CLASSES)
    image, target = ds[0]
    assert image.shape == (3, H, W)
    # copying instead of linking gives the same annotations
    s2 = convert(src, tmp_path / "copied", images="copy")
    assert not Path(s2["images_dir"]).is_symlink() and len(os.listdir(s2["images_dir"])) == 10
    assert Path(s2["train_annotations"]).read_text() == Path(s["train_annotations"]).read_text()


def test_malformed_label_names_file(tmp_path):
    src = make_dair(tmp_path / "src")
    (src / "label" / "camera" / "000003.json").write_text("[{not json")
    with pytest.raises(DatasetError, match="000003.json.*malformed"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on error


def test_bad_box_names_file_and_object(tmp_path):
    src = make_dair(tmp_path / "src")
    (src / "label" / "camera" / "000002.json").write_text(
        json.dumps([{"type": "Car", "2d_box": {"xmin": "a", "ymin": 0, "xmax": 1, "ymax": 1}}]))
    with pytest.raises(DatasetError, match="000002.json.*object 0.*non-numeric"):
        convert(src, tmp_path / "out")


def test_missing_image_names_file(tmp_path):
    src = make_dair(tmp_path / "src")
    (src / "image" / "000007.jpg").unlink()
    with pytest.raises(DatasetError, match="000007"):
        convert(src, tmp_path / "out")


def test_cli_prints_summary(tmp_path):
    src = make_dair(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "dset.data.dair_v2x", str(src), str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "images: train 8, val 2" in r.stdout
    assert any(line.split()[:1] == ["Car"] and int(line.split()[1]) + int(line.split()[2]) == 5
               for line in r.stdout.splitlines())
    assert (tmp_path / "o" / "train.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "dset.data.dair_v2x", str(tmp_path / "nothing"), str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "image folder not found" in bad.stderr
