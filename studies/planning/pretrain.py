"""Stage 1 of a study (DSET's protocol): the RT-DETR checkpoint that every cell of a backbone fine-tunes from.

Every cell of a study, the all-off RT-DETR cell included, starts from the same checkpoint of its backbone and trains
for the same steps (stage 2). That checkpoint is trained here once and cached, keyed by what produced it, or a
published file, or none; the study's or its budget's ``pretrain`` setting says which (docs/studies.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dset.config import RESULT_NEUTRAL_KEYS, Config, ConfigError, _merge, budget_path, read_budget, resolve_config
from dset.provenance import code_version, data_digest, file_digest
from dset.run_folder import RunFolder

# stage-1 runs keep no resume state once finished and need no profile or pictures (cells are profiled and drawn)
STAGE1_SETTINGS = {"train.keep_last_checkpoint": False, "train.profile": False, "train.pictures": 0}
SPEC_KEYS = ("budget", "checkpoints", "source", "seed")


class PretrainError(ValueError):
    """Stage 1 cannot be had as configured; the message names the file or key and what to do."""


def cache_root() -> Path:
    """Where trained stage-1 checkpoints are cached: ``$DSET_CACHE_DIR/pretrained`` (default
    ``~/.cache/dset/pretrained``), the same variable that moves the synthetic data cache."""
    base = os.environ.get("DSET_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "dset") / "pretrained"


@dataclass
class Stage1:
    """The start of every cell of one backbone."""

    depth: int
    kind: str                          # "train" (here, cached), "file" (published) or "none"
    checkpoint: Path | None = None     # what the cells load
    key: str | None = None             # train: the cache key (configuration, data, code); file: the file's
                                       # SHA-256 (16 hex digits)
    config: Config | None = None       # train: the stage-1 run's configuration
    folder: Path | None = None         # train: the cache folder (the stage-1 run's output folder)
    budget: str | None = None          # train: the stage-1 budget
    source: str | None = None          # file: where a user gets it

    @property
    def cell_id(self) -> str:
        return f"stage1-r{self.depth}"

    @property
    def partial_folder(self) -> Path:
        """Where stage 1 trains before it is renamed into the cache (an interrupted run resumes here)."""
        return self.folder.with_name(self.folder.name + ".partial")

    @property
    def cached(self) -> bool:
        if self.kind != "train":
            return self.kind == "file"
        run = RunFolder(self.folder)
        if not (run.summary.is_file() and self.checkpoint.is_file()):
            return False
        return run.read_summary().get("status") == "completed"

    @property
    def identity(self) -> dict:
        """What a cell's key records of its start, independent of the code version (``key`` carries that)."""
        if self.kind == "train":
            return {"stage1": "train", "budget": self.budget}
        if self.kind == "file":
            return {"stage1": "file", "path": str(self.checkpoint)}
        return {"stage1": "none"}

    def describe(self) -> str:
        if self.kind == "train":
            state = "cached" if self.cached else "to train first"
            return (f"R{self.depth}: RT-DETR trained here with budget {self.budget}, {state}: "
                    f"{self.folder} (key {self.key})")
        if self.kind == "file":
            return f"R{self.depth}: published checkpoint {self.checkpoint} (sha256 {self.key})"
        return f"R{self.depth}: none (every cell from its own initial weights)"

    def init_source(self) -> str:
        """The TAG_INIT_SOURCE text of a cell."""
        if self.kind == "train":
            return f"stage 1: RT-DETR R{self.depth} trained here (budget {self.budget}, cache key {self.key})"
        if self.kind == "file":
            return f"stage 1: published checkpoint {self.checkpoint.name} (sha256 {self.key})"
        return "none: from the configuration's initial weights"


def _normalised(spec: Any) -> Any:
    """Per-backbone keys as ints (YAML gives 18, a command-line ``pretrain.checkpoints.18=...`` gives "18")."""
    if isinstance(spec, dict):
        for key in ("checkpoints", "budget"):
            if isinstance(spec.get(key), dict):
                spec = {**spec, key: {int(str(k).lower().lstrip("r")): v for k, v in spec[key].items()}}
    return spec


def pretrain_spec(budget: str | None, override: Any) -> Any:
    """The study's ``pretrain`` setting if given, else its budget's ``pretrain`` section. A partial mapping is
    merged over the budget's section (``pretrain.checkpoints.18=PATH`` keeps the R34 file and the source)."""
    _, section = read_budget(budget) if budget_path(budget) is not None else ({}, None)
    if isinstance(override, dict) and isinstance(section, dict):
        base = _normalised(section)
        if "budget" in override:
            base.pop("checkpoints", None)
        if "checkpoints" in override:
            base.pop("budget", None)
        override = _merge(base, _normalised(override))
    if override is not None and str(override) != "auto":
        return _normalised(override)
    if section is None:
        raise PretrainError(f"budget {budget or 'none'} has no 'pretrain' section, so stage 1 is undefined: set "
                            "pretrain=none to train every cell from its own initial weights, or "
                            "pretrain.budget=NAME to train RT-DETR first")
    return section


def plan_stage1(spec: Any, depth: int, run_overrides: list[str] = ()) -> Stage1:
    """Stage 1 for backbone ``depth`` under ``spec`` (docs/studies.md). ``run_overrides``: the
    command line's ``run.*`` overrides (device ...), which stage 1 shares with the cells."""
    if spec is None or str(spec).lower() in ("none", "null"):
        return Stage1(depth, "none")
    if not isinstance(spec, dict):
        raise PretrainError(f"pretrain: expected none or a mapping ({', '.join(SPEC_KEYS)}), got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise PretrainError(f"pretrain: unknown keys {unknown}; valid: {', '.join(SPEC_KEYS)}")
    if spec.get("checkpoints") is not None:
        files = _normalised(spec)["checkpoints"]
        if depth not in files:
            raise PretrainError(f"pretrain.checkpoints: no checkpoint for R{depth} "
                                f"(give pretrain.checkpoints.{depth}=PATH)")
        path = Path(str(files[depth])).expanduser()
        if not path.is_file():
            where = spec.get("source") or "the RT-DETR repository's releases"
            raise PretrainError(
                f"pretrain.checkpoints.{depth}: the RT-DETR R{depth} checkpoint that stage 1 starts from is not at "
                f"{path} (resolved: {path.resolve()}). Downloads are not possible here: get {path.name} from "
                f"{where}, place it there, or point pretrain.checkpoints.{depth}=PATH at your copy")
        # keyed by content: a file replaced in place under the same name is another start for the cells
        return Stage1(depth, "file", checkpoint=path, key=file_digest(path)[:16], source=spec.get("source"))
    budget = _normalised(spec).get("budget")
    if isinstance(budget, dict):  # one budget per backbone (R34 converges more slowly from scratch)
        if depth not in budget:
            raise PretrainError(f"pretrain.budget: no budget for R{depth} (give pretrain.budget.{depth}=NAME)")
        budget = budget[depth]
    if budget is None:
        raise PretrainError("pretrain: give 'budget' (train RT-DETR here) or 'checkpoints' (published files)")
    try:
        cfg = resolve_config(f"rtdetr_r{depth}", budget=budget, layers=[STAGE1_SETTINGS],
                             overrides=list(run_overrides), seed=int(spec.get("seed", 0)))
    except ConfigError as exc:
        raise PretrainError(f"pretrain.budget {budget}: {exc}") from None
    flat = {k: v for k, v in cfg.flat().items() if k not in RESULT_NEUTRAL_KEYS}
    payload = json.dumps({"config": flat, "data": data_digest(cfg), "code": code_version()}, sort_keys=True,
                         default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    folder = cache_root() / f"rtdetr_r{depth}-{key}"
    return Stage1(depth, "train", checkpoint=RunFolder(folder).best_checkpoint, key=key, config=cfg,
                  folder=folder, budget=str(budget))


def publish(stage: Stage1) -> None:
    """Move a finished stage-1 run from its partial folder into the cache (one rename: a reader never sees a
    half-written folder). If another process published the same key meanwhile, its copy is kept."""
    partial = stage.partial_folder
    if not stage.folder.exists():
        try:
            partial.rename(stage.folder)
            return
        except OSError:  # published by another process between the check and the rename
            if not stage.folder.exists():
                raise
    shutil.rmtree(partial, ignore_errors=True)
