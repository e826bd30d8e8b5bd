"""``python -m dset.profile PRESET [PRESET ...] [--size 640] [--json]``: parameters, GFLOPs by
component, latency and FPS, for several models measured side by side in one process; and the deployed
speed: eager PyTorch next to ONNX Runtime (CPU; TensorRT and CUDA too where onnxruntime has them and a GPU is
present) at batch 1 and 8, every model and runtime timed round-robin (``--no-onnx`` skips it).

Latency is timed side by side in ``--processes K`` separate processes (default 3; :mod:`dset.latency_benchmark`):
in each, after warm-up, ``--repeats`` rounds that call every model once in a shuffled order. Each model's latency
is the median of all its timed calls; "vs <first model>" gives the change with a 95% interval (Student t over
the processes' median per-round log ratios) that includes the spread between processes. ``--processes 0`` times
the models in this process only (the interval is then a bootstrap over its rounds, between-process spread left out).

DSET models are measured in their trained state: the pruning schedules (token and memory) are set to their end
(``--epoch`` overrides), so pruning runs at the target keep ratio.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .config import ConfigError, load_config
from .export import ExportError
from .latency_benchmark import LatencyBenchmarkError, ModelSpec
from .model_profile import profile_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dset.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="preset names or YAML files (e.g. rtdetr_r18 dset_r18)")
    parser.add_argument("--size", type=int, default=640, help="square input size in pixels (default 640)")
    parser.add_argument("--device", default="cpu", help="device for latency (FLOPs are counted on CPU)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per process (default 10)")
    parser.add_argument("--processes", type=int, default=3,
                        help="separate processes the latency is timed in, one after the other (default 3; 0: only in "
                             "this process, without the between-process spread)")
    parser.add_argument("--flops-inputs", type=int, default=3, help="random inputs to average DSET FLOPs over")
    parser.add_argument("--epoch", type=int, default=None,
                        help="epoch for the pruning schedules (default: the end of each ramp)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration override applied to every model (repeatable)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="skip the deployed speed (ONNX export and ONNX Runtime timing)")
    parser.add_argument("--deploy-batch-sizes", default="1,8", metavar="B,B",
                        help="batch sizes of the deployed-speed comparison (default 1,8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    args = parser.parse_intermixed_args(argv)
    try:
        deploy_batches = tuple(int(b) for b in args.deploy_batch_sizes.split(","))
        if not deploy_batches or min(deploy_batches) < 1:
            raise ValueError
    except ValueError:
        parser.error("--deploy-batch-sizes must be positive integers separated by commas, "
                     f"got {args.deploy_batch_sizes!r}")
    if args.processes < 0:
        parser.error(f"--processes must be >= 0, got {args.processes}")
    if args.size <= 0 or args.size % 32:
        parser.error(f"--size must be a positive multiple of 32 (the backbone's stride), got {args.size}")

    from .models.detector import build_model

    models = {}
    try:
        for name in args.models:
            cfg = load_config(name, args.overrides)
            models[name] = build_model(cfg)
            models[name].set_deployed_epoch(args.epoch)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # how each latency process builds the same models
    specs = [ModelSpec(name, name, tuple(args.overrides), epoch=args.epoch) for name in models]
    torch.manual_seed(0)
    try:
        results = profile_models(models, args.size, args.device, args.flops_inputs, args.warmup, args.repeats,
                                 args.batch_size, deployment=not args.no_onnx, deployment_batch_sizes=deploy_batches,
                                 processes=args.processes, latency_specs=specs)
    except (ValueError, ExportError, LatencyBenchmarkError) as exc:  # e.g. more queries than tokens at a small --size
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, r in results.items():
        if args.json:
            print(json.dumps(r))
        else:
            comp = ", ".join(f"{k} {v:.2f}" for k, v in r["gflops_by_component"].items())
            print(f"{name}: {r['params']:,} params ({r['active_params']:,} active), {r['gflops']:.2f} GFLOPs "
                  f"({comp}), {r['latency_ms']:.1f} ms = {r['fps']:.1f} FPS on {r['device']}, "
                  f"batch {r['batch_size']}, {args.size}x{args.size}")
            if "vs_first" in r:
                v = r["vs_first"]
                print(f"  vs {v['baseline']}: GFLOPs {v['gflops_change_percent']:+.1f}%, latency "
                      f"{v['latency_change_percent']:+.1f}% (95% interval {v['latency_change_low_percent']:+.1f} to "
                      f"{v['latency_change_high_percent']:+.1f}%; {v['processes']} process(es) x {v['rounds']} "
                      f"paired rounds, {v['interval']})")
            if "deployment" in r:
                print(deployment_lines(r["deployment"]))
    return 0


def deployment_lines(d: dict) -> str:
    """The deployed-speed block of one model as text: one line per runtime, then the ONNX check."""
    lines = []
    for runtime, by_batch in d["runtimes"].items():
        cells = "; ".join(f"batch {b}: {t['latency_ms']:.1f} ms, {t['fps']:.1f} images/s" for b, t in by_batch.items())
        lines.append(f"  {runtime} ({next(iter(by_batch.values()))['device']}): {cells}")
    c = d["onnx_check"]
    lines.append(f"  ONNX vs PyTorch: max |difference| pred_logits {c['pred_logits']:.1e}, pred_boxes "
                 f"{c['pred_boxes']:.1e} ({c['images']} images, {c['reordered_queries']} tied queries reordered)")
    lines += [f"  not timed: {runtime}: {why}" for runtime, why in d["not_timed"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
