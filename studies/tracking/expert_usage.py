"""Expert usage of the MoE sites: the shares a training record holds, their entropy, and the heatmap of them.

A record (one ``metrics.jsonl`` line) holds ``sparse/<encoder_moe|decoder_moe>/layer<i>/expert<j>``: the share of
token-slots expert j of layer i received that epoch, and ``sparse/<site>/layer<i>/entropy``, the entropy of the
layer's shares (:func:`dset.engine.epoch_stats.entropy`; names: :mod:`dset.metric_names`).
:func:`draw_usage_heatmap` draws a site's layer x expert shares; the run's ``expert_usage.png``
(:func:`plot_expert_usage`) and the report's per-variant figure (``analysis/present/plots.py``) both draw theirs
with it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from dset import metric_names as M
from dset.engine.epoch_stats import MOE_SITES as SITES

USAGE_KEY_RE = re.compile("^" + re.escape(M.USAGE_PREFIX) + r"(" + "|".join(SITES) + r")/layer(\d+)/expert(\d+)$")


def usage_by_site(record: dict) -> dict[str, dict[int, dict[int, float]]]:
    """A record's usage shares: ``{site: {layer: {expert: share}}}`` (only the sites it holds)."""
    sites: dict[str, dict[int, dict[int, float]]] = {}
    for key, value in record.items():
        m = USAGE_KEY_RE.match(key)
        if m and value is not None:
            sites.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[int(m.group(3))] = float(value)
    return sites


def draw_usage_heatmap(ax, mat: np.ndarray, fontsize: float):
    """Draw ``mat`` (layer x expert usage shares, NaN where none) on ``ax``, each cell labelled with its share.
    Returns the image, for the caller's colorbar."""
    im = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(mat)), 1e-9), aspect="auto")
    for (i, j), val in np.ndenumerate(mat):
        if not math.isnan(val):
            ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if val < 0.6 * np.nanmax(mat) else "black")
    ax.set_xticks(range(mat.shape[1]))
    ax.set_yticks(range(mat.shape[0]))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    return im


def _matrix(layers: dict[int, dict[int, float]]) -> np.ndarray:
    mat = np.full((max(layers) + 1, max(max(v) for v in layers.values()) + 1), np.nan)
    for layer, shares in layers.items():
        for e, s in shares.items():
            mat[layer, e] = s
    return mat


def _entropy_curves(ax, records: list[dict], sites: dict[str, dict[int, dict[int, float]]]) -> None:
    """Each layer's routing entropy over the epochs, with ln(num_experts) (uniform usage) dashed."""
    from matplotlib.ticker import MaxNLocator

    for site in sites:
        for layer in sorted(sites[site]):
            xs, ys = [], []
            for r in records:
                if r.get(M.entropy_metric(site, layer)) is not None:
                    xs.append(r["epoch"])
                    ys.append(r[M.entropy_metric(site, layer)])
            ax.plot(xs, ys, marker="o", label=f"{site.split('_')[0]} L{layer}")
        n_exp = max(sites[site][min(sites[site])]) + 1
        ax.axhline(math.log(n_exp), color="grey", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("routing entropy (nats)")
    ax.set_title("entropy (dashed: uniform)", fontsize=9)
    ax.legend(fontsize=7)


def plot_expert_usage(records: list[dict], path: Path, title: str) -> bool:
    """A run's ``expert_usage.png``: final-epoch usage share per layer and expert (heatmap per MoE site) and each
    layer's routing entropy over the epochs. False when the run has no MoE."""
    found = usage_by_site(records[-1] if records else {})
    sites = {s: found[s] for s in SITES if s in found}
    if not sites:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites) + 1, figsize=(4.2 * (len(sites) + 1), 3.4), squeeze=False)
    for ax, (site, layers) in zip(axes[0], sites.items()):
        im = draw_usage_heatmap(ax, _matrix(layers), fontsize=7)
        ax.set_title(f"{site}: usage share (epoch {records[-1].get('epoch', '?')})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    _entropy_curves(axes[0][-1], records, sites)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
