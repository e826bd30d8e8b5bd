"""``python -m dset.bench train``: the training step cut into parts, on CPU at 64 px (dset/bench_train.py)."""

from __future__ import annotations

import json

import pytest
import torch

from dset.bench import main as bench_main
from dset.bench_train import PARTS, StepBench, bench_train
from dset.config import resolve_config

# 8 synthetic images of 64 px, batch 2 (4 steps a pass), 10 queries: seconds per model on a CPU; the learning
# rate at its peak from the first step (a warm-up of 2000 steps would move weights near 1 by less than a float32 ulp)
TINY = ["data.image_size=64", "data.batch_size=2", "model.decoder.num_queries=10", "model.decoder.num_denoising=4",
        "model.eval_spatial_size=[64,64]", "data.synthetic.num_train=8", "data.synthetic.num_val=2",
        "data.synthetic.image_size=64", "run.device=cpu", "run.progress=false", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def result():
    return bench_train(["rtdetr_r18"], TINY, steps=2, warmup=2)


def test_every_part_timed(result):
    (m,) = result["models"]
    assert set(m["parts_ms"]) == set(PARTS) and set(m["shares"]) == set(PARTS)
    assert len(m["steps_ms"]) == 2 and m["images_per_step"] == [2, 2]
    for step in m["steps_ms"]:
        assert all(step[p] >= 0 for p in PARTS)
        # the model's forward, backward and optimizer step of a real R18 take milliseconds even at 64 px
        assert step["forward"] > 1 and step["backward"] > 1 and step["optimizer"] > 0.1
        # the matcher runs inside the loss and is a share of it
        assert 0 < step["matcher"] <= step["loss"]
    assert 0 < m["matcher_share_of_loss"] <= 1
    assert m["host_syncs"] is None   # counted on CUDA only


def test_parts_add_up_to_the_step(result):
    (m,) = result["models"]
    for step in m["steps_ms"]:
        # the parts are contiguous stretches of one clock: they add up to the step up to the 4-decimal rounding
        assert sum(step[p] for p in PARTS) == pytest.approx(step["step"], abs=1e-3)
    # ... and the steps to the wall time of the timed loop, measured around it: only the bench's own bookkeeping
    # between two steps (a new clock, a list append: microseconds) lies outside them; 5% (at least 20 ms)
    # leaves room for the scheduler of a shared 2-core machine
    timed = sum(s["step"] for s in m["steps_ms"])
    wall = result["timed_wall_ms"]
    assert timed <= wall + 1e-3
    assert wall - timed <= max(0.05 * wall, 20.0)
    # a share is the part's median over the sum of the parts' medians: they sum to 1
    median_sum = sum(m["parts_ms"].values())
    assert sum(m["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    for p in PARTS:
        assert m["shares"][p] == pytest.approx(m["parts_ms"][p] / median_sum, abs=1e-3)
        assert m["parts_ms"][p] == pytest.approx((m["steps_ms"][0][p] + m["steps_ms"][1][p]) / 2, abs=1e-3)
    # the median of two steps is their mean: the parts' medians then add up to the step's median too
    assert median_sum == pytest.approx(m["step_ms"], abs=1e-2)


def test_throughput_and_bound(result):
    (m,) = result["models"]
    assert m["images_per_s"] == pytest.approx(2 * 1000 / m["step_ms"], abs=0.0051)   # rounded to 2 decimals
    assert m["bound_by"] == max(PARTS, key=lambda p: m["shares"][p])
    assert m["shares"][m["bound_by"]] >= 1 / len(PARTS)


def test_a_real_optimizer_step(result):
    (m,) = result["models"]
    # four steps (2 warm-up, 2 timed) moved every trained tensor of RT-DETR (each gets a gradient)
    assert m["params_changed_share"] == 1.0 and m["update_norm"] > 0
    assert m["mean_loss"] > 0 and m["loader_passes"] == 1


def test_what_it_ran_on(result):
    (m,) = result["models"]
    assert result["device"] == "cpu" and result["torch"] == torch.__version__
    assert result["threads"] == torch.get_num_threads() and result["steps"] == 2 and result["warmup"] == 2
    assert (m["batch"], m["image_size"], m["workers"], m["num_queries"]) == (2, 64, 0, 10)
    # train.amp and train.channels_last are on, but they apply on CUDA only
    assert m["precision"] == "fp32" and m["channels_last"] is False and m["compiled"] is False
    assert m["loss_check_every"] == 50
    assert m["config_name"] == "rtdetr_r18" and m["epoch"] == 0 and m["keep_ratio"] is None


def test_the_step_is_the_training_loops_step():
    """Four bench steps leave the model, its EMA and the epoch's loss exactly where one epoch of
    ``TrainingRun.train_one_epoch`` (4 batches) leaves them: the bench times the real step."""
    from dset.bench_step import Clock
    from dset.data.loaders import set_loader_epoch
    from dset.engine.distributed import DistInfo
    from dset.engine.loop import TrainingRun

    cfg = resolve_config("rtdetr_r18", budget="none", overrides=TINY)
    bench = StepBench("rtdetr_r18", cfg)
    for _ in range(4):
        bench.step(Clock(torch.device("cpu")))
    bench_loss = bench.stats.mean_loss() * 4

    ref = TrainingRun(cfg, bench.run.folder.root, hooks=[], resume=False, dinfo=DistInfo())
    ref.model_core.set_epoch(0)
    ref.ema.module.set_epoch(0)
    set_loader_epoch(ref.train_loader, 0, cfg.run.seed, 0)
    stats = ref.train_one_epoch(0)
    assert stats["counts"]["train_steps"] == 4 and ref.global_step == bench.run.global_step == 4
    for (name, a), b in zip(ref.model_core.state_dict().items(), bench.run.model_core.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for a, b in zip(ref.ema.module.parameters(), bench.run.ema.module.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert bench_loss / 4 == pytest.approx(stats["train/loss"], rel=1e-6)
    bench.close()


def test_cli_json_both_models(capsys):
    assert bench_main(["train", "rtdetr_r18", "dset_r18", *TINY, "--steps", "1", "--warmup", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in out["models"]] == ["rtdetr_r18", "dset_r18"]
    for m in out["models"]:
        assert m["bound_by"] in PARTS and m["images_per_s"] > 0 and m["params_changed_share"] > 0.9
    # DSET's token pruner is on and, in epoch 0, still in its warm-up: it keeps every token
    assert out["models"][1]["config_name"] == "dset_r18" and out["models"][1]["keep_ratio"] == 1.0


def test_cli_table_and_trace(capsys, tmp_path):
    args = ["train", "rtdetr_r18", *TINY, "--steps", "1", "--warmup", "1", "--workers", "0", "--trace", str(tmp_path)]
    assert bench_main(args) == 0
    out = capsys.readouterr().out
    assert "rtdetr_r18" in out and "bound by:" in out and "images/s" in out
    for p in PARTS:
        assert p in out.splitlines()[1]
    trace = (tmp_path / "train_step_rtdetr_r18.json").read_text()
    assert all(f"step/{p}" in trace for p in ("data", "forward", "loss", "backward", "optimizer", "matcher"))


@pytest.mark.parametrize("args, message", [
    (["rtdetr_r18", "model.decoder.no_such_key=1"], "no_such_key"),
    (["no_such_preset", "run.device=cpu"], "no_such_preset"),
    (["rtdetr_r18", "run.device=cpu", "--steps", "0"], "--steps"),
    (["rtdetr_r18", "run.device=mps"], "run.device"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    assert bench_main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_cuda_events_host_time_and_syncs(tmp_path):
    """On CUDA the parts are CUDA-event intervals of the stream; the host's time and syncs come alongside."""
    cuda = [o for o in TINY if not o.startswith("run.device")] + ["run.device=cuda"]
    r = bench_train(["rtdetr_r18"], cuda, steps=3, warmup=2, trace=tmp_path)
    (m,) = r["models"]
    assert r["device"].startswith("cuda") and r["device_name"] == torch.cuda.get_device_name()
    assert m["precision"] == "amp fp16" and m["amp"] is True
    for step in m["steps_ms"]:
        # event intervals between consecutive boundaries telescope: they add up to the step
        assert sum(step[p] for p in PARTS) == pytest.approx(step["step"], abs=1e-2)
        assert all(step[p] >= 0 for p in PARTS) and 0 < step["matcher"] <= step["loss"] + 1e-3
    assert set(m["host_ms"]) == set(PARTS) and all(v >= 0 for v in m["host_ms"].values())
    # the loss check reads the loss on the host; the matcher copies its cost matrix to the host
    assert m["host_syncs"]["loss"] >= 1 and m["host_syncs"]["matcher"] >= 1
    assert m["params_changed_share"] > 0.9 and m["bound_by"] in PARTS
    assert "step/forward" in (tmp_path / "train_step_rtdetr_r18.json").read_text()
