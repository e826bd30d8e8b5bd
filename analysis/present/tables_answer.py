"""The report's tables, built from a :class:`analysis.runs.StudyRuns`, and their Markdown/CSV/LaTeX forms.

Each builder returns a :class:`Table` (or None when the experiment has nothing for it, with the reason
in ``skipped``). A table keeps raw values (floats, ints, strings; NaN for "not logged") in ``df``: the
CSV has them at full precision; Markdown, LaTeX and the HTML page (analysis/templates/index.html.j2) show
``text_columns`` through ``formats``. The files are written by pandas: ``DataFrame.to_csv``,
``DataFrame.to_markdown`` (tabulate) and ``Styler.to_latex``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dset import metric_names as M
from studies import mlflow_schema as S

from . import bootstrap as B
from . import deltas as D
from . import errors as E
from . import latency as L
from . import runs as R
from . import stats
from . import verdicts as V

MISSING = "–"

# The seed report's published DAIR-V2X numbers: (model, backbone) -> (mAP@0.5:0.95, mAP@0.5, mAP@0.75)
REPORTED = {
    ("RT-DETR", "R18"): (0.5851, 0.8077, 0.6658),
    ("DSET", "R18"): (0.5780, 0.8054, 0.6554),
    ("RT-DETR", "R34"): (0.5898, 0.8146, 0.6654),
    ("DSET", "R34"): (0.5960, 0.8185, 0.6766),
}
REPORTED_DATA = "DAIR-V2X (seed report)"
# ../shared/parity/README.md, measured on the reference RT-DETR R18 at 640 px (multiply-adds)
REFERENCE_R18_MACS = {"aifi": 0.40e9, "dec_ffn": 0.47e9, "total": 30.87e9}


def missing(v) -> bool:
    if v is None or v is pd.NA:
        return True
    if isinstance(v, (float, np.floating)):
        return math.isnan(v)
    return False


def fmt(spec: str) -> Callable:
    return lambda v: MISSING if missing(v) else format(v, spec)


F4, F2, F1, SIGNED2, SIGNED4 = fmt(".4f"), fmt(".2f"), fmt(".1f"), fmt("+.2f"), fmt("+.4f")


def millions(v) -> str:
    return MISSING if missing(v) else f"{v / 1e6:.2f} M"


def pvalue(v) -> str:
    if missing(v):
        return MISSING
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def integer(v) -> str:
    return MISSING if missing(v) else str(int(v))


def interval(low: float, high: float) -> str | None:
    return None if missing(low) or missing(high) else f"[{low:+.4f}, {high:+.4f}]"


def _profile_text(tokens, kept, ratio) -> str | None:
    if missing(tokens) or missing(kept):
        return None
    return f"{int(kept)}/{int(tokens)} tokens" + ("" if missing(ratio) else f" (keep ratio {ratio:.2f})")


def profiled_at(v: pd.Series) -> str | None:
    """What a variant's GFLOPs and latency were measured at (profile/kept_tokens, profile/tokens,
    profile/keep_ratio), e.g. "70/100 tokens (keep ratio 0.70)"; per seed, "; "-joined, where seeds differ."""
    texts = [_profile_text(t, k, r) for t, k, r in zip(*(v[f"{m}_values"] for m in (
        M.PROFILE_TOKENS, M.PROFILE_KEPT_TOKENS, M.PROFILE_KEEP_RATIO)))]
    return "; ".join(dict.fromkeys(t for t in texts if t)) or None


PROFILE_NOTE = ("GFLOPs/latency at: the AIFI encoder tokens kept of the tokens in and their ratio when the GFLOPs "
                "and latency were measured (profile/kept_tokens, profile/tokens, profile/keep_ratio, on the reported "
                "checkpoint at its schedule); – where the run did not log them.")
NOISE_NOTE = (f"ΔmAP (%) is not shown (–) where both mAPs are below the noise floor of {B.NOISE_FLOOR_MAP:g} "
              "(analysis.bootstrap.NOISE_FLOOR_MAP): a ratio of two near-zero mAPs (0.0032 against 0.0010 would read "
              "+220%) measures noise, not the model.")


def mean_pm(mean: float, std: float, spec: str = ".4f") -> str:
    if missing(mean):
        return MISSING
    return format(mean, spec) if missing(std) else f"{format(mean, spec)} ± {format(std, spec)}"


@dataclass
class Table:
    name: str                                   # file stem: <name>.md/.csv/.tex
    title: str
    df: pd.DataFrame
    text_columns: list[str] | None = None       # shown in Markdown/LaTeX/HTML (None: all)
    csv_columns: list[str] | None = None        # written to CSV (None: all)
    formats: dict[str, Callable] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lead: str | None = None                     # a sentence shown before the table (the answer's first line)

    def text(self) -> pd.DataFrame:
        """The table as shown: the text columns, every cell a string."""
        cols = self.text_columns or list(self.df.columns)
        out = pd.DataFrame(index=self.df.index)
        for c in cols:
            f = self.formats.get(c, _default_format)
            out[c] = [f(v) for v in self.df[c]]
        return out.reset_index(drop=True)


def _default_format(v) -> str:
    if missing(v):
        return MISSING
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if float(v).is_integer() else format(float(v), ".4g")
    if isinstance(v, (tuple, list)):
        return ", ".join(str(x) for x in v) or MISSING
    return str(v)


def _csv_value(v) -> str:
    if missing(v):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format(float(v), ".10g")
    if isinstance(v, (tuple, list)):
        return " ".join(str(x) for x in v)
    return str(v)


# ------------------------------------------------------------------------------------------ render
def to_csv(t: Table) -> str:
    cols = t.csv_columns or list(t.df.columns)
    return t.df[cols].map(_csv_value).to_csv(index=False, lineterminator="\n")


def _markdown_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown_grid(text: pd.DataFrame) -> str:
    """A Markdown pipe table (tabulate): the cells as they are, not padded to the column width and not parsed
    as numbers (tabulate would rewrite "0.5050" as "0.505")."""
    cells = text.rename(columns=_markdown_cell).map(_markdown_cell)
    return cells.to_markdown(index=False, tablefmt="pipe", disable_numparse=True, stralign=None, numalign=None)


def to_markdown(t: Table) -> str:
    parts = [f"## {t.title}", "", markdown_grid(t.text())]
    if t.notes:
        parts += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(parts) + "\n"


# LaTeX's special characters, and the Unicode ones pdflatex cannot typeset in text mode
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"\ensuremath{\pm}",
        "Δ": r"\ensuremath{\Delta}", "×": r"\ensuremath{\times}", "–": "--", "—": "---", "≥": r"\ensuremath{\geq}",
        "≤": r"\ensuremath{\leq}", "−": r"\ensuremath{-}", "·": r"\ensuremath{\cdot}", "<": r"\textless{}",
        ">": r"\textgreater{}", "ρ": r"\ensuremath{\rho}", "²": r"\ensuremath{^2}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(t: Table) -> str:
    """A booktabs table (the tabular from pandas' Styler), its caption, label and notes; numeric columns
    right-aligned."""
    text = t.text()
    numeric = [all(_looks_numeric(v) for v in text[c]) and len(text) > 0 for c in text.columns]
    spec = "".join("r" if n else "l" for n in numeric)
    tabular = (text.style.hide(axis="index").format(tex_escape).format_index(tex_escape, axis=1)
               .to_latex(column_format=spec, hrules=True))
    lines = [f"% {t.name}: generated by analysis/make_report.py; needs \\usepackage{{booktabs}}",
             r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{tex_escape(t.title)}}}",
             f"\\label{{tab:{t.name}}}", tabular.rstrip("\n")]
    if t.notes:
        lines += [r"\par\smallskip\footnotesize"] + [tex_escape(n) + r"\par" for n in t.notes]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


def _looks_numeric(s: str) -> bool:
    s = s.replace("±", "").replace(" M", "").replace("<", "").replace(" ", "").replace(MISSING, "0")
    try:
        float(s.replace("+", "", 1))
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------- builders
def _excluded_note(reasons: tuple[str, ...]) -> str:
    counts = Counter(r.split(":")[0] if r.startswith("failed") else r for r in reasons)
    return "; ".join(f"{n} {why}" for why, n in sorted(counts.items()))


def data_note(vs: pd.DataFrame) -> str:
    datas = sorted(set(vs["data"]))
    return "Measured here on: " + " | ".join(datas) + " (params data.name, data.image_size, train.epochs)."


def main_table(study: R.StudyRuns, vs: pd.DataFrame) -> Table:
    """Every variant: accuracy, change against RT-DETR of the same backbone, size, compute, speed."""
    rows = []
    floored = False
    for _, v in vs.iterrows():
        base = R.baseline_of(vs, v["backbone"])
        rel = math.nan
        if base is not None and base["group"] != v["group"] and not missing(v[f"{M.BEST_MAP}_mean"]):
            rel = B.relative_percent(v[f"{M.BEST_MAP}_mean"], base[f"{M.BEST_MAP}_mean"])
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
            "data": v["data"], "runs not included": _excluded_note(v["not_included"]) or None,
        })
    df = pd.DataFrame(rows)
    text = [c for c in df.columns if c not in ("mAP@0.5:0.95 mean", "mAP@0.5:0.95 std", "data")]
    csv_cols = [c for c in df.columns if c != "mAP@0.5:0.95"]
    baselines = [bb for bb in sorted(set(vs["backbone"].dropna())) if R.baseline_of(vs, bb) is not None]
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


def _delta_columns(d: D.Delta | None) -> dict:
    """The columns every comparison with RT-DETR shows, from one :class:`analysis.deltas.Delta`."""
    if d is None:
        return {"ΔmAP": math.nan, "ΔmAP (%)": math.nan, "ΔmAP 95% CI": None, "ΔmAP50": math.nan,
                "ΔmAP50 95% CI": None, "interval": None, "p (Welch)": math.nan, "MDE": math.nan,
                "interval includes": None, "scored on": None,
                "ΔmAP CI low": math.nan, "ΔmAP CI high": math.nan, "ΔmAP50 CI low": math.nan,
                "ΔmAP50 CI high": math.nan}
    return {"ΔmAP": d.map, "ΔmAP (%)": d.relative, "ΔmAP 95% CI": interval(d.map_low, d.map_high),
            "ΔmAP50": d.map50, "ΔmAP50 95% CI": interval(d.map50_low, d.map50_high), "interval": d.method_text,
            "p (Welch)": d.p_welch, "MDE": d.mde, "interval includes": d.includes or None,
            "scored on": scored_on(d), "ΔmAP CI low": d.map_low, "ΔmAP CI high": d.map_high,
            "ΔmAP50 CI low": d.map50_low, "ΔmAP50 CI high": d.map50_high}


SPLIT_WORDS = {"test": "test", "val": "val (selected on it)"}


def scored_on(d: D.Delta) -> str:
    """The split (and images) a comparison's ΔmAP was scored on, e.g. "test, 200 images"."""
    if d.method != D.BOOTSTRAP:
        return "val (logged best/mAP)"
    return f"{SPLIT_WORDS.get(d.split, d.split)}, {d.n_images} images"


CI_COLUMNS = ["ΔmAP CI low", "ΔmAP CI high", "ΔmAP50 CI low", "ΔmAP50 CI high"]  # CSV only (text: the CI strings)


def split_note(found: list[D.Delta]) -> str | None:
    """Which split the bootstrap comparisons were scored on, and what that means; None without any."""
    splits = sorted({d.split for d in found if d.method == D.BOOTSTRAP})
    if not splits:
        return None
    parts = []
    if "test" in splits:
        parts.append("test: the study's scoring split, images the model was not selected on (eval/test_detections"
                     ".json against eval/test_ground_truth.json)")
    if "val" in splits:
        parts.append("val: the validation images, which also chose the reported checkpoint (best epoch): selected "
                     "on the images it is scored on, so its ΔmAP can be optimistic (eval/detections.json against "
                     "eval/ground_truth.json)")
    return "Scored on: " + "; ".join(parts) + "."


def _interval_notes(found: list[D.Delta], targets: V.Targets) -> list[str]:
    """How the intervals of ``found`` were computed, the verdict rule, and why some fell back on Welch."""
    notes = []
    boot = [d for d in found if d.method == D.BOOTSTRAP]
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
        notes.append(V.MDE_NOTE)
        notes.append(split_note(boot))
    welch = [d for d in found if d.method == D.WELCH]
    if welch:
        reasons = "; ".join(dict.fromkeys(d.fallback for d in welch if d.fallback))
        notes.append(
            "Welch over seeds (fallback): these runs did not log usable detections and ground truth (runs from before "
            "eval/detections.json existed): the interval is Welch's unequal-variance interval over the per-seed "
            "best/mAP, and with n=1 on either side there is none (\"n=1, no test\")" + (f". Why: {reasons}." if reasons
                                                                                      else "."))
    notes.append(f"{V.VERDICT_NOTE} Here δ = {targets.delta_map:g} mAP, learning floor {targets.learning_floor_map:g} "
                 f"mAP, at least {targets.min_scored_images} scored images. p (Welch): over seeds, only where both "
                 "sides have n > 1.")
    if any(missing(d.relative) and d.baseline_map for d in found):
        notes.append(NOISE_NOTE)
    return notes


def ablation_table(study: R.StudyRuns, vs: pd.DataFrame, targets: V.Targets) -> tuple[Table | None, str]:
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
    for bb in sorted(set(grid["backbone"].dropna()), key=lambda b: (R.BACKBONE_ORDER.get(b, 9), b)):
        base = R.baseline_of(vs, bb)
        for e, p, d in R.COMBOS:
            groups = grid[(grid["backbone"] == bb) & (grid["encoder_moe"] == e) & (grid["token_pruning"] == p)
                          & (grid["decoder_moe"] == d)]
            common = {"backbone": bb, "enc MoE": "on" if e else "off", "pruning": "on" if p else "off",
                      "dec MoE": "on" if d else "off"}
            if groups.empty:
                rows.append({**common, "model": R.combo_label(bb, e, p, d), "n": 0, "seeds": None,
                             "mAP@0.5:0.95": None, "mean": math.nan, "std": math.nan, **_delta_columns(None),
                             "verdict": MISSING, "init checkpoint": None, "runs not included": "not run"})
                continue
            for _, g in groups.iterrows():
                notes = [_excluded_note(g["not_included"])] if g["not_included"] else []
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
                    row.update({**_delta_columns(None), "verdict": verdict})
                else:
                    c = D.against_baseline(study, g, base, targets)
                    found.append(c)
                    row.update({**_delta_columns(c), "verdict": c.verdict})
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
        *_interval_notes(found, targets),
        "init checkpoint: the weights the variant's runs started from (tag dset.init_checkpoint).",
        "Combinations with no finished run are listed (\"not run\", or the runs' failures); see the runs table.",
    ]
    return Table("ablation", "Ablation: the switch combinations per backbone against RT-DETR", df, text, csv_cols,
                 {"n": integer, "mean": F4, "std": F4, "ΔmAP": SIGNED4, "ΔmAP (%)": SIGNED2, "ΔmAP50": SIGNED4,
                  "p (Welch)": pvalue, "MDE": F4}, notes), ""


def side_by_side_latency(study: R.StudyRuns) -> pd.DataFrame:
    """The study's side-by-side latency deltas (:func:`analysis.latency.side_by_side_latency`), indexed by variant
    label; an empty frame where the study has no side-by-side benchmark."""
    return L.side_by_side_latency(study).set_index("variant", drop=False)


def _latency_of(latency: pd.DataFrame, label: str) -> dict:
    """One variant's side-by-side latency change: {"Δlatency (%)", "Δlatency CI low", "Δlatency CI high",
    "latency measured side by side"}, NaN/None where the benchmark did not time it."""
    if label not in latency.index:
        return {"Δlatency (%)": math.nan, "Δlatency CI low": math.nan, "Δlatency CI high": math.nan,
                "latency measured side by side": None}
    r = latency.loc[label]
    return {"Δlatency (%)": float(r["delta_percent"]), "Δlatency CI low": float(r["delta_low"]),
            "Δlatency CI high": float(r["delta_high"]),
            "latency measured side by side": f"{r['device']}, {r['image_size']} px, batch {r['batch']}, "
                                             f"{r['precision']}, {r['processes']} processes × {r['rounds']} rounds"}


def percent_interval(value: float, low: float, high: float) -> str:
    """"-6.1% [-7.3, -5.0]", or the value alone without an interval, "–" without a value."""
    if missing(value):
        return MISSING
    return f"{value:+.1f}%" + ("" if missing(low) or missing(high) else f" [{low:+.1f}, {high:+.1f}]")


def delta_with_interval(value: float, low: float, high: float) -> str:
    """"+0.0123 [+0.0050, +0.0190]", or the value alone without an interval, "–" without a value."""
    if missing(value):
        return MISSING
    return f"{value:+.4f}" + ("" if missing(low) or missing(high) else f" [{low:+.4f}, {high:+.4f}]")


ANSWER_TEXT = ["variant", "ΔmAP [95% CI]", "verdict", "MDE", "interval includes", "ΔGFLOPs %", "Δlatency % [95% CI]",
               "scored on"]


def answer_table(study: R.StudyRuns, vs: pd.DataFrame, targets: V.Targets,
                 latency: pd.DataFrame | None = None) -> tuple[Table | None, str]:
    """The answer first: per backbone, every variant (grid cells, not Optuna trials) against RT-DETR of the same
    backbone: ΔmAP with its 95% interval and verdict (judged against ``targets``), its minimum detectable effect,
    what the interval includes, ΔGFLOPs %, the side-by-side Δlatency % with its interval (``latency``:
    :func:`side_by_side_latency`), and the split it was scored on; ``lead``: the answer in one sentence."""
    grid = vs[vs["trial"].isna() & vs["combo"].notna()]
    if grid.empty:
        return None, ("not an ablation: every run is an Optuna trial (see the optuna tables)" if study.is_optuna
                      else "no runs with switch tags")
    latency = side_by_side_latency(study) if latency is None else latency
    rows, found = [], []
    for bb in sorted(set(grid["backbone"].dropna()), key=lambda b: (R.BACKBONE_ORDER.get(b, 9), b)):
        base = R.baseline_of(vs, bb)
        for _, g in grid[grid["backbone"] == bb].iterrows():
            if base is not None and g["group"] == base["group"]:
                continue
            row = {"backbone": bb, "variant": g["label"], "n (variant / RT-DETR)": None, "GFLOPs at": None,
                   "mAP": math.nan,
                   "mAP RT-DETR": math.nan, **_delta_columns(None), "ΔGFLOPs %": math.nan,
                   **_latency_of(latency, g["label"]), "judged": False}
            if base is None or g["n"] == 0:
                row["verdict"] = f"{V.NO_VERDICT}: " + ("no RT-DETR baseline" if base is None else "no finished run")
                rows.append(row)
                continue
            c = D.against_baseline(study, g, base, targets)
            found.append(c)
            row.update({"n (variant / RT-DETR)": f"{g['n']} / {base['n']}", "mAP": c.variant_map,
                        "mAP RT-DETR": c.baseline_map, **_delta_columns(c),
                        "ΔGFLOPs %": _percent_change(g[f"{M.GFLOPS}_mean"], base[f"{M.GFLOPS}_mean"]),
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
        *_interval_notes(found, targets),
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


def latency_note(latency: pd.DataFrame) -> str:
    if latency.empty:
        return ("Δlatency %: – : this study has no side-by-side latency benchmark (variant and RT-DETR timed "
                "interleaved in one process, over several processes); the per-run latencies in the main table are "
                "run metadata, each timed in its own process, and are not compared here.")
    return ("Δlatency %: variant / RT-DETR − 1 of the side-by-side benchmark (both timed interleaved in one process, "
            "repeated over several processes; analysis.latency), with its 95% interval, which includes the "
            "between-process spread; measured on: " + "; ".join(sorted({
                f"{r['device']}, {r['image_size']} px, batch {r['batch']}, {r['precision']}"
                for _, r in latency.iterrows()})) + ".")


def answer_lead(df: pd.DataFrame, found: list[D.Delta], targets: V.Targets) -> str:
    """The answer in one sentence: per backbone, how many variants got each verdict; the rows without a verdict
    and why; the margin; and where the model was selected on the images it is scored on, that it was."""
    parts = []
    for bb, sub in df.groupby("backbone", sort=False):
        counts = Counter(v for v in sub.loc[sub["judged"], "verdict"])
        said = ", ".join(f"{counts[v]} {v}" for v in V.VERDICTS if counts[v])
        judged = [f"{said}" if said else ""]
        unjudged = sub[~sub["judged"]]
        if len(unjudged):
            whys = list(dict.fromkeys(v.split(": ", 1)[-1] for v in unjudged["verdict"]))
            judged.append(f"{len(unjudged)} with no verdict ({'; '.join(whys)})")
        parts.append(f"{bb}: " + ", ".join(j for j in judged if j))
    splits = {d.split for d in found if d.method == D.BOOTSTRAP}
    where = ("scored on the test split" if splits == {"test"} else
             "scored on the validation images that also selected the model (selected on the images it is scored "
             "on)" if splits == {"val"} else
             "scored partly on the test split and partly on the validation images that selected the model"
             if splits else "no detections logged: Welch over the logged per-seed mAP")
    return (f"Answer (margin δ = {targets.delta_map:g} mAP; {where}): " + "; ".join(parts) + ".")


def meets_targets(verdict: str, gflops_percent: float, latency_high: float, targets: V.Targets) -> str:
    """"yes" when the ΔmAP verdict is better or non-inferior, GFLOPs changed by at most ``targets.gflops_percent``
    and the side-by-side latency interval's upper bound is at most ``targets.latency_percent``; otherwise "no: <what
    failed>"; "not decided: <why>" where a verdict or a number is missing."""
    undecided = [why for why, gap in (
        (verdict, verdict.startswith(V.NO_VERDICT)), ("GFLOPs not counted", missing(gflops_percent)),
        ("no side-by-side latency", missing(latency_high))) if gap]
    if undecided:
        return "not decided: " + "; ".join(undecided)
    failed = [what for what, ok in (
        (f"ΔmAP {verdict}", verdict in (V.BETTER, V.NON_INFERIOR)),
        (f"GFLOPs {gflops_percent:+.1f}% (need <= {targets.gflops_percent:g}%)",
         gflops_percent <= targets.gflops_percent),
        (f"latency up to {latency_high:+.1f}% (need <= {targets.latency_percent:g}%)",
         latency_high <= targets.latency_percent)) if not ok]
    return "yes" if not failed else "no: " + "; ".join(failed)


def _percent_change(variant: float, baseline: float) -> float:
    return math.nan if missing(variant) or missing(baseline) or not baseline else 100 * (variant / baseline - 1)


def memory_pruning_table(study: R.StudyRuns, vs: pd.DataFrame, targets: V.Targets,
                         latency: pd.DataFrame | None = None) -> tuple[Table | None, str]:
    """Is any variant cheaper and as accurate as RT-DETR? Every variant of an experiment with memory-pruning runs
    against RT-DETR of the same backbone: ΔmAP with its interval and verdict, ΔGFLOPs %, the side-by-side Δlatency
    % with its interval, and whether it meets the study's targets."""
    grid = vs[vs["trial"].isna() & vs["combo"].notna()]
    if not grid["memory_pruning"].any():
        return None, "no memory-pruning variants in this experiment"
    latency = side_by_side_latency(study) if latency is None else latency
    rows, found = [], []
    for bb in sorted(set(grid["backbone"].dropna()), key=lambda b: (R.BACKBONE_ORDER.get(b, 9), b)):
        base = R.baseline_of(vs, bb)
        for _, g in grid[grid["backbone"] == bb].iterrows():
            if base is not None and g["group"] == base["group"]:
                continue
            row = {"backbone": bb, "model": g["label"], "DSET switches": g["combo"] or "none",
                   "memory keep ratio": g["memory_keep"] if g["memory_pruning"] else math.nan,
                   "n (variant / RT-DETR)": None, "mAP": math.nan, "mAP RT-DETR": math.nan, **_delta_columns(None),
                   "ΔGFLOPs (%)": math.nan, **_latency_of(latency, g["label"]), "GFLOPs": g[f"{M.GFLOPS}_mean"],
                   "latency (ms, run metadata)": g[f"{M.LATENCY_MS}_mean"], "memory tokens kept": _memory_kept_text(g),
                   "latency device (run metadata)": g["latency_device"], "meets the targets": MISSING}
            if base is None or g["n"] == 0:
                row["verdict"] = f"{V.NO_VERDICT}: " + ("no RT-DETR baseline" if base is None else "no finished run")
                rows.append(row)
                continue
            c = D.against_baseline(study, g, base, targets)
            found.append(c)
            gflops = _percent_change(g[f"{M.GFLOPS}_mean"], base[f"{M.GFLOPS}_mean"])
            row.update({"n (variant / RT-DETR)": f"{g['n']} / {base['n']}", "mAP": c.variant_map,
                        "mAP RT-DETR": c.baseline_map, **_delta_columns(c), "ΔGFLOPs (%)": gflops,
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
        *_interval_notes(found, targets),
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


# a mixture whose experts are this alike (mean pairwise cosine of their weights) is one FFN in disguise
DEGENERATE_COSINE = 0.99
# a router whose mean per-token entropy is within this share of ln(E) routes every token uniformly
UNIFORM_ENTROPY_SHARE = 0.01


def moe_diagnostics_table(study: R.StudyRuns, vs: pd.DataFrame) -> tuple[Table | None, str]:
    """Per MoE variant, site and layer: the experts' mean pairwise cosine, the router's mean per-token entropy and
    ln E (uniform routing), from the latest logged sparse/<site>/layer<i>/{expert_cosine,router_entropy}; a layer
    is flagged degenerate where its experts are near-identical or its router near-uniform."""
    rows = []
    for _, v in vs[vs["n"] > 0].iterrows():
        diag = R.moe_diagnostics(study, v["group"])
        for where, frame in diag.items():
            experts = _num_experts(study, v["first_run"], where)
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


def _num_experts(study: R.StudyRuns, run_id: str, where: str) -> int | None:
    """The number of experts of MoE site ``where`` (encoder_moe or decoder_moe) in run ``run_id``'s configuration."""
    try:
        return int(getattr(study.config(run_id).model, where).num_experts)
    except Exception:  # noqa: BLE001  (params that do not rebuild a configuration: ln E unknown, shown as –)
        return None


def _memory_kept_text(v: pd.Series) -> str | None:
    texts = [f"{int(k)}/{int(t)}" for t, k in zip(v[f"{M.PROFILE_MEMORY_TOKENS}_values"],
                                                  v[f"{M.PROFILE_MEMORY_KEPT_TOKENS}_values"])]
    return "; ".join(dict.fromkeys(texts)) or None


# ------------------------------------------------------------------------- errors beyond mAP
def _without_detections(evals: dict) -> str | None:
    """Why some of these runs (run id -> :class:`analysis.bootstrap.Evaluated`, or why none) have no error
    analysis, naming one of them; None when every run has one."""
    missing = {r: why for r, why in evals.items() if isinstance(why, str)}
    if not missing:
        return None
    run, why = sorted(missing.items())[0]
    head = "no detections logged" if all(w.startswith("no ") for w in missing.values()) else "no usable detections"
    return f"{head} ({len(missing)} of {len(evals)} runs; run {run}: {why})"


def error_analyses(study: R.StudyRuns, vs: pd.DataFrame) -> dict[str, E.ErrorAnalysis | str]:
    """Per variant (``group``) with included runs: the mean over its runs of their error analyses
    (:func:`analysis.errors.mean_over_runs`, from the detections each logged), or why there is none."""
    out: dict[str, E.ErrorAnalysis | str] = {}
    for _, v in vs[vs["n"] > 0].iterrows():
        evals = R.evaluations(study, tuple(v["run_ids"]))
        why = _without_detections(evals)
        if why is None:
            try:
                out[v["group"]] = E.mean_over_runs([evals[r].errors for r in v["run_ids"]], v["label"])
                continue
            except ValueError as exc:  # e.g. seeds evaluated on different images: say so
                why = str(exc)
        out[v["group"]] = why
    return out


SIZE_RANGES = {"small": "< 32² px", "medium": "32²–96² px", "large": "> 96² px"}


def ap_by_size_table(study: R.StudyRuns, vs: pd.DataFrame,
                     analyses: dict[str, E.ErrorAnalysis | str]) -> tuple[Table | None, str]:
    """Every variant: AP for small, medium and large objects (seed means) and the change against RT-DETR of
    the same backbone, with the ground-truth boxes each AP averages over. ``analyses``: :func:`error_analyses`."""
    found = [a for a in analyses.values() if isinstance(a, E.ErrorAnalysis)]
    if not found:
        if not analyses:
            return None, "no finished run"
        group, why = next(iter(analyses.items()))  # the first variant in reading order
        return None, f"no variant with usable detections ({vs.loc[vs['group'] == group, 'label'].iloc[0]}: {why})"
    rows = []
    for _, v in vs.iterrows():
        a = analyses.get(v["group"], "no finished run")
        base = R.baseline_of(vs, v["backbone"])
        b = analyses.get(base["group"], "no finished run") if base is not None else None
        if not isinstance(a, E.ErrorAnalysis):
            note = a
        elif base is None:
            note = "no RT-DETR baseline of this backbone"
        elif base["group"] == v["group"]:
            note = "RT-DETR (the baseline)"
        elif not isinstance(b, E.ErrorAnalysis):
            note = f"RT-DETR {v['backbone']}: {b}"
        elif not np.array_equal(a.image_ids, b.image_ids):
            note = "evaluated on other images than RT-DETR: no Δ"
        else:
            note = None
        has = isinstance(a, E.ErrorAnalysis)
        compared = has and note is None
        row = {"backbone": v["backbone"], "model": v["label"], "n": a.n_runs if has else 0}
        row.update({f"AP {s}": a.ap_by_size[s] if has else math.nan for s in E.SIZES})
        row.update({f"ΔAP {s}": a.ap_by_size[s] - b.ap_by_size[s] if compared else math.nan for s in E.SIZES})
        row.update({f"GT {s}": a.gt_by_size[s] if has else math.nan for s in E.SIZES})
        row["note"] = note
        rows.append(row)
    n_images = sorted({len(a.image_ids) for a in found})
    notes = [
        "AP@[.5:.95] by object size: pycocotools' COCOeval stats[3], [4], [5] (area 'all' boxes split by their "
        "annotation area: small " + SIZE_RANGES["small"] + ", medium " + SIZE_RANGES["medium"] + ", large "
        + SIZE_RANGES["large"] + "; a box exactly on a bound counts in both ranges, as in pycocotools), from each "
        "run's logged detections (eval/detections.json) against eval/ground_truth.json on "
        + " / ".join(map(str, n_images)) + " validation images; n: runs (seeds) averaged.",
        "GT small/medium/large: the non-crowd ground-truth boxes in that range, the boxes each AP averages over "
        "(an AP over a handful of boxes says little); – for an AP: no box of that size.",
        "ΔAP = variant − RT-DETR of the same backbone (seed means). No interval: these differences are "
        "descriptive, not findings; the intervals are in the answer table (mAP) and the class_ap_deltas table.",
        data_note(vs),
    ]
    fm = {"n": integer, **{f"AP {s}": F4 for s in E.SIZES}, **{f"ΔAP {s}": SIGNED4 for s in E.SIZES},
          **{f"GT {s}": integer for s in E.SIZES}}
    return Table("ap_by_size", "AP by object size (COCO area ranges) against RT-DETR of the same backbone",
                 pd.DataFrame(rows), None, None, fm, notes), ""


def class_ap_deltas_table(study: R.StudyRuns, vs: pd.DataFrame, n_resamples: int = B.N_RESAMPLES,
                          seed: int = 0) -> tuple[Table | None, str]:
    """Per variant and class: ΔAP@[.5:.95] against RT-DETR of the same backbone, with the paired bootstrap
    interval of :func:`analysis.bootstrap.paired_class_delta` (the mAP comparison's image and seed draws)."""
    grid = vs[vs["trial"].isna()]
    backbones = sorted(set(grid["backbone"].dropna()), key=lambda b: (R.BACKBONE_ORDER.get(b, 9), b))
    if not any(R.baseline_of(vs, bb) is not None for bb in backbones):
        return None, ("not an ablation: every run is an Optuna trial, and there is no RT-DETR baseline"
                      if study.is_optuna else "no RT-DETR baseline (all switches off, finished) in this experiment")
    rows, computed, reasons = [], [], []
    for bb in backbones:
        base = R.baseline_of(vs, bb)
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
                evals = R.evaluations(study, tuple(v["run_ids"]) + tuple(base["run_ids"]))
                why = _without_detections(evals)
            if why is None:
                try:
                    found = B.paired_class_delta([evals[r] for r in v["run_ids"]],
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
        "(eval/detections.json) against eval/ground_truth.json on every validation image; the mean over seeds. "
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
           "detections logged: runs from before eval/detections.json existed)."] if reasons else []),
        data_note(vs),
    ]
    text = [c for c in order if c not in ("category id", "ΔAP CI low", "ΔAP CI high")]
    return Table("class_ap_deltas", "Per-class AP against RT-DETR of the same backbone, with 95% intervals", df,
                 text, None, {"GT boxes": integer, "category id": integer, "AP": F4, "AP RT-DETR": F4,
                              "ΔAP": SIGNED4}, notes), ""


def stage1_table(study: R.StudyRuns) -> tuple[Table | None, str]:
    """Stage-1 pretraining runs (tag dset.role = pretrain): the RT-DETR checkpoints the cells fine-tune from.
    Not variants: listed here only, with the cells that started from each."""
    pre = study.pretrain
    if pre.empty:
        return None, "no stage-1 pretraining runs (tag dset.role = pretrain) in this experiment"
    children = study.children
    rows = []
    for _, r in pre.iterrows():
        ckpt, key = r["checkpoint_dir"], r.get(f"tags.{S.TAG_STAGE1_KEY}")
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


def run_config(study: R.StudyRuns, run_id: str) -> dict:
    row = study.runs[study.runs["run_id"] == run_id].iloc[0]
    return {k[len("params."):]: stats.parse_param(v) for k, v in row.items()
            if k.startswith("params.") and isinstance(v, str)}


def _image_size(cfg: dict) -> int | None:
    size = cfg.get("data.image_size")
    if isinstance(size, int):
        return size
    spatial = cfg.get("model.eval_spatial_size")
    if isinstance(spatial, str) and spatial.startswith("["):
        try:
            return int(spatial.strip("[]").split(",")[0])
        except ValueError:
            return None
    return None


def compute_table(study: R.StudyRuns, vs: pd.DataFrame) -> tuple[Table | None, str]:
    """GFLOPs by component (measured) and the share of the sites the sparse mechanisms act on (closed form)."""
    rows, sizes = [], set()
    for _, v in vs[vs["n"] > 0].iterrows():
        gflops = v[f"{M.GFLOPS}_mean"]
        if missing(gflops):
            continue
        parts = [v[f"{M.GFLOPS_COMPONENT_PREFIX}{c}_mean"] for c in ("backbone", "encoder", "decoder")]
        # rounded: the remainder of logged values carries float noise (1e-15), not information
        other = round(gflops - sum(parts), 6) + 0.0 if not any(missing(x) for x in parts) else math.nan
        cfg = run_config(study, v["first_run"])
        size = _image_size(cfg)
        row = {"model": v["label"], "backbone": v["backbone"], "GFLOPs": gflops,
               "GFLOPs backbone": parts[0], "GFLOPs encoder": parts[1], "GFLOPs decoder": parts[2],
               "GFLOPs other": other, "GFLOPs/latency at": profiled_at(v)}
        for name, x in zip(("backbone", "encoder", "decoder"), parts):
            row[f"{name} %"] = x / gflops * 100 if gflops else math.nan
        if size:
            sizes.add(size)
            keep = next((k for k in (v[f"{M.PROFILE_KEEP_RATIO}_mean"], v[f"{M.FINAL_KEEP_RATIO}_mean"])
                         if not missing(k)), None)
            m = stats.sparse_site_macs(study.config(v["first_run"]), size, keep)
            dense = 2 * (m["aifi_dense"] + m["dec_ffn_dense"]) / 1e9
            as_run = 2 * (m["aifi"] + m["dec_ffn"]) / 1e9
            row.update({"sites dense GFLOPs": dense, "sites as run GFLOPs": as_run,
                        "sites share (%)": as_run / gflops * 100 if gflops else math.nan,
                        "AIFI tokens kept": f"{m['kept_tokens']}/{m['tokens']}"})
        else:
            row.update({"sites dense GFLOPs": math.nan, "sites as run GFLOPs": math.nan, "sites share (%)": math.nan,
                        "AIFI tokens kept": None})
        rows.append(row)
    if not rows:
        return None, "no finished run logged gflops"
    ref = stats.sparse_site_macs({}, 640)
    ref_aifi, ref_dec, ref_total = (REFERENCE_R18_MACS[k] / 1e9 for k in ("aifi", "dec_ffn", "total"))
    notes = [
        "GFLOPs = 2 × multiply-adds as measured by the runs (fvcore + attention and grid-sample handles), total and "
        "by component (gflops/backbone, gflops/encoder, gflops/decoder); other = total − the three; % of the total.",
        "Sites = what the switches act on: the AIFI encoder layer(s) on the stride-32 map (token pruning, encoder MoE) "
        "and the decoder layers' FFNs over the queries (decoder MoE). Computed in closed form (not measured) from each "
        "variant's logged configuration at data.image_size = " + ", ".join(f"{s} px" for s in sorted(sizes))
        + " (the resolution dset profiles at), eval mode (no denoising queries): projections, attention "
        "products and FFN/expert matmuls, ×2; norms, softmax, biases and the pruning predictor not counted.",
        "sites dense = the same configuration with every switch off; sites as run = top-k experts (+ router) and "
        "the keep ratio the GFLOPs were measured at (profile/keep_ratio, else final/keep_ratio, else the configured "
        "target); share = sites as run / measured total.",
        PROFILE_NOTE,
        "Reference figure (../shared/parity/README.md, reference RT-DETR R18 at 640 px): AIFI layer "
        f"{ref_aifi:.2f} G and the three decoder FFNs {ref_dec:.2f} G multiply-adds of {ref_total:.2f} G, about "
        f"{(ref_aifi + ref_dec) / ref_total * 100:.1f}% of the model; "
        f"the closed form here gives {ref['aifi_dense'] / 1e9:.2f} G and {ref['dec_ffn_dense'] / 1e9:.2f} G for it.",
    ]
    fm = {c: F2 for c in ("GFLOPs", "GFLOPs backbone", "GFLOPs encoder", "GFLOPs decoder", "GFLOPs other",
                          "sites dense GFLOPs", "sites as run GFLOPs")}
    fm.update({c: F1 for c in ("backbone %", "encoder %", "decoder %")})
    fm["sites share (%)"] = F2
    return Table("compute", "Compute breakdown: where the GFLOPs go, and the share the sparse mechanisms act on",
                 pd.DataFrame(rows), None, None, fm, notes), ""


def reported_table(study: R.StudyRuns, vs: pd.DataFrame) -> Table:
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
                rel = (B.relative_percent(m[f"{M.BEST_MAP}_mean"], b[f"{M.BEST_MAP}_mean"])
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


def optuna_trials(study: R.StudyRuns) -> pd.DataFrame:
    """Finished trials with both objectives (Optuna-pruned ones left out: their mAP is from a cut-short
    training): trial, run_id, the metrics best/mAP, gflops and latency_ms (``M.BEST_MAP``, ``M.GFLOPS``,
    ``M.LATENCY_MS``), settings (dict of the parameters that vary across them, parsed), pareto (bool)."""
    trials = study.included[study.included["trial"].notna()]
    trials = trials[[not (s or "").startswith("optuna_pruned") for s in trials["stop_reason"]]]
    rows = []
    for _, t in trials.iterrows():
        m, g = t.get(M.BEST_MAP), t.get(M.GFLOPS)
        if missing(m) or missing(g):
            continue
        cfg = {k[len("params."):]: stats.parse_param(v) for k, v in t.items()
               if k.startswith("params.") and not k.startswith("params.run.") and isinstance(v, str)}
        rows.append({"trial": int(t["trial"]), "run_id": t["run_id"], M.BEST_MAP: float(m), M.GFLOPS: float(g),
                     M.LATENCY_MS: float(t.get(M.LATENCY_MS, math.nan)), "cfg": cfg})
    df = pd.DataFrame(rows, columns=["trial", "run_id", M.BEST_MAP, M.GFLOPS, M.LATENCY_MS, "cfg"])
    if df.empty:
        return df.assign(settings=[], pareto=[])
    df = df.sort_values(["trial", "run_id"], kind="mergesort").reset_index(drop=True)
    keys = sorted({k for c in df["cfg"] for k in c})
    varying = [k for k in keys if len({repr(c.get(k)) for c in df["cfg"]}) > 1]
    df["settings"] = [{k: c.get(k) for k in varying} for c in df["cfg"]]
    df["pareto"] = stats.pareto_mask(df[M.BEST_MAP], df[M.GFLOPS])
    return df.drop(columns="cfg")


def _short(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def optuna_pareto_table(study: R.StudyRuns, trials: pd.DataFrame) -> tuple[Table | None, str]:
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
               "GFLOPs/latency at": _profile_text(*(run.get(m, math.nan) for m in
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


def runs_table(study: R.StudyRuns) -> Table:
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
            "GFLOPs at": _profile_text(*(r.get(m, math.nan) for m in
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


def deployment_runtimes(study: R.StudyRuns) -> list[tuple[str, int]]:
    """The (runtime, batch) pairs that some run logged a deploy/ latency for, eager first, then ONNX Runtime's
    providers in name order, batches ascending."""
    found = set()
    for col in study.runs.columns:
        m = R.DEPLOY_RE.match(col)
        if m and m.group(2) == "latency_ms" and study.runs[col].notna().any():
            found.add((m.group(1), int(m.group(3))))
    return sorted(found, key=lambda rb: (rb[0] != M.EAGER, rb[0], rb[1]))


def deployment_table(study: R.StudyRuns, vs: pd.DataFrame) -> tuple[Table | None, str]:
    """Every variant's deployed speed: eager PyTorch and ONNX Runtime at batch 1 and 8 (seed means of what each run
    timed side by side in its own process), ONNX Runtime's speed-up over eager, and its latency against RT-DETR of
    the same backbone."""
    pairs = deployment_runtimes(study)
    if vs.empty or not pairs:
        return None, "no run logged deploy/ metrics (train.profile_deployment off, or runs from before it existed)"
    inc = study.included
    rows = []
    for _, v in vs.iterrows():
        runs = inc[inc["group"] == v["group"]]
        row = {"model": v["label"], "backbone": v["backbone"], "n": v["n"]}
        for runtime, batch in pairs:
            ms = study.metric(runs, M.deploy_metric(runtime, "latency_ms", batch)).dropna()
            ips = study.metric(runs, M.deploy_metric(runtime, "images_per_s", batch)).dropna()
            row[f"{runtime} b{batch} (ms)"] = float(ms.mean()) if len(ms) else math.nan
            row[f"{runtime} b{batch} (images/s)"] = float(ips.mean()) if len(ips) else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    ort_b1, eager_b1 = f"{M.ONNXRUNTIME_CPU} b1 (ms)", f"{M.EAGER} b1 (ms)"
    if ort_b1 in df and eager_b1 in df:
        df["ONNX Runtime speed-up b1 (×)"] = df[eager_b1] / df[ort_b1]
        base_ms = {bb: df.loc[(df["model"] == R.baseline_of(vs, bb)["label"]), ort_b1].iloc[0]
                   for bb in set(vs["backbone"].dropna()) if R.baseline_of(vs, bb) is not None}
        df["ONNX Runtime b1 vs RT-DETR same backbone (%)"] = [
            (ms / base_ms[bb] - 1) * 100 if bb in base_ms and base_ms[bb] > 0 else math.nan
            for ms, bb in zip(df[ort_b1], df["backbone"])]
    diff = f"{M.DEPLOY_ONNX_MAX_DIFF}_mean"
    df["max |ONNX − eager|"] = [float(v[diff]) if not missing(v[diff]) else math.nan for _, v in vs.iterrows()]
    devices = sorted({d for d in vs["deploy_devices"] if isinstance(d, str) and d})  # None/NaN: nothing logged
    if len(devices) > 1:  # one machine for all: said once in the notes
        df["measured on"] = list(vs["deploy_devices"])
    # images/s at batch 1 is 1000 / ms: keep the batch-8 throughput and the batch-1 latency only
    df = df[[c for c in df.columns if not (c.endswith("(images/s)") and " b1 " in c)
             and not (c.endswith("(ms)") and " b1 " not in c)]]
    formats = {c: (F1 if "images/s" in c or c.endswith("(ms)") else F2) for c in df.columns if "(" in c}
    formats.update({"n": integer, "ONNX Runtime b1 vs RT-DETR same backbone (%)": SIGNED2,
                    "max |ONNX − eager|": fmt(".1e")})
    notes = [
        "Deployed speed of each run's reported checkpoint (train.profile_deployment, dset.measure.deployment_latency): "
        "the model exported to ONNX (dset.export, every switch included) and run by ONNX Runtime with as many threads "
        "as PyTorch, timed round-robin with eager PyTorch on the same random images in the run's own process, at the "
        "run's image size; warm-up 2, median of 5 timed runs per batch size. ms: batch-1 latency; images/s: batch-8 "
        "throughput = 8000 / batch-8 latency (ms). With n > 1 seeds: mean of the runs' medians.",
        "No interval: each run is one timing session on the machine the study ran on, so a latency difference here "
        "is indicative only; python -m dset.profile times variants side by side in one process for a comparison.",
        "max |ONNX − eager|: largest difference of the outputs (logits, boxes) between ONNX Runtime and eager "
        "PyTorch on random inputs, queries paired where tied scores reorder them (dset.export.compare_with_eager).",
        "Runtimes: eager = PyTorch on the run's device; onnxruntime_cpu = ONNX Runtime's CPUExecutionProvider; "
        "onnxruntime_tensorrt / onnxruntime_cuda appear where the run had a GPU and an onnxruntime build with them.",
    ] + ([f"Measured on, for every run: {devices[0]}."] if len(devices) == 1 else [])
    text = [c for c in df.columns]
    return Table("deployment", "Deployed speed: eager PyTorch and ONNX Runtime, batch 1 and 8", df, text, text,
                 formats, notes), ""
