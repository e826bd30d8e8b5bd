"""A study file: what a study is (a grid of cells or an Optuna search, its budget, seeds and targets), read,
checked and with the command line's ``key=value`` overrides applied.

A study is a YAML file in ``studies/`` (or any path); its keys are described in docs/studies.md. A problem is a
:class:`StudyError` that names the key. The runs a study makes of it are :mod:`studies.planning.cells`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dset.config import (
    BUDGET_AUTO,
    PRESET_DIR,
    ConfigError,
    apply_overrides,
    find_yaml,
    flatten,
    read_preset,
    read_yaml_mapping,
)

from .pretrain import Stage1, plan_stage1, pretrain_spec
from .slurm_settings import SlurmSettings, SlurmSettingsError, parse_slurm_settings

# the study files shipped with the project (python -m studies.run NAME)
STUDY_DIR = Path(__file__).resolve().parents[1]
CONFIG_SECTIONS = ("model", "data", "train", "run")
STUDY_KEYS = ("name", "description", "kind", "presets", "budget", "data", "data_suggestion", "pretrain", "seeds", "set",
              "out_dir", "grid", "search", "targets", "slurm")
OVERRIDABLE = ("name", "presets", "budget", "data", "data_suggestion", "pretrain", "seeds", "out_dir", "n_trials",
               "search", "targets", "slurm")
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
    pretrain: Any = "auto"            # stage 1 (planning/pretrain.py): "auto" (the budget's section), none, a mapping
    data_suggestion: bool = True      # COCO data: the data check's image size, queries and epochs under the study's
                                      # own settings (planning/cells.py)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)   # each task of a SLURM submission (studies/slurm/)
    _stage1: dict = field(default_factory=dict, repr=False)   # planned stage 1 by (budget, depth)
    _data_checks: dict = field(default_factory=dict, repr=False)   # the data check by data set (planning/cells.py)

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

    data_suggestion = data.get("data_suggestion", True)
    if not isinstance(data_suggestion, bool):
        raise StudyError(f"data_suggestion: expected true or false, got {data_suggestion!r}")
    out_dir = Path(str(data.get("out_dir") or "runs"))
    try:
        slurm = parse_slurm_settings(data.get("slurm"), path.name)
    except SlurmSettingsError as exc:
        raise StudyError(str(exc)) from None
    return Study(name=name, path=path, kind=kind, description=str(data.get("description") or ""), presets=presets,
                 budget=budget, data=dataset, seeds=list(seeds), settings=settings, out_dir=out_dir, axes=axes,
                 search=search, config_overrides=config_ov, study_overrides=study_ov,
                 targets=parse_targets(data.get("targets"), f"{path.name}: targets"),
                 pretrain=data.get("pretrain", "auto"), data_suggestion=data_suggestion, slurm=slurm)


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
