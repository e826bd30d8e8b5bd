"""A study's variants, each summarised over its included runs (mean, sample std, n, per final metric), their
RT-DETR baselines, and what else the report reads from the runs frame per variant or trial: expert usage, MoE
diagnostics, deployment runtimes, Optuna trials, a run's configuration."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from dset import metric_names as M

from .loading import StudyResults
from .logged_params import parse_param
from .stats import missing, pareto_mask

# the final metrics summarised per variant (``variants``: columns <metric>_mean, <metric>_std, <metric>_values)
FINAL_METRICS = (
    M.BEST_MAP, M.BEST_MAP50, M.BEST_MAP75, M.BEST_EPOCH, M.PARAMS, M.ACTIVE_PARAMS, M.GFLOPS,
    *(M.GFLOPS_COMPONENT_PREFIX + part for part in ("backbone", "encoder", "decoder")),
    M.LATENCY_MS, M.FPS, M.FINAL_KEEP_RATIO, M.EPOCHS_RUN, M.TRAIN_MINUTES,
    M.PROFILE_TOKENS, M.PROFILE_KEPT_TOKENS, M.PROFILE_KEEP_RATIO,
    M.PROFILE_MEMORY_TOKENS, M.PROFILE_MEMORY_KEPT_TOKENS,
    # deployed speed (train.profile_deployment): eager PyTorch and ONNX Runtime (CPU) timed side by side in the run
    M.deploy_metric(M.EAGER, "latency_ms", 1), M.deploy_metric(M.EAGER, "images_per_s", 8),
    M.deploy_metric(M.ONNXRUNTIME_CPU, "latency_ms", 1), M.deploy_metric(M.ONNXRUNTIME_CPU, "images_per_s", 8),
    M.DEPLOY_ONNX_MAX_DIFF,
)


# the deploy/ metrics of any runtime: deploy/<runtime>/<latency_ms|images_per_s>_b<batch>
DEPLOY_RE = re.compile("^" + re.escape(M.DEPLOY_PREFIX) + r"([a-z_]+)/(latency_ms|images_per_s)_b(\d+)$")
MOE_SITES = ("encoder_moe", "decoder_moe")   # report order: encoder first
USAGE_RE = re.compile("^" + re.escape(M.USAGE_PREFIX) + r"(encoder_moe|decoder_moe)/layer(\d+)/expert(\d+)$")
# per MoE layer: how alike the experts' weights are (mean pairwise cosine), the router's mean per-token entropy (nats)
DIAGNOSTIC_RE = re.compile("^" + re.escape(M.USAGE_PREFIX)
                           + r"(encoder_moe|decoder_moe)/layer(\d+)/(expert_cosine|router_entropy)$")


# ---------------------------------------------------------------------------------------- variants
def _describe_data(row: pd.Series) -> str:
    name = row.get("params.data.name")
    if not isinstance(name, str):
        return "?"
    parts = [name]
    size = row.get("params.data.image_size")
    if isinstance(size, str):
        parts.append(f"{size} px")
    epochs = row.get("params.train.epochs")
    if isinstance(epochs, str):
        parts.append(f"{epochs} epochs")
    return ", ".join(parts)


def variants(study: StudyResults) -> pd.DataFrame:
    """One row per variant (child runs grouped as in the module docstring), in reading order.

    Columns: group, label, backbone, encoder_moe, token_pruning, decoder_moe, combo, trial, n (included
    runs), n_runs (all runs), seeds (included), failed (count), data, latency_device, and for each final
    metric in ``FINAL_METRICS`` (its MLflow name, e.g. ``best/mAP``): ``<metric>_mean``, ``<metric>_std`` (sample
    std, NaN for n < 2) and ``<metric>_values`` (a tuple in seed order); ``first_run`` (a run id) to read settings
    from; ``run_ids`` (the included runs, seed order); ``init_checkpoint`` (the weights its runs started from,
    "; "-joined)."""
    children = study.children
    rows = []
    for gid, g in children.groupby("group", sort=False):
        inc = g[g["included"]]
        first = g.iloc[0]
        row = {
            "group": gid, "label": first["label"], "sort_key": first["sort_key"], "backbone": first["backbone"],
            "encoder_moe": first["encoder_moe"], "token_pruning": first["token_pruning"],
            "decoder_moe": first["decoder_moe"], "combo": first["combo"],
            "memory_pruning": first["memory_pruning"], "memory_keep": first["memory_keep"],
            "trial": None if pd.isna(first["trial"]) else int(first["trial"]),
            "n": len(inc), "n_runs": len(g), "failed": int((g["status"] == "FAILED").sum()),
            "seeds": tuple(int(s) for s in inc["seed"] if not pd.isna(s)),
            "all_seeds": tuple(sorted({int(s) for s in g["seed"] if not pd.isna(s)})),
            "data": _describe_data((inc if len(inc) else g).iloc[0]),
            "latency_device": "; ".join(sorted({d for d in inc["latency_device"] if d})) or None,
            "deploy_devices": " | ".join(sorted({d for d in inc["deploy_devices"] if isinstance(d, str) and d}))
            or None,
            "first_run": (inc if len(inc) else g).iloc[0]["run_id"],
            "run_ids": tuple(inc["run_id"]),
            "init_checkpoint": "; ".join(sorted({c for c in inc["init_checkpoint"] if c})) or None,
            # why the budget may not learn these data, as its runs recorded (quoted where a baseline has not learned)
            "learning_risks": "; ".join(dict.fromkeys(r for r in inc["learning_risks"] if isinstance(r, str) and r))
            or None,
            "not_included": tuple(g.loc[~g["included"], "reason"]),
        }
        for metric in FINAL_METRICS:
            values = study.metric(inc, metric).dropna().to_numpy(dtype=float)
            row[f"{metric}_values"] = tuple(float(v) for v in values)
            row[f"{metric}_mean"] = float(np.mean(values)) if len(values) else math.nan
            row[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    return out.sort_values("sort_key", kind="mergesort").reset_index(drop=True)


def baseline_of(vs: pd.DataFrame, backbone: str) -> pd.Series | None:
    """The RT-DETR variant (all switches off) of ``backbone`` with included runs, if there is exactly one
    such configuration (otherwise the comparison would be ambiguous: None)."""
    base = vs[(vs["backbone"] == backbone) & (vs["encoder_moe"] == False) & (vs["token_pruning"] == False)  # noqa: E712
              & (vs["decoder_moe"] == False) & (vs["memory_pruning"] == False)  # noqa: E712
              & (vs["n"] > 0) & vs["trial"].isna()]
    return base.iloc[0] if len(base) == 1 else None


def usage_matrices(study: StudyResults, group: str) -> dict[str, np.ndarray]:
    """Final-epoch expert usage shares of a variant, averaged over its included runs:
    ``{"encoder_moe": [layers, experts], "decoder_moe": ...}`` (only the MoE sites that logged usage)."""
    inc = study.included[study.included["group"] == group]
    found: dict[str, dict[tuple[int, int], str]] = {}
    for col in study.runs.columns:
        m = USAGE_RE.match(col)
        if m and inc[col].notna().any():
            found.setdefault(m.group(1), {})[(int(m.group(2)), int(m.group(3)))] = col
    out = {}
    for where in MOE_SITES:
        cells = found.get(where)
        if not cells:
            continue
        layers = max(k[0] for k in cells) + 1
        experts = max(k[1] for k in cells) + 1
        mat = np.full((layers, experts), np.nan)
        for (layer, expert), col in cells.items():
            mat[layer, expert] = float(inc[col].astype(float).mean())
        out[where] = mat
    return out


def moe_diagnostics(study: StudyResults, group: str) -> dict[str, pd.DataFrame]:
    """Per MoE site of a variant (``{"encoder_moe": frame, "decoder_moe": frame}``, the sites that logged them): one
    row per layer with ``expert_cosine`` (mean pairwise cosine of the experts' weights, 1 = identical experts) and
    ``router_entropy`` (mean per-token routing entropy, nats), each the latest value MLflow holds of
    ``sparse/<site>/layer<i>/<name>`` (the last epoch's), averaged over the variant's included runs."""
    inc = study.included[study.included["group"] == group]
    found: dict[str, dict[int, dict[str, str]]] = {}
    for col in study.runs.columns:
        m = DIAGNOSTIC_RE.match(col)
        if m and inc[col].notna().any():
            found.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = col
    out = {}
    # the sites in a fixed order (MLflow's column order varies with the hash seed)
    for where, layers in sorted(found.items(), key=lambda item: MOE_SITES.index(item[0])):
        rows = [{"layer": layer, **{name: float(inc[col].astype(float).mean()) if col else math.nan
                                    for name, col in ((n, cols.get(n)) for n in ("expert_cosine", "router_entropy"))}}
                for layer, cols in sorted(layers.items())]
        out[where] = pd.DataFrame(rows)
    return out


def deployment_runtimes(study: StudyResults) -> list[tuple[str, int]]:
    """The (runtime, batch) pairs that some run logged a deploy/ latency for, eager first, then ONNX Runtime's
    providers in name order, batches ascending."""
    found = set()
    for col in study.runs.columns:
        m = DEPLOY_RE.match(col)
        if m and m.group(2) == "latency_ms" and study.runs[col].notna().any():
            found.add((m.group(1), int(m.group(3))))
    return sorted(found, key=lambda rb: (rb[0] != M.EAGER, rb[0], rb[1]))


def optuna_trials(study: StudyResults) -> pd.DataFrame:
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
        cfg = {k[len("params."):]: parse_param(v) for k, v in t.items()
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
    df["pareto"] = pareto_mask(df[M.BEST_MAP], df[M.GFLOPS])
    return df.drop(columns="cfg")


def run_config(study: StudyResults, run_id: str) -> dict:
    row = study.runs[study.runs["run_id"] == run_id].iloc[0]
    return {k[len("params."):]: parse_param(v) for k, v in row.items()
            if k.startswith("params.") and isinstance(v, str)}


def image_size(cfg: dict) -> int | None:
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


def num_experts(study: StudyResults, run_id: str, where: str) -> int | None:
    """The number of experts of MoE site ``where`` (encoder_moe or decoder_moe) in run ``run_id``'s configuration."""
    try:
        return int(getattr(study.config(run_id).model, where).num_experts)
    except Exception:  # noqa: BLE001  (params that do not rebuild a configuration: ln E unknown, shown as –)
        return None
