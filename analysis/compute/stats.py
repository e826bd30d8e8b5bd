"""Statistics the report uses: seed-noise tests, Pareto fronts, Optuna parameter importances, and the
closed-form compute of the sites the sparse mechanisms act on. Pure arithmetic: no MLflow, no runs frame."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dset.analytic import aifi_layer_macs, ffn_macs, keep_count  # torch-free formulas shared with dset.measure
from dset.config import Config, MoEConfig

from .logged_params import config_from_params

ALPHA = 0.05


def missing(v) -> bool:
    """True for a value that was not logged: None, pandas' NA or NaN."""
    if v is None or v is pd.NA:
        return True
    if isinstance(v, (float, np.floating)):
        return math.isnan(v)
    return False


# ------------------------------------------------------------------------------------- seed noise
@dataclass(frozen=True)
class Comparison:
    """Variant minus baseline over seeds: difference of means, Welch 95% interval, two-sided p."""

    diff: float
    ci_low: float
    ci_high: float
    p: float
    verdict: str


def welch(variant: tuple[float, ...] | list[float], baseline: tuple[float, ...] | list[float]) -> Comparison:
    """Welch's unequal-variance t-test of ``mean(variant) - mean(baseline)`` (per-seed values).

    With fewer than two values on either side there is no estimate of seed noise: ``verdict`` says
    "n=1, no test" and ``p``/interval are NaN. With no spread at all on both sides the test is
    undefined ("no seed spread, no test")."""
    from scipy import stats

    a = np.asarray(variant, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, "no runs")
    diff = float(a.mean() - b.mean())
    n = min(len(a), len(b))
    if n < 2:
        return Comparison(diff, math.nan, math.nan, math.nan, f"n={n}, no test")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(diff, math.nan, math.nan, math.nan, "no seed spread, no test")
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(1 - ALPHA / 2, dof)) * se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    verdict = f"yes (p<{ALPHA:g})" if p < ALPHA else "no: within seed noise"
    return Comparison(diff, diff - half, diff + half, p, verdict)


# ------------------------------------------------------------------------------------------ Pareto
def pareto_mask(maximise: np.ndarray | list, minimise: np.ndarray | list) -> np.ndarray:
    """True for the points no other point dominates (>= on ``maximise``, <= on ``minimise``, better on
    one). Points with a NaN coordinate are never on the front."""
    up = np.asarray(maximise, dtype=float)
    down = np.asarray(minimise, dtype=float)
    ok = ~(np.isnan(up) | np.isnan(down))
    mask = np.zeros(len(up), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = others & (up >= up[i]) & (down <= down[i]) & ((up > up[i]) | (down < down[i]))
        mask[i] = not dominated.any()
    return mask


# ----------------------------------------------------------------------------- Optuna importances
def param_importances(settings: list[dict], values: list[tuple[float, ...]], objective_names: tuple[str, ...],
                      directions: tuple[str, ...], seed: int = 0) -> tuple[dict[str, dict[str, float]], str]:
    """Importance of each varying parameter for each objective, from finished trials.

    The trials are rebuilt as an in-memory Optuna study (``optuna.trial.create_trial`` with
    distributions spanning the values seen) and scored with Optuna's fANOVA evaluator (random forest,
    fixed seed: deterministic). Returns ``({objective: {param: importance}}, method)``; importances of
    one objective sum to 1. Needs at least 2 trials and 1 varying parameter (else ``({}, reason)``)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if len(settings) < 2:
        return {}, f"{len(settings)} finished trial(s): importances need at least 2"
    names = sorted({k for s in settings for k in s})
    dists = {}
    for name in names:
        vals = [s.get(name) for s in settings]
        if any(v is None for v in vals) or len(set(map(repr, vals))) < 2:
            continue  # constant, or missing in some trial
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if not numeric:
            dists[name] = CategoricalDistribution(sorted({str(v) for v in vals}))
        elif all(isinstance(v, int) for v in vals):
            dists[name] = IntDistribution(min(vals), max(vals))
        else:
            dists[name] = FloatDistribution(float(min(vals)), float(max(vals)))
    if not dists:
        return {}, "no parameter varies across the finished trials"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=list(directions))
    for s, v in zip(settings, values):
        params = {k: (str(s[k]) if isinstance(dists[k], CategoricalDistribution) else s[k]) for k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=list(v)))
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        method = f"fANOVA (optuna.importance, random forest, seed {seed}) over {len(settings)} trials"
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, name in enumerate(objective_names):
                imp = optuna.importance.get_param_importances(
                    study, evaluator=evaluator, target=lambda t, i=i: t.values[i], normalize=True)
                out[name] = {k: float(imp.get(k, 0.0)) for k in dists}
        return out, method
    except ImportError:  # fANOVA needs scikit-learn: fall back on |Spearman rho|, normalised
        from scipy import stats

        out = {}
        for i, name in enumerate(objective_names):
            y = [v[i] for v in values]
            raw = {}
            for k, d in dists.items():
                categorical = isinstance(d, CategoricalDistribution)
                x = [d.choices.index(str(s[k])) if categorical else s[k] for s in settings]
                rho = stats.spearmanr(x, y).statistic
                raw[k] = 0.0 if np.isnan(rho) else abs(float(rho))
            total = sum(raw.values()) or 1.0
            out[name] = {k: r / total for k, r in raw.items()}
        return out, f"|Spearman rho| normalised to sum 1 (scikit-learn missing for fANOVA) over {len(settings)} trials"


# ------------------------------------------------------------------- compute of the sparse sites
def sparse_site_macs(cfg: Config | Mapping[str, Any], image_size: int,
                     keep_ratio: float | None = None) -> dict[str, float]:
    """Closed-form multiply-adds of the parts the three switches act on, from a run's configuration (``cfg``: a
    :class:`~dset.config.Config`, or logged params, dotted key -> value, which
    :func:`analysis.compute.logged_params.config_from_params` rebuilds it from; keys not given keep the defaults of
    ``dset/config.py``): the AIFI layer(s) on the stride-32 map (token pruning, encoder MoE) and the FFNs of the
    decoder layers over the queries (decoder MoE), at eval (no denoising queries). Returns ``aifi_dense``,
    ``dec_ffn_dense`` (the same config with every switch off) and ``aifi``, ``dec_ffn`` (as configured; pruning at
    ``keep_ratio``, default the configured target ratio)."""
    model = (cfg if isinstance(cfg, Config) else config_from_params(cfg)).model
    d = model.encoder.hidden_dim
    enc_ffn = model.encoder.dim_feedforward
    enc_layers = model.encoder.num_encoder_layers
    dec_ffn = model.decoder.dim_feedforward
    dec_layers = model.decoder.num_layers
    queries = model.decoder.num_queries
    tokens = (image_size // 32) ** 2

    def moe(site: MoEConfig, dense_hidden: int):
        if not site.enabled:
            return None, None, dense_hidden
        return site.num_experts, site.top_k, site.expert_hidden_dim or dense_hidden

    kept = tokens
    pruning = model.token_pruning
    if pruning.enabled:
        kept = keep_count(tokens, keep_ratio if keep_ratio is not None else pruning.keep_ratio, pruning.min_tokens)
    e_experts, e_k, e_hidden = moe(model.encoder_moe, enc_ffn)
    d_experts, d_k, d_hidden = moe(model.decoder_moe, dec_ffn)
    return {
        "tokens": tokens, "kept_tokens": kept,
        "aifi_dense": enc_layers * aifi_layer_macs(tokens, d, enc_ffn),
        "dec_ffn_dense": dec_layers * ffn_macs(queries, d, dec_ffn),
        "aifi": enc_layers * aifi_layer_macs(kept, d, e_hidden, e_experts, e_k),
        "dec_ffn": dec_layers * ffn_macs(queries, d, d_hidden, d_experts, d_k),
    }
