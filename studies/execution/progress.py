"""What a study invocation prints: a line per finished run with the elapsed time and the ETA, the summary
table at the end, and the text helpers they share with the dry run."""

from __future__ import annotations

import sys
import time
from typing import Any

from dset import metric_names as M

from .jobs import RunResult


def say(text: str = "") -> None:
    """A line above any progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(text, flush=True)
    sys.stdout.flush()


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_value(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


class Progress:
    """The results of a study's runs as they come (its summary's rows) and the counts behind the ETA."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.results: list[RunResult] = []
        self.t0 = time.time()
        self.total = 0                      # runs (or trials) of the study
        self.done = 0                       # of them, finished or failed, here or elsewhere
        self.executed = 0                   # jobs this invocation ran
        self.durations: list[float] = []    # wall seconds of the jobs that ran here

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status == "failed"]

    def record(self, result: RunResult) -> None:
        """A row of the summary, without a progress line (a run done elsewhere, read back at the end)."""
        self.results.append(result)

    def skipped(self, result: RunResult) -> None:
        """A run finished before this invocation started: counted, no line."""
        self.record(result)
        self.done += 1

    def ran(self, result: RunResult, seconds: float, resumed: bool) -> None:
        """A job of this invocation ended."""
        self.executed += 1
        self.settled(result, resumed=resumed, seconds=seconds)

    def settled(self, result: RunResult, resumed: bool = False, seconds: float | None = None) -> None:
        """A run settled now (ran here, failed before it could start, or found done): recorded, with a line."""
        self.record(result)
        self.done += 1
        if seconds:
            self.durations.append(seconds)
        elapsed = time.time() - self.t0
        remaining = self.total - self.done
        # runs left x mean run time, shared by the workers
        eta = (sum(self.durations) / len(self.durations) * remaining / max(1, min(self.workers, remaining))
               if self.durations else None)
        m = result.metrics
        bits = [f"[{self.done}/{self.total}]", result.cell, result.status + (" (resumed)" if resumed else "")]
        if m.get(M.BEST_MAP) is not None:
            bits.append(f"mAP {m[M.BEST_MAP]:.4f}")
        if m.get(M.GFLOPS) is not None:
            bits.append(f"{m[M.GFLOPS]:.2f} GFLOPs")
        if result.error:
            bits.append(f"error: {result.error[:160]}")
        say("  ".join(bits) + f"  | elapsed {format_duration(elapsed)}, "
            f"ETA {format_duration(eta) if remaining else '0s'}")

    def print_table(self) -> None:
        rows = []
        for r in self.results:
            m = r.metrics
            label = r.cell if r.trial is None or r.cell == f"trial-{r.trial}" else f"{r.cell} (trial {r.trial})"
            rows.append([label, r.status, format_value(m.get(M.BEST_MAP), ".4f"),
                         format_value(m.get(M.BEST_MAP50), ".4f"), format_value(m.get(M.GFLOPS), ".2f"),
                         format_value(m.get(M.LATENCY_MS), ".1f"), format_value(m.get(M.TRAIN_MINUTES), ".1f")])
        print()
        print(table(rows, ["cell", "status", "mAP", "mAP50", "GFLOPs", "latency ms", "train min"]))

    def print_totals(self, where: str) -> int:
        """The closing lines (``where``: the MLflow experiment); 1 when a run failed (listed), 0 otherwise."""
        print(f"\n{len(self.results)} runs, {self.executed} executed in {format_duration(time.time() - self.t0)}; "
              f"{where}")
        failed = self.failed
        if failed:
            print(f"\n{len(failed)} run(s) FAILED:", file=sys.stderr)
            for r in failed:
                print(f"  {r.cell}: {r.error}", file=sys.stderr)
            return 1
        return 0
