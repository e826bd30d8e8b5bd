"""Studies end to end on the smoke budget (64 px synthetic images, 2 steps per epoch), each into its own
temporary MLflow store: dry runs of every shipped study, a grid read back from MLflow (params, tags,
metrics, artifacts), a failing cell, resume after a kill, 2 workers, and an Optuna search.

The in-process runs use one torch thread (see ``_one_torch_thread``): the whole file takes about a minute
on a busy 2-core CPU."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import one_thread_for_module

from dset import metric_names as M
from dset.config import flatten, load_config, read_budget
from dset.engine.epoch_stats import entropy
from studies.planning.cells import grid_cells, search_fingerprint
from studies.planning.study import StudyError, load_study, study_names
from studies.run import main
from studies.tracking import schema
from studies.tracking.callback import epoch_metrics, final_metrics

REPO = Path(__file__).resolve().parents[1]


# one intra-op thread for the in-process runs: on a busy 2-core machine two OpenMP threads spend most of their
# time waiting for each other (several times slower than one)
_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_thread_for_module)


@pytest.fixture(scope="module")
def synth_root(module_tmp):
    return module_tmp("synthetic")



def write_study(path: Path, grid: dict, budget: str = "smoke", **extra) -> Path:
    path.write_text(yaml.safe_dump({"kind": "grid", "budget": budget, "seeds": [0], "grid": grid, **extra}))
    return path


BASE = {"model.encoder_moe.enabled": False, "model.token_pruning.enabled": False, "model.decoder_moe.enabled": False}
DSET = {"model.encoder_moe.enabled": True, "model.token_pruning.enabled": True, "model.decoder_moe.enabled": True}


def common(tmp_path, synth_root, *extra):
    return [f"out_dir={tmp_path / 'runs'}", f"data.synthetic.root={synth_root}", *extra]


def search(uri: str, experiment: str):
    """``mlflow.search_runs`` on ``uri``: the experiment's runs as a pandas frame."""
    from studies.tracking.mlflow_store import search_runs_frame

    return search_runs_frame(uri, experiment_names=[experiment])


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def out_dir_of(row) -> Path:
    return Path(row["tags.dset.checkpoint_dir"]).parent


# ------------------------------------------------------------------------------------- study files
@pytest.mark.parametrize("name", study_names())
def test_dry_run_of_every_shipped_study(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main([name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    st = load_study(name)
    assert f"budget: {st.budget}" in out and "train:" in out and "epochs" in out
    if st.kind == "grid":
        for cell in grid_cells(st):
            assert cell.ok and cell.id in out
    else:
        for p in st.search.space:
            assert p.key in out
        assert "objectives: " + ", ".join(f"{o.direction} {o.metric}" for o in st.search.objectives) in out
        if len(st.search.objectives) > 1:
            assert "pruning: off -- Optuna does not support pruning for multi-objective studies" in out
        else:
            assert "pruning: per epoch on val/mAP" in out
    assert not (tmp_path / "mlflow.db").exists()      # a dry run creates nothing


def test_ablation_grid_cells_configs_and_overrides(capsys):
    st = load_study("ablation_grid")
    cells = grid_cells(st)
    assert len(cells) == 16 and len({c.fingerprint for c in cells}) == 16
    assert [c.id for c in cells[:8]] == ["r18-base-s0", "r18-enc_moe-s0", "r18-prune-s0", "r18-dec_moe-s0",
                                         "r18-enc_moe-prune-s0", "r18-enc_moe-dec_moe-s0", "r18-prune-dec_moe-s0",
                                         "r18-enc_moe-prune-dec_moe-s0"]
    by_id = {c.id: c for c in cells}
    for bb, depth, layers in (("r18", 18, 3), ("r34", 34, 4)):
        base = by_id[f"{bb}-base-s0"].config          # the all-off cells are RT-DETR
        ref = load_config(f"rtdetr_{bb}")
        assert base.model.name == f"rtdetr_{bb}" and base.model.backbone.depth == depth
        assert base.model.decoder.num_layers == layers
        m = base.model
        assert not (m.encoder_moe.enabled or m.token_pruning.enabled or m.decoder_moe.enabled)
        assert base.model.encoder == ref.model.encoder and base.model.decoder.num_layers == ref.model.decoder.num_layers
        full = by_id[f"{bb}-enc_moe-prune-dec_moe-s0"].config    # switched-on settings = the DSET preset's
        dset = load_config(f"dset_{bb}")
        assert full.model.encoder_moe == dset.model.encoder_moe and full.model.decoder_moe == dset.model.decoder_moe
        assert full.model.token_pruning.keep_ratio == dset.model.token_pruning.keep_ratio
        assert by_id[f"{bb}-prune-s0"].labels()["variant"] == f"DSET R{depth} (P)"
    cfg = cells[0].config                              # the default budget
    assert cfg.data.name == "synthetic" and cfg.data.image_size == 128 and cfg.train.profile
    # study-level and configuration overrides
    st3 = load_study("ablation_grid", ["seeds=[0,1,2]", "model.decoder.num_queries=30"])
    cells3 = grid_cells(st3)
    assert len(cells3) == 48 and [c.seed for c in cells3[:17]] == [0] * 16 + [1]
    assert all(c.config.model.decoder.num_queries == 30 and c.config.run.seed == c.seed for c in cells3)
    assert load_study("optuna_search", ["n_trials=3"]).search.n_trials == 3
    with pytest.raises(StudyError, match="unknown override key 'epochs'"):
        load_study("ablation_grid", ["epochs=3"])
    with pytest.raises(StudyError, match="seeds=\\[0,1,2\\]"):
        load_study("ablation_grid", ["run.seed=3"])
    with pytest.raises(StudyError, match="unknown budget 'nope'"):
        load_study("ablation_grid", ["budget=nope"])
    # budget=paper: DAIR-V2X at 640 px, 72 epochs, patience 35; a clear error when the data is absent
    paper = grid_cells(load_study("ablation_grid", ["budget=paper"]))
    assert not paper[0].ok and "data.train.images" in paper[0].error and "dset.data.dair_v2x" in paper[0].error
    raw = flatten(read_budget(load_study("ablation_grid", ["budget=paper"]).budget_path())[0])
    assert raw["data.image_size"] == 640 and raw["train.epochs"] == 72 and raw["train.early_stop_patience"] == 35
    assert raw["data.train.annotations"] == "data/dair_v2x_coco/train.json"
    # an invalid override for every run: an error before any work
    assert main(["smoke", "model.decoder_moe.top_k=9"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("ablation_grid", "optuna_search", "baselines", "smoke"):
        assert name in out
    assert "study_cpu" in out and "paper" in out


def test_epoch_metric_names():
    """A record (as the training loop writes it) is logged under its own names: every finite number but the
    step (``epoch``); the counts beside the metrics are not logged."""
    rec = {"epoch": 3, "train/loss": 2.0, "train/loss_vfl": 0.5, "lr/new": 1e-4, "val/mAP": 0.25, "val/mAP50": 0.5,
           M.per_class_ap_metric("circle"): 0.1, M.KEEP_RATIO: 0.7, M.SCHEDULED_KEEP_RATIO: 0.7,
           "val/mAP_large": float("nan"), M.usage_metric("encoder_moe", 0, 0): 0.25,
           M.usage_metric("encoder_moe", 0, 1): 0.75, M.entropy_metric("encoder_moe", 0): entropy([0.25, 0.75]),
           "counts": {"step": 8, "train_images": 8}}
    m = epoch_metrics(rec)
    assert set(m) == set(rec) - {"epoch", "val/mAP_large", "counts"}
    assert m["train/loss"] == 2.0 and m["train/loss_vfl"] == 0.5 and m["lr/new"] == 1e-4
    assert m["val/mAP"] == 0.25 and m["val/mAP50"] == 0.5 and m["val/AP/circle"] == 0.1
    assert m[M.KEEP_RATIO] == 0.7 and "val/mAP_large" not in m and "train_images" not in m
    assert m[M.usage_metric("encoder_moe", 0, 1)] == 0.75
    assert m[M.entropy_metric("encoder_moe", 0)] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert entropy([0.25] * 4) == pytest.approx(math.log(4))
    # class names as MLflow accepts them
    assert M.per_class_ap_metric("traffic light (red)") == "val/AP/traffic light _red_"
    # final metrics: the summary's metrics block, finite numbers only
    summary = {"status": "completed", "metrics": {M.BEST_MAP: 0.5, M.PEAK_GPU_MEMORY_MB: None, M.GFLOPS: math.nan}}
    assert final_metrics(summary) == {M.BEST_MAP: 0.5} and final_metrics({"status": "failed"}) == {}


# --------------------------------------------------------------------------------------- end to end
def test_grid_end_to_end_into_mlflow_with_a_failing_cell(tmp_path, store, synth_root, capsys):
    study_file = write_study(tmp_path / "tiny.yaml", {
        "backbone": {"r18": {"preset": "rtdetr_r18"}},
        "variant": {"off": BASE, "dset": DSET, "bad": {**BASE, "model.decoder_moe.top_k": 9}}})
    # the smoke budget leaves the deployed-speed timing out; this test checks it end to end; and a test split, so
    # that each cell is scored once on other images than those that selected it
    overrides = common(tmp_path, synth_root, "train.profile_deployment=true", "data.synthetic.num_test=3")
    code = main([str(study_file), *overrides])
    out, err = capsys.readouterr()
    assert code == 1                                           # a run failed: non-zero at the end
    assert "r18-bad-s0" in err and "top_k" in err and "1 run(s) FAILED" in err
    assert "[3/3]" in out and "ETA" in out and "latency ms" in out   # progress lines, summary table

    df = search(store, "tiny")
    parents = df[df["tags.dset.role"] == "parent"]
    children = df[df["tags.dset.role"] == "child"].set_index("tags.dset.cell")
    assert len(parents) == 1 and sorted(children.index) == ["r18-bad-s0", "r18-base-s0", "r18-dset-s0"]
    assert parents.iloc[0]["status"] == "FAILED"
    assert (children["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]).all()

    bad = children.loc["r18-bad-s0"]
    assert bad["status"] == "FAILED" and "model.decoder_moe.top_k" in bad["tags.dset.error"]
    assert bad["tags.dset.status"] == "failed"

    cells = {c.id: c for c in grid_cells(load_study(str(study_file), overrides))}
    c = client(store)
    for cell_id, on in (("r18-base-s0", False), ("r18-dset-s0", True)):
        row = children.loc[cell_id]
        assert row["status"] == "FINISHED"
        # tags
        expect = {schema.TAG_STUDY: "tiny", schema.TAG_BACKBONE: "R18", schema.TAG_SEED: "0",
                  schema.TAG_STATUS: "completed", schema.TAG_VARIANT: "DSET R18 (E+P+D)" if on else "RT-DETR R18",
                  schema.TAG_DEVICE: "cpu",
                  schema.TAG_FINGERPRINT: cells[cell_id].fingerprint, schema.TAG_SCORE_SPLIT: "test"}
        for tag in schema.SWITCH_TAGS:
            expect[tag] = str(on).lower()
        for k, v in expect.items():
            assert row[f"tags.{k}"] == v, k
        latency_device = row[f"tags.{schema.TAG_LATENCY_DEVICE}"]
        assert latency_device.startswith("cpu (") and "batch 1" in latency_device
        run_dir = out_dir_of(row)
        # a finished study run keeps its weights, not its resume state (train.keep_last_checkpoint=false)
        assert (run_dir / "checkpoints" / "best.pt").is_file()
        assert not (run_dir / "checkpoints" / "last.pt").exists()
        assert row["params.train.keep_last_checkpoint"] == "False"
        assert (REPO / ".git").exists() and row[f"tags.{schema.TAG_GIT_COMMIT}"]
        # params: the resolved configuration, as fit saved it (num_classes from the data set)
        saved = load_config(run_dir / "config.yaml")
        assert saved.model.num_classes == 4
        for k, v in saved.flat().items():
            assert row[f"params.{k}"] == str(v), k
        # per-epoch metrics equal metrics.jsonl, one value per epoch
        lines = records(run_dir / "metrics.jsonl")
        assert [r["epoch"] for r in lines] == [0, 1]
        # fine-tuned from stage 1: RT-DETR has only pretrained parameters; DSET adds new ones (routers, predictor)
        assert ("lr/new" in lines[0]) == on and "lr/pretrained" in lines[0]
        run_id = row["run_id"]
        for name, key in (("train/loss", "train/loss"), ("train/loss_vfl", "train/loss_vfl"), ("val/mAP", "val/mAP"),
                          ("val/mAP50", "val/mAP50"), ("lr/pretrained", "lr/pretrained"),
                          ("train/loss_bbox_dn_0", "train/loss_bbox_dn_0")):
            hist = sorted((m.step, m.value) for m in c.get_metric_history(run_id, name))
            assert hist == [(r["epoch"], pytest.approx(r[key])) for r in lines], name
        # final metrics equal summary.json
        summary = json.loads((run_dir / "summary.json").read_text())
        prof, final = summary["profile"], summary["metrics"]
        assert row[f"metrics.{M.BEST_MAP}"] == pytest.approx(final[M.BEST_MAP])
        assert row[f"metrics.{M.BEST_EPOCH}"] == final[M.BEST_EPOCH]
        assert summary["num_test_images"] == 3
        for key in (M.TEST_MAP, M.TEST_MAP50, M.TEST_MAP75):
            assert row[f"metrics.{key}"] == pytest.approx(final[key])
        assert row[f"metrics.{M.PARAMS}"] == final[M.PARAMS]
        assert row[f"metrics.{M.ACTIVE_PARAMS}"] == final[M.ACTIVE_PARAMS]
        assert row[f"metrics.{M.GFLOPS}"] == pytest.approx(final[M.GFLOPS])
        parts = [row[f"metrics.{M.GFLOPS_COMPONENT_PREFIX}{p}"] for p in ("backbone", "encoder", "decoder")]
        assert parts == [pytest.approx(prof["gflops_by_component"][p]) for p in ("backbone", "encoder", "decoder")]
        assert sum(parts) == pytest.approx(final[M.GFLOPS], rel=1e-3)
        assert row[f"metrics.{M.LATENCY_MS}"] == pytest.approx(final[M.LATENCY_MS])
        assert row[f"metrics.{M.FPS}"] == pytest.approx(1000.0 / final[M.LATENCY_MS])
        assert row[f"metrics.{M.EPOCHS_RUN}"] == 2
        assert row[f"metrics.{M.TRAIN_MINUTES}"] == pytest.approx(sum(r[M.EPOCH_TIME] for r in lines) / 60)
        # artifacts
        names = {a.path for a in c.list_artifacts(run_id)}
        expected = {"config.yaml", "metrics.jsonl", "summary.json", "per_class_ap.csv", "eval",
                    schema.ARTIFACT_PICTURES, schema.ARTIFACT_IMAGES}
        expected |= {"expert_usage.png"} if on else set()
        assert names == expected
        kinds = ("detections", "kept_tokens", "encoder_experts", "decoder_experts") if on else ("detections",)
        pictures = {Path(a.path).name for a in c.list_artifacts(run_id, schema.ARTIFACT_PICTURES)}
        assert pictures == {p.name for p in (run_dir / schema.ARTIFACT_PICTURES).iterdir()}
        assert {n.rsplit("_", 1)[0] for n in pictures if n.endswith(".png")} == set(kinds)
        assert {a.path for a in c.list_artifacts(run_id, "eval")} == {
            schema.ARTIFACT_DETECTIONS, schema.ARTIFACT_GROUND_TRUTH, schema.ARTIFACT_TEST_DETECTIONS,
            schema.ARTIFACT_TEST_GROUND_TRUTH}
        logged = Path(c.download_artifacts(run_id, schema.ARTIFACT_TEST_DETECTIONS, str(tmp_path / f"dl-t-{cell_id}")))
        assert logged.read_bytes() == (run_dir / schema.ARTIFACT_TEST_DETECTIONS).read_bytes()
        local = Path(c.download_artifacts(run_id, "per_class_ap.csv", str(tmp_path / f"dl-{cell_id}")))
        table = {r["class"]: r for r in csv.DictReader(local.open())}
        assert set(table) == {"circle", "square", "triangle", "cross"}
        for name, r in table.items():
            best_record = lines[final[M.BEST_EPOCH]]
            assert float(r["AP_best_epoch"]) == pytest.approx(best_record[M.per_class_ap_metric(name)], abs=1e-6)
        if on:
            png = Path(c.download_artifacts(run_id, "expert_usage.png", str(tmp_path / "dl-png")))
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            # sparse metrics: keep ratio, usage shares (sum 1 per layer) and their entropy
            last = lines[-1]
            assert row[f"metrics.{M.KEEP_RATIO}"] == pytest.approx(last[M.KEEP_RATIO]) and last[M.KEEP_RATIO] < 1
            assert row[f"metrics.{M.FINAL_KEEP_RATIO}"] == pytest.approx(last[M.KEEP_RATIO])
            for where, layers in (("encoder_moe", 1), ("decoder_moe", 3)):
                for layer in range(layers):
                    shares = [row[f"metrics.{M.usage_metric(where, layer, e)}"] for e in range(6)]
                    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
                    assert row[f"metrics.{M.entropy_metric(where, layer)}"] == pytest.approx(entropy(shares), abs=1e-6)
        else:
            assert f"metrics.{M.KEEP_RATIO}" not in row or math.isnan(row[f"metrics.{M.KEEP_RATIO}"])

    # the report layer reads this store
    from analysis.compute.loading import load_study_results

    study = load_study_results("tiny", store)
    assert sorted(study.included["cell"]) == ["r18-base-s0", "r18-dset-s0"]
    # mlflow ui opens the experiment on its runs, not on MLflow 3's GenAI overview
    assert c.get_experiment_by_name("tiny").tags[schema.TAG_EXPERIMENT_KIND] == "custom_model_development"

    # the report shows each run's deployed speed (eager and ONNX Runtime, as the run timed them) and its pictures
    from analysis.make_report import build_report

    report = build_report("tiny", tmp_path / "report", store)
    deploy = report["tables"]["deployment"].df.set_index("model")
    labels = dict(zip(report["study"].included["cell"], report["study"].included["label"]))
    for cell_id, label in labels.items():
        timed = json.loads((out_dir_of(children.loc[cell_id]) / "summary.json").read_text())["deployment"]
        for runtime, column in (("eager", "eager b1 (ms)"), ("onnxruntime_cpu", "onnxruntime_cpu b1 (ms)")):
            assert deploy.loc[label, column] == pytest.approx(timed["runtimes"][runtime]["1"]["latency_ms"])
        assert deploy.loc[label, "onnxruntime_cpu b8 (images/s)"] == pytest.approx(
            timed["runtimes"]["onnxruntime_cpu"]["8"]["fps"])
        assert deploy.loc[label, "max |ONNX − eager|"] <= 1e-4
    assert "deployment" in report["plots"]
    # every picture kind of the DSET variant; RT-DETR has detections only
    assert {"pictures_detections_r18", "pictures_kept_tokens_r18", "pictures_encoder_experts_r18",
            "pictures_decoder_experts_r18"} <= set(report["plots"])

    # running again (the same command): the finished cells are skipped, the failed one is retried in the SAME run
    code = main([str(study_file), *overrides])
    out = capsys.readouterr().out
    assert code == 1 and "2 of 3 runs already finished" in out
    df2 = search(store, "tiny")
    kids2 = df2[df2["tags.dset.role"] == "child"]
    assert len(kids2) == 3 and set(kids2["run_id"]) == set(children["run_id"])
    assert (df2["tags.dset.role"] == "parent").sum() == 2


KILLER = """
import os, signal, sys
from studies.tracking.callback import MlflowCallback

original = MlflowCallback.on_epoch_end


def on_epoch_end(self, epoch, metrics):
    # a cell's epoch 1 (not stage 1's, trained first unless an earlier test cached it) is checkpointed but not yet
    # in MLflow: kill -9, no clean-up at all
    if epoch == 1 and "pretrained" not in str(self.out_dir):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, epoch, metrics)


MlflowCallback.on_epoch_end = on_epoch_end
from studies.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_continues_the_same_run(tmp_path, store, synth_root):
    study_file = write_study(tmp_path / "resume.yaml", {"backbone": {"r18": {"preset": "rtdetr_r18"}},
                                                        "variant": {"off": BASE}})
    # the resume state written at every epoch (by default at most every 10 minutes)
    args = [str(study_file), *common(tmp_path, synth_root, "train.epochs=3", "train.profile=false",
                                     "train.checkpoint_every_minutes=1e-6")]
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = next((tmp_path / "runs").glob("resume/*/checkpoints/last.pt"))
    run_dir = ckpt.parents[1]
    import torch

    assert torch.load(ckpt, weights_only=False)["epoch"] == 1             # killed after epoch 1's checkpoint
    df = search(store, "resume")
    child = df[df["tags.dset.role"] == "child"]
    assert len(child) == 1 and child.iloc[0]["status"] == "RUNNING"
    run_id = child.iloc[0]["run_id"]
    assert [m.step for m in client(store).get_metric_history(run_id, "train/loss")] == [0]

    assert main(args) == 0
    df = search(store, "resume")
    child = df[df["tags.dset.role"] == "child"]
    assert len(child) == 1 and child.iloc[0]["run_id"] == run_id          # same run, no duplicate
    assert child.iloc[0]["status"] == "FINISHED"
    lines = records(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [0, 1, 2]                         # epochs 0 and 1 were not redone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["metrics"][M.EPOCHS_RUN] == 3
    assert not ckpt.exists() and (run_dir / "checkpoints" / "best.pt").is_file()
    hist = sorted((m.step, m.value) for m in client(store).get_metric_history(run_id, "train/loss"))
    assert hist == [(r["epoch"], pytest.approx(r["train/loss"])) for r in lines]  # epoch 1 back-filled, each once
    stale = df[(df["tags.dset.role"] == "parent") & (df["status"] != "FINISHED")]
    assert list(stale["status"]) == ["KILLED"]                             # the killed invocation's parent


KILLER_AFTER_LOGGING = KILLER.replace("""    if epoch == 1 and "pretrained" not in str(self.out_dir):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, epoch, metrics)""", """    result = original(self, epoch, metrics)
    if epoch == 1 and "pretrained" not in str(self.out_dir):   # in MLflow now, and no last.pt (every 10 min)
        os.kill(os.getpid(), signal.SIGKILL)
    return result""")


def test_a_cell_killed_past_its_resume_state_is_redone_in_a_new_run_logging_each_epoch_once(tmp_path, store,
                                                                                           synth_root, capsys):
    """Issue 24's case: killed after logging epochs 0 and 1 with no resume state, the cell starts again at epoch 0.
    Into the same run it would log epochs [0, 1, 0, 1, 2]; instead a new attempt run, linked to the killed one,
    logs each epoch once, and the killed run is deleted (restorable), so the store shows one run per cell."""
    study_file = write_study(tmp_path / "again.yaml", {"backbone": {"r18": {"preset": "rtdetr_r18"}},
                                                       "variant": {"off": BASE}})
    args = [str(study_file), *common(tmp_path, synth_root, "train.epochs=3", "train.profile=false")]
    assert KILLER_AFTER_LOGGING != KILLER
    (tmp_path / "killer.py").write_text(KILLER_AFTER_LOGGING)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("again/*/checkpoints/last.pt"))
    killed = search(store, "again")
    killed = killed[killed["tags.dset.role"] == "child"].iloc[0]["run_id"]
    assert [m.step for m in client(store).get_metric_history(killed, "train/loss")] == [0, 1]
    capsys.readouterr()
    assert main([*args, "--status"]) == 0   # its process is gone: interrupted, with the epochs it logged
    out = capsys.readouterr().out
    assert "study again: 1 interrupted of 1 cells" in out, out
    assert re.search(r"r18-base-s0\s+interrupted\s+its process is gone, 2 epoch\(s\) logged; the next invocation "
                     r"resumes it", out), out

    assert main(args) == 0
    assert main([*args, "--status"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"study again: 1 done of 1 cells.*\n.*\n.*\nr18-base-s0\s+done\s+best mAP 0\.\d{4}", out), out
    df = search(store, "again")
    child = df[df["tags.dset.role"] == "child"]
    assert len(child) == 1 and child.iloc[0]["status"] == "FINISHED"
    run_id = child.iloc[0]["run_id"]
    assert run_id != killed and child.iloc[0][f"tags.{schema.TAG_ATTEMPT_OF}"] == killed
    for key in ("train/loss", "val/mAP"):
        assert sorted(m.step for m in client(store).get_metric_history(run_id, key)) == [0, 1, 2], key
    old = client(store).get_run(killed)
    assert old.info.lifecycle_stage == "deleted" and old.info.status == "KILLED"
    assert old.data.tags[schema.TAG_SUPERSEDED_BY] == run_id


def test_two_workers_share_the_store(tmp_path, store, synth_root, capfd):
    # one epoch: token pruning at its target from epoch 0 (no warm-up), as a reported checkpoint must be
    code = main(["smoke", "--workers", "2", *common(tmp_path, synth_root, "train.epochs=1", "train.profile=false",
                                                    "model.token_pruning.warmup_epochs=0")])
    out, err = capfd.readouterr()                              # the worker processes' output too
    assert code == 0, err
    assert "locked" not in out + err and "Traceback" not in out + err
    df = search(store, "smoke")
    kids = df[df["tags.dset.role"] == "child"]
    assert sorted(kids["tags.dset.cell"]) == ["r18-base-s0", "r18-dset-s0"]
    assert (kids["status"] == "FINISHED").all() and (df["tags.dset.role"] == "parent").sum() == 1
    assert kids["metrics.train/loss"].notna().all() and kids[f"metrics.{M.BEST_MAP}"].notna().all()
    assert len(set(kids["tags.dset.pid"])) == 1                          # the invocation's pid, set per run
    assert kids["start_time"].max() < kids["end_time"].min()              # the two ran at the same time


def test_optuna_search_two_trials(tmp_path, store, synth_root, capsys):
    import optuna

    args = ["optuna_search", "budget=smoke", "n_trials=2", *common(tmp_path, synth_root, "train.epochs=1",
                                                                   "model.token_pruning.warmup_epochs=0")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best trials" in out
    df = search(store, "optuna_search")
    parent = df[df["tags.dset.role"] == "parent"].iloc[0]
    kids = df[df["tags.dset.role"] == "child"].sort_values("tags.dset.trial")
    assert list(kids["tags.dset.trial"]) == ["0", "1"] and list(kids["tags.dset.cell"]) == ["trial-0", "trial-1"]
    assert (kids["status"] == "FINISHED").all()
    name = parent[f"tags.{schema.TAG_OPTUNA_STUDY}"]
    assert (kids[f"tags.{schema.TAG_OPTUNA_STUDY}"] == name).all()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "runs" / "optuna_search" / "optuna_journal.log")))
    ostudy = optuna.load_study(study_name=name, storage=storage)
    trials = ostudy.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t, (_, row) in zip(trials, kids.iterrows()):
        for key, value in t.params.items():                  # the sampled values are the run's configuration
            if key == "model.token_pruning.warmup_epochs":   # except where the command line overrides them
                assert row[f"params.{key}"] == "0"
                continue
            assert row[f"params.{key}"] == str(value)
        assert t.params["model.encoder_moe.top_k"] <= t.params["model.encoder_moe.num_experts"]
        assert t.values == [pytest.approx(row[f"metrics.{M.BEST_MAP}"]), pytest.approx(row[f"metrics.{M.GFLOPS}"])]
    # more trials continue the same search
    assert search_fingerprint(load_study("optuna_search", ["budget=smoke", "n_trials=5"])) == \
        search_fingerprint(load_study("optuna_search", ["budget=smoke", "n_trials=2"]))


def test_pruning_callback_reports_and_prunes(tmp_path):
    import optuna

    from studies.execution.optuna_storage import open_storage
    from studies.execution.search import PruningCallback

    desc = {"journal": str(tmp_path / "journal.log")}
    ostudy = optuna.create_study(study_name="p", storage=open_storage(desc), direction="maximize",
                                 pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    first = ostudy.ask()
    for epoch, value in enumerate([0.5, 0.6]):
        first.report(value, epoch)
    ostudy.tell(first, 0.6)
    median = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}
    good = PruningCallback(desc, "p", ostudy.ask()._trial_id, median)    # as a worker process does
    assert good.on_epoch_end(0, {M.VAL_MAP: 0.7}) is None and not good.pruned   # above the median: goes on
    assert good.on_epoch_end(1, {M.VAL_MAP: float("nan")}) is None             # nothing to report
    bad = PruningCallback(desc, "p", ostudy.ask()._trial_id, median)
    assert bad.on_epoch_end(0, {M.VAL_MAP: 0.1}) is True and bad.pruned       # below: stop the run
    assert [t.intermediate_values for t in ostudy.get_trials()] == [{0: 0.5, 1: 0.6}, {0: 0.7}, {0: 0.1}]


def test_interrupted_trial_is_enqueued_again_with_its_parameters(tmp_path):
    import optuna

    from studies.execution import claims
    from studies.execution.optuna_storage import open_storage
    from studies.execution.search import requeue_stale, trial_counts
    from studies.processes import host

    dead = subprocess.Popen(["true"])
    dead.wait()                                                 # a pid that no longer runs
    desc = {"journal": str(tmp_path / "journal.log")}
    ostudy = optuna.create_study(study_name="s", storage=open_storage(desc), direction="maximize")
    done = ostudy.ask({"x": optuna.distributions.IntDistribution(1, 9)})
    ostudy.tell(done, 0.5)
    killed = ostudy.ask({"x": optuna.distributions.IntDistribution(1, 9)})
    killed.set_user_attr(claims.ATTR_HOST, host())
    killed.set_user_attr(claims.ATTR_PID, dead.pid)
    alive = ostudy.ask({"x": optuna.distributions.IntDistribution(1, 9)})    # this process: still running
    alive.set_user_attr(claims.ATTR_HOST, host())
    alive.set_user_attr(claims.ATTR_PID, os.getpid())
    assert trial_counts(ostudy)[0] == 3

    assert requeue_stale(ostudy, host()) == [killed.number]
    states = [t.state.name for t in ostudy.get_trials()]
    assert states == ["COMPLETE", "FAIL", "RUNNING", "WAITING"]
    assert trial_counts(ostudy)[0] == 3                       # the interrupted trial is replaced, not counted
    retry = ostudy.ask()                                        # the next trial asked is the re-run
    assert retry.user_attrs[claims.ATTR_RETRY_OF] == killed.number
    assert retry.suggest_int("x", 1, 9) == killed.params["x"]


def test_status_says_where_each_cell_stands():
    """``--status``'s states from the runs MLflow holds (studies/status.py), without a store to read: running on
    another host, failed with its error, killed, finished, never run."""
    from types import SimpleNamespace

    from studies.status import cell_status

    def run(status, tags=None, metrics=None):
        return SimpleNamespace(info=SimpleNamespace(status=status, run_id="r"),
                               data=SimpleNamespace(tags=tags or {}, metrics=metrics or {}))

    history = SimpleNamespace(get_metric_history=lambda run_id, key: [object()] * 3)   # 3 epochs logged
    cell = SimpleNamespace(ok=True, error=None, fingerprint="fp", cell_key="key", provenance={})
    cases = {
        "running": (run("RUNNING", {schema.TAG_HOST: "node7", schema.TAG_PID: "41"}),
                    "on node7 (pid 41), 3 epoch(s) logged"),
        "failed": (run("FAILED", {schema.TAG_ERROR: "DatasetError: no images"}), "DatasetError: no images"),
        "interrupted": (run("KILLED"), "killed, 3 epoch(s) logged; the next invocation resumes it"),
        "done": (run("FINISHED", metrics={M.BEST_MAP: 0.25}), "best mAP 0.2500"),
    }
    for state, (r, what) in cases.items():
        assert cell_status(cell, {"fp": r}, {}, False, history, my_host="this-host") == (state, what)
    assert cell_status(cell, {}, {}, False, history, my_host="this-host") == ("waiting", "")
    bad = SimpleNamespace(ok=False, error="ConfigError: model.top_k: must be ...", fingerprint=None)
    assert cell_status(bad, {}, {}, False, history, my_host="h") == ("invalid", "ConfigError: model.top_k: must be ...")
