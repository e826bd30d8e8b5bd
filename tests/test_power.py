"""The planning aid (analysis/power.py, analysis/compute/power.py): images and seeds needed to detect a ΔmAP,
from a fixture study's logged detections (tests/report_fixtures.py's two_stage experiment)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import report_fixtures as F

from analysis import power
from analysis.compute import bootstrap
from analysis.compute.loading import load_study_results
from analysis.compute.power import images_needed, plan


@pytest.fixture(scope="module")
def two_stage_store(module_tmp) -> str:
    from mlflow.tracking import MlflowClient

    root = module_tmp("power_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    F.log_two_stage(MlflowClient(tracking_uri=uri), Path(root) / "artifacts")
    return uri


def test_images_needed_scales_the_image_variance_by_one_over_n():
    # image sampling only: MDE(n) = 2.80 SE sqrt(n_now / n) <= delta  <=>  n >= n_now (2.80 SE / delta)^2
    se, n_now = 0.01, 48
    z = bootstrap.minimum_detectable_effect(1.0)      # 2.80
    assert images_needed(se, n_now, 0.01, 1, math.nan) == math.ceil(n_now * (z * se / 0.01) ** 2)
    assert images_needed(se, n_now, 0.02, 1, math.nan) == math.ceil(n_now * (z * se / 0.02) ** 2)
    # the MDE at the images returned is at most delta, and one image fewer is not enough
    n = images_needed(se, n_now, 0.01, 1, math.nan)
    assert z * se * math.sqrt(n_now / n) <= 0.01 < z * se * math.sqrt(n_now / (n - 1))
    # several seeds: the seed term takes its share first; where it alone exceeds delta no image count suffices
    s_seed = 0.002
    seed_mde = bootstrap.minimum_detectable_effect(0.0, s_seed * math.sqrt(2 / 3), 4)
    assert images_needed(se, n_now, 0.01, 3, s_seed) == math.ceil(n_now * (z * se) ** 2 / (0.01 ** 2
                                                                                                 - seed_mde ** 2))
    assert images_needed(se, n_now, 0.01, 2, 0.05) == math.inf
    assert math.isnan(images_needed(se, n_now, 0.01, 2, math.nan))   # seed spread unknown


def test_plan_from_the_logged_detections(two_stage_store):
    study = load_study_results("two_stage", two_stage_store)
    table, note = plan(study, 0.02, seeds=(1, 3), n_resamples=200)
    row = table[table["comparison"] == "DSET R18 (P) vs RT-DETR R18"].iloc[0]
    gt = F.two_stage_ground_truth()
    expected = bootstrap.paired_delta([bootstrap.evaluate_run(gt, F.two_stage_detections(4))],
                              [bootstrap.evaluate_run(gt, F.two_stage_detections(0))], n_resamples=200)
    assert row["images now"] == F.TWO_STAGE_IMAGES and row["SE_image"] == pytest.approx(expected.map.se_image)
    assert row["MDE now"] == pytest.approx(expected.map.mde)
    assert row["images for 1 seed"] == images_needed(expected.map.se_image, F.TWO_STAGE_IMAGES, 0.02, 1,
                                                           math.nan)
    # the seed spread: DSET R18 (E)'s two seeds, their mAPs on every image (ddof 1)
    e0, e1 = (bootstrap.evaluate_run(gt, F.two_stage_detections(i)).observed()[0] for i in (2, 3))
    s_seed = abs(e0 - e1) / math.sqrt(2)
    assert f"pooled per-seed mAP std {s_seed:.4f} on 1 df" in note
    assert row["images for 3 seeds"] == images_needed(expected.map.se_image, F.TWO_STAGE_IMAGES, 0.02, 3,
                                                            s_seed)
    assert "DSET R18 (D)" not in set(table["comparison"].str.split(" vs ").str[0]) and "Left out" in note


def test_cli(two_stage_store, capsys):
    assert power.main(["--experiment", "two_stage", "--delta", "0.05", "--tracking-uri", two_stage_store]) == 0
    out = capsys.readouterr().out
    assert "DSET R18 (E+P+D) vs RT-DETR R18" in out and "images for 5 seeds" in out and "ΔmAP to detect: 0.05" in out
    assert power.main(["--experiment", "two_stage", "--delta", "0", "--tracking-uri", two_stage_store]) == 2
    assert "--delta: expected a ΔmAP > 0" in capsys.readouterr().err
    assert power.main(["--experiment", "nope", "--delta", "0.01", "--tracking-uri", two_stage_store]) == 2
