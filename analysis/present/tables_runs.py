"""The tables of runs and trials: ``runs`` (every run, its status and why it is or is not in the other tables),
``stage1`` (the pretraining runs the cells fine-tune from), ``optuna_pareto`` and ``optuna_importances``."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd

from analysis.compute import stats
from analysis.compute.loading import StudyResults
from dset import metric_names as M
from studies.tracking import schema

from .formatting import F2, F4, fmt, integer, profile_text
from .notes import PROFILE_NOTE
from .table import Table


def runs_table(study: StudyResults) -> Table:
    """Every run of the experiment, finished or not, with why it is or is not in the other tables."""
    rows = []
    for _, r in study.runs.iterrows():
        rows.append({
            "role": r["role"], "cell": r["cell"], "model": None if r["role"] == "parent" else r["label"],
            "seed": None if pd.isna(r["seed"]) else int(r["seed"]),
            "trial": None if pd.isna(r["trial"]) else int(r["trial"]), "MLflow status": r["status"],
            "dset status": r["dset_status"], "in tables": "yes" if r["included"] else "no",
            "reason / error": "; ".join(x for x in (r["reason"], r["note"]) if x) or None,
            "mAP@0.5:0.95": r.get(M.BEST_MAP, math.nan), "GFLOPs": r.get(M.GFLOPS, math.nan),
            "GFLOPs at": profile_text(*(r.get(m, math.nan) for m in
                                         (M.PROFILE_TOKENS, M.PROFILE_KEPT_TOKENS, M.PROFILE_KEEP_RATIO))),
            "init checkpoint": r["init_checkpoint"], "init source": r["init_source"],
            "started (UTC)": None if pd.isna(r["start_time"]) else r["start_time"].strftime("%Y-%m-%d %H:%M:%S"),
            "run id": r["run_id"],
        })
    df = pd.DataFrame(rows)
    counts = Counter(study.children["status"])
    n_pre = len(study.pretrain)
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    notes = [f"{len(study.runs)} runs: {int((study.runs['role'] == 'parent').sum())} parent (study invocations), "
             + (f"{n_pre} stage-1 pretraining, " if n_pre else "")
             + f"{len(study.children)} child ({statuses}); {int(study.runs['included'].sum())} enter the other tables.",
             "A run enters the tables when MLflow marks it FINISHED and it logged best/mAP; the others are listed "
             "here with their status and error (tag dset.error). Stage-1 pretraining runs (role pretrain) enter "
             "only the Stage 1 table.",
             "init checkpoint, init source: the weights the run started from and what they are (tags "
             "dset.init_checkpoint, dset.init_source).",
             PROFILE_NOTE.replace("GFLOPs/latency at", "GFLOPs at")]
    return Table("runs", "Runs: every run of the experiment and its status", df, None, None,
                 {"seed": integer, "trial": integer, "mAP@0.5:0.95": F4, "GFLOPs": F2}, notes)


def stage1_table(study: StudyResults) -> tuple[Table | None, str]:
    """Stage-1 pretraining runs (tag dset.role = pretrain): the RT-DETR checkpoints the cells fine-tune from.
    Not variants: listed here only, with the cells that started from each."""
    pre = study.pretrain
    if pre.empty:
        return None, "no stage-1 pretraining runs (tag dset.role = pretrain) in this experiment"
    children = study.children
    rows = []
    for _, r in pre.iterrows():
        ckpt, key = r["checkpoint_dir"], r.get(f"tags.{schema.TAG_STAGE1_KEY}")
        key = key if isinstance(key, str) and key else None
        users = children[[bool(ckpt and c and c.startswith(ckpt)) or bool(key and src and key in src)
                          for c, src in zip(children["init_checkpoint"], children["init_source"])]]
        rows.append({"run": r["cell"] or r["run_id"], "backbone": r["backbone"], "MLflow status": r["status"],
                     "mAP@0.5:0.95": r.get(M.BEST_MAP, math.nan),
                     "mAP@0.5": r.get(M.BEST_MAP50, math.nan),
                     "epochs": r.get(M.EPOCHS_RUN, math.nan), "checkpoint dir": ckpt,
                     "started from": r["init_checkpoint"], "cells fine-tuned from it": len(users),
                     "run id": r["run_id"]})
    notes = ["Stage 1: RT-DETR pretrained on the study's data; the cells fine-tune from its checkpoint (their "
             "dset.init_checkpoint, shown in the runs and ablation tables). These runs are not variants and enter "
             "no other table.",
             "checkpoint dir: tag dset.checkpoint_dir; started from: tag dset.init_checkpoint of the stage-1 run; "
             "cells fine-tuned from it: child runs whose dset.init_checkpoint lies in that folder or whose "
             "dset.init_source names the stage-1 run's cache key (dset.stage1_key)."]
    return Table("stage1", "Stage 1 (pretrained RT-DETR)", pd.DataFrame(rows), None, None,
                 {"mAP@0.5:0.95": F4, "mAP@0.5": F4, "epochs": integer, "cells fine-tuned from it": integer},
                 notes), ""


def _short(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def optuna_pareto_table(study: StudyResults, trials: pd.DataFrame) -> tuple[Table | None, str]:
    if not study.is_optuna:
        return None, "not an Optuna study (no run has a dset.trial tag)"
    if trials.empty:
        return None, "no finished trial with both best/mAP and gflops"
    front = trials[trials["pareto"]].sort_values([M.GFLOPS, "trial"], kind="mergesort")
    keys = sorted({k for s in trials["settings"] for k in s})
    rows = []
    for _, t in front.iterrows():
        run = study.runs[study.runs["run_id"] == t["run_id"]].iloc[0]
        row = {"trial": t["trial"], "mAP@0.5:0.95": t[M.BEST_MAP], "GFLOPs": t[M.GFLOPS],
               "latency (ms)": t[M.LATENCY_MS],
               "GFLOPs/latency at": profile_text(*(run.get(m, math.nan) for m in
                                                    (M.PROFILE_TOKENS, M.PROFILE_KEPT_TOKENS, M.PROFILE_KEEP_RATIO)))}
        row.update({_short(k): t["settings"].get(k) for k in keys})
        rows.append(row)
    n_trials = int(study.children["trial"].notna().sum())
    notes = [f"Pareto-optimal trials (maximise best/mAP, minimise gflops) among {len(trials)} finished trials "
             f"with both metrics ({n_trials} trials logged; the others, failed, unfinished or pruned by Optuna, "
             "are listed in the runs table).",
             "Settings: the parameters that vary across the finished trials (MLflow params, model. prefix dropped).",
             PROFILE_NOTE]
    df = pd.DataFrame(rows)
    return Table("optuna_pareto", "Optuna: Pareto-optimal trials and their settings", df, None, None,
                 {"trial": integer, "mAP@0.5:0.95": F4, "GFLOPs": F2, "latency (ms)": F2}, notes), ""


def optuna_importance_table(trials: pd.DataFrame) -> tuple[Table | None, str, dict]:
    if trials.empty:
        return None, "no finished trials", {}
    imp, method = stats.param_importances(list(trials["settings"]), list(zip(trials[M.BEST_MAP], trials[M.GFLOPS])),
                                          ("mAP", "GFLOPs"), ("maximize", "minimize"))
    if not imp:
        return None, method, {}
    keys = sorted(imp["mAP"], key=lambda k: (-imp["mAP"][k], k))
    df = pd.DataFrame([{"parameter": _short(k), "importance for mAP": imp["mAP"][k],
                        "importance for GFLOPs": imp["GFLOPs"][k]} for k in keys])
    notes = [f"Method: {method}. Importances of one objective sum to 1; with few trials they are rough.",
             "Computed by this report from the logged trials (params and final metrics), not by the study."]
    return (Table("optuna_importances", "Optuna: parameter importances", df, None, None,
                  {"importance for mAP": fmt(".3f"), "importance for GFLOPs": fmt(".3f")}, notes), "",
            {"importances": imp, "method": method})
