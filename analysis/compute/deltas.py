"""Each variant's change against RT-DETR of the same backbone, with the interval its verdict follows from.

Where every run on both sides logged its detections and ground truth (``dset.run_folder.evaluation_files``),
the interval is the paired bootstrap over validation images, combined with the
seed spread when a side has several seeds (:mod:`analysis.compute.bootstrap`): it exists with one seed. Runs from
before those artifacts existed fall back on Welch's test over the logged per-seed values
(:func:`analysis.compute.stats.welch`), which has no interval with one seed; the delta says which it used and why.
The verdict is judged against the study's targets (:mod:`analysis.compute.verdicts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from dset import metric_names as M

from . import stats
from .bootstrap import N_RESAMPLES, paired_delta, relative_percent
from .evaluations import evaluations
from .loading import StudyResults
from .verdicts import Targets, interval_includes, judge, verdict_text, why_no_verdict

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
    verdict: str              # better, worse, non-inferior, inconclusive or "no verdict: why" (verdicts.py)
    variant_map: float        # the two mAPs the delta is the difference of
    baseline_map: float
    p_welch: float            # Welch's p over seeds where both sides have n > 1, else NaN
    n_images: int | None      # bootstrap: images resampled
    n_resamples: int | None
    fallback: str | None      # WELCH: why not the bootstrap
    mde: float = math.nan     # minimum detectable effect on ΔmAP (bootstrap), analysis.compute.bootstrap
    includes: str = ""        # what the interval accounts for (analysis.compute.verdicts.interval_includes)
    split: str | None = None  # the split the bootstrap scored: "test" or "val" (None: Welch on logged best/mAP)
    no_verdict: str | None = None   # why there is no verdict

    @property
    def relative(self) -> float:
        """ΔmAP in % of the baseline, NaN below the noise floor (:func:`~analysis.compute.bootstrap.relative_percent`).
        """
        return relative_percent(self.variant_map, self.baseline_map)

    @property
    def method_text(self) -> str:
        if self.method == BOOTSTRAP:
            return f"bootstrap: {self.n_images} images × {self.n_resamples} resamples"
        return "Welch over seeds"

    @property
    def judged(self) -> bool:
        """True where the row has one of the four verdicts (not "no verdict")."""
        return self.no_verdict is None


def _likely_cause(base: pd.Series) -> str | None:
    cause = base.get("learning_risks")
    return cause if isinstance(cause, str) and cause else None


def against_baseline(study: StudyResults, v: pd.Series, base: pd.Series, targets: Targets,
                     n_resamples: int = N_RESAMPLES, seed: int = 0) -> Delta:
    """``v`` minus ``base`` (rows of :func:`analysis.compute.variants.variants`, with included runs): the bootstrap
    where every run has its evaluation artifacts on one split and they cover the same images, else Welch; the
    verdict judged against ``targets`` (:mod:`analysis.compute.verdicts`)."""
    welch = stats.welch(v[f"{M.BEST_MAP}_values"], base[f"{M.BEST_MAP}_values"])
    p = welch.p if min(v["n"], base["n"]) > 1 else math.nan
    evals = evaluations(study, tuple(v["run_ids"]) + tuple(base["run_ids"]))
    missing = {r: why for r, why in evals.items() if isinstance(why, str)}
    why = None
    splits = sorted({ev.split for ev in evals.values() if not isinstance(ev, str)})
    if missing:
        run, reason = sorted(missing.items())[0]
        why = f"{len(missing)} of {len(evals)} runs without usable detections (run {run}: {reason})"
    elif len(splits) > 1:
        why = f"the runs' detections are on different splits ({', '.join(splits)}): not comparable image by image"
    else:
        try:
            d = paired_delta([evals[r] for r in v["run_ids"]], [evals[r] for r in base["run_ids"]],
                               n_resamples=n_resamples, seed=seed)
            no = why_no_verdict(d.baseline_map, d.n_images, targets, _likely_cause(base))
            verdict = verdict_text(judge(d.map.low, d.map.high, targets.delta_map), no)
            return Delta(BOOTSTRAP, d.map.delta, d.map.low, d.map.high, d.map50.delta, d.map50.low, d.map50.high,
                         verdict, d.variant_map, d.baseline_map, p, d.n_images, d.n_resamples, None, d.map.mde,
                         interval_includes(d.n_variant, d.n_baseline, d.map.seed_dof), splits[0], no)
        except ValueError as exc:  # e.g. evaluated on different images: say so, and fall back
            why = str(exc)
    w50 = stats.welch(v[f"{M.BEST_MAP50}_values"], base[f"{M.BEST_MAP50}_values"])
    no = why_no_verdict(base[f"{M.BEST_MAP}_mean"], None, targets, _likely_cause(base))
    if no is None and math.isnan(welch.ci_low):
        no = f"no interval ({welch.verdict}: one seed and no logged detections)"
    verdict = verdict_text(judge(welch.ci_low, welch.ci_high, targets.delta_map), no)
    includes = "training noise only (Welch over the logged per-seed best/mAP)" if not math.isnan(welch.ci_low) else ""
    return Delta(WELCH, welch.diff, welch.ci_low, welch.ci_high, w50.diff, w50.ci_low, w50.ci_high, verdict,
                 v[f"{M.BEST_MAP}_mean"], base[f"{M.BEST_MAP}_mean"], p, None, None, why, math.nan, includes, None, no)
