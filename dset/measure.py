"""Measurement: parameters (total and active), FLOPs by component, latency/FPS, sparse-mechanism use.

Conventions (every number says how it was made):
- FLOPs are counted with fvcore's ``FlopCountAnalysis`` on a traced forward. fvcore counts one
  multiply-add as one flop; we add handles for the operators it skips that matter here
  (``scaled_dot_product_attention``: Q K^T and A V, ``grid_sampler``: bilinear sampling, 4 per output
  value) and report GFLOPs = 2 x multiply-adds, the RT-DETR paper's convention.
- The trace records the computation actually done on that input: MoE layers count only the experts
  each token was routed to, token pruning only the kept tokens. DSET FLOPs are therefore averaged
  over several random inputs. While counting, MoE layers take their per-expert dispatch path, so the
  count is the routed work itself; the padded path that is faster on some devices also multiplies
  up to ``MoEFFN.pad_waste_limit`` x that work in padding rows, an implementation detail that the
  paper-convention GFLOPs leave out.
- Latency: eval mode, ``torch.inference_mode``, batch 1 unless stated, fp32 eager unless stated
  (:mod:`dset.inference_modes`: bf16/fp16 autocast, ``torch.compile``, CUDA graphs), warm-up runs then the median
  (and p90) of timed runs, timed with CUDA events on a GPU; several models are timed round-robin in one process so
  that they share conditions, and
  :mod:`dset.latency_benchmark` repeats that in several processes for an interval that includes the spread
  between processes.
- Deployed speed (:func:`deployment_latency`): each model exported to ONNX (:mod:`dset.export`) and run by
  ONNX Runtime with as many threads as torch uses, timed round-robin with eager PyTorch on the same images,
  at batch 1 and 8; images/s = batch / median latency.
"""

from __future__ import annotations

import itertools
import math
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .models.detector import TensorOutputs
from .models.moe import MoEFFN
from .models.moe_flops import fvcore_op_handles

COMPONENTS = ("backbone", "encoder", "decoder")
FLOPS_TOOL = "fvcore FlopCountAnalysis + handles for scaled_dot_product_attention and grid_sampler"


# ------------------------------------------------------------------------------------------- params
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_active_params(model: nn.Module) -> int:
    """Parameters used for one token: all dense parameters, the routers, and top_k of each MoE
    layer's experts (the other experts' weights are idle for that token)."""
    total = count_params(model)
    for m in model.modules():
        if isinstance(m, MoEFFN):
            per_expert = (m.w1[0].numel() + m.b1[0].numel() + m.w2[0].numel() + m.b2[0].numel())
            total -= (m.num_experts - m.top_k) * per_expert
    return total


# -------------------------------------------------------------------------------------------- flops
def _shape(value) -> list[int] | None:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def sdpa_flop_jit(inputs, outputs) -> int:
    """Multiply-adds of attention products: Q K^T (Lq x Lk x d) and A V (Lq x Lk x d) per batch and head."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    batch_heads = math.prod(q[:-2])
    return 2 * batch_heads * q[-2] * k[-2] * q[-1]


def grid_sampler_flop_jit(inputs, outputs) -> int:
    """Bilinear sampling: 4 multiply-adds per output value (N x C x Hout x Wout)."""
    out = _shape(outputs[0])
    return 4 * math.prod(out)


def count_flops(model: nn.Module, size: int | tuple[int, int] = 640, num_inputs: int = 1, batch_size: int = 1,
                device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """GFLOPs (2 x multiply-adds) of one eval forward, total and by component, averaged over
    ``num_inputs`` random images (uniform noise in [0, 1), the model's input range)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import touches deprecated torch.jit APIs
        from fvcore.nn import FlopCountAnalysis

    h, w = (size, size) if isinstance(size, int) else size
    was_training = model.training
    model.eval()
    wrapper = TensorOutputs(model)  # fvcore traces with torch.jit: tensors out
    generator = torch.Generator().manual_seed(seed)
    totals, parts = [], {c: [] for c in COMPONENTS}
    extra = {}
    moe_layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    saved_limits = [m.pad_waste_limit for m in moe_layers]
    for m in moe_layers:
        m.pad_waste_limit = 0.0  # per-expert path: count routed work, not padding
    try:
        for _ in range(num_inputs):
            images = torch.rand(batch_size, 3, h, w, generator=generator).to(device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about python values are expected
                analysis = FlopCountAnalysis(wrapper, images)
                analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
                analysis.set_op_handle("aten::grid_sampler", grid_sampler_flop_jit)
                analysis.set_op_handle(**fvcore_op_handles())  # MoE's batched and grouped matmuls
                analysis.unsupported_ops_warnings(False)
                analysis.uncalled_modules_warnings(False)
                analysis.tracer_warnings("none")
                by_module = analysis.by_module()
                totals.append(analysis.total())
            for c in COMPONENTS:
                parts[c].append(by_module.get(f"model.{c}", 0))
            for name, value in by_module.items():
                extra.setdefault(name, []).append(value)
    finally:
        model.train(was_training)
        for m, limit in zip(moe_layers, saved_limits):
            m.pad_waste_limit = limit
    gflops = lambda macs: 2 * statistics.fmean(macs) / 1e9  # noqa: E731
    return {
        "gflops": gflops(totals),
        "gflops_by_component": {c: gflops(parts[c]) for c in COMPONENTS},
        "gflops_by_module": {k[len("model."):]: gflops(v) for k, v in extra.items() if k.startswith("model.")},
        "flops_inputs": num_inputs,
        "flops_tool": FLOPS_TOOL,
    }


# ------------------------------------------------------------------------------------------ latency
def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def gpu_driver_version() -> str:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it, or "unknown" (no nvidia-smi, or it failed)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "unknown"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    versions = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
    return ", ".join(versions) if out.returncode == 0 and versions else "unknown"


def environment(device: torch.device | str) -> dict:
    """What latency is measured on: the device (a GPU's name and driver, or the CPU and its threads), torch, CUDA
    and cuDNN versions."""
    device = torch.device(device)
    env = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"}
    if device.type == "cuda":
        env["driver"] = gpu_driver_version()
    else:
        env.update({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()})
    return env


def environment_line(env: dict) -> str:
    """:func:`environment` as one line of text."""
    where = (f"{env['device']}, driver {env['driver']}" if "driver" in env else env["device"])
    return f"measured on {where}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(runners: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     sync: Callable[[], None] = lambda: None,
                     order_rng: random.Random | None = None, cuda_events: bool = False) -> dict[str, list[float]]:
    """Milliseconds of each call of each runner: ``warmup`` untimed rounds, then ``repeats`` rounds in which every
    runner is called once in turn, so that all of them share the machine's conditions (load, clocks, caches).
    With ``order_rng`` each timed round calls the runners in an order shuffled afresh, so that no runner always
    follows the same one (whose caches or clocks it would inherit).

    Each call starts after ``sync()`` (an idle GPU). The clock is ``time.perf_counter`` around the call and a
    ``sync()``; with ``cuda_events``, CUDA events recorded on the current stream before and after the call,
    read after the round's ``sync()`` (the GPU's own clock, from the call's first queued work to its last, the
    host's launch gaps included). Only for runners that queue their work on the current CUDA stream."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    sync()
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for _ in range(repeats):
        if order_rng is not None:
            order_rng.shuffle(names)
        events = []
        for name in names:
            run = runners[name]
            sync()
            if cuda_events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                events.append((name, start, end))
            else:
                start_s = time.perf_counter()
                run()
                sync()
                times[name].append((time.perf_counter() - start_s) * 1000)
        if events:
            sync()
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
    return times


def timing_summary(ts: list[float], batch_size: int, repeats: int, device: str) -> dict:
    """Median (p50), p90, min, max and FPS of timed calls (milliseconds), with what they were timed on."""
    median = statistics.median(ts)
    return {"latency_ms": median, "latency_ms_p50": median, "latency_ms_p90": float(np.percentile(ts, 90)),
            "latency_ms_min": min(ts), "latency_ms_max": max(ts),
            "fps": 1000.0 * batch_size / median, "batch_size": batch_size, "repeats": repeats, "device": device,
            "latency_ms_rounds": list(ts)}


def paired_latency_change(baseline_ms: list[float], model_ms: list[float], level: float = 0.95,
                          n_resamples: int = 2000, seed: int = 0) -> dict:
    """A model's latency against a baseline's, from the same round-robin rounds (each round times both under the
    same conditions): the median of the per-round ratios as a change in percent, and a percentile-bootstrap
    interval over rounds at ``level``."""
    if len(baseline_ms) != len(model_ms) or not baseline_ms:
        raise ValueError(f"paired latency needs the same rounds for both models, got {len(baseline_ms)} and "
                         f"{len(model_ms)} timings")
    ratios = np.asarray(model_ms, dtype=float) / np.asarray(baseline_ms, dtype=float)
    rng = np.random.default_rng(seed)
    resampled = np.median(rng.choice(ratios, size=(n_resamples, len(ratios)), replace=True), axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return {"latency_change_percent": 100 * (float(np.median(ratios)) - 1),
            "latency_change_low_percent": 100 * (float(low) - 1),
            "latency_change_high_percent": 100 * (float(high) - 1),
            "rounds": len(ratios), "level": level}


def runner_label(model: str, precision: str, mode: str, combinations: int) -> str:
    """A timed runner's name: the model's alone when one precision and mode is timed, else with them."""
    from .inference_modes import describe

    return model if combinations == 1 else f"{model} {describe(precision, mode)}"


def measure_latency(models: dict[str, nn.Module], size: int | tuple[int, int] = 640, device: str = "cpu",
                    batch_size: int = 1, warmup: int = 3, repeats: int = 10, seed: int = 0,
                    order_seed: int | None = None, precisions: tuple[str, ...] = ("fp32",),
                    modes: tuple[str, ...] = ("eager",)) -> dict[str, dict]:
    """Median and p90 latency (ms) and FPS (images/s) of each model's eval forward in each precision and mode
    (:func:`dset.inference_modes.inference_runner`), every runner timed round-robin in one process (in an order
    shuffled every round with ``order_seed``, see :func:`time_round_robin`; CUDA events on a GPU).

    One entry per runner (:func:`runner_label`) with its ``model``, ``precision`` and ``mode``; a combination that
    cannot run here has ``not_timed`` (why) instead of timings."""
    from .inference_modes import InferenceModeError, inference_runner, precision_label

    device = torch.device(device)
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.rand(batch_size, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    combinations = [(p, m) for p in precisions for m in modes]
    states = {}
    runners, out = {}, {}
    try:
        for name, model in models.items():
            states[name] = model.training
            model.eval().to(device)
            for precision, mode in combinations:
                label = runner_label(name, precision, mode, len(combinations))
                out[label] = {"model": name, "precision": precision, "precision_as_run": precision_label(precision),
                              "mode": mode}
                try:
                    runners[label] = inference_runner(model, precision, mode, images)
                except InferenceModeError as exc:
                    out[label]["not_timed"] = str(exc)
        order_rng = random.Random(order_seed) if order_seed is not None else None
        times = time_round_robin({label: (lambda r=r: r(images)) for label, r in runners.items()}, warmup, repeats,
                                 lambda: _sync(device), order_rng, cuda_events=device.type == "cuda")
    finally:
        for runner in runners.values():
            runner.close()
        for name, model in models.items():
            if name in states:
                model.train(states[name])
    timer = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    for label, ts in times.items():
        out[label].update({**timing_summary(ts, batch_size, repeats, device_name(device)), "timer": timer,
                           "warmup": warmup, "image_size": [h, w]})
    return out


# ------------------------------------------------------------------------------------ deployed speed
# ONNX Runtime providers timed besides the CPU one when this onnxruntime build has them and a GPU is present
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROVIDER_NAMES = {"CPUExecutionProvider": "onnxruntime_cpu", "CUDAExecutionProvider": "onnxruntime_cuda",
                  "TensorrtExecutionProvider": "onnxruntime_tensorrt"}


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers()))


def deployment_latency(models: dict[str, nn.Module], size: int = 640, device: str = "cpu",
                       batch_sizes: tuple[int, ...] = (1, 8), warmup: int = 3, repeats: int = 10,
                       seed: int = 0) -> dict[str, dict]:
    """Eager PyTorch (on ``device``) next to ONNX Runtime (its CPU provider; TensorRT and CUDA as well where this
    onnxruntime has them and a GPU is present) at each batch size, every model and runtime timed round-robin in
    one process on the same random images. Each model is exported with :func:`dset.export.export_onnx` and
    checked against eager PyTorch first (:func:`dset.export.compare_with_eager`).

    Returns per model ``{"runtimes": {"eager": {batch: timing}, "onnxruntime_cpu": {...}, ...}, "onnx_check":
    {...}, "onnxruntime": "<version>", "threads": n, "not_timed": {runtime: why}}``; a timing is what
    :func:`measure_latency` gives (``latency_ms`` per batch, ``fps`` = images/s)."""
    import copy
    import tempfile

    import onnxruntime as ort

    from .export import INPUT_NAME, compare_with_eager, export_onnx, onnxruntime_session

    torch_device = torch.device(device)
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    not_timed = {}
    for provider in GPU_PROVIDERS:
        if provider not in available:
            not_timed[PROVIDER_NAMES[provider]] = f"this onnxruntime build has no {provider}"
        elif not torch.cuda.is_available():
            not_timed[PROVIDER_NAMES[provider]] = "no CUDA GPU"
        else:
            providers.append(provider)
    h, w = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    images = {b: torch.rand(b, 3, h, w, generator=generator) for b in batch_sizes}
    out: dict[str, dict] = {}
    sessions: dict[tuple[str, str], object] = {}
    runtime_names = {PROVIDER_NAMES[p]: f"onnxruntime {ort.__version__} {p}" for p in providers}
    runtime_names["onnxruntime_cpu"] += f" ({torch.get_num_threads()} threads)"
    states = {name: model.training for name, model in models.items()}
    with tempfile.TemporaryDirectory(prefix="dset_onnx_") as tmp:
        for name, model in models.items():
            # exported from the CPU; a model elsewhere is copied there, so that the caller's stays where it is
            # (export_onnx and compare_with_eager leave the model as they found it)
            cpu_model = model if _on_cpu(model) else copy.deepcopy(model).cpu()
            path = export_onnx(cpu_model, Path(tmp) / f"model{len(out)}.onnx", (h, w))
            cpu_session = onnxruntime_session(path)
            out[name] = {"onnx_check": compare_with_eager(cpu_model, cpu_session, (h, w)),
                         "onnxruntime": ort.__version__, "threads": torch.get_num_threads(),
                         "not_timed": dict(not_timed), "runtimes": {}}
            del cpu_model
            sessions[(name, "CPUExecutionProvider")] = cpu_session
            for provider in providers[1:]:
                try:
                    sessions[(name, provider)] = onnxruntime_session(path, providers=[provider])
                except Exception as exc:  # noqa: BLE001 - e.g. TensorRT libraries missing: say so, time the rest
                    out[name]["not_timed"][PROVIDER_NAMES[provider]] = f"{type(exc).__name__}: {exc}"
        try:
            with torch.inference_mode():
                for model in models.values():
                    model.eval().to(torch_device)
                for b, x in images.items():
                    runners = {}
                    on_device, as_numpy = x.to(torch_device), x.numpy()
                    for name, model in models.items():
                        runners[(name, "eager")] = lambda m=model, x=on_device: m(x)
                        for (sname, provider), session in sessions.items():
                            if sname == name:
                                runners[(name, PROVIDER_NAMES[provider])] = (
                                    lambda s=session, x=as_numpy: s.run(None, {INPUT_NAME: x}))
                    times = time_round_robin(runners, warmup, repeats, lambda: _sync(torch_device))
                    for (name, runtime), ts in times.items():
                        where = device_name(torch_device) if runtime == "eager" else runtime_names[runtime]
                        out[name]["runtimes"].setdefault(runtime, {})[b] = timing_summary(ts, b, repeats, where)
        finally:
            for name, model in models.items():
                model.train(states[name])
    return out


# -------------------------------------------------------------------------------------- sparse use
def sparse_summary(model: nn.Module) -> dict:
    """Static description of the sparse mechanisms a model has (for profiles and reports)."""
    info: dict = {}
    enc = list(getattr(model, "encoder_moe_layers", lambda: [])())
    dec = list(getattr(model, "decoder_moe_layers", lambda: [])())
    if enc:
        info["encoder_moe"] = {"layers": len(enc), "num_experts": enc[0].num_experts, "top_k": enc[0].top_k,
                               "expert_hidden_dim": enc[0].hidden_dim}
    if dec:
        info["decoder_moe"] = {"layers": len(dec), "num_experts": dec[0].num_experts, "top_k": dec[0].top_k,
                               "expert_hidden_dim": dec[0].hidden_dim}
    pruner = getattr(model, "token_pruner", None)
    if pruner is not None:
        info["token_pruning"] = {"keep_ratio_in_force": pruner.current_keep_ratio(),
                                 "target_keep_ratio": pruner.keep_ratio, "min_tokens": pruner.min_tokens,
                                 "epoch": pruner._epoch}
    memory_pruner = getattr(model, "memory_pruner", None)
    if memory_pruner is not None:
        info["memory_pruning"] = {"keep_ratio_in_force": memory_pruner.current_keep_ratio(),
                                  "target_keep_ratio": memory_pruner.keep_ratio, "fill": memory_pruner.fill,
                                  "epoch": memory_pruner._epoch}
    return info
