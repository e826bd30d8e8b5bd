"""The tables of every variant: ``main`` (accuracy, size, compute, speed against RT-DETR), ``ablation`` (the switch
combinations per backbone, with intervals and verdicts), ``reported_vs_measured`` (the seed report's published
numbers next to ours) and ``moe_diagnostics`` (are the experts different, does the router choose?)."""

from __future__ import annotations

import math

import pandas as pd

from analysis.compute.bootstrap import relative_percent
from analysis.compute.deltas import against_baseline
from analysis.compute.loading import StudyResults
from analysis.compute.normalise import COMBOS, backbones_in_order, combo_label
from analysis.compute.stats import missing
from analysis.compute.variants import baseline_of, moe_diagnostics, num_experts
from analysis.compute.verdicts import Targets
from dset import metric_names as M

from .comparisons import CI_COLUMNS, delta_columns
from .formatting import F1, F2, F4, MISSING, SIGNED2, SIGNED4, integer, mean_pm, millions, profiled_at, pvalue
from .notes import NOISE_NOTE, PROFILE_NOTE, data_note, excluded_note, interval_notes
from .table import Table

# The seed report's published DAIR-V2X numbers: (model, backbone) -> (mAP@0.5:0.95, mAP@0.5, mAP@0.75)
REPORTED = {
    ("RT-DETR", "R18"): (0.5851, 0.8077, 0.6658),
    ("DSET", "R18"): (0.5780, 0.8054, 0.6554),
    ("RT-DETR", "R34"): (0.5898, 0.8146, 0.6654),
    ("DSET", "R34"): (0.5960, 0.8185, 0.6766),
}


REPORTED_DATA = "DAIR-V2X (seed report)"


def main_table(study: StudyResults, vs: pd.DataFrame) -> Table:
    """Every variant: accuracy, change against RT-DETR of the same backbone, size, compute, speed."""
    rows = []
    floored = False
    for _, v in vs.iterrows():
        base = baseline_of(vs, v["backbone"])
        rel = math.nan
        if base is not None and base["group"] != v["group"] and not missing(v[f"{M.BEST_MAP}_mean"]):
            rel = relative_percent(v[f"{M.BEST_MAP}_mean"], base[f"{M.BEST_MAP}_mean"])
            floored |= missing(rel) and bool(base[f"{M.BEST_MAP}_mean"])
        rows.append({
            "model": v["label"], "backbone": v["backbone"], "n": v["n"],
            "mAP@0.5:0.95": mean_pm(v[f"{M.BEST_MAP}_mean"], v[f"{M.BEST_MAP}_std"]),
            "mAP@0.5:0.95 mean": v[f"{M.BEST_MAP}_mean"], "mAP@0.5:0.95 std": v[f"{M.BEST_MAP}_std"],
            "mAP@0.5": v[f"{M.BEST_MAP50}_mean"], "mAP@0.75": v[f"{M.BEST_MAP75}_mean"],
            "ΔmAP vs RT-DETR same backbone (%)": rel,
            "params": v[f"{M.PARAMS}_mean"], "active params": v[f"{M.ACTIVE_PARAMS}_mean"],
            "GFLOPs": v[f"{M.GFLOPS}_mean"], "latency (ms)": v[f"{M.LATENCY_MS}_mean"], "FPS": v[f"{M.FPS}_mean"],
            "latency device": v["latency_device"],
            "GFLOPs/latency at": profiled_at(v),
            "best epoch": ", ".join(str(int(e)) for e in v[f"{M.BEST_EPOCH}_values"]) or None,
            "data": v["data"], "runs not included": excluded_note(v["not_included"]) or None,
        })
    df = pd.DataFrame(rows)
    text = [c for c in df.columns if c not in ("mAP@0.5:0.95 mean", "mAP@0.5:0.95 std", "data")]
    csv_cols = [c for c in df.columns if c != "mAP@0.5:0.95"]
    baselines = [bb for bb in sorted(set(vs["backbone"].dropna())) if baseline_of(vs, bb) is not None]
    notes = [
        "mAP: best epoch's mAP (EMA weights, COCO evaluation) as logged (best/mAP, best/mAP50, best/mAP75); "
        "with n > 1 seeds: mean, and ± sample std for mAP@0.5:0.95.",
        "ΔmAP: (mAP − mAP of RT-DETR with the same backbone) / mAP of RT-DETR × 100, on seed means"
        + (f"; RT-DETR baselines here: {', '.join(baselines)}." if baselines
           else "; no RT-DETR baseline in this experiment."),
        "GFLOPs = 2 × multiply-adds (RT-DETR paper convention), counted by the runs with fvcore plus handles for "
        "attention products and grid sampling; params: total; active params: those one token uses (top-k experts).",
        "Latency: batch 1, eval mode, median of timed runs on the latency device shown; FPS = 1000 / latency.",
        PROFILE_NOTE,
        data_note(vs),
    ] + ([NOISE_NOTE] if floored else [])
    return Table("main", "Main comparison: every variant against RT-DETR with the same backbone", df, text, csv_cols,
                 {"n": integer, "mAP@0.5": F4, "mAP@0.75": F4, "mAP@0.5:0.95 mean": F4, "mAP@0.5:0.95 std": F4,
                  "ΔmAP vs RT-DETR same backbone (%)": SIGNED2, "params": millions, "active params": millions,
                  "GFLOPs": F2, "latency (ms)": F2, "FPS": F1}, notes)


def ablation_table(study: StudyResults, vs: pd.DataFrame, targets: Targets) -> tuple[Table | None, str]:
    """The 8 switch combinations per backbone, deltas against the baseline with their interval and verdict (memory
    pruning's variants are in :func:`memory_pruning_table`)."""
    grid = vs[vs["trial"].isna() & vs["combo"].notna() & (vs["memory_pruning"] == False)]  # noqa: E712
    combos = {(r.encoder_moe, r.token_pruning, r.decoder_moe) for r in grid.itertuples()}
    if len(combos) < 2:
        if study.is_optuna and grid.empty:
            return None, "not an ablation: every run is an Optuna trial (see the optuna tables)"
        return None, ("not an ablation: the experiment has runs of only one switch combination"
                      if combos else "no runs with switch tags")
    children = study.children
    all_seeds = sorted({int(s) for s in children.loc[children["trial"].isna(), "seed"] if not pd.isna(s)})
    rows, found = [], []
    for bb in backbones_in_order(grid):
        base = baseline_of(vs, bb)
        for e, p, d in COMBOS:
            groups = grid[(grid["backbone"] == bb) & (grid["encoder_moe"] == e) & (grid["token_pruning"] == p)
                          & (grid["decoder_moe"] == d)]
            common = {"backbone": bb, "enc MoE": "on" if e else "off", "pruning": "on" if p else "off",
                      "dec MoE": "on" if d else "off"}
            if groups.empty:
                rows.append({**common, "model": combo_label(bb, e, p, d), "n": 0, "seeds": None,
                             "mAP@0.5:0.95": None, "mean": math.nan, "std": math.nan, **delta_columns(None),
                             "verdict": MISSING, "init checkpoint": None, "runs not included": "not run"})
                continue
            for _, g in groups.iterrows():
                notes = [excluded_note(g["not_included"])] if g["not_included"] else []
                never = [s for s in all_seeds if s not in g["all_seeds"]]
                if never:
                    notes.append("seed " + ", ".join(map(str, never)) + " not run")
                row = {**common, "model": g["label"], "n": g["n"], "seeds": g["seeds"] or None,
                       "mAP@0.5:0.95": mean_pm(g[f"{M.BEST_MAP}_mean"], g[f"{M.BEST_MAP}_std"]),
                       "mean": g[f"{M.BEST_MAP}_mean"], "std": g[f"{M.BEST_MAP}_std"],
                       "init checkpoint": g["init_checkpoint"],
                       "runs not included": "; ".join(n for n in notes if n) or None}
                if base is None or base["group"] == g["group"] or g["n"] == 0:
                    verdict = "baseline" if base is not None and base["group"] == g["group"] else (
                        "no baseline" if base is None else "no runs")
                    row.update({**delta_columns(None), "verdict": verdict})
                else:
                    c = against_baseline(study, g, base, targets)
                    found.append(c)
                    row.update({**delta_columns(c), "verdict": c.verdict})
                rows.append(row)
    order = ["backbone", "enc MoE", "pruning", "dec MoE", "model", "n", "seeds", "mAP@0.5:0.95", "mean", "std", "ΔmAP",
             "ΔmAP (%)", "ΔmAP 95% CI", "ΔmAP50", "ΔmAP50 95% CI", "interval", "p (Welch)", "verdict", "MDE",
             "interval includes", "scored on", "init checkpoint", "runs not included"] + CI_COLUMNS
    df = pd.DataFrame(rows)[order]
    text = [c for c in df.columns if c not in ["mean", "std"] + CI_COLUMNS]
    csv_cols = [c for c in df.columns if c != "mAP@0.5:0.95"]
    notes = [
        "Switches: enc MoE = encoder token-level MoE FFN, pruning = encoder token pruning, dec MoE = decoder "
        "query-level MoE FFN; all off = RT-DETR.",
        "mAP@0.5:0.95 of the best epoch: mean ± sample std over the n seeds listed (as logged, best/mAP). ΔmAP, "
        "ΔmAP50 = variant − RT-DETR of the same backbone (absolute; ΔmAP also in % of RT-DETR's mAP).",
        *interval_notes(found, targets),
        "init checkpoint: the weights the variant's runs started from (tag dset.init_checkpoint).",
        "Combinations with no finished run are listed (\"not run\", or the runs' failures); see the runs table.",
    ]
    return Table("ablation", "Ablation: the switch combinations per backbone against RT-DETR", df, text, csv_cols,
                 {"n": integer, "mean": F4, "std": F4, "ΔmAP": SIGNED4, "ΔmAP (%)": SIGNED2, "ΔmAP50": SIGNED4,
                  "p (Welch)": pvalue, "MDE": F4}, notes), ""


def reported_table(study: StudyResults, vs: pd.DataFrame) -> Table:
    """The seed report's published DAIR-V2X numbers next to the ones measured in this experiment."""
    rows = []
    backbones = ["R18", "R34"] + sorted(b for b in set(vs["backbone"].dropna()) if b not in ("R18", "R34"))
    grid = vs[vs["trial"].isna() & (vs["n"] > 0)]
    for bb in backbones:
        measured = {}
        for model, combo in (("RT-DETR", ""), ("DSET", "E+P+D")):
            hits = grid[(grid["backbone"] == bb) & (grid["combo"] == combo)]
            measured[model] = hits.iloc[0] if len(hits) == 1 else (None if hits.empty else "several")
        for source in ("reported", "measured here"):
            for model in ("RT-DETR", "DSET"):
                name = f"{model}-{bb}" if model == "RT-DETR" else f"{model}-{bb} (E+P+D)"
                if source == "reported":
                    if (model, bb) not in REPORTED:
                        continue
                    vals = REPORTED[(model, bb)]
                    base = REPORTED[("RT-DETR", bb)][0]
                    rows.append({"model": name, "source": "reported", "data": REPORTED_DATA, "n": None,
                                 "mAP@0.5:0.95": vals[0], "mAP@0.5": vals[1], "mAP@0.75": vals[2],
                                 "ΔmAP vs RT-DETR (%)": (vals[0] - base) / base * 100 if model == "DSET" else math.nan,
                                 "note": None})
                    continue
                m = measured[model]
                if (model, bb) not in REPORTED and not isinstance(m, pd.Series):
                    continue
                if not isinstance(m, pd.Series):
                    why = "not in this experiment" if m is None else "several configurations here: see the main table"
                    rows.append({"model": name, "source": "measured here", "data": None, "n": 0,
                                 "mAP@0.5:0.95": math.nan, "mAP@0.5": math.nan, "mAP@0.75": math.nan,
                                 "ΔmAP vs RT-DETR (%)": math.nan, "note": why})
                    continue
                b = measured["RT-DETR"]
                rel = (relative_percent(m[f"{M.BEST_MAP}_mean"], b[f"{M.BEST_MAP}_mean"])
                       if model == "DSET" and isinstance(b, pd.Series) else math.nan)
                rows.append({"model": name, "source": "measured here", "data": m["data"], "n": m["n"],
                             "mAP@0.5:0.95": m[f"{M.BEST_MAP}_mean"], "mAP@0.5": m[f"{M.BEST_MAP50}_mean"],
                             "mAP@0.75": m[f"{M.BEST_MAP75}_mean"],
                             "ΔmAP vs RT-DETR (%)": rel, "note": None if m["n"] < 2 else "mean over seeds"})
    notes = [
        "reported: the numbers published in the seed report (DAIR-V2X, mAP@0.5:0.95 / @0.5 / @0.75), copied, not "
        "re-measured. measured here: this experiment's runs (best epoch; seed means), on the data set named in the "
        "data column (params data.name, data.image_size, train.epochs).",
        "Numbers from different data sets, resolutions or budgets are not comparable with each other; only the "
        "ΔmAP within one source compares DSET with RT-DETR.",
        NOISE_NOTE,
    ]
    return Table("reported_vs_measured", "Seed report (reported) versus this experiment (measured here)",
                 pd.DataFrame(rows), None, None,
                 {"n": integer, "mAP@0.5:0.95": F4, "mAP@0.5": F4, "mAP@0.75": F4, "ΔmAP vs RT-DETR (%)": SIGNED2},
                 notes)


# a mixture whose experts are this alike (mean pairwise cosine of their weights) is one FFN in disguise
DEGENERATE_COSINE = 0.99
# a router whose mean per-token entropy is within this share of ln(E) routes every token uniformly
UNIFORM_ENTROPY_SHARE = 0.01


def moe_diagnostics_table(study: StudyResults, vs: pd.DataFrame) -> tuple[Table | None, str]:
    """Per MoE variant, site and layer: the experts' mean pairwise cosine, the router's mean per-token entropy and
    ln E (uniform routing), from the latest logged sparse/<site>/layer<i>/{expert_cosine,router_entropy}; a layer
    is flagged degenerate where its experts are near-identical or its router near-uniform."""
    rows = []
    for _, v in vs[vs["n"] > 0].iterrows():
        diag = moe_diagnostics(study, v["group"])
        for where, frame in diag.items():
            experts = num_experts(study, v["first_run"], where)
            ln_e = math.log(experts) if experts else math.nan
            for _, r in frame.iterrows():
                flags = []
                if not missing(r["expert_cosine"]) and r["expert_cosine"] > DEGENERATE_COSINE:
                    flags.append(f"experts near-identical (cosine > {DEGENERATE_COSINE:g})")
                if not missing(r["router_entropy"]) and not missing(ln_e) and \
                        r["router_entropy"] >= (1 - UNIFORM_ENTROPY_SHARE) * ln_e:
                    flags.append(f"router near-uniform (entropy within {UNIFORM_ENTROPY_SHARE:.0%} of ln E)")
                rows.append({"model": v["label"], "site": where.replace("_", " "), "layer": int(r["layer"]),
                             "expert cosine": r["expert_cosine"], "router entropy (nats)": r["router_entropy"],
                             "ln E": ln_e, "n": v["n"], "degenerate": "; ".join(flags) or "no"})
    if not rows:
        return None, "no run logged sparse/<site>/layer<i>/expert_cosine or router_entropy (no MoE variant, or runs " \
                     "from before these diagnostics)"
    notes = [
        "Per MoE layer, the latest value MLflow holds (the last epoch's) of sparse/<encoder_moe|decoder_moe>/"
        "layer<i>/expert_cosine (the mean pairwise cosine similarity of the layer's experts' weights: 1.0 = "
        "identical experts, the dense FFN copied) and .../router_entropy (the mean per-token entropy of the routing "
        "distribution, nats; ln E = uniform over E experts); mean over the variant's n runs.",
        f"degenerate: a mixture that is not one: expert cosine > {DEGENERATE_COSINE:g} (the experts are one FFN), or "
        f"router entropy within {UNIFORM_ENTROPY_SHARE:.0%} of ln E (the router does not choose).",
    ]
    return Table("moe_diagnostics", "MoE diagnostics: are the experts different, does the router choose?",
                 pd.DataFrame(rows), None, None, {"expert cosine": F4, "router entropy (nats)": F4, "ln E": F4,
                                                  "n": integer, "layer": integer}, notes), ""
