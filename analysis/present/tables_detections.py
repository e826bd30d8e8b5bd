"""The tables of errors beyond mAP, from the detections the runs logged: ``ap_by_size`` (AP for small, medium and
large objects against RT-DETR) and ``class_ap_deltas`` (per class, ΔAP against RT-DETR with its bootstrap interval).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.compute.bootstrap import N_RESAMPLES, paired_class_delta
from analysis.compute.detection_errors import SIZES, ErrorAnalysis
from analysis.compute.evaluations import evaluations, without_detections
from analysis.compute.loading import StudyResults
from analysis.compute.normalise import backbones_in_order
from analysis.compute.variants import baseline_of
from dset import run_folder

from .formatting import F4, SIGNED4, integer, interval
from .notes import data_note
from .table import Table

SIZE_RANGES = {"small": "< 32² px", "medium": "32²–96² px", "large": "> 96² px"}


def ap_by_size_table(study: StudyResults, vs: pd.DataFrame,
                     analyses: dict[str, ErrorAnalysis | str]) -> tuple[Table | None, str]:
    """Every variant: AP for small, medium and large objects (seed means) and the change against RT-DETR of
    the same backbone, with the ground-truth boxes each AP averages over. ``analyses``: :func:`error_analyses`."""
    found = [a for a in analyses.values() if isinstance(a, ErrorAnalysis)]
    if not found:
        if not analyses:
            return None, "no finished run"
        group, why = next(iter(analyses.items()))  # the first variant in reading order
        return None, f"no variant with usable detections ({vs.loc[vs['group'] == group, 'label'].iloc[0]}: {why})"
    rows = []
    for _, v in vs.iterrows():
        a = analyses.get(v["group"], "no finished run")
        base = baseline_of(vs, v["backbone"])
        b = analyses.get(base["group"], "no finished run") if base is not None else None
        if not isinstance(a, ErrorAnalysis):
            note = a
        elif base is None:
            note = "no RT-DETR baseline of this backbone"
        elif base["group"] == v["group"]:
            note = "RT-DETR (the baseline)"
        elif not isinstance(b, ErrorAnalysis):
            note = f"RT-DETR {v['backbone']}: {b}"
        elif not np.array_equal(a.image_ids, b.image_ids):
            note = "evaluated on other images than RT-DETR: no Δ"
        else:
            note = None
        has = isinstance(a, ErrorAnalysis)
        compared = has and note is None
        row = {"backbone": v["backbone"], "model": v["label"], "n": a.n_runs if has else 0}
        row.update({f"AP {s}": a.ap_by_size[s] if has else math.nan for s in SIZES})
        row.update({f"ΔAP {s}": a.ap_by_size[s] - b.ap_by_size[s] if compared else math.nan for s in SIZES})
        row.update({f"GT {s}": a.gt_by_size[s] if has else math.nan for s in SIZES})
        row["note"] = note
        rows.append(row)
    n_images = sorted({len(a.image_ids) for a in found})
    notes = [
        "AP@[.5:.95] by object size: pycocotools' COCOeval stats[3], [4], [5] (area 'all' boxes split by their "
        "annotation area: small " + SIZE_RANGES["small"] + ", medium " + SIZE_RANGES["medium"] + ", large "
        + SIZE_RANGES["large"] + "; a box exactly on a bound counts in both ranges, as in pycocotools), from each "
        f"run's logged detections ({run_folder.DETECTIONS}) against {run_folder.GROUND_TRUTH} on "
        + " / ".join(map(str, n_images)) + " validation images; n: runs (seeds) averaged.",
        "GT small/medium/large: the non-crowd ground-truth boxes in that range, the boxes each AP averages over "
        "(an AP over a handful of boxes says little); – for an AP: no box of that size.",
        "ΔAP = variant − RT-DETR of the same backbone (seed means). No interval: these differences are "
        "descriptive, not findings; the intervals are in the answer table (mAP) and the class_ap_deltas table.",
        data_note(vs),
    ]
    fm = {"n": integer, **{f"AP {s}": F4 for s in SIZES}, **{f"ΔAP {s}": SIGNED4 for s in SIZES},
          **{f"GT {s}": integer for s in SIZES}}
    return Table("ap_by_size", "AP by object size (COCO area ranges) against RT-DETR of the same backbone",
                 pd.DataFrame(rows), None, None, fm, notes), ""


def class_ap_deltas_table(study: StudyResults, vs: pd.DataFrame, n_resamples: int = N_RESAMPLES,
                          seed: int = 0) -> tuple[Table | None, str]:
    """Per variant and class: ΔAP@[.5:.95] against RT-DETR of the same backbone, with the paired bootstrap
    interval of :func:`analysis.compute.bootstrap.paired_class_delta` (the mAP comparison's image and seed draws)."""
    grid = vs[vs["trial"].isna()]
    backbones = backbones_in_order(grid)
    if not any(baseline_of(vs, bb) is not None for bb in backbones):
        return None, ("not an ablation: every run is an Optuna trial, and there is no RT-DETR baseline"
                      if study.is_optuna else "no RT-DETR baseline (all switches off, finished) in this experiment")
    rows, computed, reasons = [], [], []
    for bb in backbones:
        base = baseline_of(vs, bb)
        for _, v in grid[grid["backbone"] == bb].iterrows():
            if base is not None and base["group"] == v["group"]:
                continue
            common = {"backbone": bb, "model": v["label"],
                      "n (variant / RT-DETR)": f"{v['n']} / {base['n']}" if base is not None else None}
            empty = {"class": None, "category id": None, "GT boxes": math.nan, "AP": math.nan, "AP RT-DETR": math.nan,
                     "ΔAP": math.nan, "ΔAP 95% CI": None, "ΔAP CI low": math.nan, "ΔAP CI high": math.nan}
            why = "no RT-DETR baseline of this backbone" if base is None else (
                "no finished run" if v["n"] == 0 else None)
            if why is None:
                evals = evaluations(study, tuple(v["run_ids"]) + tuple(base["run_ids"]))
                why = without_detections(evals)
            if why is None:
                try:
                    found = paired_class_delta([evals[r] for r in v["run_ids"]],
                                                 [evals[r] for r in base["run_ids"]], n_resamples, seed)
                except ValueError as exc:  # e.g. evaluated on different images: say so
                    why = str(exc)
            if why is not None:
                rows.append({**common, **empty, "verdict": why})
                reasons.append(f"{v['label']}: {why}")
                continue
            names = evals[v["run_ids"][0]].errors.category_names
            computed.append(v["group"])
            for d, name in zip(found, names):
                rows.append({**common, "class": name, "category id": d.category_id, "GT boxes": d.n_gt,
                             "AP": d.variant_ap, "AP RT-DETR": d.baseline_ap, "ΔAP": d.ap.delta,
                             "ΔAP 95% CI": interval(d.ap.low, d.ap.high), "ΔAP CI low": d.ap.low,
                             "ΔAP CI high": d.ap.high,
                             "verdict": d.ap.verdict if d.n_gt else "no ground truth of this class"})
    if not computed:
        return None, (f"no comparison with RT-DETR has usable detections ({reasons[0]})" if reasons
                      else "no variant to compare with RT-DETR")
    order = ["backbone", "model", "n (variant / RT-DETR)", "class", "category id", "GT boxes", "AP", "AP RT-DETR",
             "ΔAP", "ΔAP 95% CI", "verdict", "ΔAP CI low", "ΔAP CI high"]
    df = pd.DataFrame(rows)[order]
    n_classes = int(df["category id"].notna().sum())
    notes = [
        "AP: a class's AP@[.5:.95] (pycocotools: interpolated precision averaged over the 101 recall thresholds "
        "and IoU 0.50:0.05:0.95, area all, 100 detections per image), from each run's logged detections "
        f"({run_folder.DETECTIONS}) against {run_folder.GROUND_TRUTH} on every validation image; the mean over seeds. "
        "ΔAP = variant − RT-DETR of the same backbone.",
        f"95% CI: the paired bootstrap of the mAP comparison (answer and ablation tables), {n_resamples} resamples, "
        "with the same image draws and seed draws: each resample scores both sides' class AP on the same images "
        "(hierarchical over seeds where a side has several). Percentile interval; a resample without a box of "
        "the class is left out of that class's interval.",
        "Verdict, from the ΔAP interval: lower bound > 0: better; upper bound < 0: worse; otherwise no difference "
        f"detected. {n_classes} class intervals here: without any real difference about 1 in 20 would still "
        "exclude 0, so one class's verdict alone is weak evidence.",
        "GT boxes: the class's non-crowd ground-truth boxes on the validation images: few boxes, wide interval.",
        *(["Rows without a class: the comparison could not be made, and the verdict column says why (no "
           f"detections logged: runs from before {run_folder.DETECTIONS} existed)."] if reasons else []),
        data_note(vs),
    ]
    text = [c for c in order if c not in ("category id", "ΔAP CI low", "ΔAP CI high")]
    return Table("class_ap_deltas", "Per-class AP against RT-DETR of the same backbone, with 95% intervals", df,
                 text, None, {"GT boxes": integer, "category id": integer, "AP": F4, "AP RT-DETR": F4,
                              "ΔAP": SIGNED4}, notes), ""
