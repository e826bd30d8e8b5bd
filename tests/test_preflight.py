"""The data check before any work: dset.train and studies refuse unusable COCO data with the check's report, a
study applies the check's suggestion under its own settings, and a baseline that has not learned is said, with
the likely causes its run recorded, in the study's summary and in the report's answer."""

from __future__ import annotations

import math

import pytest
from data_helpers import write_coco, write_image

from analysis.compute.verdicts import Targets, why_no_verdict
from dset.config import resolve_config
from dset.data.check import check_splits
from dset.data.errors import DatasetError
from dset.data.preflight import check_configured_data, learning_risks, refuse_unusable
from dset.data_file import write_data_file
from studies.execution.jobs import RunResult
from studies.execution.learning_floor import baselines_below_floor
from studies.planning.cells import Cell, cell_config
from studies.planning.study import load_study

# 10 training images of 400x300 with one 12x12 box each: 12 px at 400 px, 3.84 px at 128 px
BOX = 12


def _coco_set(root, n: int, unknown_category: bool = False) -> tuple:
    images, annotations = [], []
    for i in range(n):
        write_image(root / "images" / f"{i}.png", 400, 300, rects=[(20, 20, 20 + BOX, 20 + BOX, (250, 0, 0))])
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 400, "height": 300})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [20, 20, BOX, BOX],
                            "area": BOX * BOX, "iscrowd": 0})
    if unknown_category:
        annotations[0]["category_id"] = 9
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "roof"}]}
    return root / "images", write_coco(root, data)


@pytest.fixture
def data_file(tmp_path):
    """A usable two-split data set and its data.yaml."""
    train = _coco_set(tmp_path / "train", 10)
    val = _coco_set(tmp_path / "val", 4)
    path = tmp_path / "data.yaml"
    write_data_file(path, {"train": train, "val": val}, ["roof"], {"source": {"format": "test"}})
    return path


def test_learning_risks_name_small_objects_few_steps_and_fresh_heads(tmp_path):
    check = check_splits({"train": _coco_set(tmp_path, 10)}, batch_size=8)
    s = check.suggestion
    # the rule: the smallest S in 128, 160, ... with the median box (12 / sqrt(400 x 300) of S, the image resized
    # to S x S) >= 16 px -> 480 (16.6 px)
    assert s.values["data.image_size"] == 480
    assert s.values["train.epochs"] == math.ceil(300 / math.ceil(10 / 8))   # 150
    risks = learning_risks(check, image_size=128, epochs=2, steps_per_epoch=2,
                           class_heads_from_scratch="4 classes in stage1.pt, 1 in the model")
    assert len(risks) == 3
    assert "median training box is 4.4 px" in risks[0] and "data.image_size=480" in risks[0]
    assert risks[1].startswith("4 optimiser steps (2 epochs x 2)") and "train.epochs=150" in risks[1]
    assert "4 classes in stage1.pt, 1 in the model" in risks[2]
    # at the suggested budget nothing is left to say
    assert learning_risks(check, image_size=480, epochs=150, steps_per_epoch=2) == []


def test_unusable_data_is_refused_with_the_check_report(tmp_path):
    bad = _coco_set(tmp_path / "bad", 3, unknown_category=True)
    good = _coco_set(tmp_path / "good", 3)
    cfg = resolve_config("rtdetr_r18", overrides=[
        "data.name=coco", f"data.train.images={bad[0]}", f"data.train.annotations={bad[1]}",
        f"data.val.images={good[0]}", f"data.val.annotations={good[1]}"])
    check = check_configured_data(cfg)
    assert not check.usable
    with pytest.raises(DatasetError) as exc:
        refuse_unusable(check)
    text = str(exc.value)
    assert "usable: NO" in text and "train annotations[0] (id 1, image 1 0.png) category_id 9" in text


def test_dset_train_refuses_unusable_data_before_any_work(tmp_path, capsys):
    from dset.train import main

    bad = _coco_set(tmp_path / "bad", 3, unknown_category=True)
    good = _coco_set(tmp_path / "good", 3)
    out = tmp_path / "run"
    code = main(["rtdetr_r18", "--out", str(out), "data.name=coco", f"data.train.images={bad[0]}",
                 f"data.train.annotations={bad[1]}", f"data.val.images={good[0]}",
                 f"data.val.annotations={good[1]}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "usable: NO" in err and "Traceback" not in err
    assert not (out / "config.yaml").exists()   # nothing was written


def test_a_study_applies_the_suggestion_under_its_own_settings(data_file):
    study = load_study("ablation_grid", [f"data={data_file}"])
    cfg = cell_config(study, {}, seed=0, presets=["rtdetr_r18"])
    assert cfg.data.name == "coco" and cfg.data.classes == ["roof"]
    assert (cfg.data.image_size, cfg.model.eval_spatial_size) == (480, [480, 480])
    assert cfg.train.epochs == math.ceil(300 / math.ceil(10 / 8))
    # a cell's value wins over the suggestion, and so does the command line
    assert cell_config(study, {"data.image_size": 320}, seed=0, presets=["rtdetr_r18"]).data.image_size == 320
    cli = load_study("ablation_grid", [f"data={data_file}", "train.epochs=3"])
    assert cell_config(cli, {}, seed=0, presets=["rtdetr_r18"]).train.epochs == 3
    off = load_study("ablation_grid", [f"data={data_file}", "data_suggestion=false"])
    assert cell_config(off, {}, seed=0, presets=["rtdetr_r18"]).data.image_size == 128   # the budget's


def test_studies_run_refuses_unusable_data_with_exit_2(tmp_path, capsys):
    from studies.run import main

    bad = _coco_set(tmp_path / "bad", 3, unknown_category=True)
    good = _coco_set(tmp_path / "good", 3)
    path = tmp_path / "data.yaml"
    write_data_file(path, {"train": bad, "val": good}, ["roof"], {"source": {"format": "test"}})
    code = main(["ablation_grid", f"data={path}", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "usable: NO" in err and "Traceback" not in err


def test_dry_run_shows_the_data_file_check_and_suggestion(data_file, tmp_path, monkeypatch, capsys):
    from studies.run import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["ablation_grid", f"data={data_file}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data: {data_file}" in out
    assert "data check: train 10 images / 10 boxes, val 4 images / 4 boxes; 1 classes (roof)" in out
    assert "data check's suggestion: data.image_size=480" in out


def _cell(cell_id: str, switches_on: bool) -> Cell:
    o = {"model.encoder_moe.enabled": switches_on, "model.token_pruning.enabled": False,
         "model.decoder_moe.enabled": False}
    return Cell(id=cell_id, seed=0, overrides=o, presets=["rtdetr_r18"])


def test_a_baseline_below_the_learning_floor_is_said_with_its_likely_cause():
    cells = [_cell("r18-s0", False), _cell("r18-enc_moe-s0", True)]
    results = [RunResult("r18-s0", "completed", {"best/mAP": 0.001}, run_id="a"),
               RunResult("r18-enc_moe-s0", "completed", {"best/mAP": 0.0}, run_id="b")]
    said = baselines_below_floor(cells, results, 0.05, {"a": "objects are small"}.get)
    assert len(said) == 1   # the variant is not a baseline
    assert said[0].startswith("RT-DETR R18 (r18-s0) ended at mAP 0.0010, below the learning floor 0.05")
    assert said[0].endswith("Likely cause: objects are small.")
    results[0].metrics["best/mAP"] = 0.06
    assert baselines_below_floor(cells, results, 0.05, {}.get) == []


def test_the_report_quotes_the_likely_cause_where_rt_detr_has_not_learned():
    targets = Targets()
    why = why_no_verdict(0.001, 100, targets, likely_cause="2 optimiser steps")
    assert why == "RT-DETR has not learned (mAP 0.0010 < floor 0.05; likely cause: 2 optimiser steps)"
    assert why_no_verdict(0.2, 100, targets, likely_cause="2 optimiser steps") is None
