"""``python -m dset.bench loader``: the benchmark's files, both pipelines on one image, its numbers and its command
line, on a few tiny files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from dset import bench
from dset.bench_loader import (
    REFERENCE_NAME,
    ReferenceCocoDetection,
    _RefConvertBoxes,
    _RefConvertPILImage,
    _synthetic_scenes,
    bench_loader,
    our_train_dataset,
    reference_collate,
    reference_train_transforms,
    write_bench_files,
)
from dset.config_checks import ConfigError
from dset.data.coco import CocoDetection, collate_fn

REPO = Path(__file__).resolve().parents[1]
W, H, SIZE, N = 96, 72, 64, 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_bench_files(tmp_path_factory.mktemp("bench_files"), count=N, width=W, height=H, seed=0)


@pytest.fixture(scope="module")
def result(files):
    return bench_loader(files, size=SIZE, rounds=2, warmup=1, batch_size=4, seed=0)


def test_files_are_the_same_scenes_in_both_formats(files):
    assert files["count"] == N and files["sizes"] == [(W, H)]
    anns = {f: json.loads(Path(p["annotations"]).read_text()) for f, p in files["formats"].items()}
    assert anns["jpeg"]["annotations"] == anns["png"]["annotations"]
    scenes = list(_synthetic_scenes(N, W, H, 0))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=90)
    q90_tables = Image.open(buf).quantization
    for k, (pixels, scene_anns, _) in enumerate(scenes):
        entry = anns["png"]["images"][k]
        assert (entry["width"], entry["height"]) == (W, H)
        with Image.open(Path(files["formats"]["png"]["images"]) / entry["file_name"]) as im:
            assert im.format == "PNG"
            assert np.array_equal(np.asarray(im.convert("RGB")), pixels)  # lossless
        with Image.open(Path(files["formats"]["jpeg"]["images"]) / anns["jpeg"]["images"][k]["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (W, H)
            assert im.quantization == q90_tables  # saved at quality 90
            # the same scene: 8x8 block means agree (pixel noise is what JPEG drops)
            blocks = (np.asarray(im.convert("RGB"), np.float32) - pixels).reshape(H // 8, 8, W // 8, 8, 3)
            assert np.abs(blocks.mean((1, 3))).mean() < 2
        assert scene_anns, "every scene keeps at least one box"
        for a in scene_anns:  # tight boxes inside the cropped image
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= W and y + h <= H
    assert files["formats"]["png"]["bytes"] > files["formats"]["jpeg"]["bytes"] > 0


def test_both_pipelines_make_the_same_batch_from_the_same_draws(files):
    paths = files["formats"]["jpeg"]
    ours = our_train_dataset(paths["images"], paths["annotations"], SIZE)
    ref = ReferenceCocoDetection(paths["images"], paths["annotations"], reference_train_transforms(SIZE))
    for i in range(N):
        torch.manual_seed(100 + i)
        a_img, a_t = ours[i]
        torch.manual_seed(100 + i)
        b_img, b_t = ref[i]
        for img in (a_img, b_img):
            assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.float32
            assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        for boxes in (a_t["boxes"], b_t["boxes"]):
            assert boxes.ndim == 2 and boxes.shape[1] == 4
            cx, cy, w, h = boxes.unbind(1)
            assert bool(((w > 0) & (h > 0) & (cx - w / 2 >= -1e-6) & (cx + w / 2 <= 1 + 1e-6)
                         & (cy - h / 2 >= -1e-6) & (cy + h / 2 <= 1 + 1e-6)).all())
        torch.testing.assert_close(a_img, b_img.as_subclass(torch.Tensor), atol=1e-6, rtol=0)
        torch.testing.assert_close(a_t["boxes"], b_t["boxes"])
        assert torch.equal(a_t["labels"], b_t["labels"])
    batch, targets = reference_collate([ref[0], ref[1]])
    assert batch.shape == (2, 3, SIZE, SIZE) and len(targets) == 2
    assert collate_fn([ours[0], ours[1]])[0].shape == batch.shape


def test_reference_steps(tmp_path):
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), format="XYXY", canvas_size=(100, 200))
    torch.testing.assert_close(_RefConvertBoxes()(boxes), torch.tensor([[0.1, 0.4, 0.1, 0.4]]))
    img = _RefConvertPILImage()(Image.new("RGB", (3, 2), (51, 255, 0)))
    assert img.shape == (3, 2, 3) and img.dtype == torch.float32
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([0.2, 1.0, 0.0]))

    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 5, "file_name": "a.png", "width": 50, "height": 40}],
            "categories": [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 7, "bbox": [40, 30, 20, 20], "area": 400, "iscrowd": 0},
                {"id": 2, "image_id": 5, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
                {"id": 3, "image_id": 5, "category_id": 3, "bbox": [2, 3, 0, 4], "area": 0, "iscrowd": 0},
                {"id": 4, "image_id": 5, "category_id": 3, "bbox": [2, 3, 4, 5], "area": 20, "iscrowd": 0}]}
    (tmp_path / "i.json").write_text(json.dumps(coco))
    image, target = ReferenceCocoDetection(tmp_path, tmp_path / "i.json")[0]
    assert image.size == (50, 40)
    # crowd dropped, the empty box dropped, the box reaching out clamped to the image, labels in category order
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[40.0, 30, 50, 40],
                                                                                        [2, 3, 6, 8]]))
    assert target["labels"].tolist() == [1, 0] and target["area"].tolist() == [400, 20]
    assert target["orig_size"].tolist() == [50, 40] and target["image_id"].tolist() == [5]


def test_bench_numbers(result):
    assert result["size"] == SIZE and result["images"] == N and result["rounds"] == 2
    assert result["pipelines"]["reference"] == REFERENCE_NAME
    assert result["machine"]["threads"] == 1 and result["machine"]["cpu_count"] >= 1
    assert set(result["results"]) == {"jpeg", "png"}
    for r in result["results"].values():
        for key in ("ours", "reference"):
            p = r[key]
            assert 0 < p["images_per_s_min"] <= p["images_per_s"] <= p["images_per_s_max"]
            assert p["ms_per_image"] == pytest.approx(1e3 / p["images_per_s"], rel=1e-3)
            assert p["decode_ms"] > 0 and p["transform_ms"] > 0
            assert len(p["rounds"]) == 2
            for rd in p["rounds"]:  # decode + the rest is the whole time of a round
                assert rd["decode_ms"] + rd["transform_ms"] == pytest.approx(1e3 / rd["images_per_s"], rel=1e-3)
            # every round repeats the same augmentation draws
            assert p["rounds"][0]["boxes_out"] == p["rounds"][1]["boxes_out"] > 0
        assert r["ratio"] == pytest.approx(r["ours"]["images_per_s"] / r["reference"]["images_per_s"], rel=1e-9)
        # with two rounds the ratio of the medians (means) lies between the rounds' ratios
        assert r["ratio_min"] - 1e-3 <= r["ratio"] <= r["ratio_max"] + 1e-3
        assert r["ours"]["rounds"][0]["boxes_out"] == r["reference"]["rounds"][0]["boxes_out"]
        assert r["outputs_max_abs_diff"] < 1e-5


def test_bench_is_seeded_and_leaves_the_caller_alone(files, result):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = bench_loader(files, size=SIZE, rounds=1, warmup=0, batch_size=4, seed=0, formats=("png",))
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    for key in ("ours", "reference"):
        assert again["results"]["png"][key]["rounds"][0]["boxes_out"] == \
            result["results"]["png"][key]["rounds"][0]["boxes_out"]


def test_real_data_source(files, tmp_path):
    src = files["formats"]["png"]
    made = write_bench_files(tmp_path / "from_data", count=3, data=src["annotations"], data_images=src["images"],
                             formats=("jpeg",))
    assert made["count"] == 3 and made["sizes"] == [(W, H)] and made["source"] == src["annotations"]
    ds = CocoDetection(made["formats"]["jpeg"]["images"], made["formats"]["jpeg"]["annotations"])
    original = CocoDetection(src["images"], src["annotations"])
    for i in range(3):
        assert ds[i][1]["boxes"].shape == original[i][1]["boxes"].shape
        torch.testing.assert_close(ds[i][1]["boxes"], original[i][1]["boxes"])


def test_command_line(tmp_path, capsys):
    argv = ["loader", "--num-images", "4", "--width", str(W), "--height", str(H), "--size", str(SIZE),
            "--rounds", "1", "--warmup", "0", "--formats", "png"]
    assert bench.main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bench"] == "loader" and res["images"] == 4 and set(res["results"]) == {"png"}
    assert bench.main([*argv, "--out", str(tmp_path / "kept")]) == 0
    out = capsys.readouterr().out
    assert REFERENCE_NAME in out and "ratio png: ours / reference images/s = " in out
    assert len(list((tmp_path / "kept" / "png" / "images").iterdir())) == 4


@pytest.mark.parametrize("extra, needle", [
    (["--rounds", "0"], "--rounds"),
    (["--size", "50"], "--size"),
    (["--data", "nowhere/instances.json"], "--data-images"),
    (["--data", "nowhere/instances.json", "--data-images", "nowhere"], "nowhere/instances.json"),
])
def test_command_line_errors(extra, needle, capsys):
    assert bench.main(["loader", "--num-images", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dset.bench", "loader", "--num-images", "2", "--width", "64",
                           "--height", "48", "--size", "32", "--rounds", "1", "--warmup", "0", "--formats", "jpeg",
                           "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"]["jpeg"]["ratio"] > 0


def test_bad_values_are_config_errors(files):
    with pytest.raises(ConfigError, match="--batch-size"):
        bench_loader(files, batch_size=0)
    with pytest.raises(ConfigError, match="--formats"):
        write_bench_files("unused", formats=("gif",))
