"""Latency measured side by side in several processes (dset/latency_benchmark.py), with an interval that includes
the between-process spread; ``dset.profile --processes``; the study's benchmark step
(studies/execution/latency_step.py) and the report's reading of it (analysis/compute/latency.py)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_thread_for_module

from dset import latency_benchmark as LB
from dset.measure import paired_latency_change
from studies.tracking import schema

# one intra-op thread in this module's processes (the study's runs and its benchmark's, which take this one's): on
# a busy 2-core machine two threads spend most of their time waiting for each other
_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_thread_for_module)

TINY = ("model.decoder.num_queries=10",)
T_975_DOF_3 = 3.182446305284263   # Student t, 97.5% quantile, 3 degrees of freedom (scipy.stats.t.ppf)


def synthetic_processes(offsets: list[float], rounds: int = 21) -> tuple[list[list[float]], list[list[float]]]:
    """Per-process timings: the baseline at 100 ms, the variant at 100 * exp(offset_k + e_i) ms, with a
    within-process noise e_i of +-1% whose median is 0, so that each process's median log ratio is its offset."""
    noise = np.linspace(-0.01, 0.01, rounds)
    baseline = [[100.0] * rounds for _ in offsets]
    variant = [list(100.0 * np.exp(offset + np.roll(noise, k))) for k, offset in enumerate(offsets)]
    return baseline, variant


def test_the_interval_includes_the_spread_between_processes():
    offsets = [-0.10, 0.0, 0.10, 0.05]     # each process runs the variant at another speed against its baseline
    baseline, variant = synthetic_processes(offsets)
    change = LB.change_between_processes(baseline, variant)
    mean, sd = statistics.fmean(offsets), statistics.stdev(offsets)
    half = T_975_DOF_3 * sd / math.sqrt(len(offsets))
    assert change["latency_change_percent"] == pytest.approx(100 * (math.exp(mean) - 1), abs=1e-6)
    assert change["latency_change_low_percent"] == pytest.approx(100 * (math.exp(mean - half) - 1), abs=1e-6)
    assert change["latency_change_high_percent"] == pytest.approx(100 * (math.exp(mean + half) - 1), abs=1e-6)
    assert change["latency_change_by_process_percent"] == pytest.approx([100 * (math.exp(o) - 1) for o in offsets])
    assert change["processes"] == 4 and change["rounds"] == 21 and change["interval"] == LB.INTERVAL_PROCESSES
    width = change["latency_change_high_percent"] - change["latency_change_low_percent"]
    assert width > 20                       # about 2 x 3.18 x 8.5% / 2: the processes' spread
    # the rounds pooled as if one process: the within-process interval is far narrower and misses process 0's -9.5%
    pooled = paired_latency_change(sum(baseline, []), sum(variant, []))
    assert pooled["latency_change_high_percent"] - pooled["latency_change_low_percent"] < width / 3
    assert change["latency_change_low_percent"] < 100 * (math.exp(offsets[0]) - 1)


def test_processes_that_agree_give_a_narrow_interval():
    baseline, variant = synthetic_processes([0.05, 0.0501, 0.0499])
    change = LB.change_between_processes(baseline, variant)
    assert change["latency_change_percent"] == pytest.approx(100 * (math.exp(0.05) - 1), abs=1e-6)
    assert change["latency_change_high_percent"] - change["latency_change_low_percent"] < 0.1


def test_summary_of_one_process_says_its_interval_leaves_the_process_spread_out():
    baseline, variant = synthetic_processes([0.05])
    result = LB.summarise(["base", "variant"], [{"device": "cpu (x, 1 threads)", "threads": 1,
                                             "rounds_ms": {"base": baseline[0], "variant": variant[0]},
                                             "sparse": {"base": {}, "variant": {}}}],
                       {"image_size": 64, "batch_size": 1, "rounds": 21, "warmup": 0})
    assert result["interval"] == LB.INTERVAL_ONE_PROCESS and result["changes"]["variant"]["processes"] == 1
    assert result["models"]["base"]["latency_ms"] == pytest.approx(100.0)
    assert result["changes"]["variant"]["latency_change_percent"] == pytest.approx(100 * (math.exp(0.05) - 1))
    with pytest.raises(ValueError, match="at least 2"):
        LB.change_between_processes(baseline, variant)


def test_a_real_benchmark_of_two_tiny_models_in_two_processes():
    specs = [LB.ModelSpec("rtdetr", "rtdetr_r18", TINY), LB.ModelSpec("fast", "dset_fast_r18", TINY)]
    result = LB.run_benchmark(specs, size=64, warmup=1, rounds=3, processes=2, threads=1)
    assert (result["processes"], result["rounds"], result["image_size"], result["batch_size"]) == (2, 3, 64, 1)
    assert result["threads"] == 1 and result["precision"] == "fp32" and result["device"].startswith("cpu (")
    assert result["baseline"] == "rtdetr" and list(result["changes"]) == ["fast"]
    for label in ("rtdetr", "fast"):
        model = result["models"][label]
        rounds = model["latency_ms_rounds"]
        assert len(rounds) == 2 and all(len(r) == 3 and min(r) > 0 for r in rounds)
        assert model["latency_ms"] == pytest.approx(statistics.median(rounds[0] + rounds[1]))
        assert model["latency_ms_p90"] == pytest.approx(float(np.percentile(rounds[0] + rounds[1], 90)))
        assert (model["model"], model["precision"], model["mode"]) == (label, "fp32", "eager")
    # what it was measured on: torch's version, the CPU and its threads, the clock
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["threads"] == 1
    assert result["timer"] == "time.perf_counter" and result["not_timed"] == {}
    # each process timed the models at their target sparsity: memory pruning keeps 30% (not 100% as at epoch 0)
    assert result["models"]["fast"]["sparse"]["memory_pruning"]["keep_ratio_in_force"] == pytest.approx(0.3)
    change = result["changes"]["fast"]
    expected = LB.change_between_processes(result["models"]["rtdetr"]["latency_ms_rounds"],
                                        result["models"]["fast"]["latency_ms_rounds"])
    assert change["latency_change_percent"] == pytest.approx(expected["latency_change_percent"])
    assert change["latency_change_low_percent"] <= change["latency_change_percent"] <= \
        change["latency_change_high_percent"]


def test_profile_cli_gives_the_interval_between_processes(capsys):
    from dset.profile import main

    assert main(["rtdetr_r18", "dset_fast_r18", "--size", "64", "--json", "--no-onnx", "--warmup", "0", "--repeats",
                 "2", "--processes", "2", "--flops-inputs", "1", "--set", "model.decoder.num_queries=10"]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert first["processes"] == 2 and len(first["latency_ms_by_process"]) == 2
    v = second["vs_first"]
    assert v["baseline"] == "rtdetr_r18" and v["processes"] == 2 and v["rounds"] == 2
    assert v["interval"] == LB.INTERVAL_PROCESSES and len(v["latency_change_by_process_percent"]) == 2
    assert v["latency_change_low_percent"] <= v["latency_change_percent"] <= v["latency_change_high_percent"]
    assert v["gflops_change_percent"] < 0
    # --processes 0: in this process, and the interval says it leaves the process spread out
    assert main(["rtdetr_r18", "dset_fast_r18", "--size", "64", "--no-onnx", "--warmup", "0", "--repeats", "2",
                 "--processes", "0", "--flops-inputs", "1", "--set", "model.decoder.num_queries=10"]) == 0
    assert "between-process spread not included" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- the study step
@pytest.mark.slow
def test_study_step_logs_one_benchmark_run_per_backbone_once(tmp_path, store, capsys):
    from analysis.compute.latency import COLUMNS, side_by_side_latency
    from analysis.compute.loading import load_study_results
    from studies.execution.invocation import Invocation
    from studies.execution.latency_step import BenchmarkSettings, benchmark_backbone, plan_backbones
    from studies.planning.cells import grid_cells
    from studies.planning.study import load_study
    from studies.run import main

    args = ["smoke", f"out_dir={tmp_path / 'runs'}", f"data.synthetic.root={tmp_path / 'synthetic'}",
            "train.profile=false", "train.pictures=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "latency benchmark R18: RT-DETR R18" in out
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=store)
    exp = c.get_experiment_by_name("smoke")
    runs = c.search_runs([exp.experiment_id])
    bench = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == schema.ROLE_BENCHMARK]
    parent = next(r for r in runs if r.data.tags.get(schema.TAG_ROLE) == "parent")
    assert len(bench) == 1 and bench[0].info.status == "FINISHED"
    run = bench[0]
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["mlflow.parentRunId"] == parent.info.run_id and tags[schema.TAG_BACKBONE] == "R18"
    assert (tags[schema.TAG_BENCHMARK_PROCESSES], tags[schema.TAG_BENCHMARK_ROUNDS],
            tags[schema.TAG_BENCHMARK_IMAGE_SIZE], tags[schema.TAG_BENCHMARK_BATCH],
            tags[schema.TAG_BENCHMARK_PRECISION]) == (
        str(BenchmarkSettings().processes), str(BenchmarkSettings().rounds), "64", "1", "fp32")
    assert (tags[schema.TAG_BENCHMARK_DEVICE].startswith("cpu (")
            and int(tags[schema.TAG_BENCHMARK_THREADS]) >= 1)
    children = {r.data.tags[schema.TAG_VARIANT]: r for r in runs if r.data.tags.get(schema.TAG_ROLE) == "child"}
    assert json.loads(tags[schema.TAG_BENCHMARK_CELLS]) == {"RT-DETR R18": "r18-base-s0",
                                                           "DSET R18 (E+P+D)": "r18-dset-s0"}
    # the artifact holds every round; the metrics are its summary; the timed checkpoints are the cells' best.pt
    local = Path(c.download_artifacts(run.info.run_id, schema.ARTIFACT_BENCHMARK, str(tmp_path / "dl")))
    result = json.loads(local.read_text())
    variant = result["changes"]["DSET R18 (E+P+D)"]
    slugs = {label: slug for slug, label in json.loads(tags[schema.TAG_BENCHMARK_VARIANTS]).items()}
    metric = lambda label, q: metrics[schema.BENCHMARK_METRIC.format(variant=slugs[label], quantity=q)]  # noqa: E731
    assert metric("DSET R18 (E+P+D)", "change_percent") == pytest.approx(variant["latency_change_percent"])
    assert metric("DSET R18 (E+P+D)", "change_low_percent") == pytest.approx(variant["latency_change_low_percent"])
    assert metric("RT-DETR R18", "latency_ms") == pytest.approx(result["models"]["RT-DETR R18"]["latency_ms"])
    assert len(result["models"]["RT-DETR R18"]["latency_ms_rounds"]) == 3
    # the token pruner timed at its target keep ratio (the smoke budget: 0.7 after 1 warm-up epoch)
    assert result["models"]["DSET R18 (E+P+D)"]["sparse"]["token_pruning"]["keep_ratio_in_force"] == pytest.approx(0.7)
    assert all(Path(r.data.tags[schema.TAG_CHECKPOINT_DIR], "best.pt").is_file() for r in children.values())

    # the report reads it back: one row per variant
    frame = side_by_side_latency(load_study_results("smoke", store))
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 1
    row = frame.iloc[0]
    assert (row["variant"], row["baseline"], row["processes"], row["rounds"], row["image_size"]) == \
        ("DSET R18 (E+P+D)", "RT-DETR R18", BenchmarkSettings().processes, BenchmarkSettings().rounds, 64)
    assert row["delta_percent"] == pytest.approx(variant["latency_change_percent"])
    assert row["delta_high"] == pytest.approx(variant["latency_change_high_percent"])
    assert row["baseline_latency_ms"] == pytest.approx(result["models"]["RT-DETR R18"]["latency_ms"])

    # the same command again: the cells are done and so is their benchmark
    assert main(args) == 0
    assert "latency benchmark R18: already measured" in capsys.readouterr().out
    runs = c.search_runs([exp.experiment_id])
    assert sum(r.data.tags.get(schema.TAG_ROLE) == schema.ROLE_BENCHMARK for r in runs) == 1

    # other settings make another key. A live invocation measuring it is left alone; one whose process is gone is
    # closed (KILLED) and the backbone measured here; a benchmark that fails is a FAILED run with the error
    study = load_study("smoke", args[1:])
    inv = Invocation(study, store, 1, None)
    settings = BenchmarkSettings(processes=2, rounds=1, warmup=0)
    (plan,), skipped = plan_backbones(grid_cells(study), inv.runs)
    assert skipped == [] and plan.key(settings) != tags[schema.TAG_BENCHMARK_KEY]
    other = c.create_run(exp.experiment_id, tags={schema.TAG_ROLE: schema.ROLE_BENCHMARK,
                                                  schema.TAG_BENCHMARK_KEY: plan.key(settings),
                                                  schema.TAG_HOST: inv.host,
                                                  schema.TAG_PID: str(os.getpid())}).info.run_id
    assert "being measured by another invocation" in benchmark_backbone(plan, settings, inv.runs)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    c.set_tag(other, schema.TAG_PID, str(dead.pid))
    (Path(children["DSET R18 (E+P+D)"].data.tags[schema.TAG_CHECKPOINT_DIR]) / "best.pt").unlink()
    line = benchmark_backbone(plan, settings, inv.runs)
    inv.close("FINISHED")
    assert line.startswith("R18: FAILED") and "no checkpoint" in line
    assert c.get_run(other).info.status == "KILLED"
    failed = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get(schema.TAG_BENCHMARK_KEY) ==
              plan.key(settings) and r.info.run_id != other]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "no checkpoint" in failed[0].data.tags[schema.TAG_ERROR]
    assert all(c.get_run(r.info.run_id).info.status == "FINISHED" for r in children.values())


def test_side_by_side_latency_of_a_study_without_benchmark_is_empty(tmp_path, store):
    from analysis.compute.latency import COLUMNS, side_by_side_latency
    from analysis.compute.loading import StudyResults
    from studies.tracking import mlflow_store

    mlflow_store.prepare_store(store)
    c = mlflow_store.client(store)
    exp_id = mlflow_store.get_experiment(c, "empty", store)
    import pandas as pd

    frame = side_by_side_latency(StudyResults("empty", exp_id, store, pd.DataFrame()))
    assert frame.empty and list(frame.columns) == list(COLUMNS)
