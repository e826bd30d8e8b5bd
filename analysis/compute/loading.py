"""A study's runs, read from MLflow and put in order: one row per run, one row per variant.

MLflow is the only source. Runs, their params, tags and final metrics come from ``mlflow.search_runs``
(pandas); per-epoch curves come from ``MlflowClient.get_metric_history`` (the same store, the
metric's full history instead of its last value); each run's detections on the validation images and
their ground truth come from the run's two evaluation artifacts (``ARTIFACT_DETECTIONS``,
``ARTIFACT_GROUND_TRUTH``), downloaded once per report through the MLflow client (:func:`evaluations`),
for the bootstrap intervals. No other file written by a run is read. Metric names are those of
``dset/metric_names.py``, unchanged (the metric's column is its name); tags and artifacts those of
``studies/mlflow_schema.py``.

``load_study_runs(experiment, tracking_uri)`` returns a :class:`StudyRuns` whose ``runs`` frame keeps every
column ``search_runs`` returned (``params.*``, ``tags.*``, and each ``metrics.<name>`` under the metric's own name,
``dset.metric_names``: ``best/mAP``, ``gflops/backbone``, ...) and adds normalised ones:
``role`` ("parent"; "pretrain": a stage-1 pretraining run, never a variant; "benchmark": a side-by-side latency
benchmark run, never a variant; or "child"), ``backbone``,
the three switches as booleans, ``combo`` ("", "E", "E+P", ...), ``seed``, ``trial``, ``init_checkpoint``
and ``init_source`` (the weights a run started from), ``checkpoint_dir``, ``included`` (the run's numbers
enter the tables) and ``reason`` (why not, e.g. the error of a failed run), ``note`` (an early stop, a
failed profile), ``group`` and ``label`` (the variant the run belongs to).

A *variant* is a set of runs that differ only in their seed: the same logged configuration once the
``run.*`` parameters (seed, device, output folder) and the other result-neutral keys
(``dset.config.RESULT_NEUTRAL_KEYS``) are set aside, and the same Optuna trial when
there is one. ``variants(study)`` summarises each variant over its included runs (mean, sample std, n).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dset import metric_names as M
from dset.config import RESULT_NEUTRAL_KEYS, Config, ConfigError, config_from_dict, unflatten
from studies import mlflow_schema as S
from studies import mlflow_store as store
from studies.spec import variant_label

from . import bootstrap as B

SWITCHES = ("encoder_moe", "token_pruning", "decoder_moe")
SWITCH_CODES = {"encoder_moe": "E", "token_pruning": "P", "decoder_moe": "D"}
# the 8 switch combinations in reading order: baseline, one switch, two, all three
COMBOS = [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
          (True, True, False), (True, False, True), (False, True, True), (True, True, True)]
BACKBONE_ORDER = {"R18": 0, "R34": 1}
TAG_STOP_REASON = getattr(S, "TAG_STOP_REASON", "dset.stop_reason")        # "early_stopping: ...", "optuna_pruned"
TAG_PROFILE_ERROR = getattr(S, "TAG_PROFILE_ERROR", "dset.profile_error")  # why params/GFLOPs/latency are missing

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
USAGE_RE = re.compile("^" + re.escape(M.USAGE_PREFIX) + r"(encoder_moe|decoder_moe)/layer(\d+)/expert(\d+)$")
# per MoE layer: how alike the experts' weights are (mean pairwise cosine), the router's mean per-token entropy (nats)
DIAGNOSTIC_RE = re.compile("^" + re.escape(M.USAGE_PREFIX)
                           + r"(encoder_moe|decoder_moe)/layer(\d+)/(expert_cosine|router_entropy)$")
ROLES = ("parent", "pretrain", "benchmark")   # runs that are never a variant; any other role is a "child"
# the prefix mlflow.search_runs puts before each metric's name; normalise drops it
SEARCH_RUNS_METRIC_PREFIX = "metrics."


class ReportError(Exception):
    """A problem the user can fix (no traceback): the message says what; ``exit_code`` is the CLI's."""

    exit_code = 1


class UnknownExperiment(ReportError):
    exit_code = 2


class EmptyExperiment(ReportError):
    exit_code = 1


# ------------------------------------------------------------------------------------------- study
@dataclass
class StudyRuns:
    """A study's runs as logged in MLflow (one experiment), normalised; what the report is built from."""

    experiment: str
    experiment_id: str
    tracking_uri: str
    runs: pd.DataFrame                         # every run (parents too), normalised, in a stable order
    _histories: dict = field(default_factory=dict, repr=False)
    _evaluations: dict = field(default_factory=dict, repr=False)
    _pictures: dict = field(default_factory=dict, repr=False)

    @property
    def children(self) -> pd.DataFrame:
        return self.runs[self.runs["role"] == "child"]

    @property
    def pretrain(self) -> pd.DataFrame:
        return self.runs[self.runs["role"] == "pretrain"]

    @property
    def benchmarks(self) -> pd.DataFrame:
        """The side-by-side latency benchmark runs (role "benchmark"; :mod:`analysis.latency` reads them)."""
        return self.runs[self.runs["role"] == "benchmark"]

    @property
    def parents(self) -> pd.DataFrame:
        return self.runs[self.runs["role"] == "parent"]

    @property
    def included(self) -> pd.DataFrame:
        return self.runs[self.runs["included"]]

    @property
    def is_optuna(self) -> bool:
        return bool(self.children["trial"].notna().any())

    def metric(self, frame: pd.DataFrame, name: str) -> pd.Series:
        """The final value of MLflow metric ``name`` for each row of ``frame`` (NaN where not logged)."""
        return frame[name].astype(float) if name in frame else pd.Series(np.nan, index=frame.index)

    def config(self, run_id: str) -> Config:
        """The dset configuration run ``run_id`` trained with, rebuilt from its logged params."""
        row = self.runs[self.runs["run_id"] == run_id].iloc[0]
        return config_from_params({k[len("params."):]: v for k, v in row.items()
                                   if k.startswith("params.") and isinstance(v, str)}, run_id)


def config_from_params(params: Mapping[str, Any], run_id: str = "?") -> Config:
    """The dset :class:`~dset.config.Config` a run's params describe: the resolved configuration, flat dotted keys,
    each value as ``str()`` wrote it (values already parsed are taken as they are). Keys not given keep the defaults
    of ``dset/config.py``. Raises :class:`ReportError`, naming the run and the key, for a value that does not fit."""
    try:
        return config_from_dict(unflatten({key: _param_value(value) for key, value in params.items()}))
    except ConfigError as exc:
        raise ReportError(f"run {run_id}: its logged params do not make a dset configuration: {exc}") from None


def _param_value(text: Any) -> Any:
    """A logged param back to the value ``str()`` wrote it from: a number, bool, None or list is a Python literal;
    anything else is the string itself."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text



def load_study_runs(experiment: str = "ablation_grid", tracking_uri: str | None = None) -> StudyRuns:
    """Every run of ``experiment`` in the store at ``tracking_uri``, normalised (see the module docstring).
    Raises :class:`UnknownExperiment` (no such store or experiment) or :class:`EmptyExperiment`."""
    uri = store.tracking_uri(tracking_uri)
    local = store.local_store_path(uri)
    if local is not None and not local.exists():
        raise UnknownExperiment(
            f"no MLflow store at {uri} ({local} does not exist): run a study first "
            f"(python -m studies.run {experiment}) or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    try:
        client = store.client(uri)
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:  # no driver, no server, not an MLflow database: say so in one line
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise UnknownExperiment(f"could not open the MLflow store at {store.redact(uri)}: "
                                f"{type(exc).__name__}: {store.redact(message, uri)}") from None
    if exp is None or exp.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments())
        state = "not found" if exp is None else "deleted"
        raise UnknownExperiment(
            f"experiment '{experiment}' {state} in {store.redact(uri)}; "
            f"experiments there: {', '.join(known) if known else '(none)'}")
    raw = store.search_runs_frame(uri, experiment_ids=[exp.experiment_id])
    if raw.empty:
        raise EmptyExperiment(f"experiment '{experiment}' in {store.redact(uri)} has no runs yet: nothing to report")
    return StudyRuns(experiment, str(exp.experiment_id), uri, normalise(raw))


def _tag(frame: pd.DataFrame, tag: str) -> pd.Series:
    col = f"tags.{tag}"
    if col not in frame:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    return pd.Series([None if pd.isna(v) else str(v) for v in frame[col]], index=frame.index, dtype=object)


def _objects(frame: pd.DataFrame, values: list) -> pd.Series:
    """A column that keeps None as None (pandas would turn a list of str/None into strings and NaN)."""
    return pd.Series(values, index=frame.index, dtype=object)


def _as_bool(value) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    return None


def _as_int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def combo_code(e: bool, p: bool, d: bool) -> str:
    return "+".join(c for c, on in zip("EPD", (e, p, d)) if on)


def combo_label(backbone: str, e: bool, p: bool, d: bool, memory_keep: float | None = None) -> str:
    return variant_label(backbone, e, p, d, memory_keep)


def _memory_keep(tag, enabled, keep_ratio) -> float | None:
    """Memory pruning's keep ratio, None when off: from the tag ("false" or the ratio), else the params; runs from
    before the fourth switch have neither and read as off."""
    if isinstance(tag, str) and tag:
        return None if tag.lower() == "false" else float(tag)
    if _as_bool(enabled):
        return float(keep_ratio)
    return None


def _memory_rank(keep: float | None) -> float:
    """Reading order of memory pruning: off first, then from the most tokens kept to the fewest."""
    return -2.0 if keep is None or pd.isna(keep) else -float(keep)


def normalise(raw: pd.DataFrame) -> pd.DataFrame:
    """Add the normalised columns to what ``search_runs`` returned, name each metric's column by the metric alone
    (``metrics.best/mAP`` -> ``best/mAP``) and sort the rows stably."""
    df = raw.copy()
    _add_variant_columns(df)
    _add_tag_columns(df)
    map_col = SEARCH_RUNS_METRIC_PREFIX + M.BEST_MAP
    has_map = df[map_col].notna() if map_col in df else pd.Series(False, index=df.index)
    superseded = _tag(df, S.TAG_SUPERSEDED_BY)
    reasons = [_exclusion(row, superseded[i], bool(has_map[i])) for i, row in df.iterrows()]
    df["included"] = [r is None for r in reasons]
    df["reason"] = [r or "" for r in reasons]

    df["group"] = [_group_key(row) for _, row in df.iterrows()]
    df = df.sort_values(by=["role", "group", "seed", "start_time", "run_id"],
                        key=lambda s: s.map(_role_rank) if s.name == "role" else s,
                        na_position="last", kind="mergesort").reset_index(drop=True)
    _label_groups(df)
    # final order: parents, then variants in reading order, seeds, start
    df = df.sort_values(by=["role", "sort_key", "seed", "start_time", "run_id"],
                        key=lambda s: s.map(_role_rank) if s.name == "role" else s,
                        na_position="last", kind="mergesort").reset_index(drop=True)
    return _metrics_by_name(df)


def _metrics_by_name(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each ``metrics.<name>`` column renamed ``<name>``; a metric named like another column is an error
    (its values would be mistaken for that column's)."""
    names = {c: c[len(SEARCH_RUNS_METRIC_PREFIX):] for c in df.columns if c.startswith(SEARCH_RUNS_METRIC_PREFIX)}
    clash = sorted(set(names.values()) & set(df.columns))
    if clash:
        raise ValueError(f"metric(s) {', '.join(clash)} named like a column of the report's runs frame")
    return df.rename(columns=names)


def _add_variant_columns(df: pd.DataFrame) -> None:
    """role, backbone, the three switches, combo, seed and trial (in place): from the tags, else the params."""
    df["role"] = [r if r in ROLES else "child" for r in _tag(df, S.TAG_ROLE)]
    # a run without a dset.role tag but with nested children is a parent too
    parents = set(_tag(df, "mlflow.parentRunId").dropna())
    df.loc[df["run_id"].isin(parents) & _tag(df, S.TAG_ROLE).isna(), "role"] = "parent"

    backbone = []
    depths = df["params.model.backbone.depth"] if "params.model.backbone.depth" in df else [None] * len(df)
    for tag, depth in zip(_tag(df, S.TAG_BACKBONE), depths):
        backbone.append(tag if tag else (f"R{_as_int(depth)}" if _as_int(depth) else None))
    df["backbone"] = _objects(df, backbone)
    for name, tag in zip(SWITCHES, S.SWITCH_TAGS):
        tag_values = [_as_bool(v) for v in _tag(df, tag)]
        param_col = f"params.model.{name}.enabled"
        param_values = [_as_bool(v) for v in df[param_col]] if param_col in df else [None] * len(df)
        df[name] = _objects(df, [t if t is not None else p for t, p in zip(tag_values, param_values)])
    enabled = df.get("params.model.memory_pruning.enabled", pd.Series(None, index=df.index))
    ratio = df.get("params.model.memory_pruning.keep_ratio", pd.Series(None, index=df.index))
    df["memory_keep"] = _objects(df, [_memory_keep(t, e, r)
                                      for t, e, r in zip(_tag(df, S.TAG_MEMORY_PRUNING), enabled, ratio)])
    df["memory_pruning"] = _objects(df, [k is not None for k in df["memory_keep"]])
    df["combo"] = _objects(df, [combo_code(bool(e), bool(p), bool(d)) if None not in (e, p, d) else None
                                for e, p, d in zip(df["encoder_moe"], df["token_pruning"], df["decoder_moe"])])
    seed_param = df["params.run.seed"] if "params.run.seed" in df else [None] * len(df)
    df["seed"] = pd.array([_as_int(t) if t is not None else _as_int(p)
                           for t, p in zip(_tag(df, S.TAG_SEED), seed_param)], dtype="Int64")
    df["trial"] = pd.array([_as_int(t) for t in _tag(df, S.TAG_TRIAL)], dtype="Int64")


def _add_tag_columns(df: pd.DataFrame) -> None:
    """The tags the report shows, under short names, and ``note`` (an early stop, a failed profile), in place."""
    for column, tag in (("cell", S.TAG_CELL), ("variant_tag", S.TAG_VARIANT), ("dset_status", S.TAG_STATUS),
                        ("error", S.TAG_ERROR), ("latency_device", S.TAG_LATENCY_DEVICE),
                        ("deploy_devices", S.TAG_DEPLOY_DEVICES), ("device", S.TAG_DEVICE),
                        ("stop_reason", TAG_STOP_REASON), ("init_checkpoint", S.TAG_INIT_CHECKPOINT),
                        ("init_source", S.TAG_INIT_SOURCE), ("checkpoint_dir", S.TAG_CHECKPOINT_DIR)):
        df[column] = _tag(df, tag)
    df["note"] = _objects(df, ["; ".join(x for x in (f"stopped early ({s})" if s else "",
                                                     f"not profiled: {p}" if p else "") if x) or None
                               for s, p in zip(df["stop_reason"], _tag(df, TAG_PROFILE_ERROR))])


def _exclusion(row: pd.Series, superseded_by: str | None, has_map: bool) -> str | None:
    """Why the run's numbers stay out of the tables, or None when they enter them."""
    status = row["status"]
    if row["role"] == "parent":
        return "parent run (the study invocation)"
    if row["role"] == "pretrain":
        return "stage-1 pretraining run, not a variant (see the Stage 1 table)"
    if row["role"] == "benchmark":
        return "side-by-side latency benchmark, not a variant (see the answer's latency)"
    if isinstance(superseded_by, str) and superseded_by:
        return f"stale (made by other code or data), redone by run {superseded_by[:8]}"
    if status == "FINISHED" and has_map:
        return None
    if status == "FAILED" or row["error"]:
        return "failed: " + (row["error"] or "no dset.error tag")
    if status in ("RUNNING", "SCHEDULED"):
        return f"{status.lower()} (unfinished or interrupted)"
    if status == "KILLED":
        return "killed"
    return f"{status.lower()} without {M.BEST_MAP}"


def _role_rank(role: str) -> int:
    return {"parent": 0, "pretrain": 1, "benchmark": 2}.get(role, 3)


def _group_key(row: pd.Series) -> str:
    """Variant identity: the logged configuration without ``run.*`` (seed, device, out dir) and the other
    result-neutral keys (``RESULT_NEUTRAL_KEYS``), plus the trial."""
    if row["role"] != "child":
        return f"{row['role']}:" + row["run_id"]
    params = {k[len("params."):]: v for k, v in row.items()
              if k.startswith("params.") and not k.startswith("params.run.") and isinstance(v, str)
              and k[len("params."):] not in RESULT_NEUTRAL_KEYS}
    ident = {"params": params, "trial": None if pd.isna(row["trial"]) else int(row["trial"])}
    if not params:  # nothing logged (e.g. a run that failed at once): fall back on the tags
        ident.update(backbone=row["backbone"], switches=[row[s] for s in SWITCHES], variant=row["variant_tag"],
                     cell=re.sub(r"-s\d+$", "", row["cell"] or ""))
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _label_groups(df: pd.DataFrame) -> None:
    """Give each variant a readable label and a reading-order sort key (in place)."""
    labels, keys = {}, {}
    for gid, g in df[df["role"] == "child"].groupby("group", sort=True):
        first = g.iloc[0]
        bb = first["backbone"] or "?"
        tags = sorted({t for t in g["variant_tag"] if t})
        if tags:
            label = tags[0]
        elif first["combo"] is not None:
            label = combo_label(bb, first["encoder_moe"], first["token_pruning"], first["decoder_moe"],
                                first["memory_keep"])
        else:
            label = first["cell"] or gid
        if not pd.isna(first["trial"]):
            label = f"{label} [trial {int(first['trial'])}]"
        combo = (first["encoder_moe"], first["token_pruning"], first["decoder_moe"])
        combo_rank = COMBOS.index(combo) if combo in COMBOS else len(COMBOS)
        trial = -1 if pd.isna(first["trial"]) else int(first["trial"])
        labels[gid] = label
        keys[gid] = (BACKBONE_ORDER.get(bb, 9), bb, combo_rank, _memory_rank(first["memory_keep"]), trial, label, gid)
    # the same label for different configurations: say which cell each is
    by_label: dict[str, list[str]] = {}
    for gid, label in labels.items():
        by_label.setdefault(label, []).append(gid)
    for label, gids in by_label.items():
        if len(gids) > 1:
            for gid in gids:
                cells = sorted({re.sub(r"-s\d+$", "", c) for c in df.loc[df["group"] == gid, "cell"] if c})
                labels[gid] = f"{label} [{cells[0] if cells else gid}]"
                keys[gid] = keys[gid][:5] + (labels[gid], gid)
    order = {gid: i for i, gid in enumerate(sorted(keys, key=lambda g: keys[g]))}
    df["label"] = [labels.get(g) or ((t or "(stage 1)") if g.startswith("pretrain:") else
                                     "(benchmark)" if g.startswith("benchmark:") else "(parent)")
                   for g, t in zip(df["group"], df["variant_tag"])]
    df["sort_key"] = [order.get(g, -1) for g in df["group"]]


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


def variants(study: StudyRuns) -> pd.DataFrame:
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


def evaluations(study: StudyRuns, run_ids) -> dict[str, B.Evaluated | str]:
    """Each run's detections matched against its ground truth (:func:`analysis.bootstrap.evaluate_run`), or, as a
    string, why there is none: a run from before these artifacts existed, or an unreadable one (the report then
    falls back on seeds alone and says why). The scoring split's artifacts (``ARTIFACT_TEST_DETECTIONS``,
    ``ARTIFACT_TEST_GROUND_TRUTH``) where the run logged them, else the validation ones (``ARTIFACT_DETECTIONS``,
    ``ARTIFACT_GROUND_TRUTH``: the images the model was selected on); the result's ``split`` says which ("test" or
    "val"). Downloaded and evaluated once per run and report (cached on ``study``)."""
    todo = [r for r in run_ids if r not in study._evaluations]
    if todo:
        with store.no_progress_bar(), tempfile.TemporaryDirectory(prefix="dset_report_") as tmp:
            client = store.client(study.tracking_uri)
            for run_id in todo:
                study._evaluations[run_id] = _evaluation(client, run_id, Path(tmp) / run_id)
    return {r: study._evaluations[r] for r in run_ids}


def split_artifacts() -> list[tuple[str, str, str]]:
    """(split, detections artifact, ground-truth artifact) in the order the report prefers them: the scoring
    (test) split's, then the validation split's, on which the run was selected."""
    return [("test", S.ARTIFACT_TEST_DETECTIONS, S.ARTIFACT_TEST_GROUND_TRUTH),
            ("val", S.ARTIFACT_DETECTIONS, S.ARTIFACT_GROUND_TRUTH)]


def _evaluation(client, run_id: str, folder: Path) -> B.Evaluated | str:
    splits = split_artifacts()
    try:
        logged = {f.path for folder_name in sorted({d.rsplit("/", 1)[0] for _, d, _ in splits})
                  for f in client.list_artifacts(run_id, folder_name)}
    except Exception as exc:  # an artifact store that cannot be listed: the run is reported without them
        return f"artifacts not readable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    found = [(split, d, g) for split, d, g in splits if d in logged and g in logged]
    if not found:
        val = splits[-1]
        return f"no {' or '.join(a for a in val[1:] if a not in logged)} logged"
    split, det_name, gt_name = found[0]
    try:
        dets = json.loads(Path(client.download_artifacts(run_id, det_name, str(folder))).read_text())
        gt = json.loads(Path(client.download_artifacts(run_id, gt_name, str(folder))).read_text())
        if not isinstance(dets, dict) or "detections" not in dets or "image_ids" not in dets:
            raise ValueError(f"{det_name} needs 'image_ids' and 'detections'")
        ev = B.evaluate_run(gt, dets["detections"], dets["image_ids"], name=f"run {run_id}")
        ev.split = split
        return ev
    except Exception as exc:  # a malformed file: say which run and why, and report the run without it
        return f"{det_name} / {gt_name} unusable: {type(exc).__name__}: {exc}"


def pictures(study: StudyRuns, run_id: str) -> tuple[dict, dict[str, bytes]] | str:
    """A run's pictures (``ARTIFACT_PICTURES``, :mod:`dset.pictures`): its ``pictures.json`` and every PNG it lists
    (file name -> bytes), or, as a string, why there are none. Downloaded once per run and report."""
    if run_id not in study._pictures:
        with store.no_progress_bar(), tempfile.TemporaryDirectory(prefix="dset_report_") as tmp:
            study._pictures[run_id] = _download_pictures(store.client(study.tracking_uri), run_id, Path(tmp))
    return study._pictures[run_id]


def _download_pictures(client, run_id: str, folder: Path) -> tuple[dict, dict[str, bytes]] | str:
    try:
        logged = {f.path for f in client.list_artifacts(run_id, S.ARTIFACT_PICTURES)}
        if S.ARTIFACT_PICTURES_INDEX not in logged:
            return f"no {S.ARTIFACT_PICTURES_INDEX} logged"
        local = Path(client.download_artifacts(run_id, S.ARTIFACT_PICTURES, str(folder)))
        index = json.loads((local / Path(S.ARTIFACT_PICTURES_INDEX).name).read_text())
        files = {p["file"]: (local / Path(p["file"]).name).read_bytes() for p in index["pictures"]}
        return index, files
    except Exception as exc:  # an unreadable store or file: the report says why and goes on
        return f"pictures unusable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def usage_matrices(study: StudyRuns, group: str) -> dict[str, np.ndarray]:
    """Final-epoch expert usage shares of a variant, averaged over its included runs:
    ``{"encoder_moe": [layers, experts], "decoder_moe": ...}`` (only the MoE sites that logged usage)."""
    inc = study.included[study.included["group"] == group]
    found: dict[str, dict[tuple[int, int], str]] = {}
    for col in study.runs.columns:
        m = USAGE_RE.match(col)
        if m and inc[col].notna().any():
            found.setdefault(m.group(1), {})[(int(m.group(2)), int(m.group(3)))] = col
    out = {}
    for where in ("encoder_moe", "decoder_moe"):
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


def histories(study: StudyRuns, keys: tuple[str, ...], runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-epoch values of metrics ``keys`` for ``runs`` (default: the included runs), from
    ``MlflowClient.get_metric_history``: columns run_id, group, label, key, step, value. When a step
    was logged more than once (a resumed run), the last value logged wins."""
    runs = study.included if runs is None else runs
    rows = []
    client = store.client(study.tracking_uri)
    for _, run in runs.iterrows():
        for key in keys:
            if key not in run or pd.isna(run[key]):
                continue
            cache_key = (run["run_id"], key)
            if cache_key not in study._histories:
                study._histories[cache_key] = [(m.step, m.timestamp, m.value)
                                               for m in client.get_metric_history(run["run_id"], key)]
            for step, ts, value in study._histories[cache_key]:
                rows.append({"run_id": run["run_id"], "group": run["group"], "label": run["label"],
                             "sort_key": run["sort_key"], "backbone": run["backbone"], "key": key,
                             "step": int(step), "timestamp": int(ts), "value": float(value)})
    cols = ["run_id", "group", "label", "sort_key", "backbone", "key", "step", "timestamp", "value"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows, columns=cols)
    df = df.sort_values(["sort_key", "run_id", "key", "step", "timestamp"], kind="mergesort")
    df = df.drop_duplicates(["run_id", "key", "step"], keep="last").drop(columns="timestamp")
    return df.reset_index(drop=True)


def moe_diagnostics(study: StudyRuns, group: str) -> dict[str, pd.DataFrame]:
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
    for where, layers in found.items():
        rows = [{"layer": layer, **{name: float(inc[col].astype(float).mean()) if col else math.nan
                                    for name, col in ((n, cols.get(n)) for n in ("expert_cosine", "router_entropy"))}}
                for layer, cols in sorted(layers.items())]
        out[where] = pd.DataFrame(rows)
    return out
