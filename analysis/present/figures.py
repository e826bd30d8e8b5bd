"""Which figures the report draws, from which numbers, with what caption, and why an absent one was not drawn:
the charts (:mod:`analysis.present.plots`) and the figures of detections and pictures
(:mod:`analysis.present.plots_detections`), built from the tables and the study's runs."""

from __future__ import annotations

import pandas as pd

from analysis.compute.detection_errors import IOU_THRESHOLD, SCORE_THRESHOLD, ErrorAnalysis
from analysis.compute.loading import StudyResults, histories, pictures
from analysis.compute.normalise import backbones_in_order
from analysis.compute.variants import baseline_of, usage_matrices
from dset import metric_names as M

from . import plots, plots_detections

HISTORY_KEYS = (M.VAL_PREFIX + "mAP", M.KEEP_RATIO, M.TRAIN_LOSS_PREFIX + "loss")


PLOT_CAPTIONS = {
    "deployment": "Deployed speed per variant: batch-1 latency (left) and batch-8 throughput (right), eager PyTorch "
                  "next to ONNX Runtime, as each run timed them side by side (the deployment table; its notes say "
                  "how).",
    "map_vs_gflops": "mAP@0.5:0.95 against measured GFLOPs for every variant (seed mean ± std); RT-DETR baselines "
                     "as stars; dashed: the Pareto front (no other variant has more mAP for fewer GFLOPs).",
    "map_vs_latency": "mAP@0.5:0.95 against latency (batch 1, median, on the latency device) for every variant; "
                      "RT-DETR baselines as stars; dashed: the Pareto front.",
    "forest": "ΔmAP@0.5:0.95 of each variant against RT-DETR of the same backbone, with its 95% interval (the answer "
              "table's); grey band: ±δ, the study's non-inferiority margin; the verdict beside each row.",
    "accuracy_vs_latency": "ΔmAP@0.5:0.95 (95% interval, vertical) against the side-by-side latency change (95% "
                           "interval, horizontal) of each variant against RT-DETR of the same backbone; dashed: the "
                           "study's latency target; grey band: ±δ.",
    "memory_pruning_tradeoff": "Memory pruning: ΔmAP@0.5:0.95 against RT-DETR of the same backbone (error bars: its "
                               "95% interval, as in the memory-pruning table) against the change in GFLOPs as run; "
                               "points labelled with the memory keep ratio (off: memory pruning off).",
    "ablation_bars": "Ablation: mean mAP@0.5:0.95 per switch combination and backbone, error bars = sample std "
                     "over seeds.",
    "map_keep_ratio_per_epoch": "Per epoch: validation mAP (left) and the token keep ratio in force (right), "
                                "seed means.",
    "train_loss": "Training loss (train/loss, epoch mean) per epoch, seed means.",
    "optuna_pareto": "Optuna trials: best mAP against GFLOPs; red: the Pareto-optimal trials (trial numbers "
                     "annotated).",
    "optuna_importances": "Optuna parameter importances for each objective, computed by this report from the "
                          "logged trials.",
    "pr_curves": "Precision against recall at IoU 0.50, one panel per class (its ground-truth boxes in the title), "
                 "one line per variant, RT-DETR dashed black: pycocotools' interpolated precision at the 101 recall "
                 "thresholds (area all, 100 detections per image; 0 beyond the highest recall reached), from each "
                 "run's logged detections on the validation images; a variant with several seeds: the mean curve.",
    "confusion": "Detection confusion matrix per variant (rows: ground-truth class, columns: predicted class, "
                 "background last): per image, detections with score ≥ {score:g} in descending score, each matched "
                 "to the not-yet-matched non-crowd ground-truth box of any class with the highest IoU if that IoU ≥ "
                 "{iou:g}; unmatched boxes count as background column (missed), unmatched detections as background "
                 "row (false positive). Colour: share of the row; numbers: counts (per run, the mean over seeds "
                 "where a variant has several).",
}


def build_figures(study: StudyResults, vs: pd.DataFrame, tables: dict, extra: dict) -> tuple[dict, dict, dict]:
    figures, skipped, captions = {}, {}, {}

    def add(name: str, fig, why: str, caption: str | None = None):
        if fig is None:
            skipped[name] = why
        else:
            figures[name] = fig
            captions[name] = caption or PLOT_CAPTIONS[name]

    targets = extra["targets"].targets
    if "answer" in tables:
        add("forest", plots.forest(tables["answer"].df, targets.delta_map), "no variant with a ΔmAP")
        latency_why = ("no side-by-side latency benchmark in this study" if extra["latency"].empty
                       else "no variant with both a ΔmAP and a side-by-side latency change")
        add("accuracy_vs_latency", plots.accuracy_vs_latency(tables["answer"].df, targets), latency_why)
    else:
        skipped["forest"] = skipped["accuracy_vs_latency"] = "no answer table"
    devices = sorted(set(vs["latency_device"].dropna())) if not vs.empty else []
    if vs.empty:
        for name in ("map_vs_gflops", "map_vs_latency"):
            skipped[name] = "no child runs"
    else:
        add("map_vs_gflops", plots.map_vs(vs, M.GFLOPS, "GFLOPs (2 × multiply-adds)"),
            "no variant logged gflops and best/mAP")
        latency_axis = f"latency (ms, batch 1; {'; '.join(devices) or 'device not logged'})"
        add("map_vs_latency", plots.map_vs(vs, M.LATENCY_MS, latency_axis), "no variant logged latency_ms and best/mAP")
    if "ablation" in tables:
        add("ablation_bars", plots.ablation_bars(tables["ablation"].df), "no finished ablation runs")
    else:
        skipped["ablation_bars"] = "no ablation table"
    if "memory_pruning" in tables:
        add("memory_pruning_tradeoff", plots.memory_pruning_tradeoff(tables["memory_pruning"].df, targets),
            "no memory-pruning variant with a ΔmAP and GFLOPs")
    else:
        skipped["memory_pruning_tradeoff"] = "no memory-pruning table"
    # an Optuna study has one variant per trial: draw the Pareto-optimal trials' heatmaps and curves only
    focus = vs[vs["n"] > 0] if not vs.empty else vs
    note = ""
    if study.is_optuna and not extra["trials"].empty:
        front = set(extra["trials"].loc[extra["trials"]["pareto"], "trial"])
        focus = focus[focus["trial"].isin(front)]
        note = " (Optuna study: Pareto-optimal trials only)"
    used = set()
    for _, v in focus.iterrows():
        mats = usage_matrices(study, v["group"])
        if not mats:
            continue
        name = "expert_usage_" + plots.slug(v["label"])
        while name in used:
            name += "_"
        used.add(name)
        add(name, plots.expert_usage(v["label"], mats), "",
            f"Expert usage of {v['label']}: share of token-slots per expert and layer at the final epoch "
            f"(sparse/<encoder_moe|decoder_moe>/layer<i>/expert<j>), mean over {v['n']} run(s).")
    if not used:
        skipped["expert_usage_*"] = "no finished run logged expert usage (no MoE variant)"
    inc = study.included
    hist = histories(study, HISTORY_KEYS, inc[inc["group"].isin(set(focus["group"]))] if len(focus) else inc.iloc[:0])
    add("map_keep_ratio_per_epoch", plots.per_epoch(hist), "no per-epoch val/mAP logged",
        PLOT_CAPTIONS["map_keep_ratio_per_epoch"] + note)
    add("train_loss", plots.train_loss(hist), "no per-epoch train/loss logged", PLOT_CAPTIONS["train_loss"] + note)
    _error_figures(vs, focus, extra.get("errors", {}), note, add, skipped)
    if "deployment" in tables:
        add("deployment", plots.deployment_bars(tables["deployment"].df), "no deploy/ latency logged",
            PLOT_CAPTIONS["deployment"])
    else:
        skipped["deployment (plot)"] = "no deployment table"
    _picture_figures(study, focus, note, add, skipped)
    if study.is_optuna:
        add("optuna_pareto", plots.optuna_pareto(extra["trials"]), "no finished trial with best/mAP and gflops")
        add("optuna_importances", plots.optuna_importances(extra.get("importances", {}), extra.get("method", "")),
            "importances not computed (see the tables' notes)")
    return figures, skipped, captions


def _error_figures(vs: pd.DataFrame, focus: pd.DataFrame, analyses: dict, note: str, add, skipped: dict) -> None:
    """Per backbone, the precision-recall curves and confusion matrices of the variants in ``focus`` whose runs
    logged detections (``analyses``: :func:`analysis.compute.evaluations.error_analyses`); the others named in the
    caption."""
    if focus.empty:
        skipped["pr_curves_*"] = skipped["confusion_*"] = "no finished run"
        return
    for bb in backbones_in_order(focus):
        sub = focus[focus["backbone"] == bb]
        drawn = {v["label"]: analyses[v["group"]] for _, v in sub.iterrows()
                 if isinstance(analyses.get(v["group"]), ErrorAnalysis)}
        left = [f"{v['label']} ({analyses.get(v['group'], 'no finished run')})" for _, v in sub.iterrows()
                if v["label"] not in drawn]
        why = f"no {bb} variant with usable detections: {left[0] if left else ''}" + (
            f" and {len(left) - 1} more" if len(left) > 1 else "")
        base = baseline_of(vs, bb)
        runs = "; ".join(f"{label}: {a.n_runs}" for label, a in drawn.items())
        said = f" Runs per variant: {runs}." + (f" Not drawn: {'; '.join(left)}." if left else "") + note
        first = next(iter(drawn.values()), None)
        baseline = None if base is None else base["label"]
        add(f"pr_curves_{plots.slug(bb)}", plots_detections.pr_curves(bb, drawn, baseline), why,
            PLOT_CAPTIONS["pr_curves"] + said)
        thresholds = (first.score_threshold, first.iou_threshold) if first else (SCORE_THRESHOLD, IOU_THRESHOLD)
        add(f"confusion_{plots.slug(bb)}", plots_detections.confusion_matrices(bb, drawn), why,
            PLOT_CAPTIONS["confusion"].format(score=thresholds[0], iou=thresholds[1]) + said)


PICTURE_KINDS = {  # kind (dset.pictures) -> what the grid shows
    "detections": "the ground truth (top row) and each variant's predictions with score >= the run's threshold",
    "kept_tokens": "the stride-32 tokens token pruning kept (clear) and pruned (shaded)",
    "encoder_experts": "each AIFI token's top-1 expert of the encoder MoE, as a colour (pruned tokens uncoloured)",
    "decoder_experts": "each final prediction's box, coloured by the expert its query's top-1 routing chose in the "
                       "decoder layer that makes the prediction",
}
PICTURES_PER_VARIANT = 3


def _panels(picture):
    """The two panels of a detections picture (ground truth, predictions): equal widths either side of the gap
    that dset.pictures leaves between them."""
    from dset.pictures import PANEL_GAP

    width = (picture.shape[1] - PANEL_GAP) // 2
    return picture[:, :width], picture[:, width + PANEL_GAP:]


def _picture_figures(study: StudyResults, focus: pd.DataFrame, note: str, add, skipped: dict) -> None:
    """Per backbone and picture kind, the variants side by side on the same validation images: each variant's
    first included run (lowest seed), the pictures it logged (:func:`analysis.compute.loading.pictures`)."""
    import io

    import numpy as np
    from PIL import Image

    if focus.empty:
        skipped["pictures_*"] = "no finished run"
        return
    for bb in backbones_in_order(focus):
        sub = focus[focus["backbone"] == bb]
        logged, missing = {}, []
        for _, v in sub.iterrows():
            got = pictures(study, v["run_ids"][0]) if v["run_ids"] else "no included run"
            if isinstance(got, str):
                missing.append(f"{v['label']} ({got})")
            else:
                logged[v["label"]] = (v, got)
        if not logged:
            skipped[f"pictures_*_{plots.slug(bb)}"] = f"no {bb} run logged pictures: {missing[0]}" + (
                f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            continue
        shared = None  # the images every variant drew, in the order the first drew them
        for _, (index, _files) in logged.values():
            ids = list(index["image_ids"])
            shared = ids if shared is None else [i for i in shared if i in ids]
        shown = shared[:PICTURES_PER_VARIANT]
        for kind, what in PICTURE_KINDS.items():
            rows, runs = [], []
            for label, (v, (index, files)) in logged.items():
                by_image = {p["image_id"]: p["file"] for p in index["pictures"] if p["kind"] == kind}
                if not all(i in by_image for i in shown):
                    continue
                images = [np.asarray(Image.open(io.BytesIO(files[by_image[i]])).convert("RGB")) for i in shown]
                seed = v["seeds"][0] if v["seeds"] else "?"
                if kind == "detections":  # the ground truth once, on top; then each variant's predictions
                    if not rows:
                        rows.append(("ground truth", [_panels(im)[0] for im in images]))
                    images = [_panels(im)[1] for im in images]
                rows.append((label, images))
                runs.append(f"{label}: seed {seed}, epoch {index.get('epoch')}, threshold {index['score_threshold']:g}")
            name = f"pictures_{kind}_{plots.slug(bb)}"
            fig = plots_detections.picture_grid(f"{bb}: {kind.replace('_', ' ')}", rows, [f"image {i}" for i in shown])
            caption = (f"{bb}, validation images {', '.join(map(str, shown))}: {what}. One row per variant that has "
                       f"this picture, drawn by its first run's reported checkpoint (dset.pictures; every run's "
                       f"full-size pictures are MLflow artifacts under pictures/). Runs: {'; '.join(runs)}."
                       + (f" No pictures: {'; '.join(missing)}." if missing else "") + note)
            add(name, fig, f"no {bb} variant has {kind} pictures", caption)
