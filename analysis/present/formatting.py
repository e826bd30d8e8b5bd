"""How a table shows a value: fixed number formats, intervals, "–" for a value that was not logged."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from analysis.compute.stats import missing
from dset import metric_names as M

MISSING = "–"


def fmt(spec: str) -> Callable:
    return lambda v: MISSING if missing(v) else format(v, spec)


F4, F2, F1, SIGNED2, SIGNED4 = fmt(".4f"), fmt(".2f"), fmt(".1f"), fmt("+.2f"), fmt("+.4f")


def millions(v) -> str:
    return MISSING if missing(v) else f"{v / 1e6:.2f} M"


def pvalue(v) -> str:
    if missing(v):
        return MISSING
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def integer(v) -> str:
    return MISSING if missing(v) else str(int(v))


def interval(low: float, high: float) -> str | None:
    return None if missing(low) or missing(high) else f"[{low:+.4f}, {high:+.4f}]"


def mean_pm(mean: float, std: float, spec: str = ".4f") -> str:
    if missing(mean):
        return MISSING
    return format(mean, spec) if missing(std) else f"{format(mean, spec)} ± {format(std, spec)}"


def percent_interval(value: float, low: float, high: float) -> str:
    """"-6.1% [-7.3, -5.0]", or the value alone without an interval, "–" without a value."""
    if missing(value):
        return MISSING
    return f"{value:+.1f}%" + ("" if missing(low) or missing(high) else f" [{low:+.1f}, {high:+.1f}]")


def delta_with_interval(value: float, low: float, high: float) -> str:
    """"+0.0123 [+0.0050, +0.0190]", or the value alone without an interval, "–" without a value."""
    if missing(value):
        return MISSING
    return f"{value:+.4f}" + ("" if missing(low) or missing(high) else f" [{low:+.4f}, {high:+.4f}]")


def profile_text(tokens, kept, ratio) -> str | None:
    if missing(tokens) or missing(kept):
        return None
    return f"{int(kept)}/{int(tokens)} tokens" + ("" if missing(ratio) else f" (keep ratio {ratio:.2f})")


def profiled_at(v: pd.Series) -> str | None:
    """What a variant's GFLOPs and latency were measured at (profile/kept_tokens, profile/tokens,
    profile/keep_ratio), e.g. "70/100 tokens (keep ratio 0.70)"; per seed, "; "-joined, where seeds differ."""
    texts = [profile_text(t, k, r) for t, k, r in zip(*(v[f"{m}_values"] for m in (
        M.PROFILE_TOKENS, M.PROFILE_KEPT_TOKENS, M.PROFILE_KEEP_RATIO)))]
    return "; ".join(dict.fromkeys(t for t in texts if t)) or None
