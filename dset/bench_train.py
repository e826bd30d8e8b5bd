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
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, resolve_config
from .cpu_share import OtherCpuShare
from .data.loaders import set_loader_epoch
from .engine.distributed import DistInfo, resolve_device
from .engine.epoch_stats import EpochStats
from .engine.errors import NonFiniteLossError, error_message
from .engine.loop import TrainingRun

__all__ = ["PARTS", "bench_train", "add_command", "StepBench"]

PARTS = ("data", "copy", "forward", "loss", "backward", "optimizer", "stats")
DEFAULT_MODELS = ("rtdetr_r18", "dset_r18")
TRACE_STEPS = 2


# ------------------------------------------------------------------------------------------ the clock
class _Clock:
    """The boundaries of one step's parts: ``perf_counter`` always, a CUDA event too on a CUDA device.
    ``part(name)`` closes a part at its end (parts are contiguous: each starts where the one before ended);
    ``span(name)`` times a stretch inside a part (the matcher inside ``loss``) without moving the boundary.
    ``count`` (optional) is read at every boundary: the host syncs seen so far."""

    def __init__(self, device: torch.device, trace: bool = False, count: Callable[[], int] | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.current_stream(device) if self.cuda else None   # the step's work goes there
        self.trace, self.count = trace, count
        self.segments: list[tuple] = []   # (name, t0, t1, event0, event1, count0, count1)
        self.spans: list[tuple] = []

    def _now(self) -> tuple:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
        return time.perf_counter(), event, self.count() if self.count else 0

    def begin(self) -> None:
        self._last = self._now()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        with self._label(name):
            yield
        now = self._now()
        self.segments.append((name, *_pair(self._last, now)))
        self._last = now

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self._now()
        with self._label(name):
            yield
        self.spans.append((name, *_pair(start, self._now())))

    def _label(self, name: str):
        return torch.profiler.record_function(f"step/{name}") if self.trace else nullcontext()

    def times(self) -> dict:
        """``{part: ms}`` (CUDA: stream time from the events), ``{part: host ms}``, ``{part: syncs}``, spans
        included under their own names. On CUDA the events must have completed (synchronize first)."""
        ms: dict[str, float] = {}
        host: dict[str, float] = {}
        syncs: dict[str, int] = {}
        for name, t0, t1, e0, e1, c0, c1 in self.segments + self.spans:
            host[name] = host.get(name, 0.0) + (t1 - t0) * 1e3
            ms[name] = ms.get(name, 0.0) + (e0.elapsed_time(e1) if self.cuda else (t1 - t0) * 1e3)
            syncs[name] = syncs.get(name, 0) + (c1 - c0)
        return {"ms": ms, "host_ms": host, "syncs": syncs}


def _pair(start: tuple, end: tuple) -> tuple:
    return start[0], end[0], start[1], end[1], start[2], end[2]


class _TimedMatcher(nn.Module):
    """The criterion's matcher, timed as the ``matcher`` span of the step's clock when one is set."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.clock: _Clock | None = None

    def forward(self, outputs: dict, targets: list[dict]):
        if self.clock is None:
            return self.inner(outputs, targets)
        with self.clock.span("matcher"):
            return self.inner(outputs, targets)


# ------------------------------------------------------------------------------------ one model's step
class StepBench:
    """One model's training state (a ``TrainingRun``: data, model, criterion, optimizer, schedule, EMA,
    GradScaler, as ``dset.train`` builds them) and its training step, cut into :data:`PARTS`."""

    def __init__(self, label: str, cfg, epoch: int = 0) -> None:

        self.label = label
        # TrainingRun writes nothing before run(); the folder is never created. Its warning that the schedule's
        # warm-up outlasts the run's steps is about a run the bench does not make
        loop_log = logging.getLogger("dset.engine.loop")
        level = loop_log.level
        loop_log.setLevel(logging.ERROR)
        try:
            self.run = TrainingRun(cfg, Path(tempfile.gettempdir()) / "dset-bench-train", hooks=[], resume=False,
                                   dinfo=DistInfo())
        finally:
            loop_log.setLevel(level)
        run = self.run
        self.cfg, self.device, self.epoch = run.cfg, run.device, epoch
        self.matcher = _TimedMatcher(run.criterion.matcher)
        run.criterion.matcher = self.matcher
        # what TrainingRun._run_epoch sets before train_one_epoch
        run.model_core.set_epoch(epoch)
        run.ema.module.set_epoch(epoch)

        set_loader_epoch(run.train_loader, epoch, self.cfg.run.seed, 0)
        run.model.train()
        run.criterion.train()
        self.sizes = run._multi_scale_sizes(epoch)
        self.stats = EpochStats()
        self.loader_passes = 1
        self._batches = iter(run.train_loader)   # workers start here, not in a timed step
        self._initial = [p.detach().clone() for p in run.model_core.parameters() if p.requires_grad]
        self.records: list[dict] = []   # per timed step: the clock's times, the step's images
        self.last_loss = float("nan")

    def _next_batch(self):
        try:
            return next(self._batches)
        except StopIteration:   # the steps outlast the loader: a new pass, as a new epoch would start one
            self.loader_passes += 1
            self._batches = iter(self.run.train_loader)
            return next(self._batches)

    def step(self, clock: _Clock) -> int:
        """One training step, ``TrainingRun.train_step`` with its parts timed; returns its number of images."""
        run = self.run
        self.matcher.clock = clock
        clock.begin()
        with clock.part("data"):
            images, targets = self._next_batch()
        self.last_loss = run.train_step(images, targets, self.stats, self.sizes, f"bench step {run.global_step}",
                                        part=clock.part)
        self.matcher.clock = None
        return int(images.shape[0])

    def timed_step(self) -> None:
        clock = _Clock(self.device)
        images = self.step(clock)
        self.records.append({"clock": clock, "images": images})

    def count_syncs(self) -> dict[str, int] | None:
        """Host syncs per part in one more step (CUDA's sync debug mode warns at each); None on CPU."""
        if self.device.type != "cuda":
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                clock = _Clock(self.device, count=lambda: sum("synchroniz" in str(w.message) for w in caught))
                self.step(clock)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(self.device)
        return clock.times()["syncs"]

    def trace(self, folder: Path) -> Path:
        """A chrome trace of :data:`TRACE_STEPS` more steps, each part labelled ``step/<part>``."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(TRACE_STEPS):
                self.step(_Clock(self.device, trace=True))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"train_step_{_safe_name(self.label)}.json"
        prof.export_chrome_trace(str(path))
        return path

    def params_updated(self) -> dict:
        """How far the trained parameters moved since the bench started: the share of tensors that changed and
        the L2 norm of the whole change (0 would mean no optimizer step took effect)."""
        now = [p.detach() for p in self.run.model_core.parameters() if p.requires_grad]
        with torch.no_grad():
            changed = [not torch.equal(a, b) for a, b in zip(self._initial, now)]
            norm = math.sqrt(sum(float((b.float() - a.float()).pow(2).sum()) for a, b in zip(self._initial, now)))
        return {"params_changed_share": round(sum(changed) / max(1, len(changed)), 4), "update_norm": norm}

    def close(self) -> None:
        self._batches = None   # ends the loader's workers


def _safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(label).stem)


# ------------------------------------------------------------------------------------------ the result
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarise(bench: StepBench) -> dict:
    """One model's result from its timed steps (CUDA events must have completed)."""
    times = [r["clock"].times() for r in bench.records]
    per_step = [{p: t["ms"].get(p, 0.0) for p in PARTS} for t in times]
    step_ms = [sum(s.values()) for s in per_step]
    medians = {p: _median([s[p] for s in per_step]) for p in PARTS}
    parts = {p: round(v, 3) for p, v in medians.items()}
    # of the typical step: a part's median over the parts' medians (an outlier step, a neighbour process's burst,
    # moves neither)
    total = sum(medians.values())
    shares = {p: round(v / total, 4) if total > 0 else 0.0 for p, v in medians.items()}
    bound_by = max(PARTS, key=lambda p: shares[p])
    median_step = _median(step_ms)
    matcher = [t["ms"].get("matcher", 0.0) for t in times]
    cfg = bench.cfg
    out = {
        "model": bench.label,
        "config_name": cfg.model.name,
        "parts_ms": parts,
        "step_ms": round(median_step, 3),
        "shares": shares,
        "bound_by": bound_by,
        "images_per_s": round(cfg.data.batch_size * 1e3 / median_step, 2) if median_step > 0 else None,
        "matcher_ms": round(_median(matcher), 3),
        "matcher_share_of_loss": round(_median(matcher) / medians["loss"], 4) if medians["loss"] > 0 else None,
        "steps_ms": [{**{p: round(v, 4) for p, v in s.items()}, "step": round(sum(s.values()), 4),
                      "matcher": round(m, 4)} for s, m in zip(per_step, matcher)],
        "images_per_step": [r["images"] for r in bench.records],
        "batch": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "multi_scale": bool(bench.sizes),
        "amp": bool(bench.run.use_amp),
        "precision": "amp fp16" if bench.run.use_amp else "fp32",
        "workers": cfg.data.num_workers,
        "num_queries": cfg.model.decoder.num_queries,
        "num_denoising": cfg.model.decoder.num_denoising,
        "epoch": bench.epoch,
        "loader_passes": bench.loader_passes,
        "last_loss": bench.last_loss,
        **bench.params_updated(),
    }
    if bench.device.type == "cuda":
        out["host_ms"] = {p: round(_median([t["host_ms"].get(p, 0.0) for t in times]), 3) for p in PARTS}
    pruning = bench.run.model_core.sparse_stats().get("token_pruning")
    out["keep_ratio"] = float(pruning["keep_ratio"]) if pruning else None
    return out


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
                count_syncs: bool = True) -> dict:
    """Time the training step of each of ``models`` (presets or YAML files, all with ``overrides``), side by side
    in this process; the result (see the module docstring), its per-model entries under ``models``."""

    if not models:
        raise ConfigError("no model to time: give presets or YAML files (e.g. rtdetr_r18 dset_r18)")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    extra = list(overrides or [])
    if workers is not None:
        extra.append(f"data.num_workers={workers}")
    if amp is not None:
        extra.append(f"train.amp={str(amp).lower()}")
    configs = [(str(name), resolve_config(name, budget=budget, overrides=extra)) for name in models]  # errors first
    for name, cfg in configs:
        kind = resolve_device(cfg.run.device, DistInfo()).type
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"run.device: the train bench times CPU and CUDA steps, got {cfg.run.device!r} "
                              f"({name})")
    benches: list[StepBench] = []
    try:
        for name, cfg in configs:
            benches.append(StepBench(name, cfg, epoch=epoch))
        device = benches[0].device
        for _ in range(warmup):
            for b in benches:
                b.step(_Clock(b.device))
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
        other_cpu_share = load.stop()
        results = [summarise(b) for b in benches]
        for b, r in zip(benches, results):
            r["host_syncs"] = b.count_syncs() if count_syncs else None
            if trace is not None:
                r["trace"] = str(b.trace(Path(trace)))
    finally:
        for b in benches:
            b.close()
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
    head = f"{'':<14}{'':<9}" + "".join(f"{p:>10}" for p in PARTS) + f"{'step':>10}{'(matcher)':>10}"
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
            print(f"{name:<14}{what:<9}" + "".join(fmt.format(v) if v != "" else f"{'':>10}" for v in values))
        print(f"{'':<14}-> {m['images_per_s']} images/s; bound by: {m['bound_by']} "
              f"({100 * m['shares'][m['bound_by']]:.0f}% of the step)"
              + (f"; trace {m['trace']}" if m.get("trace") else ""))


def _cmd_train(args: argparse.Namespace) -> int:
    models = [a for a in args.args if "=" not in a] or list(DEFAULT_MODELS)
    overrides = [a for a in args.args if "=" in a]
    try:
        result = bench_train(models, overrides, steps=args.steps, warmup=args.warmup, workers=args.workers,
                             amp=args.amp, epoch=args.epoch, budget=args.budget, trace=args.trace,
                             count_syncs=not args.no_syncs)
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
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t.set_defaults(func=_cmd_train)
