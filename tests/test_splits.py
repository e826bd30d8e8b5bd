"""Select on one split, score on another, under one rule for every run: the epochs that may be reported
(dset.engine.reported_checkpoint.eligible_epochs), the synthetic set's test split, data.test for COCO data and
the data digest that covers it. The training runs that score a test split are in test_train.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from data_helpers import tiny_coco

from dset.config import ConfigError, load_config, resolve_config
from dset.data.loaders import build_datasets
from dset.data.synthetic import dataset_key, make_synthetic_coco
from dset.engine.reported_checkpoint import eligible_epochs
from dset.provenance import data_digest

SMALL = dict(num_train=3, num_val=2, image_size=48, seed=2, min_object_size=6, max_objects=2)


# ------------------------------------------------------------------------- one rule for every run
def test_cells_of_one_budget_choose_among_the_same_epochs():
    """The study budget's RT-DETR cell (no pruning) may not pick an epoch that its pruning cells could not."""
    budget = "study_cpu"   # token and memory pruning: warm-up 1, ramp 0, so both reach their target at epoch 1
    rtdetr = resolve_config("rtdetr_r18", budget=budget, overrides=["train.epochs=4"])
    memory = resolve_config("dset_fast_r18", budget=budget, overrides=["train.epochs=4"])
    tokens = resolve_config("dset_r18", budget=budget, overrides=["train.epochs=4"])
    assert not rtdetr.model.token_pruning.enabled and not rtdetr.model.memory_pruning.enabled
    assert memory.model.memory_pruning.enabled and tokens.model.token_pruning.enabled
    assert eligible_epochs(rtdetr) == eligible_epochs(memory) == eligible_epochs(tokens) == range(1, 4)


def test_eligible_epochs_follow_the_longest_schedule_and_keep_the_last_epoch():
    def cfg(*overrides):
        return load_config("rtdetr_r18", ["train.epochs=10", *overrides])

    schedules = ["model.memory_pruning.warmup_epochs=0"]
    assert eligible_epochs(cfg(*schedules, "model.token_pruning.warmup_epochs=0",
                               "model.token_pruning.ramp_epochs=0")) == range(0, 10)
    # token pruning at its target from epoch 2 + 3 - 1 = 4 (switched off: the rule reads the schedule alone)
    assert eligible_epochs(cfg(*schedules, "model.token_pruning.warmup_epochs=2",
                               "model.token_pruning.ramp_epochs=3")) == range(4, 10)
    assert eligible_epochs(cfg("model.token_pruning.warmup_epochs=0", "model.token_pruning.ramp_epochs=0",
                               "model.memory_pruning.warmup_epochs=3", "model.memory_pruning.ramp_epochs=2")) == \
        range(4, 10)
    # the preset's own schedule (warm-up 10, ramp 10: epoch 19) is longer than a 10-epoch run: the last epoch
    assert eligible_epochs(cfg()) == range(9, 10)


def test_eligible_epochs_start_where_the_built_pruners_reach_their_target():
    """The rule reads the schedules from the configuration; the pruners the model builds agree on their end."""
    from dset.models.detector import build_model

    overrides = ["train.epochs=9", "model.token_pruning.warmup_epochs=2", "model.token_pruning.ramp_epochs=4",
                 "model.memory_pruning.warmup_epochs=3", "model.memory_pruning.ramp_epochs=0"]
    cfg = load_config("dset_r18", [*overrides, "model.memory_pruning.enabled=true"])
    model = build_model(cfg, load_weights=False)
    targets = [p.target_epoch for p in model.pruners()]
    assert sorted(targets) == [3, 5] and eligible_epochs(cfg).start == max(targets)


# ---------------------------------------------------------------------------- the synthetic test split
def _png_digests(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def test_synthetic_test_split_is_deterministic_and_disjoint(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", num_test=4, **SMALL)
    b = make_synthetic_coco(tmp_path / "b", num_test=4, workers=2, **SMALL)
    without = make_synthetic_coco(tmp_path / "a", **SMALL)
    assert {"test_images", "test_annotations"} <= set(a) and "test_images" not in without
    # deterministic: the same images and annotations from another process count and cache folder
    assert _png_digests(a["test_images"]) == _png_digests(b["test_images"])
    test = json.loads(Path(a["test_annotations"]).read_text())
    assert test == json.loads(Path(b["test_annotations"]).read_text())
    # ids after train's (1-3) and val's (4-5); images that are neither train's nor val's
    assert [im["id"] for im in test["images"]] == [6, 7, 8, 9] and test["annotations"]
    assert {ann["image_id"] for ann in test["annotations"]} <= {6, 7, 8, 9}
    seen = set(_png_digests(a["train_images"]).values()) | set(_png_digests(a["val_images"]).values())
    assert len(set(_png_digests(a["test_images"]).values()) | seen) == len(seen) + 4
    # a test split leaves the train and val images as they were
    for split in ("train", "val"):
        assert _png_digests(a[f"{split}_images"]) == _png_digests(without[f"{split}_images"])
    # its size is part of the data set's identity; without one, the key (caches, fingerprints) is unchanged
    assert a["root"] != without["root"]
    assert dataset_key(num_test=4) != dataset_key(num_test=5) != dataset_key()
    assert dataset_key(num_test=0) == dataset_key()


def test_a_synthetic_run_builds_its_test_split_and_its_digest_covers_it(tmp_path):
    overrides = [f"data.synthetic.root={tmp_path}", "data.synthetic.num_train=2", "data.synthetic.num_val=2",
                 "data.synthetic.image_size=64", "data.image_size=64"]
    with_test = load_config("rtdetr_r18", [*overrides, "data.synthetic.num_test=3"])
    data = build_datasets(with_test, train=False)
    assert data.test is not None and data.test.image_ids == [5, 6, 7]
    dataset, coco, ids = data.evaluated_split("test")
    assert len(dataset) == 3 and ids == [5, 6, 7] and coco is data.test
    assert data_digest(with_test) != data_digest(load_config("rtdetr_r18", overrides))
    no_test = build_datasets(load_config("rtdetr_r18", overrides), train=False)
    assert no_test.test is None
    with pytest.raises(Exception, match="no test split"):
        no_test.evaluated_split("test")
    with pytest.raises(ConfigError, match="data.synthetic.num_test"):
        load_config("rtdetr_r18", ["data.synthetic.num_test=-1"])


# --------------------------------------------------------------------------------------- COCO data.test
def _coco(tmp_path: Path, *test: str) -> list[str]:
    images, annotations, _ = tiny_coco(tmp_path / "d")
    return ["data.name=coco", f"data.train.images={images}", f"data.train.annotations={annotations}",
            f"data.val.images={images}", f"data.val.annotations={annotations}", *test]


def test_coco_test_split_missing_or_half_given_is_an_error_naming_the_key(tmp_path):
    base = _coco(tmp_path)
    images = base[1].split("=", 1)[1]
    with pytest.raises(ConfigError, match=r"data\.test\.annotations.*file not found.*missing\.json"):
        load_config("rtdetr_r18", [*base, f"data.test.images={images}",
                                   f"data.test.annotations={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match=r"data\.test\.images.*folder not found"):
        load_config("rtdetr_r18", [*base, f"data.test.images={tmp_path / 'nowhere'}",
                                   f"data.test.annotations={base[2].split('=', 1)[1]}"])
    with pytest.raises(ConfigError, match=r"data\.test\.annotations.*is required when data\.test\.images is set"):
        load_config("rtdetr_r18", [*base, f"data.test.images={images}"])
    # the built-in synthetic set would ignore it
    with pytest.raises(ConfigError, match=r"data\.test\.images.*data\.name is 'synthetic'"):
        load_config("rtdetr_r18", [f"data.test.images={images}"])


def test_coco_test_split_is_read_and_its_annotations_are_in_the_digest(tmp_path):
    base = _coco(tmp_path)
    test_images, test_annotations, data = tiny_coco(tmp_path / "t")
    cfg = load_config("rtdetr_r18", [*base, f"data.test.images={test_images}",
                                     f"data.test.annotations={test_annotations}"])
    bundle = build_datasets(cfg, train=False)
    assert bundle.test is not None and bundle.test.image_ids == [11, 12]
    digest = data_digest(cfg)
    assert digest != data_digest(load_config("rtdetr_r18", base))
    data["annotations"][0]["bbox"] = [9, 4, 16, 12]   # another box in the test split: another data set
    test_annotations.write_text(json.dumps(data))
    assert data_digest(cfg) != digest
