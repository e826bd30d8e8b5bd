"""The answer tables: does each variant beat RT-DETR of the same backbone (``answer``: ΔmAP with its interval and
verdict, ΔGFLOPs, side-by-side Δlatency), and is any variant cheaper and as accurate (``memory_pruning``: the same
against the study's targets). What each column means is in the tables' notes and docs/report.md."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd

from analysis.compute.deltas import BOOTSTRAP, Delta
from analysis.compute.latency import latency_by_variant
from analysis.compute.loading import StudyResults
from analysis.compute.stats import missing
from analysis.compute.verdicts import BETTER, NO_VERDICT, NON_INFERIOR, VERDICTS, Targets
from dset import metric_names as M

from .comparisons import CI_COLUMNS, against_rt_detr, delta_columns, latency_columns, percent_change
from .formatting import F2, F4, MISSING, SIGNED2, SIGNED4, delta_with_interval, percent_interval, profiled_at, pvalue
from .notes import PROFILE_NOTE, data_note, interval_notes, latency_note
from .table import Table

ANSWER_TEXT = ["variant", "ΔmAP [95% CI]", "verdict", "MDE", "interval includes", "ΔGFLOPs %", "Δlatency % [95% CI]",
               "scored on"]


def answer_table(study: StudyResults, vs: pd.DataFrame, targets: Targets,
                 latency: pd.DataFrame | None = None) -> tuple[Table | None, str]:
    """The answer first: per backbone, every variant (grid cells, not Optuna trials) against RT-DETR of the same
    backbone: ΔmAP with its 95% interval and verdict (judged against ``targets``), its minimum detectable effect,
    what the interval includes, ΔGFLOPs %, the side-by-side Δlatency % with its interval (``latency``:
    :func:`latency_by_variant`), and the split it was scored on; ``lead``: the answer in one sentence."""
    grid = vs[vs["trial"].isna() & vs["combo"].notna()]
    if grid.empty:
        return None, ("not an ablation: every run is an Optuna trial (see the optuna tables)" if study.is_optuna
                      else "no runs with switch tags")
    latency = latency_by_variant(study) if latency is None else latency
    rows, found = [], []
    for bb, base, g, c in against_rt_detr(study, vs, grid, targets):
        row = {"backbone": bb, "variant": g["label"], "n (variant / RT-DETR)": None, "GFLOPs at": None,
               "mAP": math.nan,
               "mAP RT-DETR": math.nan, **delta_columns(None), "ΔGFLOPs %": math.nan,
               **latency_columns(latency, g["label"]), "judged": False}
        if isinstance(c, str):  # no verdict, and why
            row["verdict"] = c
            rows.append(row)
            continue
        found.append(c)
        row.update({"n (variant / RT-DETR)": f"{g['n']} / {base['n']}", "mAP": c.variant_map,
                    "mAP RT-DETR": c.baseline_map, **delta_columns(c),
                    "ΔGFLOPs %": percent_change(g[f"{M.GFLOPS}_mean"], base[f"{M.GFLOPS}_mean"]),
                    "GFLOPs at": f"{profiled_at(g) or MISSING} vs RT-DETR {profiled_at(base) or MISSING}",
                    "verdict": c.verdict, "judged": c.judged})
        rows.append(row)
    if not rows:
        return None, "no variant besides the RT-DETR baselines"
    df = pd.DataFrame(rows)
    df["ΔmAP [95% CI]"] = [delta_with_interval(r["ΔmAP"], r["ΔmAP CI low"], r["ΔmAP CI high"])
                           for _, r in df.iterrows()]
    df["Δlatency % [95% CI]"] = [percent_interval(r["Δlatency (%)"], r["Δlatency CI low"], r["Δlatency CI high"])
                                 for _, r in df.iterrows()]
    order = ["backbone", *ANSWER_TEXT, "n (variant / RT-DETR)", "mAP", "mAP RT-DETR", "ΔmAP", "ΔmAP (%)",
             "ΔmAP50", "ΔmAP50 95% CI", "interval", "p (Welch)", "GFLOPs at", "Δlatency (%)",
             "latency measured side by side", "judged", "Δlatency CI low", "Δlatency CI high"] + CI_COLUMNS
    df = df[order]
    notes = [
        "Does DSET beat RT-DETR? Each row: a variant (E = encoder MoE, P = token pruning, D = decoder MoE, M<r> = "
        "memory pruning at keep ratio r) minus RT-DETR with the same backbone, same study settings.",
        *interval_notes(found, targets),
        "ΔGFLOPs %: variant / RT-DETR − 1 of the GFLOPs the runs counted (2 × multiply-adds, at the study's image "
        "size; seed means): counted, not sampled, so no interval. The tokens they were counted at: the CSV's "
        "\"GFLOPs at\" column and the main table's \"GFLOPs/latency at\".",
        PROFILE_NOTE,
        latency_note(latency),
        data_note(vs),
    ]
    return Table("answer", "Answer: each variant against RT-DETR of the same backbone", df, ANSWER_TEXT, None,
                 {"MDE": F4, "ΔGFLOPs %": lambda v: MISSING if missing(v) else f"{v:+.1f}%", "mAP": F4,
                  "mAP RT-DETR": F4, "ΔmAP": SIGNED4, "ΔmAP (%)": SIGNED2, "ΔmAP50": SIGNED4, "p (Welch)": pvalue},
                 [n for n in notes if n], answer_lead(df, found, targets)), ""


def answer_lead(df: pd.DataFrame, found: list[Delta], targets: Targets) -> str:
    """The answer in one sentence: per backbone, how many variants got each verdict; the rows without a verdict
    and why; the margin; and where the model was selected on the images it is scored on, that it was."""
    parts = []
    for bb, sub in df.groupby("backbone", sort=False):
        counts = Counter(v for v in sub.loc[sub["judged"], "verdict"])
        said = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
        judged = [f"{said}" if said else ""]
        unjudged = sub[~sub["judged"]]
        if len(unjudged):
            whys = list(dict.fromkeys(v.split(": ", 1)[-1] for v in unjudged["verdict"]))
            judged.append(f"{len(unjudged)} with no verdict ({'; '.join(whys)})")
        parts.append(f"{bb}: " + ", ".join(j for j in judged if j))
    splits = {d.split for d in found if d.method == BOOTSTRAP}
    where = ("scored on the test split" if splits == {"test"} else
             "scored on the validation images that also selected the model (selected on the images it is scored "
             "on)" if splits == {"val"} else
             "scored partly on the test split and partly on the validation images that selected the model"
             if splits else "no detections logged: Welch over the logged per-seed mAP")
    return (f"Answer (margin δ = {targets.delta_map:g} mAP; {where}): " + "; ".join(parts) + ".")


def meets_targets(verdict: str, gflops_percent: float, latency_high: float, targets: Targets) -> str:
    """"yes" when the ΔmAP verdict is better or non-inferior, GFLOPs changed by at most ``targets.gflops_percent``
    and the side-by-side latency interval's upper bound is at most ``targets.latency_percent``; otherwise "no: <what
    failed>"; "not decided: <why>" where a verdict or a number is missing."""
    undecided = [why for why, gap in (
        (verdict, verdict.startswith(NO_VERDICT)), ("GFLOPs not counted", missing(gflops_percent)),
        ("no side-by-side latency", missing(latency_high))) if gap]
    if undecided:
        return "not decided: " + "; ".join(undecided)
    failed = [what for what, ok in (
        (f"ΔmAP {verdict}", verdict in (BETTER, NON_INFERIOR)),
        (f"GFLOPs {gflops_percent:+.1f}% (need <= {targets.gflops_percent:g}%)",
         gflops_percent <= targets.gflops_percent),
        (f"latency up to {latency_high:+.1f}% (need <= {targets.latency_percent:g}%)",
         latency_high <= targets.latency_percent)) if not ok]
    return "yes" if not failed else "no: " + "; ".join(failed)


def memory_pruning_table(study: StudyResults, vs: pd.DataFrame, targets: Targets,
                         latency: pd.DataFrame | None = None) -> tuple[Table | None, str]:
    """Is any variant cheaper and as accurate as RT-DETR? Every variant of an experiment with memory-pruning runs
    against RT-DETR of the same backbone: ΔmAP with its interval and verdict, ΔGFLOPs %, the side-by-side Δlatency
    % with its interval, and whether it meets the study's targets."""
    grid = vs[vs["trial"].isna() & vs["combo"].notna()]
    if not grid["memory_pruning"].any():
        return None, "no memory-pruning variants in this experiment"
    latency = latency_by_variant(study) if latency is None else latency
    rows, found = [], []
    for bb, base, g, c in against_rt_detr(study, vs, grid, targets):
        row = {"backbone": bb, "model": g["label"], "DSET switches": g["combo"] or "none",
               "memory keep ratio": g["memory_keep"] if g["memory_pruning"] else math.nan,
               "n (variant / RT-DETR)": None, "mAP": math.nan, "mAP RT-DETR": math.nan, **delta_columns(None),
               "ΔGFLOPs (%)": math.nan, **latency_columns(latency, g["label"]), "GFLOPs": g[f"{M.GFLOPS}_mean"],
               "latency (ms, run metadata)": g[f"{M.LATENCY_MS}_mean"], "memory tokens kept": memory_kept_text(g),
               "latency device (run metadata)": g["latency_device"], "meets the targets": MISSING}
        if isinstance(c, str):  # no verdict, and why
            row["verdict"] = c
            rows.append(row)
            continue
        found.append(c)
        gflops = percent_change(g[f"{M.GFLOPS}_mean"], base[f"{M.GFLOPS}_mean"])
        row.update({"n (variant / RT-DETR)": f"{g['n']} / {base['n']}", "mAP": c.variant_map,
                    "mAP RT-DETR": c.baseline_map, **delta_columns(c), "ΔGFLOPs (%)": gflops,
                    "meets the targets": meets_targets(c.verdict, gflops, row["Δlatency CI high"], targets),
                    "verdict": c.verdict})
        rows.append(row)
    df = pd.DataFrame(rows)
    df["Δlatency % [95% CI]"] = [percent_interval(r["Δlatency (%)"], r["Δlatency CI low"], r["Δlatency CI high"])
                                 for _, r in df.iterrows()]
    order = ["backbone", "model", "DSET switches", "memory keep ratio", "n (variant / RT-DETR)", "mAP", "mAP RT-DETR",
             "ΔmAP", "ΔmAP 95% CI", "verdict", "MDE", "ΔGFLOPs (%)", "Δlatency % [95% CI]", "meets the targets",
             "scored on", "GFLOPs", "latency (ms, run metadata)", "memory tokens kept", "latency device (run metadata)",
             "latency measured side by side", "interval", "p (Welch)", "Δlatency (%)", "Δlatency CI low",
             "Δlatency CI high"] + CI_COLUMNS
    df = df[order]
    text = [c for c in order if c not in ["p (Welch)", "interval", "Δlatency (%)", "Δlatency CI low",
                                          "Δlatency CI high"] + CI_COLUMNS]
    notes = [
        "Is any variant cheaper and as accurate as RT-DETR? Every variant (DSET switches E = encoder MoE, "
        "P = token pruning, D = decoder MoE; memory keep ratio: memory pruning, the share of the decoder's memory "
        "tokens kept, – when off) against RT-DETR with the same backbone.",
        *interval_notes(found, targets),
        "ΔGFLOPs (%): variant / RT-DETR − 1 of the GFLOPs the runs counted (2 × multiply-adds, at the study's image "
        "size, where the backbone's share of the compute differs from 640 px's).",
        latency_note(latency),
        f"meets the targets (the study's targets): ΔmAP verdict better or non-inferior (δ = {targets.delta_map:g}), "
        f"ΔGFLOPs {targets.gflops_percent:g}% or less, and the side-by-side latency interval's upper bound "
        f"{targets.latency_percent:g}% or less; \"not decided\" where a verdict or a side-by-side latency is missing.",
        "latency (ms, run metadata): each run timed itself in its own process (batch 1, median, on the device shown); "
        "not compared: the Δlatency column is the side-by-side benchmark's.",
        "memory tokens kept: profile/memory_kept_tokens of profile/memory_tokens when GFLOPs and latency were "
        "measured.",
        data_note(vs),
    ]
    return Table("memory_pruning", "Memory pruning: cheaper than RT-DETR, and as accurate?", df, text, None,
                 {"memory keep ratio": lambda x: MISSING if missing(x) else f"{x:g}", "mAP": F4, "mAP RT-DETR": F4,
                  "ΔmAP": SIGNED4, "ΔGFLOPs (%)": SIGNED2, "GFLOPs": F2, "latency (ms, run metadata)": F2,
                  "p (Welch)": pvalue, "MDE": F4}, [n for n in notes if n]), ""


def memory_kept_text(v: pd.Series) -> str | None:
    texts = [f"{int(k)}/{int(t)}" for t, k in zip(v[f"{M.PROFILE_MEMORY_TOKENS}_values"],
                                                  v[f"{M.PROFILE_MEMORY_KEPT_TOKENS}_values"])]
    return "; ".join(dict.fromkeys(texts)) or None
