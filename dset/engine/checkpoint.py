"""Checkpoints: written whole or not at all, copied off the training state, read back to resume.

- ``checkpoints/last.pt``: the resume state (weights, EMA, optimizer, scheduler, scaler, early stopping, the
  RNG states of every rank, ...). :class:`ResumeStateWriter` keeps a CPU copy of the newest epoch's state and
  writes it at most every ``train.checkpoint_every_minutes``, at the end of a run and when an exception
  leaves the epoch loop. :func:`read_resume_state` reads it back, refusing a changed configuration.
- ``checkpoints/best.pt``: :func:`weights_checkpoint`, what evaluation, profiling and fine-tuning read.

Files are written to a temporary file and renamed (``os.replace``), so a killed run never leaves a torn one;
a failed write (a full disk, most often) raises :class:`CheckpointWriteError` and leaves the previous file.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import RESULT_NEUTRAL_KEYS, Config, ConfigError, flatten

__all__ = ["CHECKPOINT_VERSION", "RESUME_MUTABLE_KEYS", "CheckpointWriteError", "atomic_save", "atomic_write_text",
           "cpu_copy", "weights_checkpoint", "config_diff", "read_resume_state", "resume_state_epoch",
           "ResumeStateWriter"]

CHECKPOINT_VERSION = 1
# configuration keys that may differ between a run and its resumption
RESUME_MUTABLE_KEYS = RESULT_NEUTRAL_KEYS


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the message names the file and the free
    space. The previous checkpoint of that name is left intact, so the run can resume once there is room."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        try:
            torch.save(obj, tmp)
        except (RuntimeError, OSError) as exc:  # torch reports a full disk as "PytorchStreamWriter failed ..."
            free_mb = shutil.disk_usage(path.parent).free / 2**20
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointWriteError(f"could not write the checkpoint {path} ({free_mb:.0f} MB free on its disk; "
                                       f"the previous one, if any, is intact): {first_line}") from exc
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def cpu_copy(value: Any) -> Any:
    """``value`` (a checkpoint dict) with every tensor copied to the CPU and every container rebuilt: the
    resume state of one epoch, which later training steps (updating parameters, optimizer moments and EMA
    buffers in place) cannot change. State dicts keep their class and ``_metadata`` (module versions)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        out = {k: cpu_copy(v) for k, v in value.items()}
        if isinstance(value, OrderedDict):
            out = OrderedDict(out)
            if hasattr(value, "_metadata"):
                out._metadata = copy.deepcopy(value._metadata)
        return out
    if isinstance(value, list):
        return [cpu_copy(v) for v in value]
    if type(value) is tuple:
        return tuple(cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def weights_checkpoint(full: dict) -> dict:
    """best.pt out of a resume state: what evaluation, profiling and fine-tuning read (the EMA weights), half
    the size it would be with the raw training weights too, which nothing reads from it."""
    keep = ("version", "config", "epoch", "global_step", "ema", "metrics", "label_to_category_id",
            "category_names")
    return {k: full[k] for k in keep}


def config_diff(a: dict, b: dict, ignore: Sequence[str]) -> list[str]:
    """The dotted keys whose values differ between two configuration dicts, less ``ignore``, sorted."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def read_resume_state(path: Path, cfg: Config) -> dict:
    """The resume state in ``path`` (``checkpoints/last.pt``), on the CPU; a :class:`ConfigError` when its
    configuration differs from ``cfg`` in a key other than :data:`RESUME_MUTABLE_KEYS`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    diff = config_diff(ckpt["config"], cfg.to_dict(), RESUME_MUTABLE_KEYS)
    if diff:
        raise ConfigError(f"--resume: the configuration differs from the checkpoint {path} in: {', '.join(diff)}")
    return ckpt


def resume_state_epoch(path: Path) -> int | None:
    """The epoch ``path`` (``checkpoints/last.pt``) holds, without reading its tensors (memory-mapped); None when
    there is no readable file (a resumed run then starts at epoch 0)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except (OSError, RuntimeError, KeyError, ValueError, EOFError):
        return None


class ResumeStateWriter:
    """The resume state of the newest epoch (a CPU copy, kept by rank 0) and what ``path`` (last.pt) holds.

    Writing it costs seconds on a large model, so :meth:`write` is called every ``every_s`` seconds
    (:meth:`due`; since the last write or :meth:`restart_clock`), at the end of the run and when an exception
    leaves the epoch loop; it writes nothing when the file holds the newest epoch already.
    """

    def __init__(self, path: Path, every_s: float, written_epoch: int) -> None:
        self.path = path
        self.every_s = every_s
        self.snapshot: dict | None = None
        self.written_epoch = written_epoch   # resumed: last.pt holds the epoch before the first one run
        self.last_write = time.monotonic()

    def restart_clock(self) -> None:
        self.last_write = time.monotonic()

    def keep(self, snapshot: dict) -> None:
        """Keep ``snapshot`` (an epoch's full training state, copied to the CPU: :func:`cpu_copy`) as the newest."""
        self.snapshot = snapshot

    def due(self) -> bool:
        return time.monotonic() - self.last_write >= self.every_s

    def write(self) -> None:
        """Write the newest epoch's resume state to ``path``, unless it holds it already."""
        if self.snapshot is None or self.snapshot["epoch"] <= self.written_epoch:
            return
        atomic_save(self.snapshot, self.path)
        self.written_epoch = self.snapshot["epoch"]
        self.last_write = time.monotonic()
