"""DDP: the training command under torchrun with 2 CPU processes (gloo), on DSET R18 (MoE layers whose
unused experts get no gradient, token pruning) so that every reduction across ranks is exercised."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import one_thread

from dset import metric_names as M
from dset.evaluate import evaluate_checkpoint


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on CPU is exercised on Linux/macOS")
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dset.train", "dset_r18",
           "data.synthetic.num_train=8", "data.synthetic.num_val=5", "data.synthetic.image_size=64",
           f"data.synthetic.root={tmp_path / 'synthetic'}", "data.image_size=64", "data.batch_size=1",
           "data.augment=flip", "model.eval_spatial_size=[64,64]", "model.decoder.num_queries=20",
           "model.decoder.num_denoising=8", "model.encoder.hidden_dim=128",
           "model.encoder.dim_feedforward=256", "model.decoder.dim_feedforward=256", "train.epochs=2",
           "train.warmup_steps=2", "train.profile=false", "model.token_pruning.min_tokens=1",
           "model.token_pruning.warmup_epochs=1", "model.token_pruning.ramp_epochs=0",
           "model.token_pruning.keep_ratio=0.5",
           "run.device=cpu", "--out", str(out), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["ddp_params_in_sync"] is True          # gradients were averaged: both ranks hold the same weights
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]          # written once per epoch: only rank 0 writes
    for m in lines:
        assert m["counts"]["train_images"] == 8           # 4 per rank, summed
        assert m["counts"]["train_steps"] == 8            # 4 steps of batch 1 on each of the 2 ranks
        assert m["counts"]["step"] in (4, 8)              # optimizer steps of one rank
        assert m["counts"]["val_images"] == 5             # 3 + 2 images, gathered to rank 0
        for layer in range(3):                            # expert usage averaged over both ranks' forwards
            assert sum(m[M.usage_metric("decoder_moe", layer, e)] for e in range(6)) == pytest.approx(1.0)
    assert lines[0][M.KEEP_RATIO] == 1.0 and lines[1][M.KEEP_RATIO] == 0.5    # 2 of the 4 stride-32 tokens
    # the gathered evaluation equals a single-process evaluation of the same weights, bit for bit: after 2 epochs
    # many detections' scores tie to float rounding, so both sides must run the very same kernels on every image:
    # one thread (as each rank) and batch 1, so that no image shares a batch (the ranks batch images 0, 2, 4 and
    # 1, 3; a single process 0, 1, ...: other GEMM shapes round differently, as they did on an AMD EPYC, mAP
    # 7.33e-5 against the ranks' 7.16e-5, and on another CPU 8.0e-4 against 7.9e-4)
    with one_thread():
        ev = evaluate_checkpoint(out / "checkpoints" / "last.pt", overrides=["run.device=cpu"])
    for key in ("mAP", "mAP50", "AR100"):
        assert ev[key] == lines[-1][M.val_metric(key)]
