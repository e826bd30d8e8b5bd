"""The text files a run writes beside its checkpoints (:mod:`dset.run_folder` names them), and the strict JSON
they hold: ``metrics.jsonl``'s records (:func:`start_metrics_file`, :func:`append_metrics`), the JSON files
written through a temporary file and a rename (:func:`write_json`), NaN and infinite numbers as ``null``
(:func:`json_safe`). Their keys: docs/runs.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metric_names as M
from .checkpoint import atomic_write_text
from .coco_eval import METRIC_KEYS

__all__ = ["json_safe", "write_json", "start_metrics_file", "append_metrics", "evaluation_entries", "epoch_line"]


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), tensors -> numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """``obj`` as one JSON document (already :func:`json_safe` where it has to be), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def start_metrics_file(path: Path, start_epoch: int) -> list[dict]:
    """An empty ``metrics.jsonl`` for a run from epoch 0; for a resumed one, its lines of the epochs before
    ``start_epoch`` (a run killed between its metrics line and its checkpoint leaves one more). Returns the
    records kept."""
    if start_epoch == 0:
        path.write_text("")
        return []
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and json.loads(line).get("epoch", -1) < start_epoch:
                keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
    return [json.loads(line) for line in keep]


def append_metrics(path: Path, record: dict) -> None:
    """One epoch's record as a line of ``metrics.jsonl``."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")


def evaluation_entries(evaluation: dict, split: str = "val") -> dict:
    """An evaluation's metrics (:func:`dset.engine.coco_eval.evaluate_detections`, COCO's names) as record
    entries: ``val/<metric>`` and ``val/AP/<class name>``, or for the test split ``test/<metric>`` and
    ``test/AP/<class name>``."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    metric, class_ap = ((M.val_metric, M.per_class_ap_metric) if split == "val"
                        else (M.metric_on_test, M.per_class_ap_metric_on_test))
    out = {metric(k): evaluation[k] for k in METRIC_KEYS if k in evaluation}
    for name, ap in (evaluation.get("per_class_AP") or {}).items():
        out[class_ap(name)] = ap
    return out


def epoch_line(epoch: int, epochs: int, m: dict) -> str:
    """The log line of one epoch's record."""
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {m[M.train_loss_metric('loss')]:.4f}"]
    if M.VAL_MAP in m:
        parts.append(f"mAP {m[M.VAL_MAP]:.4f} mAP50 {m[M.val_metric('mAP50')]:.4f}")
    lr = ([v for k, v in m.items() if k.startswith(M.lr_metric("new"))]
          or [v for k, v in m.items() if k.startswith(M.LR_PREFIX)])
    if lr:
        parts.append(f"lr {lr[0]:.2e}")
    if M.KEEP_RATIO in m:
        parts.append(f"keep {m[M.KEEP_RATIO]:.3f}")
    parts.append(f"{m[M.EPOCH_TIME]:.1f} s")
    return " | ".join(parts)
