"""The text files a run writes beside its checkpoints, and the strict JSON they hold.

- ``metrics.jsonl``: one record per epoch (keys listed in :func:`dset.engine.loop.fit`: the metric names of
  :mod:`dset.metric_names`), appended by :func:`append_metrics`; a resumed run first drops the lines of epochs
  after its checkpoint (:func:`start_metrics_file`).
- ``summary.json``, ``config.yaml``, ``eval/detections.json`` (the reported checkpoint's detections on the
  validation images) and ``eval/ground_truth.json`` (their ground truth); with a test split,
  ``eval/test_detections.json`` and ``eval/test_ground_truth.json`` (the same on the test images, the scoring
  split): what a report needs to bootstrap intervals over images. JSON files are written through a temporary
  file and a rename (:func:`write_json`).

NaN and infinite numbers are written as ``null`` (:func:`json_safe`).
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

__all__ = ["DETECTIONS_FILE", "GROUND_TRUTH_FILE", "TEST_DETECTIONS_FILE", "TEST_GROUND_TRUTH_FILE", "json_safe",
           "write_json", "start_metrics_file", "append_metrics", "evaluation_entries", "epoch_line"]

# the reported (best) checkpoint's detections on the validation images, and their ground truth (beside
# metrics.jsonl)
DETECTIONS_FILE = "eval/detections.json"
GROUND_TRUTH_FILE = "eval/ground_truth.json"
# the same checkpoint's detections on the test images (the scoring split), and their ground truth; same formats
TEST_DETECTIONS_FILE = "eval/test_detections.json"
TEST_GROUND_TRUTH_FILE = "eval/test_ground_truth.json"


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
