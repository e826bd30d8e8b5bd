"""What each comparison with RT-DETR says, judged against the study's targets.

A verdict on a variant's ΔmAP (variant minus RT-DETR of the same backbone) is one of:

- ``better``: the 95% interval's lower bound is above 0;
- ``worse``: its upper bound is below 0;
- ``non-inferior``: not better, and the lower bound is above −δ (δ: the study's ``targets.delta_map``): a loss larger
  than the margin is ruled out, though no gain is shown;
- ``inconclusive``: otherwise ("no difference detected" is not "as accurate": the interval reaches below −δ);
- ``no verdict``: the baseline has not learned (its mAP is below ``targets.learning_floor_map``) or too few images
  were scored (fewer than ``targets.min_scored_images``) for an interval to mean anything; the reason is given.

The targets are the study file's ``targets:`` (:class:`studies.planning.study.Targets`), logged as
``targets.<key>`` params on the study's parent run; :func:`study_targets` reads them back (the newest parent run
that logged them), and falls back on ``TARGET_DEFAULTS`` for a store made before targets were logged, saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from studies.planning.study import TARGET_DEFAULTS, TARGETS_PARAM_PREFIX, StudyError, Targets, parse_targets

from .loading import StudyResults

BETTER, WORSE, NON_INFERIOR, INCONCLUSIVE, NO_VERDICT = "better", "worse", "non-inferior", "inconclusive", "no verdict"
VERDICTS = (BETTER, WORSE, NON_INFERIOR, INCONCLUSIVE)
IMAGE_ONLY = "image sampling only (1 seed): training noise not included"


@dataclass(frozen=True)
class StudyTargets:
    """A study's targets and where they came from (``source``: a sentence the report shows)."""

    targets: Targets
    source: str
    logged: bool              # False: the defaults, the store predates logged targets


def study_targets(study: StudyResults) -> StudyTargets:
    """The targets logged on the study's newest parent run that has ``targets.*`` params; the defaults
    (``TARGET_DEFAULTS``) where none has, or where a logged value is unusable (the source says which and why)."""
    parents = study.parents
    cols = {k: f"params.{TARGETS_PARAM_PREFIX}{k}" for k in TARGET_DEFAULTS}
    logged = parents
    if not all(c in parents for c in cols.values()):
        logged = parents.iloc[:0]
    else:
        logged = parents[parents[list(cols.values())].notna().all(axis=1)]
    defaults = ", ".join(f"{k} {v:g}" for k, v in TARGET_DEFAULTS.items())
    if logged.empty:
        return StudyTargets(Targets(), f"targets: the defaults ({defaults}); this store's parent runs logged no "
                                       "targets.* params (made before studies logged them)", False)
    newest = logged.sort_values("start_time", kind="mergesort").iloc[-1]
    raw = {k: _number(newest[c]) for k, c in cols.items()}
    try:
        targets = parse_targets(raw, f"parent run {newest['run_id']}: targets")
    except StudyError as exc:
        return StudyTargets(Targets(), f"targets: the defaults ({defaults}): {exc}", False)
    return StudyTargets(targets, f"targets: as the study file set them, logged on parent run {newest['run_id'][:8]} "
                                 f"({', '.join(f'{k} {getattr(targets, k):g}' for k in TARGET_DEFAULTS)})", True)


def _number(text):
    """A logged param (a string) as the number it was; the string itself where it is not one (parse_targets then
    names it)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() else value


def judge(low: float, high: float, delta_map: float) -> str:
    """The verdict of a ΔmAP interval [low, high] with non-inferiority margin ``delta_map`` (module docstring);
    ``inconclusive`` where there is no interval (NaN)."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    if low > -delta_map:
        return NON_INFERIOR
    return INCONCLUSIVE


def why_no_verdict(baseline_map: float, n_images: int | None, targets: Targets,
                   likely_cause: str | None = None) -> str | None:
    """Why a comparison gets no verdict (the baseline has not learned, with the ``likely_cause`` its runs
    recorded; too few scored images), or None."""
    reasons = []
    if not math.isnan(baseline_map) and baseline_map < targets.learning_floor_map:
        cause = f"; likely cause: {likely_cause}" if likely_cause else ""
        reasons.append(f"RT-DETR has not learned (mAP {baseline_map:.4f} < floor {targets.learning_floor_map:g}"
                       f"{cause})")
    if n_images is not None and n_images < targets.min_scored_images:
        reasons.append(f"{n_images} scored images < {targets.min_scored_images}")
    return "; ".join(reasons) or None


def interval_includes(n_variant: int, n_baseline: int, seed_dof: int) -> str:
    """What a bootstrap ΔmAP interval's width accounts for, in words."""
    if seed_dof <= 0:
        return IMAGE_ONLY
    return (f"image sampling + training noise ({n_variant} / {n_baseline} seeds, pooled seed SE, t with "
            f"{seed_dof} df)")


def verdict_text(verdict: str, why: str | None) -> str:
    """The verdict as a table shows it: the verdict, or "no verdict: <why>"."""
    return f"{NO_VERDICT}: {why}" if why else verdict
