"""Study files: what a study is, and the resolved configuration of each of its runs.

A study is a YAML file in ``studies/`` (or any path). Keys:

``description``  one line for ``--list``.
``kind``         ``grid`` or ``optuna``.
``presets``      model preset(s) of ``dset/configs`` merged in order (a grid axis value may replace them).
``budget``       ``dset/configs/budget_<name>.yaml`` (or a YAML path, or ``none``): data size, image size,
                 epochs, queries ... applied on top of the presets.
``data``         optional ``dset/configs/data_<name>.yaml`` (or a YAML path) applied after the budget;
                 null: the budget's data set.
``pretrain``     stage 1, the RT-DETR checkpoint every cell fine-tunes from (studies/pretrain.py): ``auto``
                 (default: the budget's ``pretrain`` section), ``none`` (every cell from its own initial
                 weights, an explicit choice), ``{budget: NAME}`` or ``{checkpoints: {18: PATH, 34: PATH}}``.
``seeds``        list of ``run.seed`` values; every cell runs once per seed (Optuna: the first seed).
``set``          run-configuration settings for every run, dotted keys (``train.eval_every: 1``).
``out_dir``      root of the runs' output folders (default ``runs``): ``<out_dir>/<study>/<cell>-<fp>/``.
``grid``         (kind grid) axes in order: ``axis: {value_id: {dotted.key: value, ..., preset: NAME}}``;
                 ``preset`` replaces the study's presets. ``section: {from_preset: NAME, without: [key, ...]}``
                 takes the settings that preset ``NAME`` states under the dotted ``section`` (without the
                 keys listed), e.g. ``model.encoder_moe: {from_preset: dset_r18}``.
                 A cell takes one value of every axis. Its id joins the value ids with ``-``, leaving
                 out the ids named ``off``; a cell whose axes after the first are all ``off`` is
                 ``<first>-base``; then ``-s<seed>``. Example: ``r18-enc_moe-prune-s0``, ``r34-base-s0``.
``targets``      what the report judges the variants against (:class:`Targets`; every key optional, defaults
                 in ``TARGET_DEFAULTS``): ``delta_map`` (the non-inferiority margin δ, absolute mAP),
                 ``gflops_percent`` and ``latency_percent`` (the compute and latency change a variant must reach,
                 e.g. -10), ``learning_floor_map`` (a baseline below this mAP has not learned: no verdict) and
                 ``min_scored_images`` (fewer scored images: no verdict). Logged on the parent run as
                 ``targets.<key>`` params.
``search``       (kind optuna) ``n_trials``, ``objectives`` (list of ``{metric, direction}``, metrics named
                 as in ``studies/mlflow_schema.py``: ``best/mAP``, ``gflops``, ``latency_ms`` ...),
                 ``sampler`` (``{name: auto|tpe|nsga2|random, seed}``), ``pruner`` (``{name:
                 median|none, n_startup_trials, n_warmup_steps}``; used only with ONE objective: Optuna
                 cannot prune multi-objective studies) and ``space``: ``dotted.key: {type: int|float|
                 categorical, low, high, step, log, choices, at_most: other.dotted.key}``.

Configuration of a run, in order (:func:`dset.config.resolve_config`, the one resolver ``dset.train`` uses too):
presets -> budget -> data -> ``STUDY_RUN_DEFAULTS`` -> ``set`` -> grid values / sampled parameters ->
command-line ``model.*``/``data.*``/``train.*``/``run.*`` overrides -> ``run.seed``. A study without ``budget``
gets ``auto``, as ``dset.train`` does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dset.config import (
    BUDGET_AUTO,
    PRESET_DIR,
    RESULT_NEUTRAL_KEYS,
    Config,
    ConfigError,
    apply_overrides,
    budget_path,
    find_yaml,
    flatten,
    parse_override,
    read_budget,
    read_preset,
    read_yaml_mapping,
    resolve_config,
)
from dset.provenance import code_version, data_digest, weights_digest

from .pretrain import Stage1, plan_stage1, pretrain_spec

STUDY_DIR = Path(__file__).resolve().parent
CONFIG_SECTIONS = ("model", "data", "train", "run")
# settings that may change between a run and its resumption: left out of the fingerprint
FINGERPRINT_IGNORED = RESULT_NEUTRAL_KEYS
# Study runs differ from a lone ``dset.train`` run here (a study's ``set`` or the command line can change it):
# a finished cell is never resumed, so its checkpoints/last.pt (the resume state: model, EMA and the optimizer's
# two moments, about four times best.pt's EMA weights) is deleted.
STUDY_RUN_DEFAULTS = {"train": {"keep_last_checkpoint": False}}
STUDY_KEYS = ("name", "description", "kind", "presets", "budget", "data", "pretrain", "seeds", "set", "out_dir", "grid",
              "search", "targets")
OVERRIDABLE = ("name", "presets", "budget", "data", "pretrain", "seeds", "out_dir", "n_trials", "search", "targets")
SEARCH_KEYS = ("n_trials", "objectives", "sampler", "pruner", "space")
SPACE_TYPES = ("int", "float", "categorical")
DIRECTIONS = ("maximize", "minimize")


class StudyError(ValueError):
    """A problem with a study file or a study-level override; the message names the key."""


# ---------------------------------------------------------------------------------------------- targets
# what the report judges a variant by when a study file states no ``targets`` (or a store predates them)
TARGET_DEFAULTS = {"delta_map": 0.01, "gflops_percent": -10.0, "latency_percent": -8.0, "learning_floor_map": 0.05,
                   "min_scored_images": 30}
TARGETS_PARAM_PREFIX = "targets."   # the parent run's params: targets.delta_map, ...


@dataclass(frozen=True)
class Targets:
    """What a study's variants are judged against: a non-inferiority margin ``delta_map`` (absolute mAP), the
    compute and latency changes to reach (``gflops_percent``, ``latency_percent``, % of RT-DETR, negative: cheaper),
    and when no verdict is given (a baseline below ``learning_floor_map``, fewer than ``min_scored_images``)."""

    delta_map: float = TARGET_DEFAULTS["delta_map"]
    gflops_percent: float = TARGET_DEFAULTS["gflops_percent"]
    latency_percent: float = TARGET_DEFAULTS["latency_percent"]
    learning_floor_map: float = TARGET_DEFAULTS["learning_floor_map"]
    min_scored_images: int = TARGET_DEFAULTS["min_scored_images"]

    def params(self) -> dict[str, float | int]:
        """The parent run's params: ``targets.<key>`` -> value."""
        return {TARGETS_PARAM_PREFIX + k: getattr(self, k) for k in TARGET_DEFAULTS}


def parse_targets(raw: Any, where: str = "targets") -> Targets:
    """``targets`` of a study file (a mapping, or None for the defaults) as :class:`Targets`; a bad key or value is a
    :class:`StudyError` naming it (``where``.key)."""
    if raw is None:
        return Targets()
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a mapping of {', '.join(TARGET_DEFAULTS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(TARGET_DEFAULTS))
    if unknown:
        raise StudyError(f"{where}: unknown keys {unknown}; valid: {', '.join(TARGET_DEFAULTS)}")
    checks = {  # key -> (is it valid, what is expected)
        "delta_map": (lambda v: 0 < v < 1, "a margin in absolute mAP, 0 < delta_map < 1 (e.g. 0.01)"),
        "gflops_percent": (lambda v: -100 < v <= 100, "a change in %, -100 < gflops_percent <= 100 (e.g. -10)"),
        "latency_percent": (lambda v: -100 < v <= 100, "a change in %, -100 < latency_percent <= 100 (e.g. -8)"),
        "learning_floor_map": (lambda v: 0 <= v < 1, "an mAP, 0 <= learning_floor_map < 1 (e.g. 0.05)"),
        "min_scored_images": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1 (e.g. 30)"),
    }
    values = {}
    for key, value in raw.items():
        ok, expected = checks[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise StudyError(f"{where}.{key}: expected {expected}, got {value!r}")
        values[key] = int(value) if key == "min_scored_images" else float(value)
    return Targets(**values)


# ------------------------------------------------------------------------------------------ dataclasses
@dataclass
class AxisValue:
    id: str
    settings: dict[str, Any]          # flat dotted keys
    preset: list[str] | None = None


@dataclass
class Axis:
    name: str
    values: list[AxisValue]


@dataclass
class Param:
    key: str                          # dotted configuration key
    type: str
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    choices: list | None = None
    at_most: str | None = None        # upper bound is this other (earlier) parameter's value

    def describe(self) -> str:
        if self.type == "categorical":
            return f"one of {self.choices}"
        text = f"{self.type} {self.low}..{self.high}"
        if self.step is not None:
            text += f" step {self.step}"
        if self.log:
            text += " (log)"
        if self.at_most:
            text += f", <= {self.at_most}"
        return text


@dataclass
class Objective:
    metric: str
    direction: str


@dataclass
class Search:
    n_trials: int
    objectives: list[Objective]
    space: list[Param]
    sampler: dict = field(default_factory=lambda: {"name": "auto", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"name": "median"})

    @property
    def prunable(self) -> bool:
        """Per-epoch pruning is possible: one objective, and a pruner configured."""
        return len(self.objectives) == 1 and self.pruner.get("name", "none") != "none"


@dataclass
class Study:
    name: str
    path: Path
    kind: str
    description: str
    presets: list[str]
    budget: str | None
    data: str | None
    seeds: list[int]
    settings: dict[str, Any]          # ``set``: flat dotted keys
    out_dir: Path
    axes: list[Axis]
    search: Search | None
    config_overrides: list[str]       # command line model.*/data.*/train.*/run.* overrides
    study_overrides: list[str]        # command line study-level overrides (as given)
    targets: Targets = field(default_factory=Targets)   # what the report judges the variants against
    pretrain: Any = "auto"            # stage 1 (studies/pretrain.py): "auto" (the budget's section), none, a mapping
    _stage1: dict = field(default_factory=dict, repr=False)   # planned stage 1 by (budget, depth)

    def stage1(self, budget: str | None, depth: int) -> Stage1:
        """Stage 1 of the cells of backbone ``depth`` whose configuration applied ``budget`` (planned once)."""
        key = (budget, depth)
        if key not in self._stage1:
            spec = pretrain_spec(budget, self.pretrain)
            run_overrides = [o for o in self.config_overrides if o.split("=", 1)[0].strip().startswith("run.")]
            self._stage1[key] = plan_stage1(spec, depth, run_overrides)
        return self._stage1[key]

    @property
    def study_dir(self) -> Path:
        return self.out_dir / self.name

    def budget_path(self) -> Path | None:
        return _named_yaml("budget", self.budget)

    def data_path(self) -> Path | None:
        return _named_yaml("data", self.data)


@dataclass
class Cell:
    """One run of a study: a grid cell x seed, or an Optuna trial."""

    id: str
    seed: int
    overrides: dict[str, Any]          # the cell's own settings (grid values / trial parameters), flat
    presets: list[str]
    config: Config | None = None
    error: str | None = None
    fingerprint: str = ""              # configuration + seed + stage 1 + code version + data digest: a finished run
                                       # with this fingerprint is this cell, done
    cell_key: str = ""                 # the same without code and data: a finished run with this key but another
                                       # fingerprint is this cell made by other code or data (stale)
    provenance: dict = field(default_factory=dict)   # {"code": version, "data": digest}
    stage1: Stage1 | None = None
    out_dir: Path | None = None
    trial: int | None = None           # Optuna trial number
    trial_root: int | None = None      # the first trial of a re-run chain (an interrupted trial re-enqueued)

    @property
    def ok(self) -> bool:
        return self.config is not None

    def labels(self) -> dict[str, Any]:
        """Backbone, switches and the variant label, from the configuration (or the settings)."""
        keep = None  # memory pruning's keep ratio, None when off
        if self.config is not None:
            m = self.config.model
            depth, e, p, d = m.backbone.depth, m.encoder_moe.enabled, m.token_pruning.enabled, m.decoder_moe.enabled
            keep = m.memory_pruning.keep_ratio if m.memory_pruning.enabled else None
        else:
            o = self.overrides
            depth = o.get("model.backbone.depth") or (34 if any("34" in p for p in self.presets) else 18)
            e = bool(o.get("model.encoder_moe.enabled", any(p.startswith("dset") for p in self.presets)))
            p = bool(o.get("model.token_pruning.enabled", any(p.startswith("dset") for p in self.presets)))
            d = bool(o.get("model.decoder_moe.enabled", any(p.startswith("dset") for p in self.presets)))
        backbone = f"R{depth}"
        return {"backbone": backbone, "encoder_moe": bool(e), "token_pruning": bool(p), "decoder_moe": bool(d),
                "memory_keep": keep, "variant": variant_label(backbone, e, p, d, keep)}


def variant_label(backbone: str, e: bool, p: bool, d: bool, memory_keep: float | None = None) -> str:
    """"RT-DETR R18" with every switch off, else e.g. "DSET R18 (E+P+D)" or "DSET R18 (E+P+D+M0.3)": E encoder MoE,
    P token pruning, D decoder MoE, M memory pruning with its keep ratio."""
    codes = [c for c, on in zip("EPD", (e, p, d)) if on]
    if memory_keep is not None:
        codes.append(f"M{memory_keep:g}")
    return f"RT-DETR {backbone}" if not codes else f"DSET {backbone} ({'+'.join(codes)})"


# ------------------------------------------------------------------------------------------ files
def _named_yaml(kind: str, name: str | None) -> Path | None:
    if name is None or str(name).lower() in ("none", "null", ""):
        return None
    if kind == "budget" and str(name) == BUDGET_AUTO:  # decided per run by dset.config.resolve_config
        return None
    return find_yaml(name, PRESET_DIR, what=kind, prefix=f"{kind}_", extra_names=("none",), error=StudyError,
                     context=kind)


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def study_path(name_or_path: str) -> Path:
    return find_yaml(name_or_path, STUDY_DIR, what="study", error=StudyError)


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """``key=value`` arguments -> (study-level, run-configuration) overrides."""
    study, config = [], []
    for text in args:
        if "=" not in text:
            raise StudyError(f"argument {text!r} is not of the form key=value")
        key = text.split("=", 1)[0].strip()
        first = key.split(".")[0]
        if first in CONFIG_SECTIONS and "." in key:
            config.append(text)
        elif first in OVERRIDABLE:
            study.append(text)
        else:
            raise StudyError(f"unknown override key {key!r}: use a study setting ({', '.join(OVERRIDABLE)}) "
                             f"or a configuration key (model.*, data.*, train.*, run.*)")
    return study, config


def _flat_settings(node: Any, where: str) -> dict[str, Any]:
    """Configuration settings, dotted or nested keys -> flat dotted keys, checked."""
    flat = flatten(node) if isinstance(node, dict) else {"": node}
    _check_config_keys(flat, where)
    return flat


def _preset_settings(preset: str, section: str, without: list[str], where: str) -> dict[str, Any]:
    """The settings that ``preset`` (and the presets it is based on) states under ``section`` (dotted), flat,
    leaving out the keys of the section named in ``without``."""
    try:
        node: Any = read_preset(preset)
    except ConfigError as exc:
        raise StudyError(f"{where}.from_preset: {exc}") from None
    for part in section.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        raise StudyError(f"{where}.from_preset: the preset {preset!r} states no settings of {section}")
    unknown = sorted(set(without) - set(node))
    if unknown:
        raise StudyError(f"{where}.without: the preset {preset!r} states no {section}.{unknown[0]}")
    return flatten({k: v for k, v in node.items() if k not in without}, section)


def _expand_preset_references(flat: dict[str, Any], where: str) -> dict[str, Any]:
    """``SECTION.from_preset: NAME`` (with ``SECTION.without: [key, ...]``) -> the preset's settings of SECTION."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.endswith(".without") and f"{key[: -len('.without')]}.from_preset" in flat:
            continue
        if not key.endswith(".from_preset"):
            out[key] = value
            continue
        section = key[: -len(".from_preset")]
        without = flat.get(f"{section}.without") or []
        out.update(_preset_settings(str(value), section, list(without), f"{where}: {section}"))
    return out


def _check_config_keys(settings: dict[str, Any], where: str) -> None:
    for key in settings:
        if key.split(".")[0] not in CONFIG_SECTIONS or "." not in key:
            raise StudyError(f"{where}: {key!r} is not a configuration key (model.*, data.*, train.*, run.*)")


def load_study(name_or_path: str, overrides: list[str] | None = None) -> Study:
    """Read a study file and apply study-level and run-configuration ``key=value`` overrides."""
    path = study_path(name_or_path)
    raw = read_yaml_mapping(path, StudyError)
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown study keys {unknown}; valid: {', '.join(STUDY_KEYS)}")
    study_ov, config_ov = split_overrides(list(overrides or []))
    for text in config_ov:
        if text.split("=", 1)[0].strip() == "run.seed":
            raise StudyError("run.seed: set the seeds of a study with seeds=[...] (e.g. seeds=[0,1,2])")
    rewritten = []
    for text in study_ov:
        key, value = text.split("=", 1)
        if key.strip() == "n_trials":
            key = "search.n_trials"
        rewritten.append(f"{key.strip()}={value}")
    try:
        data = apply_overrides(raw, rewritten)
    except ConfigError as exc:
        raise StudyError(str(exc)) from None

    name = str(data.get("name") or path.stem)
    kind = data.get("kind", "grid")
    if kind not in ("grid", "optuna"):
        raise StudyError(f"{path}: kind must be 'grid' or 'optuna', got {kind!r}")
    presets = data.get("presets") or []
    presets = [presets] if isinstance(presets, str) else list(presets)
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not (isinstance(seeds, list) and seeds
            and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise StudyError(f"seeds: expected a non-empty list of integers, e.g. seeds=[0,1,2], got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds: repeated seeds in {seeds}")
    settings = _flat_settings(data.get("set") or {}, f"{path.name}: set")
    budget = data.get("budget", BUDGET_AUTO)
    budget = None if budget is None else str(budget)
    dataset = data.get("data")
    dataset = None if dataset is None else str(dataset)
    _named_yaml("budget", budget)
    _named_yaml("data", dataset)

    axes: list[Axis] = []
    search = None
    if kind == "grid":
        axes = _parse_grid(data.get("grid"), path)
        if not presets and not any(v.preset for a in axes for v in a.values):
            raise StudyError(f"{path}: no model preset: set 'presets' or a 'preset' in a grid axis")
    else:
        if not presets:
            raise StudyError(f"{path}: an optuna study needs 'presets'")
        search = _parse_search(data.get("search"), path)

    out_dir = Path(str(data.get("out_dir") or "runs"))
    return Study(name=name, path=path, kind=kind, description=str(data.get("description") or ""), presets=presets,
                 budget=budget, data=dataset, seeds=list(seeds), settings=settings, out_dir=out_dir, axes=axes,
                 search=search, config_overrides=config_ov, study_overrides=study_ov,
                 targets=parse_targets(data.get("targets"), f"{path.name}: targets"),
                 pretrain=data.get("pretrain", "auto"))


def _parse_grid(grid: Any, path: Path) -> list[Axis]:
    if not isinstance(grid, dict) or not grid:
        raise StudyError(f"{path}: a grid study needs 'grid' axes: {{axis: {{value_id: {{key: value}}}}}}")
    axes = []
    for axis_name, values in grid.items():
        if not isinstance(values, dict) or not values:
            raise StudyError(f"grid.{axis_name}: expected a mapping of value ids to settings")
        axis_values = []
        for vid, settings_v in values.items():
            if isinstance(vid, bool):  # YAML 1.1 reads an unquoted off/on/no/yes as a boolean
                vid = "off" if vid is False else "on"
            settings_v = dict(settings_v or {})
            preset = settings_v.pop("preset", None)
            preset = [preset] if isinstance(preset, str) else (list(preset) if preset else None)
            where = f"grid.{axis_name}.{vid}"
            flat = _expand_preset_references(flatten(settings_v), where)
            _check_config_keys(flat, where)
            axis_values.append(AxisValue(str(vid), flat, preset))
        axes.append(Axis(str(axis_name), axis_values))
    return axes


def _parse_search(raw: Any, path: Path) -> Search:
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: an optuna study needs a 'search' mapping ({', '.join(SEARCH_KEYS)})")
    unknown = sorted(set(raw) - set(SEARCH_KEYS))
    if unknown:
        raise StudyError(f"search: unknown keys {unknown}; valid: {', '.join(SEARCH_KEYS)}")
    n_trials = raw.get("n_trials", 10)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise StudyError(f"search.n_trials: expected an integer >= 1, got {n_trials!r}")
    objectives = []
    for i, o in enumerate(raw.get("objectives") or []):
        if not isinstance(o, dict) or "metric" not in o:
            raise StudyError(f"search.objectives[{i}]: expected {{metric: NAME, direction: maximize|minimize}}")
        direction = str(o.get("direction", "maximize"))
        if direction not in DIRECTIONS:
            raise StudyError(f"search.objectives[{i}].direction: must be maximize or minimize, got {direction!r}")
        objectives.append(Objective(str(o["metric"]), direction))
    if not objectives:
        raise StudyError("search.objectives: at least one objective is needed")
    space = []
    for key, spec in (raw.get("space") or {}).items():
        if key.split(".")[0] not in CONFIG_SECTIONS:
            raise StudyError(f"search.space: {key!r} is not a configuration key")
        if not isinstance(spec, dict):
            raise StudyError(f"search.space.{key}: expected {{type: int|float|categorical, ...}}")
        extra = sorted(set(spec) - {"type", "low", "high", "step", "log", "choices", "at_most"})
        if extra:
            raise StudyError(f"search.space.{key}: unknown settings {extra}")
        tp = spec.get("type")
        if tp not in SPACE_TYPES:
            raise StudyError(f"search.space.{key}.type: must be one of {SPACE_TYPES}, got {tp!r}")
        p = Param(key=key, type=tp, low=spec.get("low"), high=spec.get("high"), step=spec.get("step"),
                  log=bool(spec.get("log", False)), choices=spec.get("choices"), at_most=spec.get("at_most"))
        if tp == "categorical":
            if not isinstance(p.choices, list) or not p.choices:
                raise StudyError(f"search.space.{key}.choices: a non-empty list is needed")
        else:
            if p.low is None or p.high is None or not p.low <= p.high:
                raise StudyError(f"search.space.{key}: low <= high are needed, got {p.low}..{p.high}")
        if p.at_most is not None and p.at_most not in [q.key for q in space]:
            raise StudyError(f"search.space.{key}.at_most: {p.at_most!r} must be a parameter listed before it")
        space.append(p)
    if not space:
        raise StudyError("search.space: at least one parameter is needed")
    sampler = {"name": "auto", "seed": 0, **(raw.get("sampler") or {})}
    if sampler["name"] not in ("auto", "tpe", "nsga2", "random"):
        raise StudyError(f"search.sampler.name: auto, tpe, nsga2 or random, got {sampler['name']!r}")
    pruner = {"name": "median", **(raw.get("pruner") or {})}
    if pruner["name"] not in ("median", "none"):
        raise StudyError(f"search.pruner.name: median or none, got {pruner['name']!r}")
    return Search(n_trials=n_trials, objectives=objectives, space=space, sampler=sampler, pruner=pruner)


# ------------------------------------------------------------------------------------- configuration
def cell_config(study: Study, overrides: dict[str, Any], seed: int, presets: list[str] | None = None) -> Config:
    """The validated configuration of one run of a study (a cell): :func:`dset.config.resolve_config` with the
    study's presets, budget and data, then ``STUDY_RUN_DEFAULTS``, the study's ``set``, the cell's values, the
    command line's ``key=value`` overrides and the seed (see the module docstring)."""
    try:
        return resolve_config(presets or study.presets, budget=study.budget, data=study.data,
                              layers=[STUDY_RUN_DEFAULTS, study.settings, overrides],
                              overrides=study.config_overrides, seed=seed)
    except ConfigError as exc:
        msg = str(exc)
        if study.budget == "paper" or study.data == "dair_v2x":
            if "not found" in msg and msg.startswith("data."):
                msg += (" -- budget=paper trains on DAIR-V2X converted to COCO: "
                        "python -m dset.data.dair_v2x SRC data/dair_v2x_coco (or set data.train.*/data.val.*)")
        raise ConfigError(msg) from None


def fingerprint(cfg: Config, extra: dict | None = None) -> str:
    """Hash of the resolved configuration (seed included, resume-mutable keys left out) and ``extra``."""
    flat = {k: v for k, v in cfg.flat().items() if k not in FINGERPRINT_IGNORED}
    payload = json.dumps({"config": flat, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _error_fingerprint(study: Study, cell_id: str, overrides: dict, seed: int, extra: dict | None) -> str:
    payload = json.dumps({"study": study.name, "cell": cell_id, "overrides": overrides, "seed": seed,
                          "cli": study.config_overrides, "budget": study.budget, "data": study.data,
                          "extra": extra or {}}, sort_keys=True, default=str)
    return "invalid-" + hashlib.sha256(payload.encode()).hexdigest()[:8]


def make_cell(study: Study, cell_id: str, overrides: dict[str, Any], seed: int, presets: list[str] | None = None,
              extra: dict | None = None) -> Cell:
    """Resolve a cell; a configuration error is kept in ``cell.error`` (the run is then recorded as failed).
    A stage 1 that cannot be had (a missing published checkpoint) raises :class:`PretrainError`: nothing runs."""
    presets = presets or study.presets
    cell = Cell(id=cell_id, seed=seed, overrides=dict(overrides), presets=list(presets))
    try:
        cell.config = cell_config(study, overrides, seed, presets)
    except (ConfigError, StudyError) as exc:
        cell.error = f"ConfigError: {exc}"
        cell.fingerprint = _error_fingerprint(study, cell_id, overrides, seed, extra)
        return cell
    cfg = cell.config
    cell.stage1 = study.stage1(cfg.run.budget, cfg.model.backbone.depth)
    identity = {**(extra or {}), "stage1": cell.stage1.identity}
    cell.provenance = {"code": code_version(), "data": data_digest(cfg)}
    cell.cell_key = fingerprint(cfg, identity)
    cell.fingerprint = fingerprint(cfg, {**identity, "stage1_key": cell.stage1.key, **cell.provenance,
                                         "weights": weights_digest(cfg)})
    cell.out_dir = study.study_dir / f"{cell_id}-{cell.fingerprint[:8]}"
    return cell


def grid_cells(study: Study) -> list[Cell]:
    """Every grid cell x seed: seed by seed; within a seed by the first axis, then the cells with the
    fewest non-"off" values first (for the ablation: baseline, E, P, D, E+P, E+D, P+D, E+P+D)."""
    cells = []
    combos = list(itertools.product(*[a.values for a in study.axes]))
    # reading order: by the first axis, then the fewest non-"off" values first (baseline, single switches, ...)
    combos.sort(key=lambda combo: (study.axes[0].values.index(combo[0]), sum(v.id != "off" for v in combo[1:]),
                                   tuple(-a.values.index(v) for a, v in zip(study.axes[1:], combo[1:]))))
    for seed, combo in itertools.product(study.seeds, combos):  # every cell once per seed, seed by seed
        ids = [v.id for v in combo if v.id != "off"]
        if len(combo) > 1 and all(v.id == "off" for v in combo[1:]):
            ids.append("base")
        base_id = "-".join(ids) or "base"
        overrides: dict[str, Any] = {}
        presets = None
        for v in combo:
            overrides.update(v.settings)
            if v.preset:
                presets = v.preset
        cells.append(make_cell(study, f"{base_id}-s{seed}", overrides, seed, presets))
    ids = [c.id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise StudyError(f"grid: several cells get the id(s) {dup}; give the axis values distinct ids")
    return cells


def describe_budget(study: Study, cfg: Config | None) -> list[str]:
    """Human-readable lines: what the budget file is and what the runs train on."""
    applied = cfg.run.budget if cfg is not None else study.budget
    path = budget_path(applied) if applied not in (None, BUDGET_AUTO) else None
    lines = [f"budget: {applied or 'none'}" + (f" ({_rel(path)})" if path else "")
             + (" (auto)" if study.budget == BUDGET_AUTO else "")]
    if study.data:
        lines.append(f"data preset: {study.data} ({_rel(study.data_path())})")
    if cfg is None:  # the runs' configuration is invalid: show what the budget file sets
        if path is not None:
            flat = flatten(read_budget(path)[0])
            lines += [f"  {k} = {v}" for k, v in flat.items()]
        return lines
    d, t, m = cfg.data, cfg.train, cfg.model
    if d.name == "synthetic":
        n_train = min(d.synthetic.num_train, d.max_train_images or d.synthetic.num_train)
        n_val = min(d.synthetic.num_val, d.max_val_images or d.synthetic.num_val)
        source = f"synthetic shapes ({d.synthetic.num_classes} classes, drawn at {d.synthetic.image_size} px)"
    else:
        n_train = d.max_train_images or "all"
        n_val = d.max_val_images or "all"
        source = f"COCO-format {d.train.annotations} / {d.val.annotations}"
    lines.append(f"  data: {source}; {n_train} train / {n_val} val images at {d.image_size} px, batch {d.batch_size}, "
                 f"augment {d.augment}")
    lines.append(f"  train: {t.epochs} epochs, lr {t.lr:g} (pretrained {t.lr_pretrained:g}), warm-up {t.warmup_steps} "
                 f"steps, eval every {t.eval_every}, early stop "
                 f"{'patience ' + str(t.early_stop_patience) if t.early_stop_patience else 'off'}, "
                 f"profile {'on' if t.profile else 'off'}, device {cfg.run.device}")
    lines.append(f"  model: {m.decoder.num_queries} queries, {m.decoder.num_denoising} denoising, "
                 f"token pruning warm-up {m.token_pruning.warmup_epochs} + ramp {m.token_pruning.ramp_epochs} epochs, "
                 f"min tokens {m.token_pruning.min_tokens}")
    return lines


def _rel(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        return str(path.resolve().relative_to(STUDY_DIR.parent))
    except ValueError:
        return str(path)


def search_fingerprint(study: Study) -> str:
    """Identity of an Optuna search: everything but n_trials (more trials continue the same search)."""
    s = study.search
    payload = json.dumps({"presets": study.presets, "budget": study.budget, "data": study.data,
                          "seeds": study.seeds[:1], "set": study.settings, "cli": sorted(study.config_overrides),
                          "objectives": [o.__dict__ for o in s.objectives], "space": [p.__dict__ for p in s.space]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def parse_value(text: str) -> Any:
    return parse_override(f"x={text}")[1]
