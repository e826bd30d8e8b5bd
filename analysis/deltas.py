"""Each variant's change against RT-DETR of the same backbone, with the interval its verdict follows from.

Where every run on both sides logged its detections and ground truth (``ARTIFACT_DETECTIONS``,
``ARTIFACT_GROUND_TRUTH``), the interval is the paired bootstrap over validation images, combined with the
seed spread when a side has several seeds (:mod:`analysis.bootstrap`): it exists with one seed. Runs from
before those artifacts existed fall back on Welch's test over the logged per-seed values
(:func:`analysis.stats.welch`), which has no interval with one seed; the delta says which it used and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from dset import metric_names as M

from . import bootstrap as B
from . import runs as R
from . import stats

BOOTSTRAP = "bootstrap"
WELCH = "welch"


@dataclass(frozen=True)
class Delta:
    """Variant minus baseline, mAP@[.5:.95] and mAP@0.5, each with a 95% interval (NaN where none)."""

    method: str               # BOOTSTRAP or WELCH
    map: float
    map_low: float
    map_high: float
    map50: float
    map50_low: float
    map50_high: float
    verdict: str              # from the mAP interval only (or Welch's "n=1, no test")
    variant_map: float        # the two mAPs the delta is the difference of
    baseline_map: float
    p_welch: float            # Welch's p over seeds where both sides have n > 1, else NaN
    n_images: int | None      # bootstrap: validation images resampled
    n_resamples: int | None
    fallback: str | None      # WELCH: why not the bootstrap

    @property
    def relative(self) -> float:
        """ΔmAP in % of the baseline, NaN below the noise floor (:func:`analysis.bootstrap.relative_percent`)."""
        return B.relative_percent(self.variant_map, self.baseline_map)

    @property
    def method_text(self) -> str:
        if self.method == BOOTSTRAP:
            return f"bootstrap: {self.n_images} images × {self.n_resamples} resamples"
        return "Welch over seeds"


def against_baseline(study: R.StudyRuns, v: pd.Series, base: pd.Series, n_resamples: int = B.N_RESAMPLES,
                     seed: int = 0) -> Delta:
    """``v`` minus ``base`` (rows of :func:`analysis.runs.variants`, with included runs): the bootstrap
    where every run has its evaluation artifacts and they cover the same images, else Welch."""
    welch = stats.welch(v[f"{M.BEST_MAP}_values"], base[f"{M.BEST_MAP}_values"])
    p = welch.p if min(v["n"], base["n"]) > 1 else math.nan
    evals = R.evaluations(study, tuple(v["run_ids"]) + tuple(base["run_ids"]))
    missing = {r: why for r, why in evals.items() if isinstance(why, str)}
    why = None
    if missing:
        run, reason = sorted(missing.items())[0]
        why = f"{len(missing)} of {len(evals)} runs without usable detections (run {run}: {reason})"
    else:
        try:
            d = B.paired_delta([evals[r] for r in v["run_ids"]], [evals[r] for r in base["run_ids"]],
                               n_resamples=n_resamples, seed=seed)
            return Delta(BOOTSTRAP, d.map.delta, d.map.low, d.map.high, d.map50.delta, d.map50.low, d.map50.high,
                         d.map.verdict, d.variant_map, d.baseline_map, p, d.n_images, d.n_resamples, None)
        except ValueError as exc:  # e.g. evaluated on different images: say so, and fall back
            why = str(exc)
    w50 = stats.welch(v[f"{M.BEST_MAP50}_values"], base[f"{M.BEST_MAP50}_values"])
    verdict = welch.verdict if math.isnan(welch.ci_low) else B.verdict(welch.ci_low, welch.ci_high)
    return Delta(WELCH, welch.diff, welch.ci_low, welch.ci_high, w50.diff, w50.ci_low, w50.ci_high, verdict,
                 v[f"{M.BEST_MAP}_mean"], base[f"{M.BEST_MAP}_mean"], p, None, None, why)
