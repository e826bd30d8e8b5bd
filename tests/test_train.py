"""The training loop end to end on tiny synthetic data: files, metrics, callbacks, early stopping, NaN,
checkpoints, the evaluation of a saved run and the two command lines."""

from __future__ import annotations

import json
import math
import re
import signal
import time

import pytest
import torch
from conftest import SMALL_HEADS, one_thread_for_module

import dset
from dset import metric_names as M
from dset.config import ConfigError
from dset.engine import checkpoint, loop
from dset.engine.callbacks import Callback, EarlyStopping
from dset.engine.checkpoint import CheckpointWriteError
from dset.engine.ema import ModelEMA, ema_decay
from dset.engine.errors import NonFiniteLossError
from dset.engine.loop import fit
from dset.engine.schedule import WarmupCosine

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_for_module)


def tiny(root, *extra):
    """8 train / 4 val synthetic images of 64 px, batch 4 (2 steps per epoch), 20 queries; pruning schedules (as
    configured, switch on or off) that leave every epoch eligible to be the reported one."""
    return ["data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.image_size=64",
            f"data.synthetic.root={root}", "data.image_size=64", "data.batch_size=4", "data.augment=flip",
            "model.eval_spatial_size=[64,64]", "model.decoder.num_queries=20", "model.decoder.num_denoising=8",
            "model.token_pruning.warmup_epochs=0", "model.token_pruning.ramp_epochs=0",
            "model.memory_pruning.warmup_epochs=0", *SMALL_HEADS,
            "train.epochs=2", "train.warmup_steps=3", "train.ema_warmup_steps=10", "train.profile=false",
            "run.progress=false", *extra]


@pytest.fixture(scope="module")
def synth_root(module_tmp):
    return module_tmp("synthetic")


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_train_start(self, info):
        self.calls.append(("start", info))

    def on_epoch_end(self, epoch, metrics):
        self.calls.append(("epoch", epoch, metrics))
        return self.stop_at is not None and epoch >= self.stop_at

    def on_train_end(self, summary):
        self.calls.append(("end", summary))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _same(a, b):
    return (a is None and (b is None or (isinstance(b, float) and math.isnan(b)))) or a == b


# ------------------------------------------------------------------------------------------ units
def test_ema_decay_warmup_and_update():
    assert ema_decay(1, 0.9999, 2000) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))
    assert ema_decay(10**6, 0.9999, 2000) == pytest.approx(0.9999)
    assert ema_decay(5, 0.9, 0) == 0.9
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5, warmup_steps=0)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(2.0)
        model[1].num_batches_tracked.fill_(7)
    assert ema.update(model) == 0.5
    torch.testing.assert_close(ema.module[0].weight, start["0.weight"] + 1.0)    # half-way towards the model
    assert int(ema.module[1].num_batches_tracked) == 7                           # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_early_stopping_counts_epochs_since_best():
    es = EarlyStopping(patience=2)
    assert es.update(0, 0.10) and not es.should_stop(0)
    assert not es.update(1, 0.05) and not es.should_stop(1)
    assert es.update(2, 0.20) and es.best_epoch == 2
    assert not es.update(3, float("nan")) and not es.should_stop(3)
    assert not es.update(4, 0.20) and es.should_stop(4)          # equal is no improvement
    assert not EarlyStopping(None).should_stop(100)
    restored = EarlyStopping(2)
    restored.load_state_dict(es.state_dict())
    assert (restored.best, restored.best_epoch) == (0.20, 2)


# ---------------------------------------------------------------------------------------- fit runs
def test_fit_writes_config_metrics_checkpoints_and_summary(tmp_path, synth_root):
    cfg = dset.load_config("rtdetr_r18", tiny(synth_root, "train.lr=2e-4"))
    rec = Recorder()
    summary = fit(cfg, tmp_path, callbacks=rec)

    assert summary["status"] == "completed" and summary["metrics"][M.EPOCHS_RUN] == 2
    assert summary["num_classes"] == 4 and summary["num_train_images"] == 8 and summary["num_val_images"] == 4
    # no test split: the model is scored on the images that selected it
    assert summary["selection_split"] == "val" and summary["score_split"] == "val"
    assert summary["eligible_epochs"] == [0, 1] and "num_test_images" not in summary
    assert not any(k.startswith(M.TEST_PREFIX) for k in summary["metrics"])
    assert not (tmp_path / "eval" / "test_detections.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    # the resolved configuration, num_classes taken from the data set (the preset says 80)
    saved = dset.load_config(tmp_path / "config.yaml")
    assert saved.model.num_classes == 4 and saved.to_dict() == dset.load_config(cfg, ["model.num_classes=4"]).to_dict()

    lines = _lines(tmp_path / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [0, 1] and [m["counts"]["step"] for m in lines] == [2, 4]
    for m in lines:
        for key in ("train/loss", "train/loss_vfl", "train/loss_bbox", "train/loss_giou", "train/loss_vfl_aux_0",
                    "train/loss_bbox_dn_0", "val/mAP", "val/mAP50", "val/mAP75", "val/AR100", "val/AP/circle",
                    "val/AP/cross", M.EPOCH_TIME, "lr/new", "lr/new_no_decay"):
            assert key in m, key
        terms = sum(v for k, v in m.items() if k.startswith("train/loss_"))
        assert m["train/loss"] == pytest.approx(terms, rel=1e-5)      # the total is the sum of the named terms
        counts = m["counts"]
        assert counts["train_images"] == 8 and counts["train_steps"] == 2 and counts["val_images"] == 4
        assert 0.0 <= m["val/mAP"] <= m["val/mAP50"] <= 1.0
    # lr at each epoch's first step: warm-up of 3 steps, 2 steps per epoch -> factors f(0), f(2)
    f = WarmupCosine(3, 4)
    assert lines[0]["lr/new"] == pytest.approx(2e-4 * f(0)) and lines[1]["lr/new"] == pytest.approx(2e-4 * f(2))

    # callbacks: start, one call per epoch with the file's record, end with the summary
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["start", "epoch", "epoch", "end"]
    info = rec.calls[0][1]
    assert info["num_classes"] == 4 and info["start_epoch"] == 0
    assert set(info["param_groups"]) == {"new", "new_no_decay"}
    for (_, epoch, metrics), line in zip(rec.calls[1:3], lines):
        assert epoch == line["epoch"] and set(metrics) == set(line)
        assert all(_same(line[k], metrics[k]) for k in line)
    assert rec.calls[3][1]["status"] == "completed"

    # checkpoints: full state in last.pt, the EMA weights of the best epoch in best.pt
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 4 and last["data_epoch"] == 2
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "early_stopping"} <= set(last)
    assert last["ema"]["updates"] == 4 and last["scheduler"]["last_epoch"] == 4
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["metrics"][M.BEST_EPOCH]
    assert best["metrics"][M.VAL_MAP] == pytest.approx(summary["metrics"][M.BEST_MAP])
    assert {"config", "epoch", "metrics", "ema", "label_to_category_id", "category_names"} <= set(best)
    assert "optimizer" not in best and "model" not in best   # nothing reads the raw weights from best.pt
    # stage 2 starts from best.pt (model.checkpoint): its EMA weights
    from dset.models.detector import load_checkpoint

    stage2 = dset.build_model(saved, load_weights=False)
    report = load_checkpoint(stage2, tmp_path / "checkpoints" / "best.pt")
    assert len(report.loaded) == len(best["ema"]["module"])
    torch.testing.assert_close(stage2.state_dict()["decoder.dec_score_head.2.weight"],
                               best["ema"]["module"]["decoder.dec_score_head.2.weight"])
    # the EMA differs from the raw weights but stays close to them
    w, e = last["model"]["decoder.dec_score_head.2.weight"], last["ema"]["module"]["decoder.dec_score_head.2.weight"]
    assert not torch.equal(w, e) and (w - e).abs().max() < 0.05

    # evaluating the saved run reproduces the metrics of its best epoch
    from dset.evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(tmp_path)
    assert ev["epoch"] == summary["metrics"][M.BEST_EPOCH] and ev["val_images"] == 4
    best_record = lines[summary["metrics"][M.BEST_EPOCH]]
    for k in ("mAP", "mAP50", "AR100"):
        assert ev[k] == pytest.approx(best_record[M.val_metric(k)], abs=1e-9)


def test_summary_reports_throughput_and_peak_memory(tmp_path, synth_root):
    import numpy as np

    # a peak of an earlier run in this process (here a 2 GiB array, touched, then freed) is not this run's
    rss_before = _rss_mb()
    ballast = np.ones(2**28)
    del ballast
    summary = fit(dset.load_config("rtdetr_r18", tiny(synth_root, "train.epochs=2", "train.eval_every=2")), tmp_path)
    m = summary["metrics"]
    assert (json.loads((tmp_path / "summary.json").read_text())["metrics"][M.TRAIN_IMAGES_PER_S]
            == m[M.TRAIN_IMAGES_PER_S])
    assert summary["train_images_processed"] == 16 and summary["eval_images_processed"] == 4   # one evaluation
    assert 0 < summary["train_seconds"] and 0 < summary["eval_seconds"]
    assert summary["train_seconds"] + summary["eval_seconds"] <= summary["train_time_s"]
    assert m[M.TRAIN_IMAGES_PER_S] == pytest.approx(16 / summary["train_seconds"])
    assert m[M.EVAL_IMAGES_PER_S] == pytest.approx(4 / summary["eval_seconds"])
    assert summary["device"] == "cpu" and m[M.PEAK_GPU_MEMORY_MB] is None
    assert 50 < m[M.PEAK_HOST_MEMORY_MB] < 64 * 1024      # torch alone is more than 50 MiB resident
    if rss_before is not None:   # Linux: the peak restarts with the run (else ru_maxrss: since the process started)
        assert m[M.PEAK_HOST_MEMORY_MB] < rss_before + 1536


def _rss_mb():
    """This process's resident memory (MiB) where its peak can be reset (Linux), else None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return None


def test_fit_dset_reports_pruning_and_expert_usage(tmp_path, synth_root):
    cfg = dset.load_config("dset_r18", tiny(synth_root, "model.token_pruning.warmup_epochs=1",
                                            "model.token_pruning.ramp_epochs=1", "model.token_pruning.min_tokens=1",
                                            "model.token_pruning.keep_ratio=0.5"))
    summary = fit(cfg, tmp_path)
    first, second = _lines(tmp_path / "metrics.jsonl")
    assert first[M.SCHEDULED_KEEP_RATIO] == 1.0 and first[M.KEEP_RATIO] == 1.0      # warm-up: no pruning
    assert second[M.SCHEDULED_KEEP_RATIO] == 0.5 and second[M.KEEP_RATIO] == 0.5    # 2x2 tokens at stride 32 -> 2
    for key in ("train/loss_enc_moe_balance", "train/loss_dec_moe_balance", "train/loss_pruning"):
        assert key in first and first[key] > 0
    for kind, layers in (("encoder_moe", 1), ("decoder_moe", 3)):
        for layer in range(layers):
            usage = [first[M.usage_metric(kind, layer, e)] for e in range(6)]
            assert sum(usage) == pytest.approx(1.0, abs=1e-5) and all(u >= 0 for u in usage)
            # the layer's routing entropy, in nats, of those shares
            assert first[M.entropy_metric(kind, layer)] == pytest.approx(
                -sum(u * math.log(u) for u in usage if u > 0), abs=1e-6)
        assert M.usage_metric(kind, layers, 0) not in first
    # the EMA model in best.pt prunes at the epoch it was saved at
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert int(best["ema"]["module"]["encoder.token_pruner.epoch"]) == best["epoch"]
    assert summary["status"] == "completed"


def test_callback_can_stop_the_run(tmp_path, synth_root):
    cfg = dset.load_config("rtdetr_r18", tiny(synth_root, "train.epochs=3", "train.keep_last_checkpoint=false"))
    rec = Recorder(stop_at=0)
    summary = fit(cfg, tmp_path, callbacks=[rec])
    assert summary["status"] == "stopped" and summary["stop_reason"] == "callback"
    assert summary["metrics"][M.EPOCHS_RUN] == 1 and len(_lines(tmp_path / "metrics.jsonl")) == 1
    assert [c[0] for c in rec.calls] == ["start", "epoch", "end"]
    # the resume state went once the run had ended; the weights stay
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 0


def test_early_stopping_keeps_best_checkpoint(tmp_path, synth_root, monkeypatch):
    maps = iter([0.5, 0.4, 0.3, 0.9])
    real = loop.evaluate_detections

    def fake_eval(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics["mAP"] = next(maps)
        return metrics

    monkeypatch.setattr(loop, "evaluate_detections", fake_eval)
    cfg = dset.load_config("rtdetr_r18", tiny(synth_root, "train.epochs=4", "train.early_stop_patience=2"))
    summary = fit(cfg, tmp_path)
    assert summary["status"] == "stopped" and summary["stop_reason"].startswith("early_stopping")
    m = summary["metrics"]
    assert m[M.EPOCHS_RUN] == 3 and m[M.BEST_EPOCH] == 0 and m[M.BEST_MAP] == 0.5
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 0
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


class LastPtWatcher(Callback):
    """Records, at each epoch end, whether checkpoints/last.pt exists and which epoch it holds."""

    def __init__(self, out):
        self.last, self.seen = out / "checkpoints" / "last.pt", []

    def on_epoch_end(self, epoch, metrics):
        held = torch.load(self.last, weights_only=True)["epoch"] if self.last.exists() else None
        self.seen.append((epoch, held, time.time()))


@pytest.mark.parametrize("minutes, keep_last, written", [
    (60, "true", [2]),              # minutes never pass: at the end only
    (1e-6, "true", [0, 1, 2]),      # they always pass: every epoch (the last one at the end of the run)
    (60, "false", []),              # the end's state would be deleted: never written
])
def test_resume_state_is_written_when_minutes_have_passed_and_at_the_end(tmp_path, synth_root, monkeypatch,
                                                                         minutes, keep_last, written):
    saves = []
    real_save = checkpoint.atomic_save

    def recording_save(obj, path):
        saves.append((path.name, obj["epoch"]))
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", recording_save)   # last.pt's writer
    if keep_last == "false":
        # a resume state left by an earlier, interrupted attempt: the completed run leaves none
        (tmp_path / "checkpoints").mkdir(parents=True)
        (tmp_path / "checkpoints" / "last.pt").write_bytes(b"stale")
    watcher = LastPtWatcher(tmp_path)
    cfg = dset.load_config("rtdetr_r18", tiny(synth_root, "train.epochs=3", f"train.checkpoint_every_minutes={minutes}",
                                              f"train.keep_last_checkpoint={keep_last}"))
    summary = fit(cfg, tmp_path, callbacks=None if keep_last == "false" else watcher)
    assert summary["status"] == "completed"
    assert [e for name, e in saves if name == "last.pt"] == written
    last = tmp_path / "checkpoints" / "last.pt"
    if keep_last == "false":
        assert not last.exists()
        return
    # what the callbacks saw: nothing before the first write, the newest epoch written by then after it
    held = [h for _, h, _ in watcher.seen]
    assert held == ([None, None, None] if minutes == 60 else [0, 1, 1])
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert last.stat().st_mtime >= watcher.seen[-1][2] - 1   # written after the last epoch's callbacks


@pytest.mark.parametrize("check_every", [1, 3])
def test_nan_loss_fails_with_step_and_name(tmp_path, synth_root, monkeypatch, check_every):
    """A NaN in one loss term at the second step fails the run naming that step: at once with
    train.loss_check_every=1 (naming the term too); with 3, at the third step's read-back, still naming the second."""
    real_build = loop.build_criterion
    calls = {"n": 0}

    def poisoned(cfg):
        criterion = real_build(cfg)
        forward = criterion.forward

        def bad_forward(outputs, targets):
            losses = forward(outputs, targets)
            calls["n"] += 1
            if calls["n"] == 2:  # the second step of the first epoch
                losses["loss_giou_aux_1"] = losses["loss_giou_aux_1"] * float("nan")
            return losses

        criterion.forward = bad_forward
        return criterion

    monkeypatch.setattr(loop, "build_criterion", poisoned)
    rec = Recorder()
    expected = r"epoch 0, step 1 .*loss_giou_aux_1=nan" if check_every == 1 else \
        r"epoch 0, step 1 \(global step 1\), found by the check every 3 steps"
    with pytest.raises(NonFiniteLossError, match=expected):
        # batch 2: 4 steps per epoch, so that the read-back after 3 comes before the epoch's end
        fit(dset.load_config("rtdetr_r18", tiny(synth_root, "data.batch_size=2",
                                                f"train.loss_check_every={check_every}")), tmp_path, callbacks=rec)
    assert calls["n"] == (2 if check_every == 1 else 3)   # found at the read-back, not later
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and re.search(expected, summary["error"])
    assert rec.calls[-1][0] == "end" and rec.calls[-1][1]["status"] == "failed"
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_nan_loss_in_an_epochs_last_steps_is_found_before_the_epoch_is_saved(tmp_path, synth_root, monkeypatch):
    """The read-back every 50 steps would come after the epoch's 2 steps: the check at the epoch's end finds the
    NaN first, so epoch 0's state with NaN weights is never saved."""
    real_build = loop.build_criterion

    def poisoned(cfg):
        criterion = real_build(cfg)
        forward = criterion.forward

        def bad_forward(outputs, targets):
            losses = forward(outputs, targets)
            return {k: v * float("nan") for k, v in losses.items()}

        criterion.forward = bad_forward
        return criterion

    monkeypatch.setattr(loop, "build_criterion", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 0 \(global step 0\), found by the check every 50"):
        fit(dset.load_config("rtdetr_r18", tiny(synth_root)), tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "metrics.jsonl").exists() or (tmp_path / "metrics.jsonl").read_text() == ""


def test_full_disk_at_a_checkpoint_is_a_clear_error_and_loses_no_work(tmp_path, synth_root, monkeypatch):
    """torch reports a full disk as 'PytorchStreamWriter failed writing file ...' from deep inside; the run
    says which checkpoint and how much room is left, keeps the previous checkpoint, and resumes later."""
    real_save = torch.save
    saves = []

    def full_disk_on_epoch_1_last(obj, f, *args, **kwargs):
        saves.append(str(f))
        if ".last.pt.tmp" in str(f) and obj["epoch"] == 1:
            with open(f, "wb") as partial:  # what a full disk leaves: a truncated file
                partial.write(b"PK\x03\x04 truncated")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/12: file write failed\nmore torch detail")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_epoch_1_last)
    cfg = dset.load_config("rtdetr_r18", tiny(synth_root, "train.checkpoint_every_minutes=1e-6"))  # every epoch
    with pytest.raises(CheckpointWriteError, match=r"last\.pt \(\d+ MB free.*file write failed$"):
        fit(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "CheckpointWriteError" in summary["error"]
    ckpt_files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpt_files == ["best.pt", "last.pt"]                      # no temporary file left behind
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0   # intact
    assert sum(".last.pt.tmp" in f for f in saves) == 2   # epochs 0 and 1: no second try on a full disk

    monkeypatch.setattr(torch, "save", real_save)         # room again: resume, nothing redone
    summary = fit(cfg, tmp_path, resume=True)
    assert summary["status"] == "completed" and [r["epoch"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1]


# -------------------------------------------------------------------------------------- command lines
def test_cli_budget_resolution(tmp_path):
    """One resolver (dset.config.resolve_config) for dset.train and studies; run.budget records the budget."""
    from dset.config import resolve_config

    cfg = resolve_config("rtdetr_r18", overrides=[])
    assert cfg.run.budget == "cpu"
    assert cfg.data.name == "synthetic" and cfg.train.epochs < 72 and cfg.data.image_size <= 256
    # overrides go on top of the budget
    cfg2 = resolve_config("dset_r18", overrides=["model.decoder_moe.top_k=2", "train.epochs=6"])
    assert cfg2.run.budget == "cpu" and cfg2.model.decoder_moe.top_k == 2 and cfg2.train.epochs == 6
    assert cfg2.data.image_size == cfg.data.image_size and cfg2.train.lr == cfg.train.lr
    # COCO data: no budget
    images, ann = tmp_path / "images", tmp_path / "a.json"
    images.mkdir()
    ann.write_text("{}")
    coco = ["data.name=coco", f"data.train.images={images}", f"data.train.annotations={ann}",
            f"data.val.images={images}", f"data.val.annotations={ann}"]
    cfg3 = resolve_config("rtdetr_r18", overrides=coco)
    assert cfg3.run.budget == "none" and cfg3.data.image_size == 640 and cfg3.train.epochs == 72
    # data paths without data.name=coco: an error naming the key, never the synthetic set instead
    with pytest.raises(ConfigError, match=r"data\.train\.images: .*data\.name=coco"):
        resolve_config("rtdetr_r18", overrides=coco[1:])
    # a YAML file with its own schedule: no budget; --budget none: the preset's schedule
    study = tmp_path / "study.yaml"
    study.write_text("base: rtdetr_r18\ntrain: {epochs: 5}\n")
    cfg4 = resolve_config(str(study), overrides=[])
    assert cfg4.run.budget == "none" and cfg4.train.epochs == 5 and cfg4.data.image_size == 640
    cfg5 = resolve_config("rtdetr_r18", budget="none", overrides=[])
    assert cfg5.run.budget == "none" and cfg5.train.epochs == 72
    cfg6 = resolve_config(str(study), budget="cpu", overrides=[])
    assert cfg6.run.budget == "cpu" and cfg6.train.epochs == cfg.train.epochs
    with pytest.raises(ConfigError, match="unknown budget"):
        resolve_config("rtdetr_r18", budget="nope", overrides=[])


def test_cli_data_paths_without_coco_are_refused(tmp_path, capsys):
    """``dset.train PRESET data.train.images=DIR ...`` without data.name=coco used to train on the synthetic
    set silently; now it stops before any work with the key named."""
    from dset.train import main

    images = tmp_path / "images"
    images.mkdir()
    code = main(["rtdetr_r18", f"data.train.images={images}", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.train.images" in err and "data.name=coco" in err
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_budget_keys(capsys):
    from dset.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("train.epochs", "data.image_size", "data.synthetic.num_train", "budget_cpu.yaml", "--resume"):
        assert key in out


def test_cli_reports_bad_data_without_traceback(tmp_path, capsys):
    from dset.train import main

    images = tmp_path / "images"
    images.mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    # options may stand between the preset and its overrides (argparse's intermixed parsing)
    args = ["rtdetr_r18", "--out", str(tmp_path / "run"), "data.name=coco", f"data.train.images={images}",
            f"data.train.annotations={bad}", f"data.val.images={images}", f"data.val.annotations={bad}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    # the data check refuses it before any work, naming the file and the problem
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"train: {bad} (Expecting property name" in err and "annotation file is not valid JSON" in err
    assert main(["rtdetr_r18", "train.epochz=3", "--out", str(tmp_path / "run")]) == 2
    assert "train.epochz" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
def test_cli_reports_unreadable_image_during_training(tmp_path, synth_root, capsys, workers):
    """An image that only fails when decoded (in the main process or in a loader worker) ends the run with
    one readable line naming the file, and summary.json records the failure."""
    import shutil

    from dset.data.synthetic import make_synthetic_coco
    from dset.train import main

    paths = make_synthetic_coco(root=synth_root, num_train=8, num_val=4, image_size=64, seed=0)
    images = tmp_path / "images"
    shutil.copytree(paths["train_images"], images)
    broken = sorted(images.iterdir())[3]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "run"
    args = ["rtdetr_r18", "data.name=coco", f"data.train.images={images}",
            f"data.train.annotations={paths['train_annotations']}", f"data.val.images={paths['val_images']}",
            f"data.val.annotations={paths['val_annotations']}", f"data.num_workers={workers}",
            *[o for o in tiny(synth_root) if not o.startswith("data.synthetic")], "--out", str(out), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image") and broken.name in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and broken.name in summary["error"] and "Traceback" not in summary["error"]


def test_cli_train_then_evaluate(tmp_path, synth_root, capsys):
    """A run with a test split: selected on val, scored once on test (metrics, files); dset.evaluate evaluates
    either split of the saved run."""
    from dset.evaluate import main as eval_main
    from dset.run_folder import TEST_DETECTIONS, TEST_GROUND_TRUTH
    from dset.train import main

    out = tmp_path / "run"
    assert main(["rtdetr_r18", *tiny(synth_root, "train.epochs=1", "data.synthetic.num_test=3"), "--out", str(out),
                 "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["selection_split"] == "val" and summary["score_split"] == "test"
    assert summary["num_test_images"] == 3 and summary["num_val_images"] == 4
    test_metrics = {k: v for k, v in summary["metrics"].items() if k.startswith(M.TEST_PREFIX)}
    assert {M.TEST_MAP, M.TEST_MAP50, M.TEST_MAP75, "test/AR100", "test/AP/circle"} <= set(test_metrics)
    # the test images (ids after the 8 train and 4 val ones) and their ground truth, in eval/detections.json's format
    truth = json.loads((out / TEST_GROUND_TRUTH).read_text())
    assert [im["id"] for im in truth["images"]] == [13, 14, 15] and truth["annotations"] and truth["categories"]
    dets = json.loads((out / TEST_DETECTIONS).read_text())
    assert dets["epoch"] == 0 and dets["image_ids"] == [13, 14, 15] and dets["detections"]
    assert {d["image_id"] for d in dets["detections"]} <= {13, 14, 15}
    assert set(dets) == set(json.loads((out / "eval" / "detections.json").read_text()))
    # scoring the saved detections against the saved ground truth gives the summary's test metrics
    from pycocotools.coco import COCO

    from dset.engine.coco_eval import coco_metrics

    gt = COCO()
    gt.dataset = truth
    gt.createIndex()
    rescored = coco_metrics(gt, dets["detections"])
    assert rescored["mAP"] == pytest.approx(test_metrics[M.TEST_MAP], abs=1e-12)
    assert rescored["mAP50"] == pytest.approx(test_metrics[M.TEST_MAP50], abs=1e-12)
    capsys.readouterr()
    assert eval_main([str(out), "--split", "test", "--json", str(tmp_path / "t.json")]) == 0
    assert "3 test images" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "t.json").read_text())
    assert evaluated["test_images"] == 3 and evaluated["split"] == "test"
    for k in ("mAP", "mAP50", "AR100"):
        assert evaluated[k] == pytest.approx(test_metrics[M.metric_on_test(k)], abs=1e-9)
    # the run's own validation split, then another data set given on the command line
    assert eval_main([str(out / "checkpoints" / "best.pt"), "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "mAP50" in printed and "AP circle" in printed
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["val_images"] == 4
    from dset.data.synthetic import make_synthetic_coco

    other = make_synthetic_coco(root=synth_root, num_train=1, num_val=3, image_size=64, seed=5)
    assert eval_main([str(out), "--data", other["val_images"], other["val_annotations"]]) == 0
    assert "3 given images" in capsys.readouterr().out
    assert eval_main([str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # best.pt keeps the EMA weights only; the raw ones are in last.pt
    assert eval_main([str(out / "checkpoints" / "best.pt"), "--weights", "model"]) == 2
    assert "no 'model' weights" in capsys.readouterr().err
    assert eval_main([str(out / "checkpoints" / "last.pt"), "--weights", "model"]) == 0
    assert "model weights" in capsys.readouterr().out


def test_cli_sigterm_interrupts_training_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM reaches fit() as KeyboardInterrupt (which writes the resume state, see
    test_resume.py); the CLI says how to resume and puts the previous handler back."""
    from dset.train import main

    def fit_until_sigterm(cfg, out, resume=False):
        signal.raise_signal(signal.SIGTERM)
        time.sleep(30)   # not reached: the handler raises
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(loop, "fit", fit_until_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["rtdetr_r18", "--out", str(tmp_path / "run"), "-q"]) == 130
    assert "python -m dset.train --resume --out" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------------------ measured as it runs
def test_a_flat_map_pruning_run_is_reported_at_its_target_keep_ratio(tmp_path, synth_root, monkeypatch):
    """mAP that never improves would make epoch 0 (unpruned, in the warm-up) the best: the reported checkpoint,
    its detections and its GFLOPs would be those of a dense model. The best epoch is chosen among those at the
    target ratio, so the run is profiled pruned."""
    real = loop.evaluate_detections

    def flat(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics["mAP"] = 0.25
        return metrics

    monkeypatch.setattr(loop, "evaluate_detections", flat)
    # 64 px: a 2x2 stride-32 map, 4 tokens; keep 1.0 (epoch 0), 0.75 (epoch 1), 0.5 from epoch 2 on
    cfg = dset.load_config("dset_r18", tiny(synth_root, "train.epochs=4", "train.profile=true",
                                            "model.token_pruning.keep_ratio=0.5", "model.token_pruning.min_tokens=1",
                                            "model.token_pruning.warmup_epochs=1", "model.token_pruning.ramp_epochs=2"))
    summary = fit(cfg, tmp_path)
    m = summary["metrics"]
    assert m[M.BEST_EPOCH] == 2                        # the first epoch at the target ratio
    assert m[M.PROFILE_TOKENS] == 4 and m[M.PROFILE_KEPT_TOKENS] == 2
    assert m[M.PROFILE_KEEP_RATIO] == 0.5
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and int(best["ema"]["module"]["encoder.token_pruner.epoch"]) == 2
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert detections["epoch"] == 2 and detections["image_ids"] == [9, 10, 11, 12]
    truth = json.loads((tmp_path / "eval" / "ground_truth.json").read_text())
    assert [im["id"] for im in truth["images"]] == [9, 10, 11, 12] and truth["categories"]


def test_a_pruning_schedule_that_never_reaches_its_target_is_refused(synth_root):
    with pytest.raises(ConfigError, match="model.token_pruning.warmup_epochs: .* reach the target keep ratio at "
                                          "epoch 5, after the run's 4 epochs"):
        dset.load_config("dset_r18", tiny(synth_root, "train.epochs=4", "model.token_pruning.warmup_epochs=2",
                                          "model.token_pruning.ramp_epochs=3"))


# ---------------------------------------------------------------------------------------- the recipe
def test_multi_scale_sizes_are_the_references_scaled_to_the_image_size():
    from dset.config import MULTI_SCALE_SIZES_640, multi_scale_sizes

    assert multi_scale_sizes(640) == list(MULTI_SCALE_SIZES_640)
    assert multi_scale_sizes(128) == [96] * 3 + [128] * 7 + [160] * 3
    assert set(multi_scale_sizes(320)) == {256, 288, 320, 352, 384}
    assert all(s % 32 == 0 for s in multi_scale_sizes(416))


def test_multi_scale_and_strong_augmentation_stop_at_the_stop_epoch(tmp_path, synth_root, monkeypatch):
    """Per training batch, one size drawn from the scaled reference list (v1 and v2); from data.stop_epoch on
    (v2's policy), neither multi-scale nor the strong augmentations."""
    from dset.data.transforms import StopEpochPolicy
    from dset.models.detector import Detector

    epoch = {"now": -1}
    sizes, pipelines = [], []
    real_forward, real_set_epoch, real_call = Detector.forward, Detector.set_epoch, StopEpochPolicy.__call__

    def set_epoch(self, e):
        epoch["now"] = e
        return real_set_epoch(self, e)

    def forward(self, images, targets=None):
        if self.training:
            sizes.append((epoch["now"], tuple(images.shape[-2:])))
        return real_forward(self, images, targets)

    def call(self, *inputs):
        pipelines.append((self.epoch, "strong" if self.active is self.strong else "plain"))
        return real_call(self, *inputs)

    monkeypatch.setattr(Detector, "set_epoch", set_epoch)
    monkeypatch.setattr(Detector, "forward", forward)
    monkeypatch.setattr(StopEpochPolicy, "__call__", call)
    cfg = dset.load_config("rtdetr_r18", tiny(synth_root, "data.image_size=128", "model.eval_spatial_size=[128,128]",
                                              "data.batch_size=1", "data.augment=rtdetr", "data.multi_scale=true",
                                              "data.stop_epoch=2", "train.epochs=3"))
    fit(cfg, tmp_path)
    before = [s for e, s in sizes if e < 2]
    after = [s for e, s in sizes if e == 2]
    assert len(before) == 16 and len(after) == 8
    assert {s for s in before} <= {(96, 96), (128, 128), (160, 160)} and len(set(before)) > 1
    assert set(after) == {(128, 128)}
    assert {p for e, p in pipelines if e < 2} == {"strong"} and {p for e, p in pipelines if e == 2} == {"plain"}
    assert len(pipelines) == 24
