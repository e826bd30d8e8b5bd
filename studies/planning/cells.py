"""The runs of a study: each cell's resolved configuration, its fingerprint and its output folder.

A cell is one run: a grid cell x seed, or an Optuna trial. Its fingerprint (configuration, seed, stage 1, code
version, data digest) says whether a finished MLflow run is this cell, done; its cell key (the same without code and
data) finds the same cell made by other code or data (stale). The order of configuration layers is in
docs/studies.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dset.config import RESULT_NEUTRAL_KEYS, Config, ConfigError, resolve_config
from dset.data.check import DataCheck
from dset.data.preflight import check_configured_data, refuse_unusable
from dset.provenance import code_version, data_digest, weights_digest

from .pretrain import Stage1
from .study import Study, StudyError

# settings that may change between a run and its resumption: left out of the fingerprint
FINGERPRINT_IGNORED = RESULT_NEUTRAL_KEYS
# Study runs differ from a lone ``dset.train`` run here (a study's ``set`` or the command line can change it):
# a finished cell is never resumed, so its checkpoints/last.pt (the resume state: model, EMA and the optimizer's
# two moments, about four times best.pt's EMA weights) is deleted.
STUDY_RUN_DEFAULTS = {"train": {"keep_last_checkpoint": False}}


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


def cell_config(study: Study, overrides: dict[str, Any], seed: int, presets: list[str] | None = None) -> Config:
    """The validated configuration of one run of a study (a cell): :func:`dset.config.resolve_config` with the
    study's presets, budget and data, then (COCO data, ``data_suggestion``) the data check's suggestion, then
    ``STUDY_RUN_DEFAULTS``, the study's ``set``, the cell's values, the command line's ``key=value`` overrides and
    the seed (docs/studies.md). Data the check finds unusable raise :class:`DatasetError` with its report."""
    layers = [STUDY_RUN_DEFAULTS, study.settings, overrides]
    try:
        cfg = resolve_config(presets or study.presets, budget=study.budget, data=study.data, layers=layers,
                             overrides=study.config_overrides, seed=seed)
        check = study_data_check(study, cfg)
        if study.data_suggestion and check is not None and check.suggestion is not None:
            # right above the data: the study's own settings, the cell's values and the command line still win
            cfg = resolve_config(presets or study.presets, budget=study.budget, data=study.data,
                                 layers=[check.suggestion.values, *layers], overrides=study.config_overrides,
                                 seed=seed)
        return cfg
    except ConfigError as exc:
        msg = str(exc)
        if study.budget == "paper" or study.data == "dair_v2x":
            if "not found" in msg and msg.startswith("data."):
                msg += (" -- budget=paper trains on DAIR-V2X converted to COCO: "
                        "python -m dset.data.dair_v2x SRC data/dair_v2x_coco (or set data.train.*/data.val.*)")
        raise ConfigError(msg) from None


def study_data_check(study: Study, cfg: Config) -> DataCheck | None:
    """The check of a cell's COCO data (None for the synthetic data), run once per data set and batch size of
    the study; :class:`DatasetError` with the check's report when the data are unusable."""
    d = cfg.data
    key = (d.name, *(getattr(getattr(d, s), p) for s in ("train", "val", "test") for p in ("images", "annotations")),
           tuple(d.classes or ()), d.batch_size)
    if key not in study._data_checks:
        check = check_configured_data(cfg)
        refuse_unusable(check)
        study._data_checks[key] = check
    return study._data_checks[key]


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


def search_fingerprint(study: Study) -> str:
    """Identity of an Optuna search: everything but n_trials (more trials continue the same search)."""
    s = study.search
    payload = json.dumps({"presets": study.presets, "budget": study.budget, "data": study.data,
                          "seeds": study.seeds[:1], "set": study.settings, "cli": sorted(study.config_overrides),
                          "objectives": [o.__dict__ for o in s.objectives], "space": [p.__dict__ for p in s.space]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]
