"""``python -m dset.profile PRESET [PRESET ...] [--size 640] [--json]``: parameters, GFLOPs by
component, latency and FPS, for several models measured side by side in one process; and the deployed
speed: eager PyTorch next to ONNX Runtime (CPU; TensorRT and CUDA too where onnxruntime has them and a GPU is
present) at batch 1 and 8, every model and runtime timed round-robin (``--no-onnx`` skips it).

Latency is timed side by side in ``--processes K`` separate processes (default 3; :mod:`dset.latency_benchmark`):
in each, after warm-up, ``--repeats`` rounds that call every model once in a shuffled order. Each model's latency
is the median of all its timed calls; "vs <first model>" gives the change with a 95% interval (Student t over
the processes' median per-round log ratios) that includes the spread between processes. ``--processes 0`` times
the models in this process only (the interval is then a bootstrap over its rounds, between-process spread left out).

The deployed-latency protocol (``--precisions fp32,bf16,fp16 --modes eager,compile,cudagraphs --batch-sizes 1,8``):
every model in every precision (bf16/fp16: ``torch.autocast``) and mode (eager, ``torch.compile``, CUDA graphs) at
each batch size, all of them timed interleaved as above, CUDA events on a GPU, p50 and p90; a combination that
cannot run on the device is listed as not timed, with why. ``docs/deployment.md`` describes it.

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
from .inference_modes import MODES, PRECISIONS, describe, parse_choices
from .latency_benchmark import LatencyBenchmarkError, ModelSpec, time_protocol
from .measure import environment, environment_line
from .model_profile import profile_models

CUDA_WARMUP = 200   # warm-up rounds by default on a GPU (clocks, cuDNN autotuning, torch.compile's recompiles)
CPU_WARMUP = 3      # on a CPU a 640 px forward takes ~0.5 s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dset.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="preset names or YAML files (e.g. rtdetr_r18 dset_r18)")
    parser.add_argument("--size", type=int, default=640, help="square input size in pixels (default 640)")
    parser.add_argument("--device", default="cpu", help="device for latency (FLOPs are counted on CPU)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the latency (default 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed warm-up rounds (default {CUDA_WARMUP} on a GPU, {CPU_WARMUP} on a CPU)")
    parser.add_argument("--precisions", default="fp32", metavar="P,P",
                        help=f"precisions of the deployed-latency protocol, from {','.join(PRECISIONS)} (default fp32; "
                             "bf16/fp16 run under torch.autocast)")
    parser.add_argument("--modes", default="eager", metavar="M,M",
                        help=f"modes of the deployed-latency protocol, from {','.join(MODES)} (default eager)")
    parser.add_argument("--batch-sizes", default=None, metavar="B,B",
                        help="batch sizes of the deployed-latency protocol (default: --batch-size alone)")
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
    deploy_batches = _batch_sizes(parser, "--deploy-batch-sizes", args.deploy_batch_sizes)
    batch_sizes = (_batch_sizes(parser, "--batch-sizes", args.batch_sizes) if args.batch_sizes is not None
                   else (args.batch_size,))
    try:
        precisions = parse_choices(args.precisions, PRECISIONS, "--precisions")
        modes = parse_choices(args.modes, MODES, "--modes")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be a torch device (cpu, cuda, cuda:1), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here (torch.cuda.is_available() is False)")
    if args.warmup is None:
        args.warmup = CUDA_WARMUP if device.type == "cuda" else CPU_WARMUP
    if args.warmup < 0 or args.repeats < 1 or min(batch_sizes) < 1:
        parser.error(f"--warmup must be >= 0 and --repeats, --batch-size >= 1; got --warmup {args.warmup}, "
                     f"--repeats {args.repeats}, --batch-size {args.batch_size}")
    # beyond today's single fp32 eager latency, the protocol times every combination at every batch size
    protocol = (precisions, modes, batch_sizes) != (("fp32",), ("eager",), (args.batch_size,))
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
    env = environment(device)
    # printed once, first: on stderr with --json, whose stdout is one JSON object per model
    print(environment_line(env), file=sys.stderr if args.json else sys.stdout)
    torch.manual_seed(0)
    try:
        results = profile_models(models, args.size, args.device, args.flops_inputs, args.warmup, args.repeats,
                                 args.batch_size, deployment=not args.no_onnx, deployment_batch_sizes=deploy_batches,
                                 processes=args.processes, latency_specs=specs)
        if protocol:
            by_batch = time_protocol(models, specs, args.size, args.device, batch_sizes, args.warmup, args.repeats,
                                     args.processes, precisions, modes)
    except (ValueError, ExportError, LatencyBenchmarkError) as exc:  # e.g. more queries than tokens at a small --size
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, r in results.items():
        r["environment"] = env
        if protocol:
            r["inference"] = inference_entries(name, by_batch)
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
            if "inference" in r:
                print(inference_lines(r["inference"]))
            if "deployment" in r:
                print(deployment_lines(r["deployment"]))
    return 0


def _batch_sizes(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
        if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
            raise ValueError
    except ValueError:
        parser.error(f"{flag} must be distinct positive integers separated by commas, got {text!r}")
    return sizes


MEASURED_ON = ("device", "environment", "image_size", "warmup", "rounds", "processes", "threads", "timer", "interval")


def inference_entries(model: str, by_batch: dict[int, dict]) -> list[dict]:
    """One model's share of the protocol (:func:`dset.latency_benchmark.time_protocol`): per batch size, precision
    and mode its p50/p90 and change against the baseline runner, or why it was not timed; each entry with what it
    was measured on."""
    entries = []
    for batch_size, bench in by_batch.items():
        measured = {k: bench.get(k) for k in MEASURED_ON}
        for label, m in bench["models"].items():
            if m.get("model") != model:
                continue
            entry = {"batch_size": batch_size, **{k: m[k] for k in ("precision", "precision_as_run", "mode")},
                     **{k: m[k] for k in ("latency_ms_p50", "latency_ms_p90", "fps", "latency_ms_by_process",
                                          "latency_ms_rounds")}, "measured": measured}
            if label in bench["changes"]:
                change = bench["changes"][label]
                entry["vs_baseline"] = {"baseline": bench["baseline"], **{
                    k: change[k] for k in ("latency_change_percent", "latency_change_low_percent",
                                           "latency_change_high_percent", "interval")}}
            entries.append(entry)
        for label, why in bench["not_timed"].items():
            runner = bench["runners"][label]
            if runner["model"] == model:
                entries.append({"batch_size": batch_size, **{k: runner[k] for k in ("precision", "mode")},
                                "not_timed": why, "measured": measured})
    return entries


def inference_lines(entries: list[dict]) -> str:
    """The protocol's block of one model as text: one line per batch size, precision and mode."""
    lines = []
    for e in entries:
        m, what = e["measured"], f"batch {e['batch_size']} {describe(e['precision'], e['mode'])}"
        if "not_timed" in e:
            lines.append(f"  {what}: not timed: {e['not_timed']}")
            continue
        vs = e.get("vs_baseline")
        change = (f"; vs {vs['baseline']} {vs['latency_change_percent']:+.1f}% ({vs['latency_change_low_percent']:+.1f}"
                  f" to {vs['latency_change_high_percent']:+.1f}%)" if vs else "")
        lines.append(f"  {what}: p50 {e['latency_ms_p50']:.2f} ms, "
                     f"p90 {e['latency_ms_p90']:.2f} ms, {e['fps']:.1f} images/s{change} [{m['device']}, "
                     f"{m['image_size']} px, warm-up {m['warmup']}, {m['processes']} process(es) x {m['rounds']} "
                     f"rounds, {m['timer']}]")
    return "\n".join(lines)


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
