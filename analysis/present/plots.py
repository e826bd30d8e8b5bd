"""The report's charts. Each builder returns a matplotlib ``Figure`` (no pyplot state, no display
backend), or None when the experiment has nothing to draw; ``png_bytes`` renders one reproducibly
(Agg, fixed size and dpi, no PNG metadata: no software version, no time stamp). The figures of detections
(precision-recall, confusion, pictures) are in :mod:`analysis.present.plots_detections`."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.compute import stats
from analysis.compute.normalise import COMBOS, backbones_in_order, combo_code
from dset import metric_names as M
from studies.tracking.expert_usage import draw_usage_heatmap

DPI = 100
BACKBONE_COLORS = {"R18": "tab:blue", "R34": "tab:orange"}
OTHER_COLORS = ["tab:green", "tab:purple", "tab:brown", "tab:gray"]
RC = {"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 7, "figure.dpi": DPI, "savefig.dpi": DPI}


def png_bytes(fig: Figure) -> bytes:
    import matplotlib

    with matplotlib.rc_context(RC):
        return _png(fig)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def jpeg_bytes(fig: Figure, quality: int = 85) -> bytes:
    """The figure as a baseline JPEG (no EXIF, no time stamp: the same figure gives the same bytes)."""
    import matplotlib
    from PIL import Image

    with matplotlib.rc_context(RC):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
    buf = io.BytesIO()
    Image.fromarray(rgba[..., :3]).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _color(backbone: str | None, seen: list) -> str:
    if backbone in BACKBONE_COLORS:
        return BACKBONE_COLORS[backbone]
    if backbone not in seen:
        seen.append(backbone)
    return OTHER_COLORS[seen.index(backbone) % len(OTHER_COLORS)]


def styled(fn):
    """Build (and lay out) the figure under the report's fixed style, whatever the caller's rcParams."""
    import functools

    import matplotlib

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def labelled(ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    """A chart panel's title, axis labels, light grid and (unless ``legend`` is False) legend."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(loc="best")


def _short_label(v: pd.Series) -> str:
    if v["trial"] is not None and not pd.isna(v["trial"]):
        return f"t{int(v['trial'])}"
    if v["combo"] is None:
        return v["label"]
    codes = [v["combo"]] if v["combo"] else []
    if v.get("memory_pruning"):
        codes.append(f"M{v['memory_keep']:g}")
    return "+".join(codes) or "RT-DETR"


@styled
def map_vs(vs: pd.DataFrame, x_metric: str, x_label: str) -> Figure | None:
    """mAP against ``x_metric`` (``M.GFLOPS`` or ``M.LATENCY_MS``) for every variant, Pareto front (max mAP, min x)
    drawn, RT-DETR baselines as stars, seed std as error bars."""
    x, y, y_std = f"{x_metric}_mean", f"{M.BEST_MAP}_mean", f"{M.BEST_MAP}_std"  # columns of runs.variants
    pts = vs[(vs["n"] > 0) & vs[x].notna() & vs[y].notna()].reset_index(drop=True)
    if pts.empty:
        return None
    fig, axes = new_figure(6.4, 4.4)
    ax = axes[0, 0]
    seen: list = []
    front = stats.pareto_mask(pts[y], pts[x])
    for bb in backbones_in_order(pts):
        sub = pts[pts["backbone"] == bb]
        color = _color(bb, seen)
        base = (sub["combo"] == "") & (sub["memory_pruning"] == False)  # noqa: E712
        kinds = ((~base, "o", 36, f"DSET variants {bb}"), (base, "*", 160, f"RT-DETR {bb} (baseline)"))
        for mask, marker, size, label in kinds:
            s = sub[mask]
            if s.empty:
                continue
            ax.errorbar(s[x], s[y], yerr=s[y_std].fillna(0), fmt="none", ecolor=color,
                        elinewidth=0.8, capsize=2, alpha=0.7)
            ax.scatter(s[x], s[y], s=size, marker=marker, color=color, edgecolor="black",
                       linewidth=0.6 if marker == "*" else 0.3, label=label, zorder=3)
        for _, v in sub.iterrows():
            ax.annotate(_short_label(v), (v[x], v[y]), textcoords="offset points",
                        xytext=(4, 3), fontsize=6.5)
    f = pts[front].sort_values(x, kind="mergesort")
    ax.step(f[x], f[y], where="post", color="black", linestyle="--", linewidth=1,
            label="Pareto front (max mAP, min " + x_label.split(" (")[0] + ")", zorder=2)
    ax.scatter(f[x], f[y], s=90, facecolor="none", edgecolor="black", linewidth=1, zorder=4)
    labelled(ax, f"mAP vs {x_label.split(' (')[0]}: every variant", x_label,
              "mAP@0.5:0.95 (best epoch; seed mean ± std)")
    return fig


def _errors(df: pd.DataFrame, value: str, low: str, high: str) -> list:
    """Matplotlib's asymmetric error bars (below, above) of ``value`` from interval columns ``low``/``high``."""
    return [(df[value] - df[low]).clip(lower=0).fillna(0), (df[high] - df[value]).clip(lower=0).fillna(0)]


@styled
def forest(answer_df: pd.DataFrame, delta_map: float) -> Figure | None:
    """One panel per backbone: each variant's ΔmAP (answer table) with its 95% interval as a horizontal bar, the
    ±``delta_map`` band shaded, 0 drawn, and the verdict written beside each row."""
    df = answer_df[answer_df["ΔmAP"].notna()]
    if df.empty:
        return None
    backbones = list(dict.fromkeys(df["backbone"]))
    heights = [max(1, (df["backbone"] == bb).sum()) for bb in backbones]
    fig = Figure(figsize=(7.6, 0.9 + 0.32 * sum(heights) + 0.5 * len(backbones)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(backbones), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    lo = min(df["ΔmAP CI low"].min(skipna=True), df["ΔmAP"].min(), -delta_map)
    hi = max(df["ΔmAP CI high"].max(skipna=True), df["ΔmAP"].max(), delta_map)
    pad = 0.08 * (hi - lo or 1.0)
    seen: list = []
    for ax, bb in zip(axes[:, 0], backbones):
        sub = df[df["backbone"] == bb].reset_index(drop=True)
        ys = np.arange(len(sub))[::-1]
        ax.axvspan(-delta_map, delta_map, color="0.88", zorder=0, label=f"±δ = {delta_map:g}")
        ax.axvline(0, color="black", linewidth=0.7)
        ax.errorbar(sub["ΔmAP"], ys, xerr=_errors(sub, "ΔmAP", "ΔmAP CI low", "ΔmAP CI high"), fmt="o",
                    color=_color(bb, seen), capsize=3, markersize=4, linewidth=1.2, zorder=3)
        ax.set_yticks(ys, [str(v) for v in sub["variant"]], fontsize=7.5)
        ax.set_ylim(-0.7, len(sub) - 0.3)
        ax.set_xlim(lo - pad, hi + pad)
        # the verdict beside each row, outside the axes on the right
        for y, verdict in zip(ys, sub["verdict"]):
            text = verdict if len(verdict) <= 48 else verdict[:46] + "…"
            ax.annotate(text, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=7,
                        annotation_clip=False)
        ax.set_title(f"{bb}: ΔmAP vs RT-DETR {bb} (95% interval)", loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower left", fontsize=6.5)
    axes[-1, 0].set_xlabel("ΔmAP@0.5:0.95 (variant − RT-DETR)")
    return fig


@styled
def accuracy_vs_latency(answer_df: pd.DataFrame, targets) -> Figure | None:
    """ΔmAP (95% interval, vertical) against the side-by-side Δlatency % (95% interval, horizontal) of each variant
    of the answer table, one colour per backbone; the latency target and the ±δ band drawn; None without any
    variant that has both."""
    df = answer_df[answer_df["ΔmAP"].notna() & answer_df["Δlatency (%)"].notna()]
    if df.empty:
        return None
    fig, axes = new_figure(6.4, 4.4)
    ax = axes[0, 0]
    seen: list = []
    ax.axhspan(-targets.delta_map, targets.delta_map, color="0.9", zorder=0, label=f"ΔmAP within ±δ = "
                                                                                    f"{targets.delta_map:g}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.axvline(targets.latency_percent, color="grey", linestyle="--", linewidth=0.8,
               label=f"latency target: {targets.latency_percent:g}%")
    for bb, sub in df.groupby("backbone", sort=False):
        ax.errorbar(sub["Δlatency (%)"], sub["ΔmAP"], xerr=_errors(sub, "Δlatency (%)", "Δlatency CI low",
                                                                     "Δlatency CI high"),
                    yerr=_errors(sub, "ΔmAP", "ΔmAP CI low", "ΔmAP CI high"), fmt="o", color=_color(bb, seen),
                    capsize=2, markersize=4, linewidth=0.9, label=bb, zorder=3)
        for _, r in sub.iterrows():
            ax.annotate(str(r["variant"]).replace(f" {bb}", ""), (r["Δlatency (%)"], r["ΔmAP"]),
                        textcoords="offset points", xytext=(4, 3), fontsize=6.5)
    labelled(ax, "Accuracy against measured latency, vs RT-DETR", "Δlatency % vs RT-DETR (side by side, 95% interval)",
              "ΔmAP@0.5:0.95 vs RT-DETR (95% interval)")
    return fig


@styled
def memory_pruning_tradeoff(table_df: pd.DataFrame, targets) -> Figure | None:
    """ΔmAP (95% interval as error bars) against ΔGFLOPs (%) for every variant of the memory-pruning table, one
    series per backbone and DSET switches, each point labelled with its memory keep ratio; RT-DETR at the origin;
    the study's GFLOPs target and ΔmAP = 0 drawn."""
    df = table_df[table_df["ΔmAP"].notna() & table_df["ΔGFLOPs (%)"].notna()]
    if df.empty:
        return None
    fig, axes = new_figure(6.4, 4.4)
    ax = axes[0, 0]
    seen: list = []
    markers = ["o", "s", "^", "D", "v", "P"]
    series = list(dict.fromkeys(zip(df["backbone"], df["DSET switches"])))
    for i, (bb, switches) in enumerate(series):
        s = df[(df["backbone"] == bb) & (df["DSET switches"] == switches)].sort_values("ΔGFLOPs (%)")
        color = _color(bb, seen)
        low = (s["ΔmAP"] - s["ΔmAP CI low"]).clip(lower=0).fillna(0)
        high = (s["ΔmAP CI high"] - s["ΔmAP"]).clip(lower=0).fillna(0)
        ax.errorbar(s["ΔGFLOPs (%)"], s["ΔmAP"], yerr=[low, high], fmt=markers[i % len(markers)] + "-",
                    color=color, alpha=0.85, capsize=2, markersize=5, linewidth=0.8,
                    label=f"{bb}, DSET switches {switches}")
        for _, r in s.iterrows():
            keep = "off" if pd.isna(r["memory keep ratio"]) else f"{r['memory keep ratio']:g}"
            ax.annotate(keep, (r["ΔGFLOPs (%)"], r["ΔmAP"]), textcoords="offset points", xytext=(4, 3), fontsize=6.5)
    ax.scatter([0], [0], s=160, marker="*", color="white", edgecolor="black", zorder=4, label="RT-DETR (origin)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(targets.gflops_percent, color="grey", linestyle="--", linewidth=0.8,
               label=f"target: {targets.gflops_percent:g}% GFLOPs")
    labelled(ax, "Memory pruning: accuracy against compute, vs RT-DETR", "ΔGFLOPs (%) vs RT-DETR, as run",
              "ΔmAP@0.5:0.95 vs RT-DETR (95% interval)")
    return fig


@styled
def ablation_bars(table_df: pd.DataFrame) -> Figure | None:
    """Grouped bars: mean mAP per switch combination, one bar per backbone, sample std as error bars."""
    df = table_df[table_df["n"] > 0]
    if df.empty:
        return None
    backbones = list(dict.fromkeys(df["backbone"]))
    codes = []
    for e, p, d in COMBOS:
        code = combo_code(e, p, d) or "RT-DETR"
        if any((table_df["enc MoE"] == ("on" if e else "off")) & (table_df["pruning"] == ("on" if p else "off"))
                & (table_df["dec MoE"] == ("on" if d else "off")) & (table_df["n"] > 0)):
            codes.append((code, e, p, d))
    fig, axes = new_figure(7.2, 4.0)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(backbones))
    seen: list = []
    labels: list = []
    for j, bb in enumerate(backbones):
        xs, means, stds, ns = [], [], [], []
        for i, (_, e, p, d) in enumerate(codes):
            r = df[(df["backbone"] == bb) & (df["enc MoE"] == ("on" if e else "off"))
                   & (df["pruning"] == ("on" if p else "off")) & (df["dec MoE"] == ("on" if d else "off"))]
            if r.empty:
                continue
            r = r.iloc[0]
            xs.append(i + (j - (len(backbones) - 1) / 2) * width)
            means.append(r["mean"])
            stds.append(0.0 if pd.isna(r["std"]) else r["std"])
            ns.append(int(r["n"]))
        color = _color(bb, seen)
        ax.bar(xs, means, width=width * 0.95, yerr=stds, capsize=3, color=color, edgecolor="black", linewidth=0.4,
               label=bb, error_kw={"elinewidth": 0.8})
        labels += list(zip(xs, ns))
    ax.set_xticks(range(len(codes)), [c[0] for c in codes])
    ax.set_xlabel("switches on (E = encoder MoE, P = token pruning, D = decoder MoE)")
    ax.set_ylabel("mAP@0.5:0.95 (seed mean ± std)")
    lo = np.nanmin(df["mean"] - df["std"].fillna(0))
    hi = np.nanmax(df["mean"] + df["std"].fillna(0))
    pad = max(0.02, (hi - lo) * 0.3)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    for x, n in labels:  # the number of seeds, inside each bar's foot
        ax.text(x, max(0.0, lo - pad), f"n={n}", ha="center", va="bottom", fontsize=6, color="white")
    ax.set_title("Ablation: mAP per switch combination")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="backbone")
    return fig


@styled
def expert_usage(label: str, mats: dict[str, np.ndarray]) -> Figure:
    """Heatmaps (layer x expert) of the final-epoch share of token-slots each expert received."""
    fig, axes = new_figure(3.2 * len(mats) + 0.8, 3.0, 1, len(mats))
    for ax, (where, mat) in zip(axes[0], sorted(mats.items(), key=lambda kv: kv[0] != "encoder_moe")):
        im = draw_usage_heatmap(ax, mat, fontsize=6)
        ax.set_title(f"{where.replace('_', ' ')} (uniform = {1 / mat.shape[1]:.3f})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"Expert usage, final epoch: {label}", fontsize=10)
    return fig


def _curves(ax, hist: pd.DataFrame, key: str, styles: dict) -> bool:
    sub = hist[hist["key"] == key]
    drawn = False
    for (_, label), g in sub.groupby(["sort_key", "label"], sort=True):
        mean = g.groupby("step", sort=True)["value"].mean()
        ls, color = styles[label]
        ax.plot(mean.index, mean.values, marker="o", markersize=2.5, linewidth=1, linestyle=ls, color=color,
                label=label)
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def _styles(hist: pd.DataFrame) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    labels = list(dict.fromkeys(hist.sort_values(["sort_key", "label"], kind="mergesort")["label"]))
    return {lab: (["-", "--", ":", "-."][(i // 10) % 4], cmap(i % 10)) for i, lab in enumerate(labels)}


@styled
def per_epoch(hist: pd.DataFrame) -> Figure | None:
    """Validation mAP per epoch (left) and the token keep ratio in force (right), per variant, seed means."""
    if hist.empty or not (hist["key"] == M.VAL_PREFIX + "mAP").any():
        return None
    backbones = backbones_in_order(hist) or [None]
    fig, axes = new_figure(9.0, 3.0 * len(backbones), len(backbones), 2)
    styles = _styles(hist)
    for row, bb in enumerate(backbones):
        h = hist if bb is None else hist[hist["backbone"] == bb]
        ax_m, ax_k = axes[row]
        _curves(ax_m, h, M.VAL_PREFIX + "mAP", styles)
        labelled(ax_m, f"{bb or ''} validation mAP@0.5:0.95 per epoch", "epoch", "val/mAP")
        if _curves(ax_k, h, M.KEEP_RATIO, styles):
            ax_k.legend(loc="best")
        else:
            ax_k.text(0.5, 0.5, "no token pruning in these variants", ha="center", va="center",
                      transform=ax_k.transAxes)
        labelled(ax_k, f"{bb or ''} token keep ratio in force", "epoch", "sparse/keep_ratio", legend=False)
        ax_k.set_ylim(0, 1.05)
    return fig


@styled
def train_loss(hist: pd.DataFrame) -> Figure | None:
    """Total training loss (epoch mean) per epoch, per variant, seed means; one panel per backbone."""
    if hist.empty or not (hist["key"] == M.TRAIN_LOSS_PREFIX + "loss").any():
        return None
    backbones = backbones_in_order(hist) or [None]
    fig, axes = new_figure(4.8 * len(backbones), 3.4, 1, len(backbones))
    styles = _styles(hist)
    for ax, bb in zip(axes[0], backbones):
        h = hist if bb is None else hist[hist["backbone"] == bb]
        _curves(ax, h, M.TRAIN_LOSS_PREFIX + "loss", styles)
        labelled(ax, f"{bb or ''} training loss (train/loss, epoch mean)", "epoch", "loss")
    return fig


@styled
def optuna_pareto(trials: pd.DataFrame) -> Figure | None:
    if trials.empty:
        return None
    fig, axes = new_figure(6.0, 4.2)
    ax = axes[0, 0]
    rest, front = trials[~trials["pareto"]], trials[trials["pareto"]].sort_values(M.GFLOPS, kind="mergesort")
    ax.scatter(rest[M.GFLOPS], rest[M.BEST_MAP], s=28, color="tab:gray", label="trials", zorder=3)
    ax.scatter(front[M.GFLOPS], front[M.BEST_MAP], s=48, color="tab:red", edgecolor="black", linewidth=0.5,
               label="Pareto-optimal trials", zorder=4)
    ax.step(front[M.GFLOPS], front[M.BEST_MAP], where="post", color="tab:red", linestyle="--", linewidth=1, zorder=2)
    for _, t in trials.iterrows():
        ax.annotate(str(int(t["trial"])), (t[M.GFLOPS], t[M.BEST_MAP]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    labelled(ax, f"Optuna: {len(trials)} finished trials, Pareto front (max mAP, min GFLOPs)",
              "GFLOPs (2 × multiply-adds)", "best mAP@0.5:0.95")
    return fig


@styled
def optuna_importances(imp: dict[str, dict[str, float]], method: str) -> Figure | None:
    if not imp:
        return None
    objectives = list(imp)
    keys = sorted(imp[objectives[0]], key=lambda k: (imp[objectives[0]][k], k))
    fig, axes = new_figure(4.0 * len(objectives) + 1.5, 0.45 * len(keys) + 1.8, 1, len(objectives))
    for ax, obj in zip(axes[0], objectives):
        ax.barh(range(len(keys)), [imp[obj][k] for k in keys], color="tab:blue")
        names = [k[len("model."):] if k.startswith("model.") else k for k in keys]
        ax.set_yticks(range(len(keys)), names, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("importance (sums to 1)")
        ax.set_title(f"for {obj}")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Optuna parameter importances: " + method, fontsize=8)
    return fig


@styled
def deployment_bars(table_df: pd.DataFrame) -> Figure | None:
    """Batch-1 latency (left) and batch-8 throughput (right) of every variant, one bar per runtime (the deployment
    table's columns)."""
    latency = [c for c in table_df.columns if c.endswith(" b1 (ms)")]
    throughput = [c for c in table_df.columns if c.endswith(" b8 (images/s)")]
    if table_df.empty or not latency or table_df[latency].isna().all().all():
        return None
    labels = [f"{m}" for m in table_df["model"]]
    fig, axes = new_figure(11, 0.9 + 0.32 * len(labels), 1, 2)
    y = np.arange(len(labels))
    for ax, cols, xlabel in ((axes[0][0], latency, "latency at batch 1 (ms, median)"),
                             (axes[0][1], throughput, "throughput at batch 8 (images/s)")):
        height = 0.8 / max(len(cols), 1)
        for i, col in enumerate(cols):
            runtime = col.split(" b")[0]
            ax.barh(y + (i - (len(cols) - 1) / 2) * height, table_df[col].to_numpy(dtype=float), height=height,
                    label=runtime, color=["tab:gray", "tab:blue", "tab:green", "tab:red"][i % 4])
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right")
    axes[0][1].set_yticklabels([])
    return fig
