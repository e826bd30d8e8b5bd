"""One model's training step cut into parts and timed (``python -m dset.bench train``, :mod:`dset.bench_train`):
the clock that times the parts, :class:`StepBench` (our ``TrainingRun.train_step``) and what every timed model
has in common (:class:`TimedSteps`, which :mod:`dset.bench_reference` builds on), and one model's result."""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .data.loaders import set_loader_epoch
from .engine.distributed import DistInfo
from .engine.epoch_stats import EpochStats
from .engine.loop import TrainingRun

__all__ = ["PARTS", "TRACE_STEPS", "Clock", "TimedMatcher", "TimedSteps", "StepBench", "summarise"]

PARTS = ("data", "copy", "forward", "loss", "backward", "optimizer", "stats")
TRACE_STEPS = 2


# ------------------------------------------------------------------------------------------ the clock
class Clock:
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


class TimedMatcher(nn.Module):
    """The criterion's matcher, timed as the ``matcher`` span of the step's clock when one is set."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.clock: Clock | None = None

    def forward(self, outputs: dict, targets: list[dict]):
        if self.clock is None:
            return self.inner(outputs, targets)
        with self.clock.span("matcher"):
            return self.inner(outputs, targets)


# ------------------------------------------------------------------------------------ one model's step
class TimedSteps:
    """What every timed model has: ``step(clock)`` (one training step, its parts timed on ``clock``; returns its
    number of images), the timed steps' records, the host-sync count and the trace. A subclass sets ``label``,
    ``device``, ``cfg`` (batch and image size), ``epoch``, ``sizes`` (multi-scale sizes or None), ``loader_passes``
    and ``records`` and defines ``step``, ``trained_params``, ``mean_loss`` and ``describe``."""

    label: str
    device: torch.device

    def step(self, clock: Clock) -> int:
        raise NotImplementedError

    def trained_params(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def mean_loss(self) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        """What this model's step is: the result's model-specific entries."""
        raise NotImplementedError

    def start(self, batches) -> None:
        """Call once built: ``batches`` is the training loader, read from here on."""
        self.records: list[dict] = []   # per timed step: the clock's times, the step's images
        self.loader_passes = 1
        self._loader = batches
        self._batches = iter(batches)   # workers start here, not in a timed step
        self._initial = [p.detach().clone() for p in self.trained_params()]

    def next_batch(self):
        try:
            return next(self._batches)
        except StopIteration:   # the steps outlast the loader: a new pass, as a new epoch would start one
            self.loader_passes += 1
            self._batches = iter(self._loader)
            return next(self._batches)

    def timed_step(self) -> None:
        clock = Clock(self.device)
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
                clock = Clock(self.device, count=lambda: sum("synchroniz" in str(w.message) for w in caught))
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
                self.step(Clock(self.device, trace=True))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"train_step_{_safe_name(self.label)}.json"
        prof.export_chrome_trace(str(path))
        return path

    def params_updated(self) -> dict:
        """How far the trained parameters moved since the bench started: the share of tensors that changed and
        the L2 norm of the whole change (0 would mean no optimizer step took effect)."""
        now = [p.detach() for p in self.trained_params()]
        with torch.no_grad():
            changed = [not torch.equal(a, b) for a, b in zip(self._initial, now)]
            norm = math.sqrt(sum(float((b.float() - a.float()).pow(2).sum()) for a, b in zip(self._initial, now)))
        return {"params_changed_share": round(sum(changed) / max(1, len(changed)), 4), "update_norm": norm}

    def finish(self) -> None:
        """After the timed steps: anything the step defers (our loss check)."""

    def close(self) -> None:
        self._batches = None   # ends the loader's workers


class StepBench(TimedSteps):
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
        self.matcher = TimedMatcher(run.criterion.matcher)
        run.criterion.matcher = self.matcher
        # what TrainingRun._run_epoch sets before train_one_epoch
        run.model_core.set_epoch(epoch)
        run.ema.module.set_epoch(epoch)
        set_loader_epoch(run.train_loader, epoch, self.cfg.run.seed, 0)
        run.model.train()
        run.criterion.train()
        self.sizes = run._multi_scale_sizes(epoch)
        self.stats = EpochStats()
        self.start(run.train_loader)

    def trained_params(self) -> list[torch.Tensor]:
        return [p for p in self.run.model_core.parameters() if p.requires_grad]

    def step(self, clock: Clock) -> int:
        """One training step, ``TrainingRun.train_step`` with its parts timed; returns its number of images."""
        run = self.run
        self.matcher.clock = clock
        clock.begin()
        with clock.part("data"):
            images, targets = self.next_batch()
        run.train_step(images, targets, self.stats, self.sizes, f"bench step {run.global_step}", part=clock.part)
        self.matcher.clock = None
        return int(images.shape[0])

    def finish(self) -> None:
        self.run.loss_check.check()   # the steps' losses were finite (the loop reads them every N steps)

    def mean_loss(self) -> float:
        return self.stats.mean_loss()

    def describe(self) -> dict:
        cfg, settings = self.cfg, self.run.step_settings
        pruning = self.run.model_core.sparse_stats().get("token_pruning")
        return {"config_name": cfg.model.name, "precision": settings.precision,
                "channels_last": settings.channels_last, "compiled": settings.compile,
                "loss_check_every": cfg.train.loss_check_every, "num_queries": cfg.model.decoder.num_queries,
                "num_denoising": cfg.model.decoder.num_denoising,
                "keep_ratio": float(pruning["keep_ratio"]) if pruning else None}


def _safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(label).stem)


# ------------------------------------------------------------------------------------------ the result
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarise(bench: TimedSteps) -> dict:
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
        "workers": cfg.data.num_workers,
        "epoch": bench.epoch,
        "loader_passes": bench.loader_passes,
        "mean_loss": bench.mean_loss(),
        "params": sum(p.numel() for p in bench.trained_params()),
        **bench.describe(),
        **bench.params_updated(),
    }
    if bench.device.type == "cuda":
        out["host_ms"] = {p: round(_median([t["host_ms"].get(p, 0.0) for t in times]), 3) for p in PARTS}
    return out
