"""How many images and seeds a study needs to detect a ΔmAP of a given size, at this study's noise (the command is
``python -m analysis.power``, :mod:`analysis.power`).

From the study's logged detections: each comparison with RT-DETR (variant minus RT-DETR of the same backbone, as
in the report's answer) gives the standard error of its ΔmAP over the scored images, from the paired image
bootstrap (:func:`analysis.compute.bootstrap.paired_delta`); image sampling variance scales as 1/n_images, so at ``n``
images it is ``SE_image * sqrt(n_now / n)``. The seed spread is the pooled sample std of the per-seed mAPs of every
variant with several seeds (ddof 1). A comparison with ``k`` seeds a side then has the minimum detectable effect
(80% power, two-sided 5%; :func:`analysis.compute.bootstrap.minimum_detectable_effect`)

    MDE(n, k) = sqrt((2.80 * SE_image * sqrt(n_now / n))**2 + ((t_0.975 + t_0.80; 2k-2 df) * s_seed * sqrt(2 / k))**2)

and the images needed for ``MDE <= delta`` follow; where the seed term alone exceeds ``delta`` no number of images
is enough with ``k`` seeds. With one seed a side there is no seed term (and no estimate of training noise in the
interval): the images needed then cover image sampling only, and the table says so.
"""

from __future__ import annotations

import math

import pandas as pd

from dset import metric_names as M

from .bootstrap import N_RESAMPLES, Evaluated, minimum_detectable_effect, paired_delta
from .evaluations import evaluations
from .loading import StudyResults
from .normalise import backbones_in_order
from .variants import baseline_of, variants

DEFAULT_SEEDS = (1, 2, 3, 5)


def seed_spread(study: StudyResults, vs: pd.DataFrame) -> tuple[float, int]:
    """The pooled sample std of the per-seed mAPs within each variant (ddof 1: every variant with n >= 2 adds
    n - 1 degrees of freedom) and its degrees of freedom; (NaN, 0) where no variant has two seeds. Each run's mAP is
    that of its logged detections on every scored image where it has them, else its logged best/mAP."""
    squares, dof = 0.0, 0
    for _, v in vs[(vs["n"] > 1) & vs["trial"].isna()].iterrows():
        evals = evaluations(study, tuple(v["run_ids"]))
        if all(isinstance(ev, Evaluated) for ev in evals.values()):
            values = [ev.observed()[0] for ev in evals.values()]
        else:
            values = list(v[f"{M.BEST_MAP}_values"])
        if len(values) > 1:
            mean = sum(values) / len(values)
            squares += sum((x - mean) ** 2 for x in values)
            dof += len(values) - 1
    return (math.sqrt(squares / dof), dof) if dof else (math.nan, 0)


def images_needed(se_image: float, n_images: int, delta: float, seeds: int, s_seed: float) -> float:
    """The fewest images at which a comparison with ``seeds`` seeds a side has MDE <= ``delta`` (module docstring):
    ``inf`` where the seed term alone reaches ``delta``, NaN where the seed spread is unknown for ``seeds`` > 1."""
    if seeds > 1 and math.isnan(s_seed):
        return math.nan
    seed_mde = minimum_detectable_effect(0.0, s_seed * math.sqrt(2 / seeds), 2 * seeds - 2) if seeds > 1 else 0.0
    room = delta ** 2 - seed_mde ** 2
    if room <= 0:
        return math.inf
    per_image = minimum_detectable_effect(se_image) ** 2 * n_images   # (2.80 SE)^2 scaled to one image
    return float(math.ceil(per_image / room))


def plan(study: StudyResults, delta: float, seeds: tuple[int, ...] = DEFAULT_SEEDS,
         n_resamples: int = N_RESAMPLES) -> tuple[pd.DataFrame, str]:
    """One row per comparison with RT-DETR that has logged detections: its images now, SE_image, MDE now, and the
    images needed for an MDE of ``delta`` at each number of ``seeds`` a side; and a note on the seed spread used.
    Raises ValueError where no comparison has logged detections."""
    if not delta > 0:
        raise ValueError(f"--delta: expected a ΔmAP > 0 to detect (e.g. 0.01), got {delta}")
    vs = variants(study)
    if vs.empty:
        raise ValueError(f"experiment '{study.experiment}' has no finished variant")
    s_seed, seed_dof = seed_spread(study, vs)
    rows, skipped = [], []
    for bb in backbones_in_order(vs):
        base = baseline_of(vs, bb)
        if base is None:
            continue
        for _, v in vs[(vs["backbone"] == bb) & vs["trial"].isna() & (vs["n"] > 0)].iterrows():
            if v["group"] == base["group"]:
                continue
            evals = evaluations(study, tuple(v["run_ids"]) + tuple(base["run_ids"]))
            if any(isinstance(ev, str) for ev in evals.values()):
                skipped.append(v["label"])
                continue
            d = paired_delta([evals[r] for r in v["run_ids"]], [evals[r] for r in base["run_ids"]],
                               n_resamples=n_resamples)
            row = {"comparison": f"{v['label']} vs {base['label']}", "images now": d.n_images,
                   "seeds now (variant / RT-DETR)": f"{d.n_variant} / {d.n_baseline}", "SE_image": d.map.se_image,
                   "MDE now": d.map.mde}
            for k in seeds:
                row[f"images for {k} seed{'s' if k > 1 else ''}"] = images_needed(d.map.se_image, d.n_images, delta,
                                                                                  k, s_seed)
            rows.append(row)
    if not rows:
        raise ValueError(f"experiment '{study.experiment}': no comparison with RT-DETR has logged detections "
                         f"({', '.join(skipped) or 'no variant besides the baselines'}): nothing to scale")
    note = (f"ΔmAP to detect: {delta:g} (80% power, two-sided 5%). Seed spread: "
            + (f"pooled per-seed mAP std {s_seed:.4f} on {seed_dof} df (variants with several seeds)" if seed_dof
               else "unknown (no variant has two seeds): the columns for several seeds are – ; one seed a side covers "
                    "image sampling only (training noise not included)")
            + ". inf: the seed term alone exceeds the ΔmAP at that number of seeds."
            + (f" Left out (no logged detections): {', '.join(skipped)}." if skipped else ""))
    return pd.DataFrame(rows), note
