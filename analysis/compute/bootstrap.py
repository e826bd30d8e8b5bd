"""Paired bootstrap of COCO mAP over validation images: an interval on every delta against RT-DETR.

Why: with one seed per cell, a test over seeds has nothing to say ("n=1, no test"), yet the validation
set is itself a sample; resampling its images says how much a difference could be an accident of which
images were drawn. Both models are scored on the same resampled images in every replicate (paired), which
removes the image-difficulty noise they share. With several seeds on a side, each replicate scores every seed of
that side on the resampled images and averages them (the image part: the paired bootstrap of the seed-averaged
delta), and the seed spread enters as a t-based term: the pooled sample variance of the per-seed mAPs (ddof 1 on
each side, ``n_variant + n_baseline - 2`` degrees of freedom), ``SE_seed = s_pooled * sqrt(1/n_v + 1/n_b)``, added
to each side of the percentile interval in quadrature, ``t_{dof, 0.975} * SE_seed``. Resampling a handful of seeds
with replacement instead would understate their variance by (n-1)/n and use normal quantiles where a t is due.
Each interval also carries its minimum detectable effect (:func:`minimum_detectable_effect`).

How: pycocotools' ``COCOeval.evaluate()`` runs once per run (:func:`evaluate_run`) and gives, for every
image and category, which detections matched a ground-truth box at each IoU threshold (``evalImgs``, area
range 'all', 100 detections). The mAP of any multiset of images is then accumulated here exactly as
``COCOeval.accumulate()``/``summarize()`` do (101-point interpolated precision, IoU 0.50:0.05:0.95,
categories without ground truth skipped), with each image's weight the number of times it was drawn, for
all resamples at once (:func:`map_replicates`): one matrix product per category and IoU threshold instead
of one pycocotools call per resample. The per-category APs of those resamples (:func:`class_ap_replicates`,
which :func:`map_replicates` averages) give each category's delta the same paired interval
(:func:`paired_class_delta`). The same pycocotools evaluation (COCO's four area ranges, ``accumulate()``)
also gives the run's error analysis beyond mAP (:mod:`analysis.compute.detection_errors`), kept on the run.

Why the weighted form is exact: precision is only read at the first point reaching a recall threshold and
as a maximum over what follows; the interpolated precision of the copies of a true positive is that of its
last copy, and false positives never raise it. So the curve can be kept at the true positives alone (the
false positives drawn before each one counted, weighted), and an image drawn twice gives what pycocotools
gives on a ground truth where that image is physically duplicated (tests/test_bootstrap.py checks both).
Detections of equal score are ordered by image, then by rank within the image, as pycocotools does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import detection_errors

LEVEL = 0.95
N_RESAMPLES = 1000
# mAP below which a relative change (%) is noise on noise: where both sides are below it, no % is shown
NOISE_FLOOR_MAP = 0.01
_EPS = np.spacing(1)  # what COCOeval.accumulate adds to tp + fp


@dataclass
class Evaluated:
    """One run's detections matched against its ground truth, ready to be scored on any image resample.

    ``image_ids`` (sorted) are the evaluated images; ``npig[i, k]`` the non-ignored ground-truth boxes of
    image ``i`` and category ``k``; ``curves[k][t]`` is ``(tp, fp_before)`` for category ``k`` at IoU
    threshold ``t``: two (images x true positives) count matrices, in score order, where column ``p`` holds,
    per image, the true positives up to and including the ``p``-th and the false positives before it.
    ``category_ids`` (sorted) name the categories ``k``; ``errors`` is the run's error analysis beyond mAP
    (:mod:`analysis.compute.detection_errors`), from the same pycocotools evaluation."""

    name: str
    image_ids: np.ndarray
    npig: np.ndarray
    curves: list[list[tuple[np.ndarray, np.ndarray]]]
    rec_thrs: np.ndarray
    category_ids: np.ndarray
    errors: detection_errors.ErrorAnalysis
    _replicates: dict = field(default_factory=dict, repr=False)
    split: str = "val"        # the split the detections were scored on: "test", or "val" (the selection split)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def observed(self) -> tuple[float, float]:
        """mAP@[.5:.95] and mAP@0.5 on every evaluated image once: pycocotools' ``stats[0]`` and ``stats[1]``."""
        if "observed" not in self._replicates:
            m, m50 = _map_of(self.observed_class_ap()[None])
            self._replicates["observed"] = (float(m[0]), float(m50[0]))
        return self._replicates["observed"]

    def observed_class_ap(self) -> np.ndarray:
        """AP of each category at each IoU threshold (categories x thresholds) on every evaluated image once:
        pycocotools' ``eval['precision']`` averaged over recall thresholds; NaN for a category without
        ground truth (pycocotools' -1)."""
        if "observed_class_ap" not in self._replicates:
            self._replicates["observed_class_ap"] = class_ap_replicates(self, np.ones((1, self.n_images)))[0]
        return self._replicates["observed_class_ap"]


def evaluate_run(ground_truth: dict, detections: list[dict], image_ids=None, name: str = "run") -> Evaluated:
    """Run ``COCOeval.evaluate()`` (bbox) once on ``detections`` against ``ground_truth`` (a COCO dict with
    images, annotations and categories) over ``image_ids`` (default: every ground-truth image) and keep what
    resampling needs, and the run's error analysis (:mod:`analysis.compute.detection_errors`, from the same evaluation).
    Errors name ``name`` (the run) and say what is wrong."""
    ev = detection_errors.coco_evaluation(ground_truth, detections, image_ids, name)
    p = ev.params
    n_img, n_thr, n_area = len(p.imgIds), len(p.iouThrs), len(p.areaRng)
    area_all = list(p.areaRngLbl).index("all")
    if not np.isclose(p.iouThrs[0], 0.5):
        raise ValueError(f"{name}: expected the first IoU threshold to be 0.5, got {p.iouThrs[0]}")
    npig = np.zeros((n_img, len(p.catIds)))
    curves = []
    for k in range(len(p.catIds)):
        start = (k * n_area + area_all) * n_img  # evalImgs: category, then area range, then image
        entries = [(i, e) for i, e in enumerate(ev.evalImgs[start:start + n_img]) if e is not None]
        for i, e in entries:
            npig[i, k] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        max_det = p.maxDets[-1]
        if entries:
            scores = np.concatenate([e["dtScores"][:max_det] for _, e in entries])
            image = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in entries]).astype(int)
            matched = np.concatenate([e["dtMatches"][:, :max_det] for _, e in entries], axis=1)
            ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in entries], axis=1)
        else:
            scores, image = np.zeros(0), np.zeros(0, dtype=int)
            matched = ignored = np.zeros((n_thr, 0))
        order = np.argsort(-scores, kind="mergesort")  # COCOeval's order: score, then image, then rank
        image, matched, ignored = image[order], matched[:, order], ignored[:, order]
        tps = np.logical_and(matched, np.logical_not(ignored))
        fps = np.logical_and(np.logical_not(matched), np.logical_not(ignored))
        curves.append([_curve(image, tps[t], fps[t], n_img) for t in range(n_thr)])
    return Evaluated(name, np.asarray(p.imgIds, dtype=np.int64), npig, curves, np.asarray(p.recThrs, dtype=float),
                     np.asarray(p.catIds, dtype=np.int64), detection_errors.analysis_of(ev, name))


def _curve(image: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_img: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image counts at each true positive (score order): true positives so far, false positives before."""
    pos = np.flatnonzero(tp)
    onehot_tp = np.zeros((n_img, len(pos)))
    onehot_tp[image[pos], np.arange(len(pos))] = 1.0
    onehot_fp = np.zeros((n_img, len(tp)))
    fp_idx = np.flatnonzero(fp)
    onehot_fp[image[fp_idx], fp_idx] = 1.0
    return np.cumsum(onehot_tp, axis=1), np.cumsum(onehot_fp, axis=1)[:, pos]


def _min_true_positives(npig: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """For each resample (rows) and recall threshold: the fewest true positives ``c`` with ``c / npig >= thr``
    in floating point, so that "first point with tp >= c" is COCOeval's ``searchsorted(rc, thr, 'left')``."""
    n = np.maximum(npig, 1.0)[:, None]
    c = np.ceil(rec_thrs[None, :] * n)
    c = np.where((c > 0) & ((c - 1) / n >= rec_thrs), c - 1, c)  # ceil of a rounded product: off by one at most
    c = np.where(c / n < rec_thrs, c + 1, c)
    return c.astype(np.int64)


def class_ap_replicates(ev: Evaluated, weights: np.ndarray) -> np.ndarray:
    """AP of each category of run ``ev`` at each IoU threshold, for each row of ``weights`` (resamples x
    images: how many times each image of ``ev.image_ids`` is drawn): (resamples, categories, IoU thresholds),
    NaN where a resample has no ground-truth box of the category (pycocotools' -1: left out of the mean)."""
    w = np.asarray(weights, dtype=float)
    n_rep = w.shape[0]
    npig = w @ ev.npig                                   # (resamples, categories)
    ap = np.zeros((n_rep, len(ev.curves), len(ev.curves[0])))
    rows = np.arange(n_rep)[:, None]
    for k, per_thr in enumerate(ev.curves):
        need = _min_true_positives(npig[:, k], ev.rec_thrs)   # (resamples, recall thresholds)
        for t, (tp_counts, fp_counts) in enumerate(per_thr):
            n_pts = tp_counts.shape[1]
            if n_pts == 0:
                continue  # no true positive: precision 0 at every recall threshold
            tp = w @ tp_counts
            fp = w @ fp_counts
            precision = tp / (tp + fp + _EPS)
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            # first point with tp >= need, every row at once: rows shifted apart so one sorted array serves all
            stride = int(max(tp[:, -1].max(), need.max())) + 2
            flat = (np.rint(tp).astype(np.int64) + rows * stride).ravel()
            first = np.searchsorted(flat, (need + rows * stride).ravel(), side="left").reshape(need.shape)
            first -= rows * n_pts
            q = np.where(first < n_pts, envelope[rows, np.minimum(first, n_pts - 1)], 0.0)
            ap[:, k, t] = q.mean(axis=1)
    ap[npig <= 0] = math.nan
    return ap


def map_replicates(ev: Evaluated, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mAP@[.5:.95] and mAP@0.5 of run ``ev`` for each row of ``weights`` (resamples x images: how many
    times each image of ``ev.image_ids`` is drawn). NaN where a resample has no ground truth at all."""
    return _map_of(class_ap_replicates(ev, weights))


def _map_of(class_ap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mAP@[.5:.95] and mAP@0.5 per resample from :func:`class_ap_replicates`: the mean over the categories
    with ground truth in that resample, as COCOeval.summarize() skips the others."""
    valid = ~np.isnan(class_ap[:, :, 0])
    ap = np.where(valid[:, :, None], class_ap, 0.0)
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(count > 0, (ap.mean(axis=2) * valid).sum(axis=1) / count, math.nan)
        m50 = np.where(count > 0, (ap[:, :, 0] * valid).sum(axis=1) / count, math.nan)
    return m, m50


def image_weights(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """``n_resamples`` bootstrap draws of ``n_images`` images with replacement, as counts per image."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n_resamples, n_images))
    flat = (draws + np.arange(n_resamples)[:, None] * n_images).ravel()
    return np.bincount(flat, minlength=n_resamples * n_images).reshape(n_resamples, n_images).astype(float)


def _class_replicates(ev: Evaluated, n_resamples: int, seed: int) -> np.ndarray:
    """:func:`class_ap_replicates` of ``ev`` on the image resamples of ``seed``; cached on the run, since the
    same run (a baseline) enters several comparisons (mAP and per class) and every one draws the same resamples."""
    key = ("class", n_resamples, seed)
    if key not in ev._replicates:
        ev._replicates[key] = class_ap_replicates(ev, image_weights(ev.n_images, n_resamples, seed))
    return ev._replicates[key]


def _replicates(ev: Evaluated, n_resamples: int, seed: int) -> np.ndarray:
    """(2, resamples) mAP and mAP50 of ``ev`` on the image resamples of ``seed`` (cached on the run)."""
    key = (n_resamples, seed)
    if key not in ev._replicates:
        ev._replicates[key] = np.stack(_map_of(_class_replicates(ev, n_resamples, seed)))
    return ev._replicates[key]


# 80% power at a two-sided 5% test: an effect of (z_0.975 + z_0.80) standard errors is detected 80% of the time
POWER = 0.80


@dataclass(frozen=True)
class Interval:
    """An observed delta, its 95% interval and the verdict that follows from the interval (without a margin:
    :mod:`analysis.compute.verdicts` judges ΔmAP with the study's margin); ``se_image``: the std of the paired image
    bootstrap's deltas, ``se_seed``: the seed term's standard error (0 with one seed a side) on ``seed_dof`` degrees
    of freedom; ``mde``: the minimum detectable effect (:func:`minimum_detectable_effect`)."""

    delta: float
    low: float
    high: float
    verdict: str
    se_image: float = math.nan
    se_seed: float = 0.0
    seed_dof: int = 0
    mde: float = math.nan


@dataclass(frozen=True)
class PairedDelta:
    """Variant minus baseline, mAP@[.5:.95] and mAP@0.5, with what the intervals were computed from."""

    map: Interval
    map50: Interval
    variant_map: float        # observed: mean over seeds, every evaluated image once
    baseline_map: float
    variant_map50: float
    baseline_map50: float
    n_variant: int            # seeds (runs) per side
    n_baseline: int
    n_images: int
    n_resamples: int
    level: float


def verdict(low: float, high: float, level: float = LEVEL) -> str:
    """What an interval on "variant minus baseline" says, and only that."""
    pct = f"{level * 100:g}%"
    if math.isnan(low) or math.isnan(high):
        return "no interval"
    if low > 0:
        return f"better ({pct} CI above 0)"
    if high < 0:
        return f"worse ({pct} CI below 0)"
    return f"no difference detected ({pct} CI includes 0)"


def relative_percent(variant_map: float, baseline_map: float) -> float:
    """(variant − baseline) / baseline × 100, or NaN where it would be noise: both mAPs below
    ``NOISE_FLOOR_MAP`` (0.001 vs 0.003 is "+200%"), or no baseline mAP."""
    if any(isinstance(x, float) and math.isnan(x) for x in (variant_map, baseline_map)) or not baseline_map:
        return math.nan
    if variant_map < NOISE_FLOOR_MAP and baseline_map < NOISE_FLOOR_MAP:
        return math.nan
    return (variant_map - baseline_map) / baseline_map * 100


def paired_delta(variant_runs, baseline_runs, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> PairedDelta:
    """Variant minus baseline (:class:`Evaluated` runs, one per seed) with percentile intervals at ``level``.

    Every replicate draws one image resample for both sides (paired) and scores every run of a side on it, averaged
    over the side's seeds; with several seeds in all, the t-based seed term (:func:`seed_term`) widens that
    percentile interval (with one run per side it is the image bootstrap alone). The observed delta is the
    difference of the seed means on every image. Every run must have been evaluated on the same images."""
    variant_runs, baseline_runs = list(variant_runs), list(baseline_runs)
    (var_reps, var_obs), (base_reps, base_obs), n_images = _paired_sides(
        variant_runs, baseline_runs, n_resamples, seed, lambda ev: _replicates(ev, n_resamples, seed).T,
        lambda ev: ev.observed())
    deltas = var_reps - base_reps                                                 # (resamples, 2)
    se_seed, dof = seed_term(var_obs, base_obs)
    intervals = [_interval(deltas[:, j], float(var_obs[:, j].mean() - base_obs[:, j].mean()), level, se_seed[j], dof)
                 for j in range(2)]
    v_mean, b_mean = var_obs.mean(axis=0), base_obs.mean(axis=0)
    return PairedDelta(intervals[0], intervals[1], float(v_mean[0]), float(b_mean[0]), float(v_mean[1]),
                       float(b_mean[1]), len(variant_runs), len(baseline_runs), n_images, n_resamples, level)


@dataclass(frozen=True)
class ClassDelta:
    """Variant minus baseline for one category: AP@[.5:.95] of that category, with what the interval was
    computed from. ``n_gt``: its ground-truth boxes on the evaluated images (non-crowd)."""

    category_id: int
    ap: Interval
    variant_ap: float         # observed: mean over seeds, every evaluated image once (NaN: no ground truth)
    baseline_ap: float
    n_gt: int
    n_variant: int
    n_baseline: int
    n_images: int
    n_resamples: int
    level: float


def paired_class_delta(variant_runs, baseline_runs, n_resamples: int = N_RESAMPLES, seed: int = 0,
                       level: float = LEVEL) -> list[ClassDelta]:
    """Per category (in category-id order), variant minus baseline AP@[.5:.95], with the bootstrap of
    :func:`paired_delta`: the same image resamples and the same seed draws (for the same ``seed``), each
    category's AP on them from :func:`class_ap_replicates`. A category without ground truth in a resample is
    left out of that category's interval (no interval, NaN, where it has none at all). Every run must have
    been evaluated on the same images and categories."""
    variant_runs, baseline_runs = list(variant_runs), list(baseline_runs)
    if not variant_runs or not baseline_runs:
        raise ValueError("a paired comparison needs at least one run on each side")
    for ev in variant_runs + baseline_runs[1:]:
        if not np.array_equal(ev.category_ids, baseline_runs[0].category_ids):
            raise ValueError(f"runs with different categories: {ev.name} {ev.category_ids.tolist()} and "
                             f"{baseline_runs[0].name} {baseline_runs[0].category_ids.tolist()}")
    (var_reps, var_obs), (base_reps, base_obs), n_images = _paired_sides(
        variant_runs, baseline_runs, n_resamples, seed,
        lambda ev: _class_replicates(ev, n_resamples, seed).mean(axis=2),          # AP@[.5:.95] per category
        lambda ev: ev.observed_class_ap().mean(axis=1))
    deltas = var_reps - base_reps                                                 # (resamples, categories)
    se_seed, dof = seed_term(var_obs, base_obs)
    var_obs, base_obs = var_obs.mean(axis=0), base_obs.mean(axis=0)
    n_gt = baseline_runs[0].npig.sum(axis=0)
    return [ClassDelta(int(c), _interval(deltas[:, k], float(var_obs[k] - base_obs[k]), level, se_seed[k], dof),
                       float(var_obs[k]), float(base_obs[k]), int(n_gt[k]), len(variant_runs), len(baseline_runs),
                       n_images, n_resamples, level)
            for k, c in enumerate(baseline_runs[0].category_ids)]


def _paired_sides(variant_runs, baseline_runs, n_resamples: int, seed: int, replicates, observed):
    """What both comparisons share (runs: lists): for each side, ``replicates(ev)`` (resamples, ...) of its runs
    averaged over the runs (every run scored on the same image resamples), and ``observed(ev)`` of each run stacked
    (runs, ...); and the number of images. Raises ValueError where the runs were evaluated on different images.
    (``n_resamples`` and ``seed`` fix the image resamples ``replicates`` draws; no seed is drawn here.)"""
    if not variant_runs or not baseline_runs:
        raise ValueError("a paired comparison needs at least one run on each side")
    ref = baseline_runs[0]
    for ev in variant_runs + baseline_runs:
        if not np.array_equal(ev.image_ids, ref.image_ids):
            only_ev = sorted(set(ev.image_ids.tolist()) - set(ref.image_ids.tolist()))
            only_ref = sorted(set(ref.image_ids.tolist()) - set(ev.image_ids.tolist()))
            raise ValueError(
                f"runs evaluated on different images: {ev.name} ({ev.n_images} images) and {ref.name} "
                f"({ref.n_images} images); only in {ev.name}: {only_ev[:5]}, only in {ref.name}: {only_ref[:5]}")

    def side(runs):
        reps = np.stack([replicates(ev) for ev in runs])                          # (runs, resamples, ...)
        return reps.mean(axis=0), np.stack([np.asarray(observed(ev), dtype=float) for ev in runs])

    return side(variant_runs), side(baseline_runs), ref.n_images


def seed_term(variant_obs: np.ndarray, baseline_obs: np.ndarray) -> tuple[np.ndarray, int]:
    """The seed part of a delta's uncertainty, from each run's observed value (``(runs, ...)`` per side): the
    standard error of the difference of the seed means, ``s_pooled * sqrt(1/n_v + 1/n_b)``, where ``s_pooled**2``
    pools both sides' sample variances (ddof 1: no (n-1)/n shrinkage; a side with one seed adds no degree of
    freedom and borrows the other side's spread), and its degrees of freedom ``n_v + n_b - 2``. With one seed a side
    there is no estimate: zeros and 0 degrees of freedom (the interval is then the image bootstrap alone)."""
    v, b = np.asarray(variant_obs, dtype=float), np.asarray(baseline_obs, dtype=float)
    n_v, n_b = len(v), len(b)
    dof = n_v + n_b - 2
    if dof == 0:
        return np.zeros(v.shape[1:]), 0
    squares = ((v - v.mean(axis=0)) ** 2).sum(axis=0) + ((b - b.mean(axis=0)) ** 2).sum(axis=0)
    return np.sqrt(squares / dof * (1 / n_v + 1 / n_b)), dof


def t_quantile(q: float, dof: int) -> float:
    """Student's t quantile ``q`` on ``dof`` degrees of freedom (the normal's for ``dof`` 0: no seed term)."""
    from scipy import stats

    return float(stats.norm.ppf(q) if dof <= 0 else stats.t.ppf(q, dof))


def minimum_detectable_effect(se_image: float, se_seed: float = 0.0, seed_dof: int = 0, level: float = LEVEL,
                              power: float = POWER) -> float:
    """The smallest true |Δ| a two-sided test at ``1 - level`` detects with probability ``power``:
    ``(z_{1-α/2} + z_power) * SE_image`` (2.80 x SE at 95% and 80%) combined in quadrature with
    ``(t_{dof, 1-α/2} + t_{dof, power}) * SE_seed``, the same way the interval combines its two parts."""
    alpha = 1 - level
    image = (t_quantile(1 - alpha / 2, 0) + t_quantile(power, 0)) * se_image
    seeds = (t_quantile(1 - alpha / 2, seed_dof) + t_quantile(power, seed_dof)) * se_seed if seed_dof else 0.0
    return float(math.hypot(image, seeds))


def _interval(deltas: np.ndarray, observed: float, level: float, se_seed: float = 0.0, seed_dof: int = 0) -> Interval:
    """The percentile interval at ``level`` of the replicate ``deltas`` (NaN ones left out), around ``observed``,
    each side widened in quadrature by the seed term ``t_{seed_dof, 1-α/2} * se_seed`` (none with 0 dof)."""
    tail = (1 - level) / 2
    d = deltas[~np.isnan(deltas)]
    if not len(d) or math.isnan(observed):
        return Interval(observed, math.nan, math.nan, verdict(math.nan, math.nan, level))
    p_low, p_high = np.quantile(d, [tail, 1 - tail])
    seed_half = t_quantile(1 - tail, seed_dof) * float(se_seed) if seed_dof else 0.0
    low = observed - math.hypot(max(observed - float(p_low), 0.0), seed_half) if seed_half else float(p_low)
    high = observed + math.hypot(max(float(p_high) - observed, 0.0), seed_half) if seed_half else float(p_high)
    se_image = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    return Interval(observed, low, high, verdict(low, high, level), se_image, float(se_seed), int(seed_dof),
                    minimum_detectable_effect(se_image, float(se_seed), int(seed_dof), level))
