"""What a study invocation prints as it runs: a line per finished run with the elapsed time and the ETA, and the
summary table at the end."""

from __future__ import annotations

import sys
import time

from dset import metric_names as M

from ..console import format_duration, format_value, say, table
from .jobs import RunResult


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
        self.notes: list[str] = []          # what the study says after its table (a baseline that has not learned)

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
        for note in self.notes:
            print(f"\nCANNOT COMPARE: {note}")

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
