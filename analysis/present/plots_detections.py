"""The report's figures of detections, from the runs' logged detections and pictures: precision-recall curves per
class, detection confusion matrices, and the pictures the runs drew, side by side. Same style and reproducible
rendering as :mod:`analysis.present.plots`."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from analysis.compute.detection_errors import ErrorAnalysis

from .plots import labelled, new_figure, styled


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols


@styled
def pr_curves(backbone: str, analyses: dict[str, ErrorAnalysis], baseline: str | None = None) -> Figure | None:
    """Precision against recall at IoU 0.50, one panel per class, one line per variant (``analyses``: label -> its
    seed-mean :class:`~analysis.compute.detection_errors.ErrorAnalysis`, in reading order); ``baseline`` (RT-DETR)
    dashed black."""
    import matplotlib

    if not analyses:
        return None
    first = next(iter(analyses.values()))
    n_classes = len(first.category_ids)
    rows, cols = _grid(n_classes)
    fig, axes = new_figure(3.0 * cols + 0.4, 2.7 * rows + 0.5, rows, cols)
    cmap = matplotlib.colormaps["tab10"]
    others = [label for label in analyses if label != baseline]
    for k, ax in enumerate(axes.flat):
        if k >= n_classes:
            ax.set_axis_off()
            continue
        for label, a in analyses.items():
            if label == baseline:
                style = {"color": "black", "linestyle": "--", "linewidth": 1.4, "zorder": 3}
            else:
                i = others.index(label)
                style = {"color": cmap(i % 10), "linestyle": ["-", ":", "-."][(i // 10) % 3], "linewidth": 1.0}
            ax.plot(a.recall, a.precision50[k], label=label, **style)
        if np.isnan(first.precision50[k]).all():
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        labelled(ax, f"{first.category_names[k]} ({int(first.gt_by_class[k])} GT boxes)", "recall",
                  "precision (IoU 0.50)", legend=False)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    axes.flat[0].legend(loc="lower left", fontsize=6)
    fig.suptitle(f"{backbone}: precision-recall per class at IoU 0.50 (pycocotools, area all, 100 detections)",
                 fontsize=10)
    return fig


@styled
def confusion_matrices(backbone: str, analyses: dict[str, ErrorAnalysis]) -> Figure | None:
    """One detection confusion matrix per variant (``analyses``: label -> its seed-mean
    :class:`~analysis.compute.detection_errors.ErrorAnalysis`): rows ground truth, columns predicted, background
    last; colour = the share of the row, the count printed (a mean per run where a variant has several seeds)."""
    if not analyses:
        return None
    first = next(iter(analyses.values()))
    size = len(first.labels)
    rows, cols = _grid(len(analyses), 3)
    panel = max(3.2, 0.45 * size + 1.6)
    fig, axes = new_figure(panel * cols, panel * rows + 0.5, rows, cols)
    im = None
    for ax, (label, a) in zip(axes.flat, analyses.items()):
        counts = np.asarray(a.confusion, dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for (i, j), c in np.ndenumerate(counts):
            if c:
                ax.text(j, i, f"{c:.0f}" if float(c).is_integer() else f"{c:.1f}", ha="center", va="center",
                        fontsize=6, color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(size), a.labels, rotation=90, fontsize=7)
        ax.set_yticks(range(size), a.labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(label + (f" (mean of {a.n_runs} runs)" if a.n_runs > 1 else ""), fontsize=9)
    for ax in list(axes.flat)[len(analyses):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of the ground-truth row")
    fig.suptitle(f"{backbone}: detection confusion matrix (score ≥ {first.score_threshold:g}, "
                 f"IoU ≥ {first.iou_threshold:g})", fontsize=10)
    return fig


@styled
def picture_grid(title: str, rows: list[tuple[str, list[np.ndarray]]], column_titles: list[str]) -> Figure | None:
    """Pictures side by side: one row per variant (its label on the left), one column per validation image, each
    cell a picture the run drew (:mod:`dset.pictures`), shown at its own aspect ratio."""
    rows = [(label, images) for label, images in rows if images]
    if not rows:
        return None
    cols = max(len(images) for _, images in rows)
    h, w = rows[0][1][0].shape[:2]
    cell_w = 3.6 if w < 1.5 * h else 5.2  # detections pictures hold two panels
    fig, axes = new_figure(0.6 + cell_w * cols, 0.4 + cell_w * h / w * len(rows), len(rows), cols)
    axes = np.atleast_2d(np.asarray(axes, dtype=object).reshape(len(rows), cols))
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], interpolation="antialiased")
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c])
            if c == 0:
                ax.set_ylabel(label, rotation=90, fontsize=9)
    fig.suptitle(title)
    return fig
