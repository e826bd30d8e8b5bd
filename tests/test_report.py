"""The report (analysis/make_report.py) against a tiny MLflow store logged the way studies/ logs.

The store (tests/report_fixtures.py) holds an ablation grid with known numbers, a failed run, per-epoch
metrics and expert usage (runs without detections: the report falls back on Welch), an Optuna-like study,
a two-stage study whose runs log their detections (bootstrap intervals, a stage-1 run, init checkpoints,
mAPs below the noise floor), a study scored on its test split
with a side-by-side latency benchmark run, and an empty experiment. Every table value checked here is recomputed by hand
(or with pycocotools) from what the fixture logged.
"""

from __future__ import annotations

import base64
import html
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import report_fixtures as F

from analysis import make_report
from analysis.compute import bootstrap, evaluations, stats, variants

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store(module_tmp) -> str:
    root = module_tmp("mlflow_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    F.make_store(uri)
    return uri


@pytest.fixture(scope="module")
def ablation(store, module_tmp) -> dict:
    out = module_tmp("report") / "ablation"
    return make_report.build_report("ablation_grid", out, store)


@pytest.fixture(scope="module")
def optuna_report(store, ablation, module_tmp) -> dict:
    """The Optuna report, written into a copy of the ablation report's folder plus a file of the user's:
    the ablation's files must go, the user's must stay."""
    out = module_tmp("report") / "optuna"
    shutil.copytree(ablation["out_dir"], out)
    (out / "my_notes.txt").write_text("mine")
    return make_report.build_report("optuna_search", out, store)


@pytest.fixture(scope="module")
def two_stage(store, module_tmp) -> dict:
    return make_report.build_report("two_stage", module_tmp("report") / "two_stage", store)


@pytest.fixture(scope="module")
def scored(store, module_tmp) -> dict:
    return make_report.build_report("scored_on_test", module_tmp("report") / "scored_on_test", store)


def _means(backbone, e, p, d) -> list[float]:
    return [m for bb, ee, pp, dd, _, m in F.ABLATION_RUNS if (bb, ee, pp, dd) == (backbone, e, p, d) and m is not None]


def _row(df: pd.DataFrame, col: str, value) -> pd.Series:
    hit = df[df[col] == value]
    assert len(hit) == 1, f"{col}={value!r}: {len(hit)} rows"
    return hit.iloc[0]


# ------------------------------------------------------------------------------------------- tables
def test_main_table_values(ablation):
    main = ablation["tables"]["main"].df
    expected_labels = ["RT-DETR R18", "DSET R18 (E)", "DSET R18 (D)", "DSET R18 (E+P+D)", "RT-DETR R34",
                       "DSET R34 (P)", "DSET R34 (E+P+D)"]
    assert list(main["model"]) == expected_labels  # reading order; the all-failed variant is listed, not dropped
    for bb in ("R18", "R34"):
        base = statistics.fmean(_means(bb, False, False, False))
        for e, p, d in [(False, False, False), (True, False, False), (False, False, True), (True, True, True)]:
            vals = _means(bb, e, p, d)
            if not vals:
                continue
            row = _row(main, "model", F.variant_label(bb, e, p, d))
            mean = statistics.fmean(vals)
            assert row["n"] == len(vals)
            assert row["mAP@0.5:0.95 mean"] == pytest.approx(mean)
            assert row["mAP@0.5"] == pytest.approx(mean + F.MAP50_OFFSET)
            assert row["mAP@0.75"] == pytest.approx(mean + F.MAP75_OFFSET)
            rel = row["ΔmAP vs RT-DETR same backbone (%)"]
            if (e, p, d) == (False, False, False):
                assert math.isnan(rel)
            else:
                assert rel == pytest.approx((mean - base) / base * 100)
            assert row["GFLOPs"] == pytest.approx(sum(F.gflops_of(bb, e, p, d)))
            latency = F.BASE_LATENCY[bb] + 1.0 * e + 0.5 * d - 2.0 * p
            assert row["latency (ms)"] == pytest.approx(latency)
            assert row["FPS"] == pytest.approx(1000 / latency)
            assert row["latency device"] == "cpu (2 threads), batch 1"
            assert row["best epoch"] == ", ".join([str(F.EPOCHS - 1)] * len(vals))
            assert row["data"] == "synthetic, 320 px, 3 epochs"
    assert _row(main, "model", "RT-DETR R18")["params"] == F.BASE_PARAMS["R18"]
    failed = _row(main, "model", "DSET R34 (P)")
    assert failed["n"] == 0 and failed["runs not included"] == "1 failed"
    # the text form: mean ± sample std with n > 1, the mean alone with n = 1
    text = ablation["tables"]["main"].text()
    assert _row(text, "model", "RT-DETR R18")["mAP@0.5:0.95"] == f"0.5050 ± {statistics.stdev([0.5, 0.51]):.4f}"
    assert _row(text, "model", "DSET R18 (D)")["mAP@0.5:0.95"] == "0.5150"
    # the CSV holds the same numbers
    csv = pd.read_csv(ablation["out_dir"] / "main.csv")
    assert csv.loc[csv["model"] == "DSET R34 (E+P+D)", "ΔmAP vs RT-DETR same backbone (%)"].item() == pytest.approx(
        (0.601 - 0.551) / 0.551 * 100)


def test_ablation_table_deltas_and_seed_noise(ablation):
    from scipy import stats as sst

    df = ablation["tables"]["ablation"].df
    assert len(df) == 16  # 8 combinations x 2 backbones, run or not
    assert list(df["backbone"]) == ["R18"] * 8 + ["R34"] * 8

    def row(bb, code):
        return _row(df, "model", f"RT-DETR {bb}" if not code else f"DSET {bb} ({code})")

    base18 = _means("R18", False, False, False)
    e18 = _means("R18", True, False, False)
    r = row("R18", "E")
    assert (r["n"], r["seeds"]) == (2, (0, 1))
    assert r["mean"] == pytest.approx(statistics.fmean(e18))
    assert r["std"] == pytest.approx(statistics.stdev(e18))
    assert r["ΔmAP"] == pytest.approx(statistics.fmean(e18) - statistics.fmean(base18))
    rel = (statistics.fmean(e18) - statistics.fmean(base18)) / statistics.fmean(base18) * 100
    assert r["ΔmAP (%)"] == pytest.approx(rel)
    assert r["p (Welch)"] == pytest.approx(sst.ttest_ind(e18, base18, equal_var=False).pvalue)
    # no detections logged by these runs: the interval is Welch's over seeds, and the verdict follows from it
    # (the ablation store's parent logged no targets: the default margin δ 0.01 judges them)
    assert r["verdict"] == "inconclusive" and r["interval"] == "Welch over seeds"
    assert r["ΔmAP CI low"] < -0.01
    assert row("R18", "E+P+D")["verdict"] == "inconclusive"  # +0.035, 0.085 seed std
    tight = row("R34", "E+P+D")
    assert tight["verdict"] == "better" and tight["p (Welch)"] < 0.05
    low, high = (float(x) for x in tight["ΔmAP 95% CI"].strip("[]").split(","))
    assert low < 0.05 < high and low > 0
    single = row("R18", "D")
    assert single["n"] == 1 and math.isnan(single["p (Welch)"])
    assert single["verdict"] == "no verdict: no interval (n=1, no test: one seed and no logged detections)"
    assert single["ΔmAP"] == pytest.approx(0.515 - statistics.fmean(base18))
    assert "seed 1 not run" in single["runs not included"]
    assert row("R18", "")["verdict"] == "baseline"
    assert row("R18", "P")["n"] == 0 and row("R18", "P")["runs not included"] == "not run"
    failed = row("R34", "P")
    assert failed["n"] == 0 and "1 failed" in failed["runs not included"]
    text = ablation["tables"]["ablation"].text()
    assert _row(text, "model", "DSET R18 (E)")["mAP@0.5:0.95"] == f"0.5250 ± {statistics.stdev(e18):.4f}"


# ----------------------------------------------------------------- answer, bootstrap, stage 1, noise floor
def _two_stage_evals(*indices) -> list:
    gt = F.two_stage_ground_truth()
    return [bootstrap.evaluate_run(gt, F.two_stage_detections(i), name=str(i)) for i in indices]


def test_answer_table_verdicts_follow_the_bootstrap_intervals(two_stage):
    answer = two_stage["tables"]["answer"]
    df = answer.df
    # every variant of the grid against RT-DETR of its backbone, none "not run"
    assert list(df["variant"]) == ["DSET R18 (E)", "DSET R18 (P)", "DSET R18 (D)", "DSET R18 (E+P+D)",
                                   "DSET R34 (E+P+D)"]
    assert list(answer.text().columns) == ["variant", "ΔmAP [95% CI]", "verdict", "MDE", "interval includes",
                                           "ΔGFLOPs %", "Δlatency % [95% CI]", "scored on"]
    better = _row(df, "variant", "DSET R18 (E+P+D)")
    # one seed a side, the paired image bootstrap: as analysis.compute.bootstrap computes from the logged detections
    base, dset = _two_stage_evals(0, 1)
    expected = bootstrap.paired_delta([dset], [base])
    assert better["ΔmAP"] == pytest.approx(expected.map.delta)
    assert better["ΔmAP"] == pytest.approx(F.coco_stats(F.two_stage_ground_truth(), F.two_stage_detections(1))[0]
                                           - F.coco_stats(F.two_stage_ground_truth(), F.two_stage_detections(0))[0])
    assert (better["ΔmAP CI low"], better["ΔmAP CI high"]) == pytest.approx((expected.map.low, expected.map.high))
    assert (better["ΔmAP50 CI low"], better["ΔmAP50 CI high"]) == pytest.approx((expected.map50.low,
                                                                                 expected.map50.high))
    assert better["ΔmAP CI low"] > 0 and better["verdict"] == "better"
    assert better["n (variant / RT-DETR)"] == "1 / 1"
    assert better["interval"] == f"bootstrap: {F.TWO_STAGE_IMAGES} images × 1000 resamples"
    assert better["ΔmAP [95% CI]"] == f"{expected.map.delta:+.4f} [{expected.map.low:+.4f}, {expected.map.high:+.4f}]"
    # its minimum detectable effect: 2.80 x the bootstrap SE; one seed a side: image sampling only
    assert better["MDE"] == pytest.approx(2.8016 * expected.map.se_image, rel=1e-3)
    assert better["interval includes"] == "image sampling only (1 seed): training noise not included"
    assert better["scored on"] == f"val (selected on it), {F.TWO_STAGE_IMAGES} images"
    same = _row(df, "variant", "DSET R18 (E)")  # two seeds of RT-DETR's quality
    assert same["n (variant / RT-DETR)"] == "2 / 1"
    # its interval includes 0 but rules out a loss of the study's margin (0.05): non-inferior, not "better"
    assert -F.TWO_STAGE_TARGETS.delta_map < same["ΔmAP CI low"] < 0 < same["ΔmAP CI high"]
    assert same["verdict"] == "non-inferior"
    assert same["interval includes"].startswith("image sampling + training noise (2 / 1 seeds")
    assert _row(df, "variant", "DSET R18 (P)")["verdict"] == "worse"
    old = _row(df, "variant", "DSET R18 (D)")  # no detections logged: Welch over seeds, nothing with one seed
    assert old["interval"] == "Welch over seeds" and old["verdict"].startswith("no verdict: no interval")
    assert old["scored on"] == "val (logged best/mAP)"
    # R34's RT-DETR has not learned (mAP below the floor): no verdict, though its interval lies above 0
    r34 = _row(df, "variant", "DSET R34 (E+P+D)")
    assert r34["mAP RT-DETR"] < F.TWO_STAGE_TARGETS.learning_floor_map
    assert r34["verdict"] == f"no verdict: RT-DETR has not learned (mAP {r34['mAP RT-DETR']:.4f} < floor 0.05)"
    # the answer's first line: the margin the study set (0.05, not the default), the verdicts, and why none for R34
    assert answer.lead.startswith("Answer (margin δ = 0.05 mAP; scored on the validation images that also selected "
                                  "the model (selected on the images it is scored on)): R18: 1 better, 1 worse, "
                                  "1 non-inferior, 1 with no verdict")
    assert "R34: 1 with no verdict (RT-DETR has not learned" in answer.lead
    # compute: % of RT-DETR's GFLOPs; latency: no side-by-side benchmark in this study, so none compared
    assert better["ΔGFLOPs %"] == pytest.approx(100 * (sum(F.gflops_of("R18", True, True, True))
                                                       / sum(F.gflops_of("R18", False, False, False)) - 1))
    assert math.isnan(better["Δlatency (%)"]) and _row(answer.text(), "variant", "DSET R18 (E+P+D)")[
        "Δlatency % [95% CI]"] == "–"
    assert better["GFLOPs at"] == "70/100 tokens (keep ratio 0.70) vs RT-DETR 100/100 tokens (keep ratio 1.00)"
    notes = " ".join(answer.notes)
    assert "paired bootstrap over the scored images" in notes and "Welch over seeds (fallback)" in notes
    assert "no eval/detections.json or eval/ground_truth.json logged" in notes
    assert "δ = 0.05 mAP" in notes and "2.80 × the standard error" in notes
    assert "no side-by-side latency benchmark" in notes


def _scored_delta(label: str, split: str) -> float:
    """pycocotools' mAP of ``label``'s detections on ``split`` minus RT-DETR R18's (the scored_on_test fixture)."""
    gt = F.scored_ground_truth(split)
    i = [r[0] for r in F.SCORED_RUNS].index(label)
    return F.coco_stats(gt, F.scored_detections(i, split))[0] - F.coco_stats(gt, F.scored_detections(0, split))[0]


def test_the_answer_is_scored_on_the_test_split(scored, two_stage):
    answer = scored["tables"]["answer"]
    df = answer.df
    # the two splits disagree on purpose: scored on the validation images the verdicts would be the reverse
    for label, sign in (("DSET R18 (E+P+D)", -1), ("DSET R18 (M0.3)", +1)):
        test, val = _scored_delta(label, "test"), _scored_delta(label, "val")
        assert sign * test > 0.05 and -sign * val > 0.05, (label, test, val)
        row = _row(df, "variant", label)
        assert row["ΔmAP"] == pytest.approx(test)
        assert row["verdict"] == ("worse" if sign < 0 else "better")
        assert row["scored on"] == f"test, {F.SCORED_TEST_IMAGES} images"
        assert row["interval"] == f"bootstrap: {F.SCORED_TEST_IMAGES} images × 1000 resamples"
    assert answer.lead.startswith("Answer (margin δ = 0.01 mAP; scored on the test split): R18: 1 better, 1 worse.")
    notes = " ".join(answer.notes)
    assert "Scored on: test: the study's scoring split" in notes and "val: the validation images" not in notes
    memory = _row(scored["tables"]["memory_pruning"].df, "model", "DSET R18 (M0.3)")
    assert memory["ΔmAP"] == pytest.approx(_scored_delta("DSET R18 (M0.3)", "test"))
    assert memory["scored on"] == f"test, {F.SCORED_TEST_IMAGES} images"
    # a store whose runs logged validation detections only: scored on them, and the answer says they selected it
    r18 = _row(two_stage["tables"]["answer"].df, "variant", "DSET R18 (E+P+D)")
    assert r18["scored on"] == f"val (selected on it), {F.TWO_STAGE_IMAGES} images"
    lead = two_stage["tables"]["answer"].lead
    assert "scored on the test split" not in lead and "(selected on the images it is scored on)" in lead
    assert "selected on the images it is scored on" in " ".join(two_stage["tables"]["answer"].notes)


def test_latency_deltas_come_from_the_side_by_side_benchmark(scored, two_stage):
    answer = scored["tables"]["answer"]
    text = answer.text()
    measured = "cpu (x86_64, 2 threads), 320 px, batch 1, fp32, 3 processes × 10 rounds"
    base_ms = F.SCORED_RUNS[0][7]
    for label in ("DSET R18 (E+P+D)", "DSET R18 (M0.3)"):
        _, change, low, high = F.SCORED_BENCHMARK[label]
        row = _row(answer.df, "variant", label)
        # the run's own latency (timed alone) would read +50%: it stays run metadata in the main table
        per_run = _row(scored["tables"]["main"].df, "model", label)["latency (ms)"]
        assert 100 * (per_run / base_ms - 1) == pytest.approx(50.0)
        assert (row["Δlatency (%)"], row["Δlatency CI low"], row["Δlatency CI high"]) == pytest.approx(
            (change, low, high))
        assert _row(text, "variant", label)["Δlatency % [95% CI]"] == f"{change:+.1f}% [{low:+.1f}, {high:+.1f}]"
        assert row["latency measured side by side"] == measured
    assert _row(text, "variant", "DSET R18 (E+P+D)")["Δlatency % [95% CI]"] == "-4.0% [-5.8, -2.2]"
    assert "measured on: cpu (x86_64, 2 threads), 320 px, batch 1, fp32." in " ".join(answer.notes)
    # the memory-pruning table compares the same benchmark's figure, and judges the latency target on its interval
    memory = _row(scored["tables"]["memory_pruning"].df, "model", "DSET R18 (M0.3)")
    assert memory["Δlatency % [95% CI]"] == "-12.0% [-14.5, -9.5]"
    assert memory["latency (ms, run metadata)"] == pytest.approx(30.0)
    assert memory["meets the targets"] == "yes"   # better, -12% GFLOPs, latency at most -9.5% (targets -10%, -8%)
    # the benchmark run is listed as what it is, never as a variant
    runs_df = scored["tables"]["runs"].df
    bench = _row(runs_df, "role", "benchmark")
    assert bench["in tables"] == "no" and bench["reason / error"].startswith("side-by-side latency benchmark")
    assert list(answer.df["variant"]) == ["DSET R18 (M0.3)", "DSET R18 (E+P+D)"]
    assert list(scored["tables"]["main"].df["model"]) == ["RT-DETR R18", "DSET R18 (M0.3)", "DSET R18 (E+P+D)"]
    assert "(benchmark)" not in set(scored["variants"]["label"]) and len(scored["study"].benchmarks) == 1
    _check_png(scored["plots"]["accuracy_vs_latency"])
    # without a benchmark run: no Δlatency, and the notes and the skipped plot say why
    r18 = _row(two_stage["tables"]["answer"].text(), "variant", "DSET R18 (E+P+D)")
    assert r18["Δlatency % [95% CI]"] == "–"
    assert any(n.startswith("Δlatency %: – : this study has no side-by-side latency benchmark")
               for n in two_stage["tables"]["answer"].notes)
    assert "accuracy_vs_latency" not in two_stage["plots"]
    assert two_stage["skipped"]["accuracy_vs_latency"] == "no side-by-side latency benchmark in this study"


def test_targets_are_read_from_the_parent_run_or_default(two_stage, ablation):
    from analysis.compute import verdicts

    got = verdicts.study_targets(two_stage["study"])
    assert got.logged and got.targets == F.TWO_STAGE_TARGETS
    assert "targets: as the study file set them" in two_stage["provenance"]
    old = verdicts.study_targets(ablation["study"])  # a store from before targets were logged: the defaults, said
    assert not old.logged and old.targets == verdicts.Targets()
    assert "logged no targets.* params" in ablation["provenance"]


def _pycocotools_ap(gt: dict, dets: list[dict], category_id: int | None = None) -> np.ndarray:
    """pycocotools' own stats (all 12) on ``dets``, over one category when ``category_id`` is given."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iouType="bbox")
        if category_id is not None:
            ev.params.catIds = [category_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.where(ev.stats > -1, ev.stats, np.nan)


def test_error_analysis_tables_and_plots(two_stage, ablation):
    from analysis.compute import detection_errors

    gt = F.two_stage_ground_truth()
    t = two_stage["tables"]
    # per class: ΔAP = pycocotools' AP of that class, DSET R18 (E+P+D) minus RT-DETR R18, with the bootstrap interval
    classes = t["class_ap_deltas"].df
    row = classes[(classes["model"] == "DSET R18 (E+P+D)") & (classes["class"] == "class3")].iloc[0]
    dset, base = (_pycocotools_ap(gt, F.two_stage_detections(i), 3)[0] for i in (1, 0))
    assert (row["AP"], row["AP RT-DETR"], row["ΔAP"]) == pytest.approx((dset, base, dset - base), abs=1e-12)
    assert row["GT boxes"] == sum(a["category_id"] == 3 for a in gt["annotations"])
    expected = bootstrap.paired_class_delta(*([e] for e in _two_stage_evals(1, 0)))[2]
    assert (row["ΔAP CI low"], row["ΔAP CI high"]) == pytest.approx((expected.ap.low, expected.ap.high))
    assert row["ΔAP CI low"] > 0 and row["verdict"] == "better (95% CI above 0)"
    assert set(classes.loc[classes["model"] == "DSET R18 (P)", "verdict"]) == {"worse (95% CI below 0)"}
    old = _row(classes, "model", "DSET R18 (D)")  # its run logged no detections: said, not dropped
    assert old["verdict"].startswith("no detections logged (1 of 2 runs") and pd.isna(old["class"])
    # by size: pycocotools' AP small/medium (stats[3], [4]), deltas against RT-DETR, boxes per size
    sizes = t["ap_by_size"].df
    dset_ap, base_ap = (_pycocotools_ap(gt, F.two_stage_detections(i)) for i in (1, 0))
    r = _row(sizes, "model", "DSET R18 (E+P+D)")
    assert (r["AP small"], r["AP medium"]) == pytest.approx((dset_ap[3], dset_ap[4]), abs=1e-12)
    assert r["ΔAP small"] == pytest.approx(dset_ap[3] - base_ap[3], abs=1e-12)
    areas = [a["area"] for a in gt["annotations"]]
    assert (r["GT small"], r["GT medium"], r["GT large"]) == (sum(a <= 32 ** 2 for a in areas),
                                                             sum(32 ** 2 <= a <= 96 ** 2 for a in areas), 0)
    assert math.isnan(r["AP large"]) and math.isnan(r["ΔAP large"])  # no large box: no AP, not 0
    assert _row(sizes, "model", "DSET R18 (D)")["note"].startswith("no detections logged")
    # the plots' analyses: a variant with two seeds is the mean of its runs' confusion matrices
    analyses = evaluations.error_analyses(two_stage["study"], two_stage["variants"])
    seeds = [i for i, (bb, e, p, d, *_) in enumerate(F.TWO_STAGE_RUNS) if (bb, e, p, d) == ("R18", True, False, False)]
    two = analyses[_row(two_stage["variants"], "label", "DSET R18 (E)")["group"]]
    assert two.n_runs == 2
    np.testing.assert_array_equal(two.confusion, np.mean(
        [detection_errors.analyse(gt, F.two_stage_detections(i)).confusion for i in seeds], axis=0))
    for name in ("pr_curves_r18", "confusion_r18", "pr_curves_r34", "confusion_r34"):
        _check_png(two_stage["plots"][name])
    page = html.unescape((two_stage["out_dir"] / "index.html").read_text())
    assert 'id="table-class_ap_deltas"' in page and 'id="table-ap_by_size"' in page
    assert "score ≥ 0.3" in page and "Not drawn: DSET R18 (D) (no detections logged" in page
    # an experiment whose runs logged no detections: every new table and plot "not produced", with why
    for name in ("ap_by_size", "class_ap_deltas", "pr_curves_r18", "confusion_r34"):
        assert "no detections logged" in ablation["skipped"][name], name


def test_the_report_opens_with_the_answer(two_stage):
    out = two_stage["out_dir"]
    assert list(two_stage["tables"])[0] == "answer"
    page = (out / "index.html").read_text()
    # the page opens on the answer's sentence, then its forest plot, then the answer table, then the details
    lead, forest = page.index('id="answer-lead"'), page.index('id="plot-forest"')
    first = page.index('id="table-answer"')
    assert lead < forest < first < page.index('class="provenance"') < page.index('id="table-main"')
    assert page.index('id="plot-forest"') < page.index('id="plot-map_vs_gflops"')
    md = (out / "report.md").read_text()
    assert md.index("**Answer (margin δ = 0.05 mAP") < md.index("## Answer: each variant") < md.index(
        "## Main comparison")
    assert "| better " in md and "| worse " in md


def test_no_relative_change_below_the_noise_floor(two_stage):
    gt = F.two_stage_ground_truth()
    base, dset = (F.coco_stats(gt, F.two_stage_detections(i))[0] for i in (6, 7))
    assert base < bootstrap.NOISE_FLOOR_MAP and dset < bootstrap.NOISE_FLOOR_MAP and dset > 2 * base
    t = two_stage["tables"]
    assert math.isnan(_row(t["answer"].df, "variant", "DSET R34 (E+P+D)")["ΔmAP (%)"])
    assert _row(t["ablation"].text(), "model", "DSET R34 (E+P+D)")["ΔmAP (%)"] == "–"
    assert math.isnan(_row(t["ablation"].df, "model", "DSET R34 (E+P+D)")["ΔmAP (%)"])
    assert math.isnan(_row(t["main"].df, "model", "DSET R34 (E+P+D)")["ΔmAP vs RT-DETR same backbone (%)"])
    measured = t["reported_vs_measured"].df
    measured = measured[measured["source"] == "measured here"]
    assert math.isnan(_row(measured, "model", "DSET-R34 (E+P+D)")["ΔmAP vs RT-DETR (%)"])
    for name in ("answer", "ablation", "main"):
        assert any("noise floor" in n for n in t[name].notes), name
    # above the floor the % is shown
    assert _row(t["answer"].df, "variant", "DSET R18 (E+P+D)")["ΔmAP (%)"] > 100
    rel = f"{(dset - base) / base * 100:+.2f}"
    for path in two_stage["out_dir"].glob("*.md"):
        assert rel not in path.read_text(), path.name


def test_pretrain_runs_are_not_variants(two_stage):
    t = two_stage["tables"]
    # the stage-1 run has RT-DETR R18's configuration: as a variant it would be a second RT-DETR R18 seed
    assert _row(t["main"].df, "model", "RT-DETR R18")["n"] == 1
    assert "(stage 1)" not in set(t["main"].df["model"])
    assert all(m != "(stage 1)" for name in ("ablation", "compute") for m in t[name].df["model"])
    assert "(stage 1)" not in set(t["answer"].df["variant"])
    stage1 = t["stage1"].df
    assert len(stage1) == 1
    r = stage1.iloc[0]
    assert (r["run"], r["checkpoint dir"], r["started from"]) == ("r18-stage1", F.STAGE1_DIR, F.STAGE1_INIT)
    assert r["cells fine-tuned from it"] == sum(bb == "R18" for bb, *_ in F.TWO_STAGE_RUNS)
    runs_df = t["runs"].df
    pre = _row(runs_df, "role", "pretrain")
    assert pre["in tables"] == "no" and "stage-1 pretraining run" in pre["reason / error"]
    assert "1 stage-1 pretraining" in two_stage["provenance"]
    assert "stage1" not in two_stage["skipped"] and "stage1" in make_report.build_tables(
        two_stage["study"], two_stage["variants"])[0]


def test_the_init_checkpoint_of_each_cell_is_shown(two_stage, ablation):
    runs_df = two_stage["tables"]["runs"].df
    children = runs_df[runs_df["role"] == "child"]
    assert len(children) == len(F.TWO_STAGE_RUNS)
    r18 = children[children["model"].str.contains("R18")]
    assert set(r18["init checkpoint"]) == {f"{F.STAGE1_DIR}/best.pt"}
    assert set(r18["init source"]) == {"stage 1 (cached, key 1a2b3c)"}
    assert set(children.loc[children["model"].str.contains("R34"), "init checkpoint"]) == {F.R34_INIT}
    assert f"{F.STAGE1_DIR}/best.pt" in (two_stage["out_dir"] / "runs.md").read_text()
    abl = two_stage["tables"]["ablation"].df
    assert _row(abl, "model", "DSET R18 (E+P+D)")["init checkpoint"] == f"{F.STAGE1_DIR}/best.pt"
    assert "stage1" in ablation["skipped"]  # no stage-1 run in the ablation grid: said, not an empty table


def test_every_table_with_gflops_or_latency_says_what_it_was_measured_at(two_stage):
    t = two_stage["tables"]
    assert _row(t["main"].df, "model", "DSET R18 (P)")["GFLOPs/latency at"] == "70/100 tokens (keep ratio 0.70)"
    assert _row(t["compute"].df, "model", "RT-DETR R18")["GFLOPs/latency at"] == "100/100 tokens (keep ratio 1.00)"
    runs_df = t["runs"].df
    assert set(runs_df.loc[runs_df["model"] == "DSET R18 (P)", "GFLOPs at"]) == {"70/100 tokens (keep ratio 0.70)"}
    for name in ("answer", "main", "compute", "runs"):
        assert any("profile/keep_ratio" in n for n in t[name].notes), name


def test_runs_without_detections_fall_back_on_welch(ablation):
    study = ablation["study"]
    first = study.children["run_id"].iloc[0]
    assert evaluations.evaluations(study, [first])[first] == "no eval/detections.json or eval/ground_truth.json logged"
    answer = ablation["tables"]["answer"]
    assert set(answer.df["interval"].dropna()) == {"Welch over seeds"}
    tight = _row(answer.df, "variant", "DSET R34 (E+P+D)")
    assert tight["verdict"] == "better" and tight["ΔmAP CI low"] > 0
    assert tight["interval includes"] == "training noise only (Welch over the logged per-seed best/mAP)"
    assert _row(answer.df, "variant", "DSET R18 (D)")["verdict"].startswith("no verdict: no interval (n=1, no test")
    assert any("Welch over seeds (fallback)" in n for n in answer.notes)
    assert not any("paired bootstrap" in n for n in answer.notes)


def test_runs_table_lists_failed_and_parent_runs(ablation):
    df = ablation["tables"]["runs"].df
    assert len(df) == len(F.ABLATION_RUNS) + 1  # every child and the parent
    failed = df[df["MLflow status"] == "FAILED"]
    child = failed[failed["role"] == "child"].iloc[0]
    assert child["in tables"] == "no" and F.FAILED_ERROR in child["reason / error"]
    assert child["model"] == "DSET R34 (P)" and child["dset status"] == "failed"
    assert (df["role"] == "parent").sum() == 1
    assert (df["in tables"] == "yes").sum() == sum(m is not None for *_, m in F.ABLATION_RUNS)
    assert F.FAILED_ERROR in (ablation["out_dir"] / "runs.md").read_text()


def test_compute_table(ablation):
    df = ablation["tables"]["compute"].df
    r = _row(df, "model", "RT-DETR R18")
    b, enc, dec = F.gflops_of("R18", False, False, False)
    assert (r["GFLOPs backbone"], r["GFLOPs encoder"], r["GFLOPs decoder"]) == pytest.approx((b, enc, dec))
    assert r["GFLOPs other"] == 0.0
    assert r["backbone %"] == pytest.approx(b / (b + enc + dec) * 100)
    # closed form by hand at 320 px: 100 AIFI tokens, d=256, FFN 1024; 3 decoder layers x 300 queries
    aifi = 4 * 100 * 256 ** 2 + 2 * 100 ** 2 * 256 + 2 * 100 * 256 * 1024
    dec_ffn = 3 * 2 * 300 * 256 * 1024
    assert r["sites dense GFLOPs"] == pytest.approx(2 * (aifi + dec_ffn) / 1e9)
    assert r["sites as run GFLOPs"] == pytest.approx(2 * (aifi + dec_ffn) / 1e9)
    assert r["sites share (%)"] == pytest.approx(2 * (aifi + dec_ffn) / 1e9 / 15.0 * 100)
    # decoder MoE, 6 experts top-3: router + 3 experts per query in each decoder layer
    d = _row(df, "model", "DSET R18 (D)")
    dec_moe = 3 * 300 * (256 * 6 + 3 * 2 * 256 * 1024)
    assert d["sites as run GFLOPs"] == pytest.approx(2 * (aifi + dec_moe) / 1e9)
    assert d["sites dense GFLOPs"] == pytest.approx(r["sites dense GFLOPs"])
    assert "Reference figure" in " ".join(ablation["tables"]["compute"].notes)


def test_site_formula_reproduces_the_reference_figures():
    """The closed form gives the parity README's RT-DETR R18 figures at 640 px (0.40 G AIFI, 0.47 G
    decoder FFNs) and agrees with dset.measure's analytic AIFI formula."""
    from dset.analytic import aifi_layer_macs

    m = stats.sparse_site_macs({}, 640)
    assert m["tokens"] == 400
    assert round(m["aifi_dense"] / 1e9, 2) == 0.40 and round(m["dec_ffn_dense"] / 1e9, 2) == 0.47
    assert m["aifi_dense"] == aifi_layer_macs(400)
    assert stats.aifi_layer_macs(280, 256, 1024, 6, 3) == aifi_layer_macs(280, num_experts=6, top_k=3)
    cfg = {"model.token_pruning.enabled": True, "model.token_pruning.keep_ratio": 0.7,
           "model.token_pruning.min_tokens": 100}
    assert stats.sparse_site_macs(cfg, 640)["kept_tokens"] == 280


def test_reported_versus_measured(ablation):
    df = ablation["tables"]["reported_vs_measured"].df
    rep = df[df["source"] == "reported"]
    assert len(rep) == 4 and set(rep["data"]) == {"DAIR-V2X (seed report)"}
    r18 = _row(rep, "model", "DSET-R18 (E+P+D)")
    assert (r18["mAP@0.5:0.95"], r18["mAP@0.5"], r18["mAP@0.75"]) == (0.5780, 0.8054, 0.6554)
    assert r18["ΔmAP vs RT-DETR (%)"] == pytest.approx((0.5780 - 0.5851) / 0.5851 * 100)
    assert _row(rep, "model", "RT-DETR-R34")["mAP@0.5:0.95"] == 0.5898
    ours = df[df["source"] == "measured here"]
    assert len(ours) == 4 and set(ours["data"]) == {"synthetic, 320 px, 3 epochs"}
    m34 = _row(ours, "model", "DSET-R34 (E+P+D)")
    assert m34["mAP@0.5:0.95"] == pytest.approx(0.601) and m34["n"] == 2
    assert m34["ΔmAP vs RT-DETR (%)"] == pytest.approx((0.601 - 0.551) / 0.551 * 100)
    md = (ablation["out_dir"] / "reported_vs_measured.md").read_text()
    assert "| reported |" in md and "| measured here |" in md


def test_optuna_pareto_and_importances(optuna_report):
    t = optuna_report["tables"]
    assert "ablation" not in t and "every run is an Optuna trial" in optuna_report["skipped"]["ablation"]
    pareto = t["optuna_pareto"].df
    assert list(pareto["trial"]) == F.OPTUNA_PARETO  # sorted by GFLOPs, which here is trial order
    by_trial = {tr: (experts, k, keep, m, g) for tr, experts, k, keep, m, g in F.OPTUNA_TRIALS}
    for _, r in pareto.iterrows():
        experts, k, keep, m, g = by_trial[r["trial"]]
        assert (r["mAP@0.5:0.95"], r["GFLOPs"]) == pytest.approx((m, g))
        settings = (r["encoder_moe.num_experts"], r["encoder_moe.top_k"], r["token_pruning.keep_ratio"])
        assert settings == (experts, k, keep)
    imp = t["optuna_importances"].df
    assert set(imp["parameter"]) == {"encoder_moe.num_experts", "encoder_moe.top_k", "token_pruning.keep_ratio"}
    assert imp["importance for mAP"].sum() == pytest.approx(1.0)
    assert imp["importance for GFLOPs"].sum() == pytest.approx(1.0)
    runs_df = t["runs"].df
    assert "ValueError: diverged (fixture)" in runs_df.loc[runs_df["trial"] == 5, "reason / error"].item()
    # an Optuna-pruned trial is listed (and in the main table) but not a candidate for the front
    assert runs_df.loc[runs_df["trial"] == 6, "reason / error"].item() == "stopped early (optuna_pruned)"
    assert 6 not in set(optuna_report["trials"]["trial"])
    assert {"optuna_pareto", "optuna_importances"} <= set(optuna_report["plots"])


def test_pareto_mask_and_welch_edge_cases():
    mask = stats.pareto_mask([0.30, 0.35, 0.32, 0.40, 0.28, np.nan], [10, 12, 13, 15, 11, 1])
    assert list(mask) == [True, True, False, True, False, False]
    assert stats.welch([0.5], [0.4, 0.41]).verdict == "n=1, no test"
    assert stats.welch([0.5, 0.5], [0.4, 0.4]).verdict == "no seed spread, no test"
    c = stats.welch([0.60, 0.61, 0.62], [0.50, 0.51, 0.52])
    assert c.diff == pytest.approx(0.1) and c.verdict == "yes (p<0.05)" and c.ci_low < 0.1 < c.ci_high


def test_a_study_with_nothing_finished_lists_its_runs(store, tmp_path):
    report = make_report.build_report("crashed_study", tmp_path / "crashed", store)
    runs_df = report["tables"]["runs"].df
    assert list(runs_df["role"]) == ["parent", "child", "child"]
    assert list(runs_df["in tables"]) == ["no", "no", "no"]
    reasons = " | ".join(runs_df["reason / error"].dropna())
    assert F.CRASH_ERROR in reasons and "running (unfinished or interrupted)" in reasons
    main = report["tables"]["main"].df
    assert set(main["model"]) == {"RT-DETR R18", "RT-DETR R34"} and list(main["n"]) == [0, 0]
    assert report["plots"] == {} and "map_vs_gflops" in report["skipped"] and "compute" in report["skipped"]
    assert (tmp_path / "crashed" / "index.html").is_file()


# -------------------------------------------------------------------------------------------- plots
def _check_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
        assert not any(k.lower() in ("software", "creation time") for k in im.info), im.info


def test_every_plot_is_a_valid_png(ablation, optuna_report):
    expected = {"forest", "map_vs_gflops", "map_vs_latency", "ablation_bars", "map_keep_ratio_per_epoch", "train_loss",
                "expert_usage_dset_r18_e", "expert_usage_dset_r18_d", "expert_usage_dset_r18_e_p_d",
                "expert_usage_dset_r34_e_p_d"}
    assert set(ablation["plots"]) == expected
    for report in (ablation, optuna_report):
        for path in report["plots"].values():
            _check_png(path)


def test_moe_diagnostics_table_flags_degenerate_layers(ablation):
    t = ablation["tables"]["moe_diagnostics"]
    df = t.df
    dec = df[(df["model"] == "DSET R34 (E+P+D)") & (df["site"] == "decoder moe")]
    assert list(dec["layer"]) == [0, 1, 2, 3]
    # the final epoch's values (the fixture's earlier epochs differ), mean over the variant's two seeds
    assert list(dec["router entropy (nats)"]) == pytest.approx(F.ROUTER_ENTROPY)
    assert list(dec["expert cosine"]) == pytest.approx([0.995, 0.6, 0.6, 0.6])
    assert list(dec["ln E"]) == pytest.approx([math.log(6)] * 4)
    flags = list(dec["degenerate"])
    assert flags[0] == "experts near-identical (cosine > 0.99)"
    assert flags[1] == "router near-uniform (entropy within 1% of ln E)"   # 1.79 >= 0.99 x ln 6 = 1.7739
    assert flags[2:] == ["no", "no"]
    enc = df[(df["model"] == "DSET R18 (E)") & (df["site"] == "encoder moe")]
    assert len(enc) == 1 and not (df["model"] == "RT-DETR R18").any()
    assert "moe_diagnostics" in ablation["tables"] and (ablation["out_dir"] / "moe_diagnostics.md").is_file()


def test_expert_usage_is_the_final_epoch(ablation):
    study = ablation["study"]
    vs = ablation["variants"]
    mats = variants.usage_matrices(study, _row(vs, "label", "DSET R34 (E+P+D)")["group"])
    assert mats["encoder_moe"].shape == (1, 6) and mats["decoder_moe"].shape == (4, 6)  # R34: 4 decoder layers
    for layer in range(4):
        assert mats["decoder_moe"][layer] == pytest.approx(F.usage_shares(layer))
    assert "decoder_moe" not in variants.usage_matrices(study, _row(vs, "label", "DSET R18 (E)")["group"])


# ---------------------------------------------------------------------------------------- index.html
def test_index_html_embeds_every_plot_and_table(ablation, store):
    out = ablation["out_dir"]
    page = (out / "index.html").read_text()
    text = html.unescape(page)
    for name, path in ablation["plots"].items():
        assert f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" in page, name
        assert f"{name}.png" in page
    assert 'src="data:image/png' in page and page.count("<img ") == len(ablation["plots"])
    assert all(src.startswith("data:") for src in page.split('src="')[1:])
    for name in ablation["tables"]:
        for ext in ("md", "csv", "tex"):
            assert (out / f"{name}.{ext}").is_file()
            assert f'href="{name}.{ext}"' in page
        assert f'id="table-{name}"' in page
    # how and when: tracking URI, experiment, run count, the newest run's date (not the report's clock)
    newest = pd.Timestamp(F.newest_ablation_start_ms(), unit="ms", tz="UTC")
    assert store in text and "experiment 'ablation_grid'" in text and "13 runs" in text
    assert f"newest run: {newest:%Y-%m-%d}" in text
    assert "RuntimeError: CUDA out of memory (fixture)" in text


def test_stale_files_of_an_earlier_report_are_removed(optuna_report):
    out = optuna_report["out_dir"]
    assert not (out / "ablation.md").exists() and not (out / "ablation_bars.png").exists()
    assert (out / "my_notes.txt").read_text() == "mine"
    listed = set((out / make_report.MANIFEST).read_text().split())
    assert listed == {p.name for p in out.iterdir()} - {"my_notes.txt", make_report.MANIFEST}


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_empty_unknown_and_missing(store, tmp_path, capsys, monkeypatch):
    assert make_report.main(["--experiment", "empty_study", "--tracking-uri", store, "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "'empty_study'" in err and "no runs" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
    assert make_report.main(["--experiment", "nope", "--tracking-uri", store, "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert "'nope' not found" in err and "ablation_grid" in err and "optuna_search" in err
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert make_report.main([]) == 2  # default sqlite:///mlflow.db, absent here: a message, and no store created
    assert "no MLflow store at sqlite:///mlflow.db" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert make_report.main(["--experiment", "empty_study"]) == 1  # the environment variable is honoured


@pytest.mark.slow
def test_script_run_prints_the_main_table_and_gives_identical_files(ablation, store, tmp_path):
    """``python analysis/make_report.py`` as a script (analysis/ on sys.path, not the repository root), in
    another process and another folder: it prints where it wrote and the main table, and writes exactly
    the bytes the in-process report wrote (no clock, no hash-seed or path dependence)."""
    out = tmp_path / "script_report"
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "make_report.py"), "--experiment", "ablation_grid",
                           "--out", str(out), "--tracking-uri", store], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"to {out}/" in proc.stdout and "index.html" in proc.stdout
    assert "| DSET R34 (E+P+D) | R34 | 2 | 0.6010 ± 0.0014 |" in proc.stdout
    first = {p.name: p.read_bytes() for p in ablation["out_dir"].iterdir()}
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []


# ----------------------------------------------------------------------------------------- notebook
@pytest.mark.slow
def test_notebook_runs_against_the_store(store, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "explore_runs.ipynb", as_version=4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("DSET_EXPERIMENT", "ablation_grid")
    client = NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            outputs.append(o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values()))
    text = "\n".join(outputs)
    assert "ablation_grid: 13 runs" in text
    assert "Main comparison" in text and "DSET R34 (E+P+D)" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert "Ablation" in text


@pytest.mark.slow
def test_the_report_renders_in_a_browser_with_every_image_and_link(ablation, two_stage, browser):
    """index.html as a person sees it (headless Chromium): every image decodes at its PNG's size, every link
    (table files, the contents' anchors) leads somewhere."""
    from browser import PAGE_CHECK_JS, broken_links
    from PIL import Image

    for report in (ablation, two_stage):
        out = report["out_dir"]
        browser.open((out / "index.html").resolve().as_uri())
        page = browser.evaluate(PAGE_CHECK_JS)
        assert page["title"].startswith("DSET report")
        assert len(page["images"]) == len(report["plots"]) > 0
        for image, (name, path) in zip(page["images"], report["plots"].items()):
            assert image["loaded"], name
            assert (image["width"], image["height"]) == Image.open(path).size, name
        links = set(page["links"])
        assert {f"{name}.csv" for name in report["tables"]} <= links and any(h.startswith("#") for h in links)
        assert broken_links(page, out) == []
        # the answer reads at a glance: its table's cells wrap to three lines at most (13 px text at 1280 px wide)
        rows = browser.evaluate('[...document.querySelectorAll("#table-answer tbody tr")].map(tr => '
                                'tr.getBoundingClientRect().height / parseFloat(getComputedStyle(tr).fontSize))')
        assert rows and max(rows) < 4 * 1.25 + 1, rows
        # the page opens on the answer: its sentence and its forest plot in the first screen
        top = browser.evaluate('document.getElementById("plot-forest").getBoundingClientRect().top')
        assert top < 900
