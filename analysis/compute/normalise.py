"""The runs frame ``mlflow.search_runs`` returns, normalised into what the report reads: each run's role, backbone,
switches, seed and trial, whether its numbers enter the tables (and why not), and the variant it belongs to.

A *variant* is a set of runs that differ only in their seed: the same logged configuration once the ``run.*``
parameters and the other result-neutral keys (``dset.config.RESULT_NEUTRAL_KEYS``) are set aside, and the same
Optuna trial when there is one. Pure pandas: no MLflow call. The columns are listed in docs/report.md."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pandas as pd

from dset import metric_names as M
from dset.config import RESULT_NEUTRAL_KEYS
from studies.planning.cells import variant_label
from studies.tracking import schema

SWITCHES = ("encoder_moe", "token_pruning", "decoder_moe")


SWITCH_CODES = {"encoder_moe": "E", "token_pruning": "P", "decoder_moe": "D"}
# the 8 switch combinations in reading order: baseline, one switch, two, all three
COMBOS = [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
          (True, True, False), (True, False, True), (False, True, True), (True, True, True)]
BACKBONE_ORDER = {"R18": 0, "R34": 1}
LEARNING_RISKS = getattr(schema, "TAG_LEARNING_RISKS", "dset.learning_risks")
TAG_STOP_REASON = getattr(schema, "TAG_STOP_REASON", "dset.stop_reason")        # "early_stopping: ...", "optuna_pruned"
TAG_PROFILE_ERROR = getattr(schema, "TAG_PROFILE_ERROR", "dset.profile_error")  # why params/GFLOPs/latency are missing
ROLES = ("parent", "pretrain", "benchmark")   # runs that are never a variant; any other role is a "child"
# the prefix mlflow.search_runs puts before each metric's name; normalise drops it
SEARCH_RUNS_METRIC_PREFIX = "metrics."


def backbones_in_order(frame: pd.DataFrame) -> list[str]:
    """The backbones of ``frame`` in reading order: R18, R34, then any other by name."""
    return sorted(set(frame["backbone"].dropna()), key=lambda b: (BACKBONE_ORDER.get(b, 9), b))


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
    superseded = _tag(df, schema.TAG_SUPERSEDED_BY)
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
    df["role"] = [r if r in ROLES else "child" for r in _tag(df, schema.TAG_ROLE)]
    # a run without a dset.role tag but with nested children is a parent too
    parents = set(_tag(df, "mlflow.parentRunId").dropna())
    df.loc[df["run_id"].isin(parents) & _tag(df, schema.TAG_ROLE).isna(), "role"] = "parent"

    backbone = []
    depths = df["params.model.backbone.depth"] if "params.model.backbone.depth" in df else [None] * len(df)
    for tag, depth in zip(_tag(df, schema.TAG_BACKBONE), depths):
        backbone.append(tag if tag else (f"R{_as_int(depth)}" if _as_int(depth) else None))
    df["backbone"] = _objects(df, backbone)
    for name, tag in zip(SWITCHES, schema.SWITCH_TAGS):
        tag_values = [_as_bool(v) for v in _tag(df, tag)]
        param_col = f"params.model.{name}.enabled"
        param_values = [_as_bool(v) for v in df[param_col]] if param_col in df else [None] * len(df)
        df[name] = _objects(df, [t if t is not None else p for t, p in zip(tag_values, param_values)])
    enabled = df.get("params.model.memory_pruning.enabled", pd.Series(None, index=df.index))
    ratio = df.get("params.model.memory_pruning.keep_ratio", pd.Series(None, index=df.index))
    df["memory_keep"] = _objects(df, [_memory_keep(t, e, r)
                                      for t, e, r in zip(_tag(df, schema.TAG_MEMORY_PRUNING), enabled, ratio)])
    df["memory_pruning"] = _objects(df, [k is not None for k in df["memory_keep"]])
    df["combo"] = _objects(df, [combo_code(bool(e), bool(p), bool(d)) if None not in (e, p, d) else None
                                for e, p, d in zip(df["encoder_moe"], df["token_pruning"], df["decoder_moe"])])
    seed_param = df["params.run.seed"] if "params.run.seed" in df else [None] * len(df)
    df["seed"] = pd.array([_as_int(t) if t is not None else _as_int(p)
                           for t, p in zip(_tag(df, schema.TAG_SEED), seed_param)], dtype="Int64")
    df["trial"] = pd.array([_as_int(t) for t in _tag(df, schema.TAG_TRIAL)], dtype="Int64")


def _add_tag_columns(df: pd.DataFrame) -> None:
    """The tags the report shows, under short names, and ``note`` (an early stop, a failed profile), in place."""
    for column, tag in (("cell", schema.TAG_CELL), ("variant_tag", schema.TAG_VARIANT),
                        ("dset_status", schema.TAG_STATUS),
                        ("error", schema.TAG_ERROR), ("latency_device", schema.TAG_LATENCY_DEVICE),
                        ("deploy_devices", schema.TAG_DEPLOY_DEVICES), ("device", schema.TAG_DEVICE),
                        ("stop_reason", TAG_STOP_REASON), ("init_checkpoint", schema.TAG_INIT_CHECKPOINT),
                        ("init_source", schema.TAG_INIT_SOURCE), ("checkpoint_dir", schema.TAG_CHECKPOINT_DIR),
                        ("learning_risks", LEARNING_RISKS)):
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
