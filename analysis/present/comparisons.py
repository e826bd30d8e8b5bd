"""What every comparison of a variant with RT-DETR of the same backbone shows: each variant compared with its
baseline (or why it is not), and the columns of a :class:`~analysis.compute.deltas.Delta` and of the
side-by-side latency."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pandas as pd

from analysis.compute.deltas import BOOTSTRAP, Delta, against_baseline
from analysis.compute.loading import StudyResults
from analysis.compute.normalise import backbones_in_order
from analysis.compute.stats import missing
from analysis.compute.variants import baseline_of
from analysis.compute.verdicts import NO_VERDICT, Targets

from .formatting import interval


def against_rt_detr(study: StudyResults, vs: pd.DataFrame, grid: pd.DataFrame,
                    targets: Targets) -> Iterator[tuple[str, pd.Series | None, pd.Series, Delta | str]]:
    """Each variant of ``grid`` (rows of :func:`analysis.compute.variants.variants`) but the RT-DETR baselines, per
    backbone in reading order, compared with RT-DETR of its backbone: ``(backbone, the baseline or None, the variant,
    its :class:`~analysis.compute.deltas.Delta` judged against ``targets``)``, or in place of the delta why there is
    none ("no verdict: ...")."""
    for bb in backbones_in_order(grid):
        base = baseline_of(vs, bb)
        for _, g in grid[grid["backbone"] == bb].iterrows():
            if base is not None and g["group"] == base["group"]:
                continue
            if base is None or g["n"] == 0:
                yield bb, base, g, f"{NO_VERDICT}: " + ("no RT-DETR baseline" if base is None else "no finished run")
            else:
                yield bb, base, g, against_baseline(study, g, base, targets)


def delta_columns(d: Delta | None) -> dict:
    """The columns every comparison with RT-DETR shows, from one :class:`~analysis.compute.deltas.Delta`."""
    if d is None:
        return {"ΔmAP": math.nan, "ΔmAP (%)": math.nan, "ΔmAP 95% CI": None, "ΔmAP50": math.nan,
                "ΔmAP50 95% CI": None, "interval": None, "p (Welch)": math.nan, "MDE": math.nan,
                "interval includes": None, "scored on": None,
                "ΔmAP CI low": math.nan, "ΔmAP CI high": math.nan, "ΔmAP50 CI low": math.nan,
                "ΔmAP50 CI high": math.nan}
    return {"ΔmAP": d.map, "ΔmAP (%)": d.relative, "ΔmAP 95% CI": interval(d.map_low, d.map_high),
            "ΔmAP50": d.map50, "ΔmAP50 95% CI": interval(d.map50_low, d.map50_high), "interval": d.method_text,
            "p (Welch)": d.p_welch, "MDE": d.mde, "interval includes": d.includes or None,
            "scored on": scored_on(d), "ΔmAP CI low": d.map_low, "ΔmAP CI high": d.map_high,
            "ΔmAP50 CI low": d.map50_low, "ΔmAP50 CI high": d.map50_high}


SPLIT_WORDS = {"test": "test", "val": "val (selected on it)"}


def scored_on(d: Delta) -> str:
    """The split (and images) a comparison's ΔmAP was scored on, e.g. "test, 200 images"."""
    if d.method != BOOTSTRAP:
        return "val (logged best/mAP)"
    return f"{SPLIT_WORDS.get(d.split, d.split)}, {d.n_images} images"


CI_COLUMNS = ["ΔmAP CI low", "ΔmAP CI high", "ΔmAP50 CI low", "ΔmAP50 CI high"]  # CSV only (text: the CI strings)


def latency_columns(latency: pd.DataFrame, label: str) -> dict:
    """One variant's side-by-side latency change: {"Δlatency (%)", "Δlatency CI low", "Δlatency CI high",
    "latency measured side by side"}, NaN/None where the benchmark did not time it."""
    if label not in latency.index:
        return {"Δlatency (%)": math.nan, "Δlatency CI low": math.nan, "Δlatency CI high": math.nan,
                "latency measured side by side": None}
    r = latency.loc[label]
    return {"Δlatency (%)": float(r["delta_percent"]), "Δlatency CI low": float(r["delta_low"]),
            "Δlatency CI high": float(r["delta_high"]),
            "latency measured side by side": f"{r['device']}, {r['image_size']} px, batch {r['batch']}, "
                                             f"{r['precision']}, {r['processes']} processes × {r['rounds']} rounds"}


def percent_change(variant: float, baseline: float) -> float:
    return math.nan if missing(variant) or missing(baseline) or not baseline else 100 * (variant / baseline - 1)
