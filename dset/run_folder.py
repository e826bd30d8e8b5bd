"""The layout of a run folder: the one place that names the files a training run writes.

The engine writes a run folder (``dset.engine``), the orchestrator logs it to MLflow under the same relative
paths (``studies``), and the report reads them back (``analysis``); all three take the names from here.
The files and their formats are described in docs/runs.md. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONFIG", "METRICS", "SUMMARY", "CHECKPOINTS_DIR", "BEST_CHECKPOINT", "RESUME_STATE", "DETECTIONS",
           "GROUND_TRUTH", "TEST_DETECTIONS", "TEST_GROUND_TRUTH", "PICTURES_DIR", "PICTURES_INDEX",
           "TEXT_FILES", "evaluation_files", "RunFolder", "read_metrics"]

# relative to the run folder; the same paths are the run's MLflow artifact paths
CONFIG = "config.yaml"                      # the resolved configuration
METRICS = "metrics.jsonl"                   # one record per epoch
SUMMARY = "summary.json"                    # the run's outcome: best epoch, final metrics, measurements, error
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINT = "checkpoints/best.pt"     # the reported weights
RESUME_STATE = "checkpoints/last.pt"        # everything needed to continue an interrupted run
# the reported checkpoint's detections on the validation images (the selection split) and their ground truth
DETECTIONS = "eval/detections.json"
GROUND_TRUTH = "eval/ground_truth.json"
# the same checkpoint on the test images (the scoring split), when the data has one; same formats
TEST_DETECTIONS = "eval/test_detections.json"
TEST_GROUND_TRUTH = "eval/test_ground_truth.json"
PICTURES_DIR = "pictures"                   # dset.pictures: PNGs of the reported checkpoint
PICTURES_INDEX = "pictures/pictures.json"   # what each picture shows

# the files logged to MLflow one by one, in this order (the pictures go as a folder)
TEXT_FILES = (CONFIG, METRICS, SUMMARY, DETECTIONS, GROUND_TRUTH, TEST_DETECTIONS, TEST_GROUND_TRUTH)


def evaluation_files(split: str) -> tuple[str, str]:
    """The (detections, ground truth) files of a split: "val" (selection) or "test" (scoring)."""
    if split == "val":
        return DETECTIONS, GROUND_TRUTH
    if split == "test":
        return TEST_DETECTIONS, TEST_GROUND_TRUTH
    raise ValueError(f"split must be 'val' or 'test', got {split!r}")


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; none when the file is missing. A line cut short by a killed
    process is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


@dataclass(frozen=True)
class RunFolder:
    """A run folder on disk: its files as paths."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def best_checkpoint(self) -> Path:
        return self.root / BEST_CHECKPOINT

    @property
    def resume_state(self) -> Path:
        return self.root / RESUME_STATE

    @property
    def pictures(self) -> Path:
        return self.root / PICTURES_DIR

    @property
    def pictures_index(self) -> Path:
        return self.root / PICTURES_INDEX

    def records(self) -> list[dict]:
        """The epoch records written so far (:func:`read_metrics`)."""
        return read_metrics(self.metrics)

    def read_summary(self) -> dict | None:
        """``summary.json``, or None before the run has ended."""
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None
