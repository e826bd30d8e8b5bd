"""Report: the tables and plots that compare every variant of a study with RT-DETR R18/R34.

    python analysis/make_report.py [--experiment ablation_grid] [--out report/] [--tracking-uri URI]

(the same as ``dset-report`` or ``python -m analysis.make_report``; all three need the repository installed,
``pip install -e .``, which is what lets the script import ``analysis`` and ``studies``).

Reads one MLflow experiment (one study) and writes into ``--out``: each table as Markdown, CSV and
LaTeX (``<table>.md/.csv/.tex``), each plot as PNG, ``index.html`` (one self-contained page that opens
with the answer table: every table, every plot embedded as a data URI, and a line saying how and when the
numbers were produced), ``report.md`` (every table in one file, the answer first) and
``report_files.txt`` (what this report wrote; files a previous report wrote there and this one does not
are removed, nothing else is touched). It prints where it wrote them, the answer and the main table.

Where the numbers come from: MLflow only. Runs, params, tags and final metrics are read with
``mlflow.search_runs`` (pandas); the per-epoch curves (mAP, keep ratio, training loss) with
``MlflowClient.get_metric_history``, which is the same store's record of the same metrics; each run's
detections on the validation images and their ground truth from its two evaluation artifacts
(``eval/detections.json``, ``eval/ground_truth.json``, downloaded through the MLflow client), from which
the intervals are bootstrapped (``analysis/bootstrap.py``). No other file a run wrote (checkpoints,
metrics.jsonl) is read. Metric names are those of ``dset/metric_names.py``, tags and artifacts those of
``studies/mlflow_schema.py``. Besides the intervals and the error analysis (pycocotools on the same logged
detections), the compute table's "sites" column is the one number this report computes itself (closed-form
multiply-adds from each run's logged configuration), and says so.

Tables: answer (first, after its one-sentence summary, a forest plot per backbone and accuracy against side-by-side
latency: every variant against RT-DETR of the same backbone, ΔmAP with its 95% interval, the verdict judged against
the study's targets (analysis/verdicts.py), the minimum detectable effect, what the interval includes, ΔGFLOPs %,
Δlatency % with its interval (analysis.latency), the split it was scored on), moe_diagnostics (expert cosine and
router entropy per MoE layer), main (every variant vs RT-DETR of the
same backbone), ablation (8 switch combinations per backbone, mean ± std over seeds, deltas with 95%
intervals: paired bootstrap over validation images, or Welch over seeds for runs that logged no detections),
compute (GFLOPs by component and the
share the sparse mechanisms act on), reported_vs_measured (the seed report's DAIR-V2X numbers next to
ours), ap_by_size (AP for small/medium/large objects per variant, their change against RT-DETR and the
ground-truth boxes per size), class_ap_deltas (per class, ΔAP against RT-DETR with 95% bootstrap intervals),
stage1 (the stage-1 pretraining runs the cells fine-tune from), optuna_pareto and optuna_importances (Optuna
studies), deployment (eager PyTorch next to ONNX Runtime at batch 1 and 8, as each run timed them: deploy/
metrics), runs (every run, with status, error and init checkpoint). The error analysis beyond mAP (the two
tables above, pr_curves and confusion) is computed by ``analysis/errors.py`` from the same logged detections.
Plots: map_vs_gflops, map_vs_latency, ablation_bars, expert_usage_<variant>, map_keep_ratio_per_epoch,
train_loss, pr_curves_<backbone> (precision-recall per class at IoU 0.50, one line per variant),
confusion_<backbone> (a detection confusion matrix per variant), deployment (the deployment table as bars),
pictures_<kind>_<backbone> (the variants side by side on the same validation images: detections, kept tokens,
encoder experts per token, decoder expert per prediction; drawn by the runs, dset.pictures, and read from their
pictures/ artifacts), optuna_pareto, optuna_importances.

Behaviour: failed, unfinished and missing runs are listed (runs table; "runs not included" columns;
"not run" rows in the ablation) rather than dropped; an unknown or empty experiment is a one-line
message and exit status 2 or 1; the same store gives byte-identical files (stable ordering, fixed
number formats, no wall-clock time anywhere, PNGs without metadata).
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import jinja2
import pandas as pd

from analysis import errors as E
from analysis import plots as P
from analysis import runs as R
from analysis import tables as T
from analysis import verdicts as V
from dset import metric_names as M
from studies import mlflow_store as store

MANIFEST = "report_files.txt"
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


def provenance(study: R.StudyRuns) -> str:
    """How and when the numbers were produced, and the targets the verdicts were judged against."""
    runs = study.runs
    children = study.children
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(children["status"].value_counts().items()))
    starts = runs["start_time"].dropna()
    when = "no start times logged" if starts.empty else (
        f"runs started between {starts.min():%Y-%m-%d %H:%M} and {starts.max():%Y-%m-%d %H:%M} UTC "
        f"(newest run: {starts.max():%Y-%m-%d})")
    return (f"Produced by analysis/make_report.py from MLflow (tracking URI {store.redact(study.tracking_uri)}, "
            f"experiment '{study.experiment}', id {study.experiment_id}): {len(runs)} runs "
            f"({int((runs['role'] == 'parent').sum())} parent, "
            + (f"{len(study.pretrain)} stage-1 pretraining, " if len(study.pretrain) else "")
            + f"{len(children)} child: {statuses or 'none'}); {when}. "
            "Every number is one the runs logged (mlflow.search_runs; per-epoch curves via get_metric_history) or "
            "a mean, difference or test of them; the intervals are bootstrapped from the detections the runs logged "
            "(or Welch's over seeds where they logged none, as the tables say), and the error analysis (AP by size, "
            "per-class AP, precision-recall, confusion) is computed from those detections; the compute table's sites "
            "are closed-form and labelled so. " + V.study_targets(study).source + ".")


def build_tables(study: R.StudyRuns, vs: pd.DataFrame) -> tuple[dict, dict, dict]:
    """The tables in reading order (the answer first), why each absent one was not produced, and what the
    figures reuse: ``errors`` (the error analyses), ``trials``, and for an Optuna study ``importances``, ``method``."""
    tables: dict[str, T.Table] = {}
    skipped: dict[str, str] = {}
    extra: dict = {}

    def add(name: str, table: T.Table | None, why: str = "") -> None:
        if table is None:
            skipped[name] = why
        else:
            tables[name] = table

    extra["targets"] = V.study_targets(study)
    targets = extra["targets"].targets
    if vs.empty:
        for name in ("answer", "main", "ablation", "memory_pruning", "moe_diagnostics", "compute",
                     "reported_vs_measured", "ap_by_size", "class_ap_deltas"):
            skipped[name] = "no child runs (only study invocations) in this experiment"
    else:
        latency = T.side_by_side_latency(study)
        extra["latency"] = latency
        add("answer", *T.answer_table(study, vs, targets, latency))
        add("main", T.main_table(study, vs))
        add("ablation", *T.ablation_table(study, vs, targets))
        add("memory_pruning", *T.memory_pruning_table(study, vs, targets, latency))
        add("moe_diagnostics", *T.moe_diagnostics_table(study, vs))
        add("compute", *T.compute_table(study, vs))
        add("reported_vs_measured", T.reported_table(study, vs))
        # errors beyond mAP, from the detections the runs logged (the plots reuse the analyses)
        extra["errors"] = T.error_analyses(study, vs)
        add("ap_by_size", *T.ap_by_size_table(study, vs, extra["errors"]))
        add("class_ap_deltas", *T.class_ap_deltas_table(study, vs))
    add("stage1", *T.stage1_table(study))
    extra["trials"] = T.optuna_trials(study)
    add("optuna_pareto", *T.optuna_pareto_table(study, extra["trials"]))
    if study.is_optuna:
        table, why, imp = T.optuna_importance_table(extra["trials"])
        extra.update(imp)
        add("optuna_importances", table, why)
    else:
        skipped["optuna_importances"] = "not an Optuna study (no run has a dset.trial tag)"
    add("deployment", *T.deployment_table(study, vs))
    add("runs", T.runs_table(study))
    return tables, skipped, extra


def build_figures(study: R.StudyRuns, vs: pd.DataFrame, tables: dict, extra: dict) -> tuple[dict, dict, dict]:
    figures, skipped, captions = {}, {}, {}

    def add(name: str, fig, why: str, caption: str | None = None):
        if fig is None:
            skipped[name] = why
        else:
            figures[name] = fig
            captions[name] = caption or PLOT_CAPTIONS[name]

    targets = extra["targets"].targets
    if "answer" in tables:
        add("forest", P.forest(tables["answer"].df, targets.delta_map), "no variant with a ΔmAP")
        latency_why = ("no side-by-side latency benchmark in this study" if extra["latency"].empty
                       else "no variant with both a ΔmAP and a side-by-side latency change")
        add("accuracy_vs_latency", P.accuracy_vs_latency(tables["answer"].df, targets), latency_why)
    else:
        skipped["forest"] = skipped["accuracy_vs_latency"] = "no answer table"
    devices = sorted(set(vs["latency_device"].dropna())) if not vs.empty else []
    if vs.empty:
        for name in ("map_vs_gflops", "map_vs_latency"):
            skipped[name] = "no child runs"
    else:
        add("map_vs_gflops", P.map_vs(vs, M.GFLOPS, "GFLOPs (2 × multiply-adds)"),
            "no variant logged gflops and best/mAP")
        latency_axis = f"latency (ms, batch 1; {'; '.join(devices) or 'device not logged'})"
        add("map_vs_latency", P.map_vs(vs, M.LATENCY_MS, latency_axis), "no variant logged latency_ms and best/mAP")
    if "ablation" in tables:
        add("ablation_bars", P.ablation_bars(tables["ablation"].df), "no finished ablation runs")
    else:
        skipped["ablation_bars"] = "no ablation table"
    if "memory_pruning" in tables:
        add("memory_pruning_tradeoff", P.memory_pruning_tradeoff(tables["memory_pruning"].df, targets),
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
        mats = R.usage_matrices(study, v["group"])
        if not mats:
            continue
        name = "expert_usage_" + P.slug(v["label"])
        while name in used:
            name += "_"
        used.add(name)
        add(name, P.expert_usage(v["label"], mats), "",
            f"Expert usage of {v['label']}: share of token-slots per expert and layer at the final epoch "
            f"(sparse/<encoder_moe|decoder_moe>/layer<i>/expert<j>), mean over {v['n']} run(s).")
    if not used:
        skipped["expert_usage_*"] = "no finished run logged expert usage (no MoE variant)"
    inc = study.included
    hist = R.histories(study, HISTORY_KEYS, inc[inc["group"].isin(set(focus["group"]))] if len(focus) else inc.iloc[:0])
    add("map_keep_ratio_per_epoch", P.per_epoch(hist), "no per-epoch val/mAP logged",
        PLOT_CAPTIONS["map_keep_ratio_per_epoch"] + note)
    add("train_loss", P.train_loss(hist), "no per-epoch train/loss logged", PLOT_CAPTIONS["train_loss"] + note)
    _error_figures(vs, focus, extra.get("errors", {}), note, add, skipped)
    if "deployment" in tables:
        add("deployment", P.deployment_bars(tables["deployment"].df), "no deploy/ latency logged",
            PLOT_CAPTIONS["deployment"])
    else:
        skipped["deployment (plot)"] = "no deployment table"
    _picture_figures(study, focus, note, add, skipped)
    if study.is_optuna:
        add("optuna_pareto", P.optuna_pareto(extra["trials"]), "no finished trial with best/mAP and gflops")
        add("optuna_importances", P.optuna_importances(extra.get("importances", {}), extra.get("method", "")),
            "importances not computed (see the tables' notes)")
    return figures, skipped, captions


def _error_figures(vs: pd.DataFrame, focus: pd.DataFrame, analyses: dict, note: str, add, skipped: dict) -> None:
    """Per backbone, the precision-recall curves and confusion matrices of the variants in ``focus`` whose runs
    logged detections (``analyses``: :func:`analysis.tables.error_analyses`); the others named in the caption."""
    if focus.empty:
        skipped["pr_curves_*"] = skipped["confusion_*"] = "no finished run"
        return
    for bb in sorted(set(focus["backbone"].dropna()), key=lambda b: (R.BACKBONE_ORDER.get(b, 9), b)):
        sub = focus[focus["backbone"] == bb]
        drawn = {v["label"]: analyses[v["group"]] for _, v in sub.iterrows()
                 if isinstance(analyses.get(v["group"]), E.ErrorAnalysis)}
        left = [f"{v['label']} ({analyses.get(v['group'], 'no finished run')})" for _, v in sub.iterrows()
                if v["label"] not in drawn]
        why = f"no {bb} variant with usable detections: {left[0] if left else ''}" + (
            f" and {len(left) - 1} more" if len(left) > 1 else "")
        base = R.baseline_of(vs, bb)
        runs = "; ".join(f"{label}: {a.n_runs}" for label, a in drawn.items())
        said = f" Runs per variant: {runs}." + (f" Not drawn: {'; '.join(left)}." if left else "") + note
        first = next(iter(drawn.values()), None)
        add(f"pr_curves_{P.slug(bb)}", P.pr_curves(bb, drawn, None if base is None else base["label"]), why,
            PLOT_CAPTIONS["pr_curves"] + said)
        thresholds = (first.score_threshold, first.iou_threshold) if first else (E.SCORE_THRESHOLD, E.IOU_THRESHOLD)
        add(f"confusion_{P.slug(bb)}", P.confusion_matrices(bb, drawn), why,
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


def _picture_figures(study: R.StudyRuns, focus: pd.DataFrame, note: str, add, skipped: dict) -> None:
    """Per backbone and picture kind, the variants side by side on the same validation images: each variant's
    first included run (lowest seed), the pictures it logged (:func:`analysis.runs.pictures`)."""
    import io

    import numpy as np
    from PIL import Image

    if focus.empty:
        skipped["pictures_*"] = "no finished run"
        return
    for bb in sorted(set(focus["backbone"].dropna()), key=lambda b: (R.BACKBONE_ORDER.get(b, 9), b)):
        sub = focus[focus["backbone"] == bb]
        logged, missing = {}, []
        for _, v in sub.iterrows():
            got = R.pictures(study, v["run_ids"][0]) if v["run_ids"] else "no included run"
            if isinstance(got, str):
                missing.append(f"{v['label']} ({got})")
            else:
                logged[v["label"]] = (v, got)
        if not logged:
            skipped[f"pictures_*_{P.slug(bb)}"] = f"no {bb} run logged pictures: {missing[0]}" + (
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
            name = f"pictures_{kind}_{P.slug(bb)}"
            fig = P.picture_grid(f"{bb}: {kind.replace('_', ' ')}", rows, [f"image {i}" for i in shown])
            caption = (f"{bb}, validation images {', '.join(map(str, shown))}: {what}. One row per variant that has "
                       f"this picture, drawn by its first run's reported checkpoint (dset.pictures; every run's "
                       f"full-size pictures are MLflow artifacts under pictures/). Runs: {'; '.join(runs)}."
                       + (f" No pictures: {'; '.join(missing)}." if missing else "") + note)
            add(name, fig, f"no {bb} variant has {kind} pictures", caption)


# the page's structure is analysis/templates/index.html.j2; autoescaped: every value goes in as text
PAGE = jinja2.Environment(loader=jinja2.PackageLoader("analysis"), autoescape=True, trim_blocks=True,
                          lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def _table_view(name: str, t: T.Table) -> dict:
    """What the page shows of a table: its text cells, title and notes."""
    text = t.text()
    return {"name": name, "title": t.title, "columns": list(text.columns), "rows": text.values.tolist(),
            "notes": t.notes, "lead": t.lead}


def render_html(study: R.StudyRuns, tables: dict, images: dict, captions: dict, skipped: dict) -> str:
    """``images``: plot name -> its file name (``<name>.png`` or ``.jpg``) and bytes."""
    figures = [{"name": name, "file": file, "caption": captions[name],
                "mime": "image/jpeg" if file.endswith(".jpg") else "image/png",
                "base64": base64.b64encode(data).decode("ascii")} for name, (file, data) in images.items()]
    return PAGE.get_template("index.html.j2").render(
        experiment=study.experiment, provenance=provenance(study), skipped=skipped,
        answer_images=[f for f in figures if f["name"] in ANSWER_FIGURES],
        images=[f for f in figures if f["name"] not in ANSWER_FIGURES],
        tables=[_table_view(name, t) for name, t in tables.items()])


ANSWER_FIGURES = ("forest", "accuracy_vs_latency")  # the page opens on these, above the answer table


def render_markdown(study: R.StudyRuns, tables: dict, skipped: dict) -> str:
    """Every table in one Markdown file, in the report's order (the answer first), with where they came from."""
    parts = [f"# DSET report: experiment {study.experiment}", ""]
    for t in tables.values():
        if t.lead:
            parts += [f"**{t.lead}**", ""]
        parts += [T.to_markdown(t)]
        if t.name == "answer":
            parts += [provenance(study), ""]
    if "answer" not in tables:
        parts.insert(2, provenance(study) + "\n")
    if skipped:
        parts += ["## Not produced", ""] + [f"- {n}: {why}" for n, why in skipped.items()]
    return "\n".join(parts) + "\n"


def _write(out: Path, files: dict[str, bytes]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.is_file():  # remove what an earlier report wrote here and this one does not
        for name in manifest.read_text().split():
            stale = out / name
            if name not in files and "/" not in name and name != MANIFEST and stale.is_file():
                stale.unlink()
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest.write_text("".join(f"{n}\n" for n in sorted(files)))


def build_report(experiment: str = "ablation_grid", out_dir: str | Path = "report",
                 tracking_uri: str | None = None) -> dict:
    """Read ``experiment`` from MLflow and write the report into ``out_dir``. Returns ``out_dir``,
    ``tables`` (name -> :class:`analysis.tables.Table`), ``plots`` (name -> PNG path), ``files`` (every
    path written), ``skipped`` (name -> why it was not produced), ``provenance``, ``study``, ``variants``
    (:func:`analysis.runs.variants`) and ``trials`` (:func:`analysis.tables.optuna_trials`).
    Raises :class:`analysis.runs.ReportError` for an unknown or empty experiment."""
    study = R.load_study_runs(experiment, tracking_uri)
    vs = R.variants(study)
    tables, skipped, extra = build_tables(study, vs)
    figures, skipped_plots, captions = build_figures(study, vs, tables, extra)
    skipped.update(skipped_plots)
    # pictures of images are JPEG (a tenth of the PNG's bytes for photograph-like content); charts stay PNG
    images = {name: (f"{name}.jpg", P.jpeg_bytes(fig)) if name.startswith("pictures_")
              else (f"{name}.png", P.png_bytes(fig)) for name, fig in figures.items()}
    files: dict[str, bytes] = {}
    for name, t in tables.items():
        files[f"{name}.md"] = T.to_markdown(t).encode()
        files[f"{name}.csv"] = T.to_csv(t).encode()
        files[f"{name}.tex"] = T.to_latex(t).encode()
    for file, data in images.values():
        files[file] = data
    files["index.html"] = render_html(study, tables, images, captions, skipped).encode()
    files["report.md"] = render_markdown(study, tables, skipped).encode()
    out = Path(out_dir)
    _write(out, files)
    return {"out_dir": out, "tables": tables, "plots": {n: out / file for n, (file, _) in images.items()},
            "files": [out / n for n in sorted(files)] + [out / MANIFEST], "skipped": skipped,
            "provenance": provenance(study), "study": study, "variants": vs, "trials": extra["trials"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python analysis/make_report.py",
        description="Tables and plots comparing every variant of a study with RT-DETR, from MLflow.")
    parser.add_argument("--experiment", default="ablation_grid",
                        help="MLflow experiment (= study name); default ablation_grid")
    parser.add_argument("--out", default="report", help="output folder; default report/")
    parser.add_argument("--tracking-uri", default=None,
                        help=f"MLflow tracking URI; default $MLFLOW_TRACKING_URI, else {store.DEFAULT_TRACKING_URI}")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        result = build_report(args.experiment, args.out, args.tracking_uri)
    except R.ReportError as exc:
        print(f"make_report: {exc}", file=sys.stderr)
        return exc.exit_code
    except MlflowException as exc:
        print(f"make_report: MLflow could not read {store.redact(store.tracking_uri(args.tracking_uri))}: "
              f"{exc.message if hasattr(exc, 'message') else exc}", file=sys.stderr)
        return 2
    out = result["out_dir"]
    tables, plots = result["tables"], result["plots"]
    print(result["provenance"])
    print(f"\nWrote {len(result['files'])} files to {out}/: open {out / 'index.html'}")
    print(f"  tables (.md .csv .tex): {', '.join(tables)}")
    print(f"  plots (.png, pictures .jpg): {', '.join(plots) or 'none'}")
    for name, why in result["skipped"].items():
        print(f"  not produced: {name}: {why}")
    for name in ("answer", "main"):
        if name in tables:
            print(f"\n{tables[name].title}\n")
            if tables[name].lead:
                print(tables[name].lead + "\n")
            print(T.markdown_grid(tables[name].text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
