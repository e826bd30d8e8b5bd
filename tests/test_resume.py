"""--resume: a run interrupted after epoch 1 (before its minutes to the next resume-state write had passed)
saves that epoch on the way out, and resumed ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_HEADS, one_thread_for_module

import dset
from dset import metric_names as M
from dset.config import ConfigError
from dset.engine.callbacks import Callback
from dset.engine.loop import fit

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_for_module)


def tiny(root, *extra):
    # rtdetr augmentation on purpose: resume must also restore the random state the augmentations draw from
    return ["data.synthetic.num_train=6", "data.synthetic.num_val=3", "data.synthetic.image_size=64",
            f"data.synthetic.root={root}", "data.image_size=64", "data.batch_size=4", "data.augment=rtdetr",
            "model.eval_spatial_size=[64,64]", "model.decoder.num_queries=20", "model.decoder.num_denoising=8",
            *SMALL_HEADS,
            "model.decoder.dropout=0.1", "train.epochs=3", "train.warmup_steps=3", "train.ema_warmup_steps=10",
            "train.lr=3e-4", "train.profile=false", "run.progress=false", "run.seed=7",
            "train.checkpoint_every_minutes=60", *extra]   # no periodic write: only the interruption's


class Kill(Callback):
    """Ctrl-C (or SIGTERM under dset.train) at the end of epoch ``at``, after that epoch's resume state was
    copied but long before it was due to be written. Records whether last.pt existed at each epoch end."""

    def __init__(self, at, out):
        self.at, self.last, self.existed = at, out / "checkpoints" / "last.pt", []

    def on_epoch_end(self, epoch, metrics):
        self.existed.append(self.last.exists())
        if epoch == self.at:
            raise KeyboardInterrupt("killed")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(module_tmp):
    root = module_tmp("synthetic")
    straight, resumed = module_tmp("straight"), module_tmp("resumed")
    cfg = dset.load_config("rtdetr_r18", tiny(root))
    fit(cfg, straight)
    kill = Kill(1, resumed)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, resumed, callbacks=kill)
    killed_summary = json.loads((resumed / "summary.json").read_text())
    killed_last = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    # a run killed between its metrics line and its checkpoint leaves an extra line: resume drops it
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 123.0}) + "\n")
    torch.manual_seed(12345)  # the resumed run must not depend on the state of this process
    summary = fit(cfg, resumed, resume=True)
    return {"cfg": cfg, "root": root, "straight": straight, "resumed": resumed, "summary": summary,
            "killed_summary": killed_summary, "kill": kill, "killed_last": killed_last}


def test_killed_run_is_recorded_as_failed(runs):
    assert runs["killed_summary"]["status"] == "failed" and "killed" in runs["killed_summary"]["error"]
    assert runs["summary"]["status"] == "completed" and runs["summary"]["metrics"][M.EPOCHS_RUN] == 3


def test_an_interruption_writes_the_newest_epoch_before_it_was_due(runs):
    assert runs["kill"].existed == [False, False]        # 60 minutes had not passed: nothing written yet
    assert runs["killed_last"]["epoch"] == 1 and runs["killed_last"]["global_step"] == 4
    assert {"model", "ema", "optimizer", "scheduler", "rng"} <= set(runs["killed_last"])


def test_resumed_metrics_equal_uninterrupted(runs):
    a, b = _lines(runs["straight"] / "metrics.jsonl"), _lines(runs["resumed"] / "metrics.jsonl")
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b] == [0, 1, 2]
    for ma, mb in zip(a, b):
        assert set(ma) == set(mb)
        for key in ma:
            if key == M.EPOCH_TIME:
                continue
            if isinstance(ma[key], float):
                assert mb[key] == pytest.approx(ma[key], rel=1e-6, abs=1e-9), key
            else:
                assert mb[key] == ma[key], key
    assert a[2]["train/loss"] != a[1]["train/loss"]  # the comparison is not trivially between constants


def test_resumed_weights_equal_uninterrupted(runs):
    a = torch.load(runs["straight"] / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(runs["resumed"] / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 6
    for part in ("model",):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-6, atol=1e-7, msg=f"{part} {k}")
    for k, v in a["ema"]["module"].items():
        torch.testing.assert_close(b["ema"]["module"][k], v, rtol=1e-6, atol=1e-7, msg=f"ema {k}")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    assert a["early_stopping"] == b["early_stopping"]
    # the optimizer moments too
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-5, atol=1e-9)


def test_resume_refuses_a_different_configuration(runs, tmp_path):
    cfg = dset.load_config("rtdetr_r18", tiny(runs["root"], "train.lr=1e-3"))
    before = (runs["resumed"] / "summary.json").read_text()
    with pytest.raises(ConfigError, match="train.lr"):
        fit(cfg, runs["resumed"], resume=True)
    assert (runs["resumed"] / "summary.json").read_text() == before   # the finished run is left alone


def test_cli_resume_of_a_finished_run_reads_its_config(runs, capsys):
    from dset.train import main

    out = runs["resumed"]
    before = (out / "metrics.jsonl").read_text()
    best = json.loads((out / "summary.json").read_text())["metrics"][M.BEST_MAP]
    assert main(["--resume", "--out", str(out), "-q"]) == 0      # no preset: OUT/config.yaml
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["status"] == "completed" and m[M.EPOCHS_RUN] == 3 and m[M.BEST_MAP] == best
    assert _lines(out / "metrics.jsonl")[-1]["epoch"] == 2
    assert (out / "metrics.jsonl").read_text() == before
