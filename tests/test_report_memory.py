"""The report's memory-pruning table and plot, from a tiny MLflow store with hand-picked numbers: keep-ratio
variants are distinct, ΔGFLOPs in % is the logged means' ratio, latency is compared only side by side (this store
has no benchmark: the per-run latencies are run metadata), the targets column says what passed and what could not
be decided, and runs from before the fourth switch read as memory pruning off."""

from __future__ import annotations

import math

import pytest
import report_fixtures as F

from analysis import make_report
from analysis.compute import normalise
from analysis.compute.verdicts import Targets
from analysis.present.tables_answer import meets_targets
from dset import metric_names as M
from studies.tracking import schema

# (cell, memory keep ratio or None, seed, best mAP, GFLOPs, latency ms)
RUNS = [
    ("r18-base", None, 0, 0.500, 15.0, 20.0),
    ("r18-base", None, 1, 0.510, 15.0, 20.0),
    ("r18-keep0.3", 0.3, 0, 0.505, 13.2, 18.0),    # -12% GFLOPs, -10% latency, no detectable mAP change: passes
    ("r18-keep0.3", 0.3, 1, 0.500, 13.2, 18.0),
    ("r18-keep0.2", 0.2, 0, 0.400, 12.9, 17.9),    # cheaper still, but clearly worse
    ("r18-keep0.2", 0.2, 1, 0.410, 12.9, 17.9),
    ("r18-keep1.0", 1.0, 0, 0.500, 14.7, 19.8),    # as accurate, barely cheaper
    ("r18-keep1.0", 1.0, 1, 0.510, 14.7, 19.8),
]


@pytest.fixture(scope="module")
def memory_report(module_tmp) -> dict:
    from mlflow.tracking import MlflowClient

    root = module_tmp("memory_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("memory_pruning")
    parent = client.create_run(exp, start_time=F.T0_MS,
                               tags={schema.TAG_ROLE: "parent", schema.TAG_STUDY: "memory_pruning"})
    for i, (cell, keep, seed, best, gflops, latency) in enumerate(RUNS):
        extra = [] if keep is None else ["model.memory_pruning.enabled=true", f"model.memory_pruning.keep_ratio={keep}"]
        params = F._config_params("R18", False, False, False, seed, extra)
        tags = F._child_tags("memory_pruning", f"{cell}-s{seed}", "R18", False, False, False, seed, "completed")
        tags[schema.TAG_VARIANT] = "RT-DETR R18" if keep is None else f"DSET R18 (M{keep:g})"
        tags[schema.TAG_MEMORY_PRUNING] = "false" if keep is None else f"{keep:g}"
        metrics = F._final_metrics("R18", False, False, False, best, latency, gflops=gflops)
        metrics += [(M.PROFILE_MEMORY_TOKENS, 336, 0), (M.PROFILE_MEMORY_KEPT_TOKENS, round(336 * (keep or 1)), 0)]
        F._log_run(client, exp, parent.info.run_id, start_ms=F.T0_MS + 60_000 * (i + 1), tags=tags, params=params,
                   status="FINISHED", metrics=metrics)
    out = module_tmp("memory_report")
    return make_report.build_report("memory_pruning", out, uri)


def _row(df, model):
    hit = df[df["model"] == model]
    assert len(hit) == 1, f"{model}: {len(hit)} rows"
    return hit.iloc[0]


def test_each_keep_ratio_is_its_own_variant_against_rtdetr(memory_report):
    df = memory_report["tables"]["memory_pruning"].df
    assert list(df["model"]) == ["DSET R18 (M1)", "DSET R18 (M0.3)", "DSET R18 (M0.2)"]  # most tokens kept first
    assert list(df["memory keep ratio"]) == [1.0, 0.3, 0.2]
    assert set(df["n (variant / RT-DETR)"]) == {"2 / 2"}


def test_percent_changes_and_the_targets(memory_report):
    df = memory_report["tables"]["memory_pruning"].df
    passing, worse = _row(df, "DSET R18 (M0.3)"), _row(df, "DSET R18 (M0.2)")
    assert passing["ΔGFLOPs (%)"] == pytest.approx(100 * (13.2 / 15.0 - 1))   # -12%
    assert passing["latency (ms, run metadata)"] == pytest.approx(18.0)       # shown, not compared
    assert math.isnan(passing["Δlatency (%)"])                                # no side-by-side benchmark here
    assert passing["ΔmAP"] == pytest.approx(0.5025 - 0.505)
    assert passing["ΔmAP CI low"] < 0 < passing["ΔmAP CI high"]
    assert passing["meets the targets"] == "not decided: no side-by-side latency"
    assert worse["ΔmAP CI high"] < 0 and worse["verdict"] == "worse"
    assert passing["memory tokens kept"] == "101/336"
    notes = " ".join(memory_report["tables"]["memory_pruning"].notes)
    assert "ΔGFLOPs -10% or less" in notes and "-8% or less" in notes   # the default targets: no targets logged


def test_meets_targets_edges():
    targets = Targets()  # -10% GFLOPs, -8% latency
    assert meets_targets("non-inferior", -10.0, -8.0, targets) == "yes"  # the targets' own values pass
    assert meets_targets("better", -10.0, -8.0, targets) == "yes"
    assert meets_targets("inconclusive", -20.0, -20.0, targets) == "no: ΔmAP inconclusive"  # no loss ruled out
    assert meets_targets("worse", -20.0, -20.0, targets) == "no: ΔmAP worse"
    assert meets_targets("better", -9.99, -8.0, targets).startswith("no: GFLOPs")
    assert meets_targets("better", -20.0, -7.9, targets).startswith("no: latency up to -7.9%")
    assert meets_targets("better", -20.0, math.nan, targets) == "not decided: no side-by-side latency"
    assert meets_targets("no verdict: 7 scored images < 30", -20.0, -20.0, targets).startswith("not decided")


def test_the_tradeoff_plot_and_the_ablation_tables_leave_memory_variants_out(memory_report):
    assert memory_report["plots"]["memory_pruning_tradeoff"].stat().st_size > 10_000  # a real PNG, not empty
    names = {path.name for path in memory_report["files"]}
    assert {"memory_pruning.md", "memory_pruning.csv", "memory_pruning_tradeoff.png"} <= names
    # the answer compares every memory-pruned variant with RT-DETR, never as RT-DETR itself
    assert list(memory_report["tables"]["answer"].df["variant"]) == ["DSET R18 (M1)", "DSET R18 (M0.3)",
                                                                     "DSET R18 (M0.2)"]
    assert "ablation" not in memory_report["tables"]  # one switch combination only: not an ablation


def test_runs_from_before_the_fourth_switch_read_as_off():
    assert normalise._memory_keep(None, None, None) is None
    assert normalise._memory_keep("false", "True", "0.3") is None  # the tag wins
    assert normalise._memory_keep("0.3", None, None) == 0.3
    assert normalise._memory_keep(None, "True", "0.5") == 0.5
    assert normalise._memory_keep(None, "False", "0.5") is None
