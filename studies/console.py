"""What an invocation prints, shared by the run, its progress lines and the dry run: a line above any progress
bar, durations, values and plain-text tables."""

from __future__ import annotations

import sys
from typing import Any


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
