"""The notes under the tables that say how a number was obtained and what it includes: shared by several tables
(the verdict rule, the intervals, the split scored, the side-by-side latency, the data measured on)."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from analysis.compute.bootstrap import NOISE_FLOOR_MAP
from analysis.compute.deltas import BOOTSTRAP, WELCH, Delta
from analysis.compute.stats import missing
from analysis.compute.verdicts import Targets
from dset import run_folder

PROFILE_NOTE = ("GFLOPs/latency at: the AIFI encoder tokens kept of the tokens in and their ratio when the GFLOPs "
                "and latency were measured (profile/kept_tokens, profile/tokens, profile/keep_ratio, on the reported "
                "checkpoint at its schedule); – where the run did not log them.")


NOISE_NOTE = (f"ΔmAP (%) is not shown (–) where both mAPs are below the noise floor of {NOISE_FLOOR_MAP:g} "
              "(analysis.compute.bootstrap.NOISE_FLOOR_MAP): a ratio of two near-zero mAPs (0.0032 against 0.0010 "
              "would read +220%) measures noise, not the model.")
VERDICT_NOTE = ("Verdict, from the ΔmAP 95% interval and the study's margin δ: better = lower bound > 0; worse = upper "
                "bound < 0; non-inferior = not better and lower bound > −δ (a loss larger than δ is ruled out); "
                "inconclusive = otherwise (the interval reaches below −δ: no difference detected is not as "
                "accurate); no verdict = RT-DETR's mAP below the learning floor, or fewer scored images than the "
                "minimum, as the row says.")
MDE_NOTE = ("MDE (minimum detectable effect): the smallest |ΔmAP| this comparison detects with 80% power at a "
            "two-sided 5% level, (z_0.975 + z_0.80) × SE = 2.80 × the standard error of the paired image "
            "bootstrap's ΔmAP, combined in quadrature with (t_0.975 + t_0.80 on the seed term's df) × the seed SE "
            "where there are several seeds. A true effect smaller than the MDE is likely to read inconclusive.")


def excluded_note(reasons: tuple[str, ...]) -> str:
    counts = Counter(r.split(":")[0] if r.startswith("failed") else r for r in reasons)
    return "; ".join(f"{n} {why}" for why, n in sorted(counts.items()))


def data_note(vs: pd.DataFrame) -> str:
    datas = sorted(set(vs["data"]))
    return "Measured here on: " + " | ".join(datas) + " (params data.name, data.image_size, train.epochs)."


def split_note(found: list[Delta]) -> str | None:
    """Which split the bootstrap comparisons were scored on, and what that means; None without any."""
    splits = sorted({d.split for d in found if d.method == BOOTSTRAP})
    if not splits:
        return None
    parts = []
    if "test" in splits:
        parts.append("test: the study's scoring split, images the model was not selected on "
                     f"({run_folder.TEST_DETECTIONS} against {run_folder.TEST_GROUND_TRUTH})")
    if "val" in splits:
        parts.append("val: the validation images, which also chose the reported checkpoint (best epoch): selected "
                     f"on the images it is scored on, so its ΔmAP can be optimistic ({run_folder.DETECTIONS} against "
                     f"{run_folder.GROUND_TRUTH})")
    return "Scored on: " + "; ".join(parts) + "."


def interval_notes(found: list[Delta], targets: Targets) -> list[str]:
    """How the intervals of ``found`` were computed, the verdict rule, and why some fell back on Welch."""
    notes = []
    boot = [d for d in found if d.method == BOOTSTRAP]
    if boot:
        notes.append(
            f"95% CI (bootstrap): paired bootstrap over the scored images, {boot[0].n_resamples} resamples: each "
            "resample draws the images with replacement and scores the variant and RT-DETR on the same draw "
            "(COCO mAP from each run's logged detections); each side's seeds are all scored on every draw and "
            "averaged. Percentile interval of that seed-averaged ΔmAP; with several seeds in all it is widened on "
            "each side, in quadrature, by t_0.975 × the seed SE (pooled sample std of the per-seed mAPs, ddof 1, × "
            "sqrt(1/n_variant + 1/n_RT-DETR), on n_variant + n_RT-DETR − 2 df). ΔmAP = difference of the seed "
            "means of the mAP on every image. Interval includes: what the width accounts for; with one seed a side, "
            "image sampling only: a reseed of either model could move ΔmAP by more.")
        notes.append(MDE_NOTE)
        notes.append(split_note(boot))
    welch = [d for d in found if d.method == WELCH]
    if welch:
        reasons = "; ".join(dict.fromkeys(d.fallback for d in welch if d.fallback))
        notes.append(
            "Welch over seeds (fallback): these runs did not log usable detections and ground truth (runs from before "
            f"{run_folder.DETECTIONS} existed): the interval is Welch's unequal-variance interval over the per-seed "
            "best/mAP, and with n=1 on either side there is none (\"n=1, no test\")" + (f". Why: {reasons}." if reasons
                                                                                      else "."))
    notes.append(f"{VERDICT_NOTE} Here δ = {targets.delta_map:g} mAP, learning floor {targets.learning_floor_map:g} "
                 f"mAP, at least {targets.min_scored_images} scored images. p (Welch): over seeds, only where both "
                 "sides have n > 1.")
    if any(missing(d.relative) and d.baseline_map for d in found):
        notes.append(NOISE_NOTE)
    return notes


def latency_note(latency: pd.DataFrame) -> str:
    if latency.empty:
        return ("Δlatency %: – : this study has no side-by-side latency benchmark (variant and RT-DETR timed "
                "interleaved in one process, over several processes); the per-run latencies in the main table are "
                "run metadata, each timed in its own process, and are not compared here.")
    return ("Δlatency %: variant / RT-DETR − 1 of the side-by-side benchmark (both timed interleaved in one process, "
            "repeated over several processes; analysis.compute.latency), with its 95% interval, which includes the "
            "between-process spread; measured on: " + "; ".join(sorted({
                f"{r['device']}, {r['image_size']} px, batch {r['batch']}, {r['precision']}"
                for _, r in latency.iterrows()})) + ".")
