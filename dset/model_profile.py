"""Profiles of several models measured side by side: parameters, GFLOPs, latency and deployed speed.

What ``python -m dset.profile`` prints and what a finished run records in ``summary.json``. The counting and timing
primitives are in :mod:`dset.measure`; latency in several processes is :mod:`dset.latency_benchmark`.
"""

from __future__ import annotations

from torch import nn

from .latency_benchmark import INTERVAL_ONE_PROCESS, run_benchmark
from .measure import (
    count_active_params,
    count_flops,
    count_params,
    deployment_latency,
    measure_latency,
    paired_latency_change,
    sparse_summary,
    timing_summary,
)


def profile_models(models: dict[str, nn.Module], size: int = 640, device: str = "cpu", flops_inputs: int = 3,
                   warmup: int = 3, repeats: int = 10, batch_size: int = 1, deployment: bool = False,
                   deployment_batch_sizes: tuple[int, ...] = (1, 8), processes: int = 0,
                   latency_specs: list | None = None) -> dict[str, dict]:
    """Everything ``python -m dset.profile`` prints, for several models measured side by side. With
    ``deployment``, also eager PyTorch next to ONNX Runtime at ``deployment_batch_sizes``
    (:func:`deployment_latency`), under the key ``deployment``.

    Latency: with ``processes`` = 0, the models given are timed round-robin in this process, and ``vs_first``'s
    interval is a bootstrap over its rounds. With ``processes`` >= 1, :func:`dset.latency_benchmark.run_benchmark`
    times them in that many separate processes, each building its models from ``latency_specs``
    (:class:`~dset.latency_benchmark.ModelSpec`, one per model, labelled by its name), in a shuffled order every
    round; ``vs_first``'s interval then includes the between-process spread (with 2 or more processes)."""
    if processes and [s.label for s in latency_specs or []] != list(models):
        raise ValueError(f"latency in {processes} processes needs one ModelSpec per model, labelled "
                         f"{list(models)}, got {[s.label for s in latency_specs or []]}")
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
    first = next(iter(models))
    if processes:
        bench = run_benchmark(latency_specs, size, device, batch_size, warmup, repeats, processes)
        timing, changes = {}, bench["changes"]
        for name, m in bench["models"].items():
            pooled = [ms for process in m["latency_ms_rounds"] for ms in process]
            timing[name] = {**timing_summary(pooled, batch_size, repeats, bench["device"]), "processes": processes,
                            "latency_ms_by_process": m["latency_ms_by_process"]}
    else:
        timing = measure_latency(models, size, device, batch_size, warmup, repeats)
        changes = {name: {**paired_latency_change(timing[first]["latency_ms_rounds"],
                                                  timing[name]["latency_ms_rounds"]),
                          "processes": 1, "interval": INTERVAL_ONE_PROCESS} for name in list(models)[1:]}
    for name in models:
        results[name].update(timing[name])
    for name in list(models)[1:]:  # each model against the first, measured side by side
        results[name]["vs_first"] = {
            **changes[name], "baseline": first,
            "gflops_change_percent": 100 * (results[name]["gflops"] / results[first]["gflops"] - 1)}
    if deployment:
        deployed = deployment_latency(models, size, device, deployment_batch_sizes, warmup, repeats)
        for name in models:
            results[name]["deployment"] = deployed[name]
    return results


def profile_model(model: nn.Module, size: int = 640, device: str = "cpu", **kwargs) -> dict:
    return profile_models({"model": model}, size, device, **kwargs)["model"]
