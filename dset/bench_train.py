"""``python -m dset.bench train``: where the time of a training step goes, and which part bounds it.

    python -m dset.bench train [PRESET ...] [key=value ...] [--steps 10] [--warmup 3] [--workers N]
                               [--amp | --no-amp] [--epoch 0] [--budget none] [--trace DIR] [--json]

Each model (default ``rtdetr_r18 dset_r18``) is a :class:`dset.engine.loop.TrainingRun` built from
``resolve_config(preset, budget, overrides)`` (nothing is written), and its step is the body of
``TrainingRun.train_one_epoch``, cut into parts:

- ``data``: blocked on the loader's ``next()`` (with ``data.num_workers=0`` that is all of reading and
  augmenting; a new pass over the loader, when the steps outlast it, falls here too);
- ``copy``: host-to-device copy of images and targets, and the multi-scale resize;
- ``forward``: the model under autocast; ``loss``: the criterion (``matcher``: its Hungarian matcher, a share
  of ``loss``) and the loss check's host read of the loss;
- ``backward``; ``optimizer``: ``zero_grad``, unscale + gradient clipping, ``GradScaler`` step and update, the
  schedule and the EMA update; ``stats``: the epoch statistics (``EpochStats.add``).

CPU: ``time.perf_counter`` at every boundary. CUDA: also a CUDA event at every boundary, read once the timed
steps are done (timing adds no host sync); a part's time is then the time the GPU's stream took from the end
of the part before it to the end of this one, including the time it sat idle waiting for the host to issue
the work, so the parts add up to the step. ``host_ms`` is the host's time in the part: close to the part's
time when the host (Python, kernel launches, a sync) sets the pace, much smaller when the GPU does.
One more step counts the host syncs of each part (``torch.cuda.set_sync_debug_mode``; CUDA only).

The models are warmed up, then timed interleaved (one step of each per round). Per model: the median ms of
each part and of the step, each part's share (its median over the sum of the parts' medians), images/s
(batch / median step) and ``bound_by``, the part with the largest share. ``--trace DIR`` writes a
``torch.profiler`` chrome trace of two more steps per model (parts labelled ``step/<part>``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .bench_reference import REFERENCE_CONFIG, ReferenceStepBench, reference_folder
from .bench_step import PARTS, TRACE_STEPS, Clock, StepBench, TimedSteps, summarise
from .config import ConfigError, resolve_config
from .cpu_share import OtherCpuShare
from .engine.distributed import DistInfo, resolve_device
from .engine.errors import NonFiniteLossError, error_message

__all__ = ["PARTS", "bench_train", "add_command", "StepBench"]

DEFAULT_MODELS = ("rtdetr_r18", "dset_r18")

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def bench_train(models: list[str] | tuple[str, ...] = DEFAULT_MODELS, overrides: list[str] | None = None,
                steps: int = 10, warmup: int = 3, workers: int | None = None, amp: bool | None = None,
                epoch: int = 0, budget: str | None = "none", trace: str | os.PathLike | None = None,
                count_syncs: bool = True, reference: str | os.PathLike | None = None,
                reference_config: str = REFERENCE_CONFIG) -> dict:
    """Time the training step of each of ``models`` (presets or YAML files, all with ``overrides``), side by side
    in this process; the result (see the module docstring), its per-model entries under ``models``. With
    ``reference`` (a checkout of the reference RT-DETR), its own step too (:mod:`dset.bench_reference`), fed the
    first model's batches, every model at one size (multi-scale off), and ``vs_reference``: each model's images/s
    over the reference's."""

    if not models:
        raise ConfigError("no model to time: give presets or YAML files (e.g. rtdetr_r18 dset_r18)")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    extra = list(overrides or [])
    if workers is not None:
        extra.append(f"data.num_workers={workers}")
    if amp is not None:
        extra.append(f"train.amp={str(amp).lower()}")
    if reference is not None:
        reference_folder(reference)   # a wrong path is refused before anything is built
        extra.append("data.multi_scale=false")   # the same work for every model: a random size per step would not be
    configs = [(str(name), resolve_config(name, budget=budget, overrides=extra)) for name in models]  # errors first
    for name, cfg in configs:
        kind = resolve_device(cfg.run.device, DistInfo()).type
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"run.device: the train bench times CPU and CUDA steps, got {cfg.run.device!r} "
                              f"({name})")
    benches: list[TimedSteps] = []
    try:
        for name, cfg in configs:
            benches.append(StepBench(name, cfg, epoch=epoch))
        if reference is not None:
            benches.append(ReferenceStepBench(reference, configs[0][1], epoch=epoch, config=reference_config))
        device = benches[0].device
        for _ in range(warmup):
            for b in benches:
                b.step(Clock(b.device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        load = OtherCpuShare().start()
        t0 = time.perf_counter()
        for _ in range(steps):   # one step of each model per round: drift in the machine's speed hits all alike
            for b in benches:
                b.timed_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
        for b in benches:
            b.finish()
        other_cpu_share = load.stop()
        results = [summarise(b) for b in benches]
        for b, r in zip(benches, results):
            r["host_syncs"] = b.count_syncs() if count_syncs else None
            if trace is not None:
                r["trace"] = str(b.trace(Path(trace)))
    finally:
        for b in benches:
            b.close()
    vs_reference = None
    if reference is not None:
        ref_ips = results[-1]["images_per_s"]
        vs_reference = {r["model"]: round(r["images_per_s"] / ref_ips, 3) if ref_ips else None for r in results[:-1]}
    return {
        "bench": "train",
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "steps": steps,
        "warmup": warmup,
        "budget": budget,
        "overrides": extra,
        "timed_wall_ms": round(wall_ms, 3),
        "other_cpu_share": other_cpu_share,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "models": results,
        "vs_reference": vs_reference,
    }


# ---------------------------------------------------------------------------------------- command line
def _print_table(result: dict) -> None:
    m0 = result["models"][0]
    print(f"Training step, median of {result['steps']} steps after {result['warmup']} warm-up (ms); "
          f"{result['device_name']} ({result['device']}), torch {result['torch']}, {m0['precision']}, "
          f"batch {m0['batch']}, {m0['image_size']} px{' multi-scale' if m0['multi_scale'] else ''}, "
          f"{m0['workers']} loader workers, {result['threads']} threads, epoch {m0['epoch']}; "
          f"other_cpu {result['other_cpu_share']}")
    cuda = result["device"].startswith("cuda")
    head = f"{'':<20}{'':<9}" + "".join(f"{p:>10}" for p in PARTS) + f"{'step':>10}{'(matcher)':>10}"
    print(head)
    for m in result["models"]:
        rows = [("ms", [m["parts_ms"][p] for p in PARTS] + [m["step_ms"], m["matcher_ms"]], "{:>10.1f}"),
                ("share", [100 * m["shares"][p] for p in PARTS], "{:>9.0f}%")]
        if cuda:
            rows.append(("host ms", [m["host_ms"][p] for p in PARTS], "{:>10.1f}"))
        if m.get("host_syncs"):
            rows.append(("syncs", [m["host_syncs"].get(p, 0) for p in PARTS]
                         + ["", m["host_syncs"].get("matcher", 0)], "{:>10}"))
        for i, (what, values, fmt) in enumerate(rows):
            name = m["model"] if i == 0 else ""
            print(f"{name:<20}{what:<9}" + "".join(fmt.format(v) if v != "" else f"{'':>10}" for v in values))
        ratio = (result.get("vs_reference") or {}).get(m["model"])
        print(f"{'':<20}-> {m['images_per_s']} images/s; bound by: {m['bound_by']} "
              f"({100 * m['shares'][m['bound_by']]:.0f}% of the step)"
              + (f"; {ratio:.3f}x the reference's images/s" if ratio is not None else "")
              + (f"; trace {m['trace']}" if m.get("trace") else ""))


def _cmd_train(args: argparse.Namespace) -> int:
    models = [a for a in args.args if "=" not in a] or list(DEFAULT_MODELS)
    overrides = [a for a in args.args if "=" in a]
    try:
        result = bench_train(models, overrides, steps=args.steps, warmup=args.warmup, workers=args.workers,
                             amp=args.amp, epoch=args.epoch, budget=args.budget, trace=args.trace,
                             count_syncs=not args.no_syncs, reference=args.reference,
                             reference_config=args.reference_config)
    # ValueError: ConfigError, DatasetError and what the model says of its input (too many queries for the size)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "DatasetError" in str(exc):   # a data error raised inside a loader worker
            print(f"error: {error_message(exc)}", file=sys.stderr)
            return 2
        raise
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        _print_table(result)
    return 0


def add_command(subparsers) -> None:
    """The ``train`` sub-command of ``python -m dset.bench``."""
    t = subparsers.add_parser("train", help="a training step split into data wait, copy, forward, loss, backward, "
                              "optimizer: which part bounds it")
    t.add_argument("args", nargs="*", metavar="PRESET|key=value",
                   help=f"presets or YAML files (default {' '.join(DEFAULT_MODELS)}) and overrides for all of them "
                        "(data.image_size=640 data.batch_size=16 data=FILE run.device=cpu ...), together")
    t.add_argument("--steps", type=int, default=10, help="timed steps per model (default 10)")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default 3)")
    t.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the configuration's)")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="train.amp on CUDA (default: the configuration's)")
    t.add_argument("--epoch", type=int, default=0,
                   help="the epoch the step belongs to: pruning schedules, multi-scale stop (default 0)")
    t.add_argument("--budget", default="none", help="budget under the overrides (default none: the preset's "
                   "own settings, 640 px; cpu: the CPU budget's small images)")
    t.add_argument("--trace", default=None, metavar="DIR", help="write a torch.profiler chrome trace of "
                   f"{TRACE_STEPS} more steps per model into DIR")
    t.add_argument("--no-syncs", action="store_true", help="skip the extra step counting host syncs (CUDA)")
    t.add_argument("--reference", default=None, metavar="DIR",
                   help="a checkout of github.com/lyuwenyu/RT-DETR: time its own training step (model, criterion, "
                        "optimizer; fed our batches) beside ours, all at one size, and print each model's ratio")
    t.add_argument("--reference-config", default=REFERENCE_CONFIG, metavar="YML",
                   help=f"the reference's config, relative to its rtdetrv2_pytorch folder (default {REFERENCE_CONFIG})")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t.set_defaults(func=_cmd_train)
