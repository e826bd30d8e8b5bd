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
- Latency: eval mode, ``torch.inference_mode``, batch 1 unless stated, warm-up runs then the median of
  timed runs; several models are timed round-robin in one process so that they share conditions.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
import warnings

import torch
import torch.nn as nn

from .analytic import aifi_layer_macs  # noqa: F401  (re-exported: the formula the counts are checked against)
from .models.moe import MoEFFN, fvcore_op_handles

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


class _OutputsAsTuple(nn.Module):
    """fvcore traces with torch.jit, which wants tensors out, not a dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        return out["pred_logits"], out["pred_boxes"]


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
    wrapper = _OutputsAsTuple(model)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(models: dict[str, nn.Module], size: int | tuple[int, int] = 640, device: str = "cpu",
                    batch_size: int = 1, warmup: int = 3, repeats: int = 10, seed: int = 0) -> dict[str, dict]:
    """Median latency (ms) and FPS of each model's eval forward, timed round-robin in one process."""
    device = torch.device(device)
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.rand(batch_size, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    states = {}
    for name, model in models.items():
        states[name] = model.training
        model.eval().to(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for model in models.values():
                    model(images)
            _sync(device)
            for _ in range(repeats):
                for name, model in models.items():
                    _sync(device)
                    start = time.perf_counter()
                    model(images)
                    _sync(device)
                    times[name].append((time.perf_counter() - start) * 1000)
    finally:
        for name, model in models.items():
            model.train(states[name])
    out = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {"latency_ms": median, "latency_ms_min": min(ts), "latency_ms_max": max(ts),
                     "fps": 1000.0 * batch_size / median, "batch_size": batch_size, "repeats": repeats,
                     "device": device_name(device)}
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
        info["token_pruning"] = {"keep_ratio_in_force": pruner.current_keep_ratio(), "target_keep_ratio": pruner.keep_ratio,
                                 "min_tokens": pruner.min_tokens, "epoch": pruner._epoch}
    return info


def profile_models(models: dict[str, nn.Module], size: int = 640, device: str = "cpu", flops_inputs: int = 3,
                   warmup: int = 3, repeats: int = 10, batch_size: int = 1) -> dict[str, dict]:
    """Everything ``python -m dset.profile`` prints, for several models measured side by side."""
    results = {}
    for name, model in models.items():
        model.eval()
        sparse = sparse_summary(model)
        n_inputs = flops_inputs if sparse else 1  # a dense model's FLOPs do not depend on the input
        # traced where the weights are (a model fit() trained on a GPU is there): the count does not depend on it
        where = next(model.parameters()).device
        results[name] = {"model": name, "params": count_params(model), "active_params": count_active_params(model),
                         "size": size, **count_flops(model, size, num_inputs=n_inputs, device=where),
                         "sparse": sparse}
        results[name].pop("gflops_by_module")
    timing = measure_latency(models, size, device, batch_size, warmup, repeats)
    for name in models:
        results[name].update(timing[name])
    return results


def profile_model(model: nn.Module, size: int = 640, device: str = "cpu", **kwargs) -> dict:
    return profile_models({"model": model}, size, device, **kwargs)["model"]
