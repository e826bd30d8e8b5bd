"""Verdicts against the study's targets (analysis/compute/verdicts.py) and the targets a study file states
(studies/planning/study.py)."""

from __future__ import annotations

import math

import pytest

from analysis.compute import verdicts
from studies.planning.study import TARGET_DEFAULTS, StudyError, Targets, load_study, parse_targets


@pytest.mark.parametrize("low, high, expected", [
    (0.001, 0.02, verdicts.BETTER),
    (-0.02, -0.001, verdicts.WORSE),            # below 0, even inside the margin: a loss is shown
    (-0.009, 0.02, verdicts.NON_INFERIOR),      # a loss larger than δ = 0.01 is ruled out
    (0.0, 0.02, verdicts.NON_INFERIOR),         # lower bound exactly 0: not better
    (-0.011, 0.02, verdicts.INCONCLUSIVE),      # "no difference detected" but a loss of up to 0.011 is possible
    (-0.01, 0.5, verdicts.INCONCLUSIVE),        # the margin's own value is not above −δ
    (-0.03, 0.0, verdicts.INCONCLUSIVE),
    (math.nan, math.nan, verdicts.INCONCLUSIVE),
])
def test_judge(low, high, expected):
    assert verdicts.judge(low, high, 0.01) == expected


def test_the_margin_decides_non_inferiority():
    assert verdicts.judge(-0.029, 0.021, 0.01) == verdicts.INCONCLUSIVE   # the R18 keep-0.3 interval at δ 0.01
    assert verdicts.judge(-0.029, 0.021, 0.03) == verdicts.NON_INFERIOR


def test_no_verdict_below_the_learning_floor_or_with_too_few_images():
    t = Targets(learning_floor_map=0.05, min_scored_images=30)
    assert verdicts.why_no_verdict(0.2, 48, t) is None
    assert verdicts.why_no_verdict(0.0005, 48, t) == "RT-DETR has not learned (mAP 0.0005 < floor 0.05)"
    assert verdicts.why_no_verdict(0.2, 7, t) == "7 scored images < 30"
    assert verdicts.why_no_verdict(0.0005, 7, t) == ("RT-DETR has not learned (mAP 0.0005 < floor 0.05); "
                                                     "7 scored images < 30")
    assert verdicts.why_no_verdict(0.2, None, t) is None   # Welch: no images counted, the floor still applies
    assert verdicts.verdict_text(verdicts.WORSE, "7 scored images < 30") == "no verdict: 7 scored images < 30"
    assert verdicts.verdict_text(verdicts.WORSE, None) == "worse"


def test_interval_includes():
    assert verdicts.interval_includes(1, 1, 0) == "image sampling only (1 seed): training noise not included"
    assert verdicts.interval_includes(3, 3, 4).startswith("image sampling + training noise (3 / 3 seeds")


def test_targets_in_a_study_file_and_their_errors():
    assert load_study("ablation_grid").targets == Targets(0.01, -10.0, -8.0, 0.05, 30)
    assert load_study("ablation_grid", ["targets.delta_map=0.02"]).targets.delta_map == 0.02
    assert parse_targets(None) == Targets() and Targets().params() == {
        f"targets.{k}": v for k, v in TARGET_DEFAULTS.items()}
    for raw, message in [
        ({"delta_map": -0.01}, r"targets\.delta_map: expected a margin in absolute mAP"),
        ({"delta_map": "0.01"}, r"targets\.delta_map: .* got '0.01'"),
        ({"min_scored_images": 2.5}, r"targets\.min_scored_images: expected an integer >= 1"),
        ({"gflops_percent": -100}, r"targets\.gflops_percent"),
        ({"learning_floor_map": True}, r"targets\.learning_floor_map"),
        ({"margin": 0.01}, r"targets: unknown keys \['margin'\]"),
        ([0.01], r"targets: expected a mapping"),
    ]:
        with pytest.raises(StudyError, match=message):
            parse_targets(raw)


def test_the_parent_run_logs_the_targets(tmp_path, monkeypatch):
    """studies/tracking/invocation_runs.py logs the study's targets on the parent run, as params analysis reads
    back."""
    from mlflow.tracking import MlflowClient

    from studies.tracking.invocation_runs import InvocationRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study("ablation_grid", ["targets.delta_map=0.03"])
    runs = InvocationRuns(study, uri, ["CPU"], keep_stale=False, host="h", pid=1)
    params = MlflowClient(tracking_uri=uri).get_run(runs.parent_id).data.params
    assert {k: v for k, v in params.items() if k.startswith("targets.")} == {
        "targets.delta_map": "0.03", "targets.gflops_percent": "-10.0", "targets.latency_percent": "-8.0",
        "targets.learning_floor_map": "0.05", "targets.min_scored_images": "30"}
