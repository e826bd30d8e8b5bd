"""The CUDA paths, which the CPU-only test suite never runs: fp32 forward parity CPU vs GPU, AMP training
(float16 autocast + GradScaler) through ``fit``, evaluation and profiling on the GPU, ``torchrun`` on CUDA, an
NCCL process group with DDP + SyncBatchNorm around a DSET model, the deployed-latency protocol (CUDA graphs and
bf16 against fp32 eager, CUDA-event timing), and the MoE grouped-GEMM path (``DSET_MOE_GROUPED_MM=1``) against the
default dispatch.

Every test is marked ``cuda`` and skipped without a GPU: ``python -m pytest -q -m cuda tests/test_cuda.py``
(``.ci/device-check`` runs them on a GPU machine). Sizes are tiny (128 px, a few steps): the whole module
takes well under two minutes on one GPU, CUDA start-up included. The grouped-GEMM test comes last: an
asynchronous CUDA error in a kernel there cannot poison the CUDA context of the tests before it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SMALL_HEADS

import dset
from dset import metric_names as M
from dset.models.moe import MoEFFN, dense_moe_forward

HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False "
                       f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"),
]

REPO = Path(__file__).resolve().parents[1]
# a small model: 5 classes, 40 queries (the 128 px encoder has 16*16 + 8*8 + 4*4 = 336 tokens)
SMALL = ["model.num_classes=5", "model.decoder.num_queries=40", "model.decoder.num_denoising=20"]
# token pruning at its target ratio from epoch 0, on the 4 x 4 = 16 stride-32 tokens of a 128 px image
PRUNE_NOW = ["model.token_pruning.warmup_epochs=0", "model.token_pruning.ramp_epochs=0",
             "model.token_pruning.min_tokens=4"]


def _gpu_name() -> str:
    return torch.cuda.get_device_name(0)


@pytest.fixture
def exact_fp32():
    """fp32 matmuls and convolutions in full precision (no TF32) for the duration of a test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


# ---------------------------------------------------------------------------------- a. forward parity
@pytest.mark.parametrize("preset", ["rtdetr_r18", "dset_r18"])
def test_cpu_and_cuda_fp32_forward_agree(preset, exact_fp32, monkeypatch):
    """Same weights, same images, eval mode: the GPU gives the CPU's encoder maps, logits and boxes (fp32,
    TF32 off). For DSET also the same MoE routing (expert usage of every layer) and the same tokens kept."""
    monkeypatch.setenv("DSET_MOE_GROUPED_MM", "0")
    overrides = SMALL + (PRUNE_NOW if preset.startswith("dset") else [])
    torch.manual_seed(0)
    cpu_model = dset.build_model(preset, overrides).eval()
    cpu_model.set_epoch(0)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))

    def run(model, x):
        maps = []
        hook = model.encoder.register_forward_hook(lambda m, i, out: maps.extend(t.detach().float().cpu() for t in out))
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            hook.remove()
        usage = [m.usage.detach().cpu() for m in model.encoder_moe_layers() + model.decoder_moe_layers()]
        kept = (model.encoder.last_pruning or {}).get("tokens_after")
        return {k: v.float().cpu() for k, v in out.items()}, maps, usage, kept

    ref, ref_maps, ref_usage, ref_kept = run(cpu_model, images)
    got, got_maps, got_usage, got_kept = run(gpu_model, images.cuda())
    assert next(gpu_model.parameters()).is_cuda

    assert len(got_maps) == len(ref_maps) == 3
    for level, (a, b) in enumerate(zip(got_maps, ref_maps)):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=lambda m, level=level: f"encoder map {level}: {m}")
    if preset.startswith("dset"):
        assert ref_kept == got_kept == 12        # keep_count(16 stride-32 tokens, 0.7, min 4)
        assert len(ref_usage) == 1 + 3           # one AIFI layer + three decoder layers
        for i, (a, b) in enumerate(zip(got_usage, ref_usage)):
            assert torch.equal(a, b), f"MoE layer {i}: expert usage differs CPU {b.tolist()} vs CUDA {a.tolist()}"
    assert got["pred_logits"].shape == ref["pred_logits"].shape == (2, 40, 5)
    torch.testing.assert_close(got["pred_logits"], ref["pred_logits"], atol=1e-3, rtol=1e-3)
    # Boxes: the decoder's queries are the encoder's top-k anchors by score, and an untrained model at 128 px
    # scores many anchors within float rounding of each other, so CPU and GPU may pick a different anchor of a
    # tie (seen on an H200: one query of dset_r18 whose logits agreed to 1e-3 had another box). Every other
    # query must agree to 2e-4; at most one query per image may be such a tie.
    box_ok = ((got["pred_boxes"] - ref["pred_boxes"]).abs() <= 2e-4 + 1e-3 * ref["pred_boxes"].abs()).all(-1)
    assert int((~box_ok).sum(-1).max()) <= 1, f"queries whose boxes differ per image: {(~box_ok).sum(-1).tolist()}"
    # the comparison has teeth: the outputs are not constant (a model that ignored its input would pass)
    assert ref["pred_logits"].std() > 1e-2 and ref["pred_boxes"].std() > 1e-3


# ------------------------------------------------------------------------------ e. profile / measure
@pytest.fixture(scope="module")
def r18_640():
    """RT-DETR R18 (CPU, eval) and its CPU FLOP count at 640 px."""
    pytest.importorskip("fvcore", reason="fvcore (FLOP counting) is not installed: install the wheels in .whl/ first")
    from dset.measure import count_flops

    torch.manual_seed(0)
    model = dset.build_model("rtdetr_r18").eval()
    return model, count_flops(model, 640)["gflops"]


def test_profile_model_on_cuda_counts_the_cpu_flops_and_times_the_gpu(r18_640):
    """``profile_model(cpu_model, device="cuda")`` (what ``python -m dset.profile --device cuda`` does): GFLOPs
    equal to the CPU count, a positive GPU latency, the device named by its GPU name; and the fvcore trace run
    on the GPU counts the same FLOPs as on the CPU."""
    from dset.measure import count_flops
    from dset.model_profile import profile_model

    model, cpu_flops = r18_640
    assert 55 < cpu_flops < 65                               # RT-DETR R18 at 640 px: about 60 GFLOPs
    prof = profile_model(copy.deepcopy(model), size=640, device="cuda", warmup=2, repeats=5)
    assert prof["gflops"] == pytest.approx(cpu_flops, rel=1e-6)
    assert prof["device"] == _gpu_name()
    assert 0 < prof["latency_ms_min"] <= prof["latency_ms"] <= prof["latency_ms_max"]
    assert prof["latency_ms"] < 1000                         # batch 1 at 640 px on a GPU: milliseconds
    assert prof["fps"] == pytest.approx(1000.0 / prof["latency_ms"], rel=1e-9)
    gpu_model = copy.deepcopy(model).cuda()
    assert count_flops(gpu_model, 640, device="cuda")["gflops"] == pytest.approx(cpu_flops, rel=1e-6)


def test_profile_model_of_a_model_already_on_cuda(r18_640):
    """``profile_model`` of a model whose weights are already on the GPU, as ``fit``'s final profile
    (``train.profile``) passes its EMA model on a CUDA run: same GFLOPs as the CPU count, a GPU latency."""
    from dset.model_profile import profile_model

    model, cpu_flops = r18_640
    gpu_model = copy.deepcopy(model).cuda()
    prof = profile_model(gpu_model, size=640, device="cuda", warmup=1, repeats=3)
    assert prof["gflops"] == pytest.approx(cpu_flops, rel=1e-6)
    assert prof["latency_ms"] > 0 and prof["device"] == _gpu_name()


# ------------------------------------------------------------------------------- b. AMP training
def _tiny_cuda(root, *extra) -> list[str]:
    """DSET R18, 16 train / 8 val synthetic images of 128 px, batch 4 (4 steps per epoch), 2 epochs, on CUDA."""
    return ["data.synthetic.num_train=16", "data.synthetic.num_val=8", "data.synthetic.image_size=128",
            f"data.synthetic.root={root}", "data.image_size=128", "data.batch_size=4", "data.augment=flip",
            "model.eval_spatial_size=[128,128]", "model.decoder.num_queries=20", "model.decoder.num_denoising=8",
            *SMALL_HEADS, "model.token_pruning.min_tokens=4", "model.token_pruning.warmup_epochs=1",
            "model.token_pruning.ramp_epochs=0", "model.token_pruning.keep_ratio=0.5",
            "train.epochs=2", "train.warmup_steps=3", "train.ema_warmup_steps=10", "run.progress=false",
            "run.device=cuda", *extra]


@pytest.mark.parametrize("amp_dtype", ["bfloat16", "float16"])
def test_amp_training_on_cuda(tmp_path, monkeypatch, amp_dtype):
    """``fit`` with ``train.amp=true`` on CUDA: the forward runs in ``train.amp_dtype`` under autocast on
    channels-last convolutions, the GradScaler is on for float16 only (its state is checkpointed), losses stay
    finite, the run completes, evaluation and the final profile run on the GPU, and evaluating the checkpoint again
    (CUDA, then CPU) gives the run's mAP."""
    from dset.engine import loop as train_mod
    from dset.evaluate import evaluate_checkpoint

    monkeypatch.setenv("DSET_MOE_GROUPED_MM", "0")
    seen_dtypes: set = set()
    seen_layouts: set = set()
    if hasattr(train_mod, "build_training_model"):
        original = train_mod.build_training_model

        def recording(cfg, *args, **kwargs):
            model, *rest = original(cfg, *args, **kwargs)

            def hook(module, inputs, out):
                if module.training:
                    seen_dtypes.add(out.dtype)
                    seen_layouts.add(module.weight.is_contiguous(memory_format=torch.channels_last))

            first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            first_conv.register_forward_hook(hook)
            return (model, *rest)

        monkeypatch.setattr(train_mod, "build_training_model", recording)

    out = tmp_path / "run"
    cfg = dset.load_config("dset_r18", _tiny_cuda(tmp_path / "synthetic", "train.amp=true", "train.profile=true",
                                                  f"train.amp_dtype={amp_dtype}"))
    summary = train_mod.fit(cfg, out)

    assert summary["status"] == "completed", summary.get("error")
    assert summary["metrics"][M.EPOCHS_RUN] == 2 and summary["global_step"] == 8
    assert summary["device"] == "cuda:0" and summary["world_size"] == 1
    scaling = amp_dtype == "float16"
    assert summary["precision"] == ("fp16 autocast + loss scaling" if scaling else "bf16 autocast")
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    if hasattr(train_mod, "build_training_model"):
        expected = getattr(torch, amp_dtype)
        assert seen_dtypes == {expected}, f"training convolution output dtypes {seen_dtypes}: autocast not on"
        assert seen_layouts == {True}, "the convolutions' weights are not channels-last (train.channels_last)"

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["epoch"] for m in lines] == [0, 1]
    for m in lines:
        losses = {k: v for k, v in m.items() if k.startswith(M.TRAIN_LOSS_PREFIX)}
        assert losses and all(v is not None and math.isfinite(v) for v in losses.values()), losses
        assert "train/loss_enc_moe_balance" in m and "train/loss_dec_moe_balance" in m and "train/loss_pruning" in m
        assert m["counts"]["train_steps"] == 4 and m["counts"]["val_images"] == 8
        assert 0.0 <= m[M.VAL_MAP] <= 1.0
    # token pruning: off in epoch 0 (warm-up), at its target 0.5 in epoch 1 (rounded up per multi-scale size:
    # 5 of 9 tokens at 96 px, 8 of 16 at 128, 13 of 25 at 160)
    assert lines[0][M.KEEP_RATIO] == 1.0 and lines[1][M.SCHEDULED_KEEP_RATIO] == 0.5
    assert 0.5 <= lines[1][M.KEEP_RATIO] <= 5 / 9

    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    scaler = ckpt["scaler"]
    if scaling:
        assert "scale" in scaler, f"GradScaler state {scaler}: the scaler was disabled"
        assert math.isfinite(float(scaler["scale"])) and float(scaler["scale"]) > 0
    else:   # bfloat16 has float32's range: no loss scaling
        assert scaler == {}, f"GradScaler state {scaler}: a scaler ran under bf16"
    # the master weights stay float32 under AMP
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())

    # throughput / memory keys (asserted when this version of fit writes them)
    final_metrics = summary["metrics"]
    if M.PEAK_GPU_MEMORY_MB in final_metrics:
        assert final_metrics[M.PEAK_GPU_MEMORY_MB] is not None and final_metrics[M.PEAK_GPU_MEMORY_MB] > 0
    if M.TRAIN_IMAGES_PER_S in final_metrics:
        assert final_metrics[M.TRAIN_IMAGES_PER_S] is not None and final_metrics[M.TRAIN_IMAGES_PER_S] > 0
    if M.EVAL_IMAGES_PER_S in final_metrics:
        assert final_metrics[M.EVAL_IMAGES_PER_S] is not None and final_metrics[M.EVAL_IMAGES_PER_S] > 0

    # evaluating the saved EMA weights again gives the run's last mAP on CUDA, and about the same on CPU
    final = lines[-1]
    ev_gpu = evaluate_checkpoint(out / "checkpoints" / "last.pt", overrides=["run.device=cuda"])
    ev_cpu = evaluate_checkpoint(out / "checkpoints" / "last.pt", overrides=["run.device=cpu"])
    for key in ("mAP", "mAP50", "AR100"):
        assert ev_gpu[key] == pytest.approx(final[M.val_metric(key)], abs=1e-3), key
        assert ev_cpu[key] == pytest.approx(final[M.val_metric(key)], abs=1e-2), key

    # train.profile=true: the final model measured on the GPU (needs fvcore, shipped in .whl/)
    try:
        import fvcore  # noqa: F401
    except ImportError:
        return
    assert "profile_error" not in summary, summary.get("profile_error")
    assert summary["latency_device"] == _gpu_name()
    assert summary["metrics"][M.GFLOPS] > 0 and summary["metrics"][M.LATENCY_MS] > 0


# ------------------------------------------------------------------------------- d. torchrun, NCCL
def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "4")
    return env


def test_torchrun_on_cuda(tmp_path):
    """``torchrun --nproc_per_node 1 -m dset.train ... run.device=cuda``: exits 0, the run completes on cuda:0.
    (With one process WORLD_SIZE is 1 and fit creates no process group: NCCL is checked by the next test.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "dset.train", "dset_r18",
           *_tiny_cuda(tmp_path / "synthetic", "train.epochs=1", "model.token_pruning.warmup_epochs=0",
                       "train.amp=true", "train.profile=false"),
           "--out", str(out), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["metrics"][M.EPOCHS_RUN] == 1
    assert summary["world_size"] == 1 and summary["device"] == "cuda:0"
    assert "ddp_params_in_sync" not in summary               # one process: no DDP wrapper
    if M.PEAK_GPU_MEMORY_MB in summary["metrics"]:
        assert summary["metrics"][M.PEAK_GPU_MEMORY_MB] > 0


NCCL_DDP_SCRIPT = textwrap.dedent("""
    # one torchrun process: an NCCL process group and DDP around a DSET model, set up as fit() does with
    # several processes (SyncBatchNorm, device_ids, find_unused_parameters), two AMP training steps
    import json, math, os, sys
    import torch, torch.distributed as dist
    from torch import nn
    sys.path.insert(0, os.path.join(os.environ["DSET_REPO"], "tests"))
    import dset
    from dset.models.criterion import build_criterion, total_loss
    from conftest import random_targets

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl")
    t = torch.full((4,), float(dist.get_rank() + 1), device=dev)
    dist.all_reduce(t)
    cfg = dset.load_config("dset_r18", json.loads(os.environ["DSET_OVERRIDES"]))
    torch.manual_seed(0)
    core = dset.build_model(cfg).to(dev)
    core.set_epoch(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(core)
    n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index], find_unused_parameters=True)
    criterion = build_criterion(cfg).to(dev)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)   # few steps: avoid skipping them all on overflow
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        images = torch.rand(2, 3, 128, 128, generator=g).to(dev)
        targets = [{k: v.to(dev) for k, v in t_.items()} for t_ in random_targets(2, 5, [3, 1], g)]
        with torch.autocast("cuda", dtype=torch.float16):
            outputs = ddp(images, targets)
        loss = total_loss(criterion(outputs, targets))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    v = torch.cuda.nccl.version()
    result = {"backend": str(dist.get_backend()), "world_size": dist.get_world_size(), "all_reduce": t.tolist(),
              "losses": losses, "changed": changed, "params": len(before), "sync_bn": n_sync,
              "scale": float(scaler.get_scale()), "nccl": ".".join(map(str, v)) if isinstance(v, tuple) else str(v)}
    dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)
""")


def test_nccl_process_group_with_ddp_and_sync_batchnorm(tmp_path):
    """NCCL initialises on this machine and DDP + SyncBatchNorm + AMP train a DSET model (MoE experts without
    tokens, token pruning: find_unused_parameters) on the GPU. One process only: NCCL refuses two ranks on
    one GPU, so several ranks need a machine with several GPUs."""
    script = tmp_path / "nccl_ddp.py"
    script.write_text(NCCL_DDP_SCRIPT)
    overrides = SMALL + PRUNE_NOW + SMALL_HEADS
    env = {**_env(), "DSET_REPO": str(REPO), "DSET_OVERRIDES": json.dumps(overrides), "DSET_MOE_GROUPED_MM": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["backend"] == "nccl" and r["world_size"] == 1
    assert r["all_reduce"] == [1.0] * 4
    assert r["sync_bn"] > 0                                   # the backbone's and neck's BatchNorms were converted
    assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
    assert r["changed"] > 0 and r["scale"] > 0                # the optimizer stepped


# ---------------------------------------------------------------- f. the deployed-latency protocol
def _top_scores(logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Each image's ``k`` best query scores, sorted: what detection keeps, blind to the order of tied queries."""
    return logits.float().sigmoid().amax(-1).sort(-1, descending=True).values[:, :k].cpu()


def _protocol_model(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = dset.build_model(preset, SMALL + (PRUNE_NOW if preset.startswith("dset") else []),
                             load_weights=False).eval()
    model.set_deployed_epoch(None)
    return model


@pytest.mark.parametrize("preset", ["rtdetr_r18", "dset_r18"])
def test_cuda_graphs_and_bf16_agree_with_fp32_eager(preset, exact_fp32):
    """The whole forward captured as a CUDA graph (MoE on its static dispatch) gives eager fp32's outputs, for the
    input it was captured on and for another one copied into its static buffer; bf16 autocast (eager and in a
    graph) gives the same best scores within bf16's rounding."""
    from dset.inference_modes import inference_runner

    model = _protocol_model(preset).cuda()
    generator = torch.Generator().manual_seed(1)
    x, other = (torch.rand(2, 3, 128, 128, generator=generator).cuda() for _ in range(2))
    with torch.inference_mode():
        ref, ref_other = model(x), model(other)
    graph = inference_runner(model, "fp32", "cudagraphs", x)
    for images, expected in ((x, ref), (other, ref_other)):
        out = {k: v.clone() for k, v in graph(images).items()}
        torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], atol=1e-4, rtol=1e-4)
        box_ok = ((out["pred_boxes"] - expected["pred_boxes"]).abs() <= 2e-4 + 1e-3 * expected["pred_boxes"].abs()
                  ).all(-1)
        assert int((~box_ok).sum(-1).max()) <= 1   # at most one tied query per image (see the parity test above)
    assert not torch.equal(ref["pred_logits"], ref_other["pred_logits"])   # the graph followed its new input
    graph.close()
    for mode in ("eager", "cudagraphs"):
        runner = inference_runner(model, "bf16", mode, x)
        out = runner(x)
        assert out["pred_logits"].dtype == torch.bfloat16
        diff = (_top_scores(out["pred_logits"]) - _top_scores(ref["pred_logits"])).abs().max().item()
        assert 0 < diff < 0.05, (mode, diff)   # bf16 keeps 8 bits of mantissa: scores within a few 1e-3
        runner.close()


def test_the_protocol_on_cuda_times_with_cuda_events_and_names_the_gpu(capsys):
    """``python -m dset.profile ... --device cuda --precisions fp32,bf16 --modes eager,cudagraphs --batch-sizes 1,2``
    for RT-DETR R18 and DSET R18 at 128 px in a worker process per batch size (one, to keep the CUDA start-ups few;
    the CPU tests cover several): every combination timed (CUDA events), p90 >= p50 > 0, the GPU, driver, torch,
    CUDA and cuDNN versions printed first."""
    from dset.profile import main

    overrides = [a for o in SMALL + PRUNE_NOW for a in ("--set", o)]
    assert main(["rtdetr_r18", "dset_r18", "--size", "128", "--device", "cuda", "--json", "--no-onnx",
                 "--warmup", "5", "--repeats", "5", "--processes", "1", "--flops-inputs", "1",
                 "--precisions", "fp32,bf16", "--modes", "eager,cudagraphs", "--batch-sizes", "1,2", *overrides]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"measured on {_gpu_name()}, driver ")
    assert f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" in captured.err
    for line in captured.out.strip().splitlines():
        r = json.loads(line)
        assert r["environment"]["device"] == _gpu_name() and r["environment"]["driver"] != "unknown"
        assert sorted((e["batch_size"], e["precision"], e["mode"]) for e in r["inference"]) == sorted(
            (b, p, m) for b in (1, 2) for p in ("fp32", "bf16") for m in ("eager", "cudagraphs"))
        for e in r["inference"]:
            assert "not_timed" not in e, e
            assert e["measured"]["timer"] == "CUDA events" and e["measured"]["device"] == _gpu_name()
            assert len(e["latency_ms_rounds"]) == 1 and len(e["latency_ms_rounds"][0]) == 5
            assert 0 < e["latency_ms_p50"] <= e["latency_ms_p90"] < 1000


# -------------------------------------------------------------------------- c. MoE grouped GEMM path
def _grouped_mm_problem(dtype: torch.dtype) -> str | None:
    """Why ``torch._grouped_mm`` cannot serve ``dtype`` on this GPU (None when it can): a tiny call in the
    layout MoEFFN uses, checked against per-group matmuls."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return f"torch {torch.__version__} has no torch._grouped_mm"
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(64, 32, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(4, 48, 32, device="cuda", dtype=dtype, generator=g)      # [E, out, in] like MoEFFN.w1
    offs = torch.tensor([16, 16, 40, 64], device="cuda", dtype=torch.int32)  # an empty group too
    try:
        y = fn(a, w.transpose(1, 2), offs=offs)
        torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) torch._grouped_mm unusable for {dtype} on "
                f"{_gpu_name()} (capability {torch.cuda.get_device_capability(0)}): {first}")
    ref = torch.cat([a[s:e].float() @ w[i].float().t() for i, (s, e) in enumerate(zip([0, 16, 16, 40], offs.tolist()))])
    tol = 1e-3 if dtype == torch.float32 else 0.1
    if not torch.allclose(y.float(), ref, atol=tol, rtol=tol):
        pytest.fail(f"torch._grouped_mm gives wrong results for {dtype} on {_gpu_name()}: max error "
                    f"{_max_diff(y, ref):.3g} (torch {torch.__version__})")
    return None


@pytest.mark.parametrize("case", ["fp32", "bf16", "fp32_autocast_fp16"])
def test_moe_grouped_mm_path_equals_default_path(case, exact_fp32, monkeypatch):
    """``DSET_MOE_GROUPED_MM=1`` on CUDA: the grouped-GEMM dispatch runs (``last_dispatch``), with the default
    (padded) and the per-expert loop dispatch's output, and the fp32 oracle's; in fp32 the gradients too.
    ``fp32_autocast_fp16`` is what AMP training feeds the layer: fp32 weights and input under float16 autocast.
    Skipped, saying why, where this torch has no usable grouped GEMM for the dtype."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp32_autocast_fp16": torch.float32}[case]
    autocast = case.endswith("autocast_fp16")
    problem = _grouped_mm_problem(dtype)
    if problem is not None:
        pytest.skip(problem)

    torch.manual_seed(0)
    ref_moe = MoEFFN(256, 1024, 6, 3, activation="gelu").eval()
    with torch.no_grad():
        ref_moe.router.weight.normal_(0.0, 0.3)               # spread routing: every expert gets tokens
    x = torch.randn(2, 300, 256, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    m = copy.deepcopy(ref_moe).to("cuda", dtype)
    # the "run every expert and mask" reference, on the GPU in the same precision (so with the same routing)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        oracle = dense_moe_forward(m, x).float().cpu()

    def run(flag: str, pad_limit: float | None = None):
        monkeypatch.setenv("DSET_MOE_GROUPED_MM", flag)
        if pad_limit is not None:
            m.pad_waste_limit = pad_limit
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            y = m(x)
        torch.cuda.synchronize()
        return y.float().cpu(), m.last_dispatch, m.usage.cpu()

    y_padded, d_padded, usage = run("0", float("inf"))
    y_loop, d_loop, _ = run("0", 0.0)
    m.pad_waste_limit = MoEFFN.pad_waste_limit
    assert (d_padded, d_loop) == ("padded", "loop")
    assert bool((usage > 0).all()), usage
    y_gmm, d_gmm, usage_gmm = run("1")
    assert d_gmm == "grouped_mm"
    assert torch.equal(usage_gmm, usage)                      # same routing
    assert torch.isfinite(y_gmm).all()

    # fp32: TF32 is off, so all paths agree closely; bf16/fp16 round differently (bias added apart, ...)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 and not autocast else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y_gmm, y_padded, **tol)
    torch.testing.assert_close(y_gmm, y_loop, **tol)
    torch.testing.assert_close(y_gmm, oracle, **tol)
    if case != "fp32":
        return
    # gradients through the grouped path equal the default path's
    m.train()
    g = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("DSET_MOE_GROUPED_MM", flag)
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        (m(xg) * g).sum().backward()
        grads[flag] = [t.grad.detach().cpu() for t in (xg, m.w1, m.b1, m.w2, m.b2, m.router.weight)]
    assert m.last_dispatch == "grouped_mm"
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2", "router.weight"), grads["0"], grads["1"]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=lambda msg, name=name: f"grad {name}: {msg}")
