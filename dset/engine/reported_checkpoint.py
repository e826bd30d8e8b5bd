"""The reported checkpoint of a finished run, measured and drawn for ``summary.json``.

The reported checkpoint is ``best.pt``'s EMA weights, or the final EMA model when no epoch was best (its
epoch: the last one run). The best epoch is chosen on the validation split (the selection split) among the
epochs :func:`eligible_epochs` names, one rule for every run; they are at or after every pruning schedule's
target, so its pruners run at their target ratio and it is profiled as deployed. It is loaded once
(:class:`ReportedCheckpoint`), then:

- with a test split (``data.test``, ``data.synthetic.num_test``): :func:`score_on_test_split`, the checkpoint's
  COCO metrics on the test images (the scoring split) as the final ``test/`` metrics, its detections and their
  ground truth written beside the validation ones (``eval/test_detections.json``, ``eval/test_ground_truth.json``);

- with ``train.profile``: :func:`profile_entries`, active params / GFLOPs / latency via :mod:`dset.model_profile`
  (and with ``train.profile_deployment`` eager PyTorch next to ONNX Runtime), as final metrics
  (``summary["metrics"]``, :mod:`dset.metric_names`) beside the detail of what was measured;
- with ``train.pictures``: :func:`picture_entries`, the first validation images drawn into ``pictures/``
  (:func:`dset.pictures.draw_pictures`).

A measurement or drawing failure is recorded (``profile_error``, ``deployment_error``, ``pictures_error``)
and never fails a finished run; a failure to score the test split does (the score is the run's result).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import metric_names as M
from .. import run_folder
from ..config import Config
from ..data.loaders import DataBundle, build_val_loader
from ..models.detector import Detector, build_model
from ..models.pruning import ScheduledPruner
from .coco_eval import evaluate_detections, ground_truth, top_per_image_and_class
from .records import evaluation_entries, json_safe, write_json
from .run_metrics import deployment_metrics

__all__ = ["DEPLOYMENT_BATCH_SIZES", "ReportedCheckpoint", "eligible_epochs", "reported_checkpoint_entries",
           "score_on_test_split", "profile_entries", "picture_entries"]

log = logging.getLogger(__name__)

# batch sizes at which a run's profile times eager PyTorch next to ONNX Runtime (train.profile_deployment)
DEPLOYMENT_BATCH_SIZES = (1, 8)


def eligible_epochs(cfg: Config) -> range:
    """The epochs that may give the reported checkpoint (the best ``val/mAP`` among those evaluated) and stop a
    run early: one rule for every run, so that the cells of a study choose among the same epochs.

    They start at the first epoch where both pruning schedules AS CONFIGURED reach their target keep ratio
    (``model.token_pruning`` and ``model.memory_pruning``: warm-up, then ramp), whether or not the switch is on: a
    study's budget sets the schedules for all its cells alike, so a cell without pruning may not pick an epoch that
    a pruning cell could not. The last epoch is always eligible (only a switch that is off may have a schedule
    longer than the run: validation refuses it for one that is on)."""
    schedules = (cfg.model.token_pruning, cfg.model.memory_pruning)
    # the schedule's end as the pruners define it (ScheduledPruner.target_epoch, one definition)
    first = max(ScheduledPruner(1.0, 1, s.warmup_epochs, s.ramp_epochs).target_epoch for s in schedules)
    last = cfg.train.epochs - 1
    return range(min(first, last), last + 1)


class ReportedCheckpoint:
    """The reported model and its epoch, loaded on the first :meth:`load` and kept for the next ones (a
    loading failure is raised again, not retried). ``final_model``/``final_epoch``: what is reported when
    ``best_path`` does not exist."""

    def __init__(self, best_path: Path, cfg: Config, device: torch.device, final_model: Detector,
                 final_epoch: int | None) -> None:
        self.best_path = best_path
        self.cfg = cfg
        self.device = device
        self.final_model = final_model
        self.final_epoch = final_epoch
        self._loaded: tuple[Detector, int | None] | BaseException | None = None

    def load(self) -> tuple[Detector, int | None]:
        if self._loaded is None:
            try:
                self._loaded = self._read()
            except Exception as exc:  # noqa: BLE001 - kept to be raised to every caller alike
                self._loaded = exc
        if isinstance(self._loaded, BaseException):
            raise self._loaded
        return self._loaded

    def _read(self) -> tuple[Detector, int | None]:
        if not self.best_path.is_file():
            return self.final_model, self.final_epoch
        checkpoint = torch.load(self.best_path, map_location="cpu", weights_only=True)
        model = build_model(self.cfg, load_weights=False)
        model.load_state_dict(checkpoint["ema"]["module"])
        return model.to(self.device), checkpoint.get("epoch")


def reported_checkpoint_entries(folder: run_folder.RunFolder, cfg: Config, device: torch.device, data: DataBundle,
                                final_model: Detector, final_epoch: int | None) -> dict:
    """Test-split score, profile and pictures of the reported checkpoint (best.pt's EMA weights, else
    ``final_model``), loaded once for all: the ``summary.json`` entries, their final metrics together under
    ``metrics``."""
    reported = ReportedCheckpoint(folder.best_checkpoint, cfg, device, final_model, final_epoch)
    parts = []
    if data.test is not None:
        parts.append(score_on_test_split(reported, data, cfg, device, folder.root))
    if cfg.train.profile:
        parts.append(profile_entries(reported, cfg, device))
    if cfg.train.pictures:
        parts.append(picture_entries(reported, data, folder.root, cfg.train.pictures))
    entries: dict = {"metrics": {}}
    for part in parts:  # each part's summary entries; their final metrics together
        entries["metrics"].update(part.pop("metrics", {}))
        entries.update(part)
    return entries


def score_on_test_split(reported: ReportedCheckpoint, data: DataBundle, cfg: Config, device: torch.device,
                        out_dir: Path) -> dict:
    """Evaluate the reported checkpoint once on the test split of ``data`` (the scoring split; this process alone,
    rank 0 under DDP): write its detections (``eval/test_detections.json``, with the checkpoint's epoch) and their
    ground truth (``eval/test_ground_truth.json``) into ``out_dir``, and return the ``summary.json`` entries: the
    ``test/`` metrics under ``metrics`` and ``num_test_images``."""
    model, epoch = reported.load()
    dataset, coco_dataset, image_ids = data.evaluated_split("test")
    detections: list = []
    evaluation = evaluate_detections(model, build_val_loader(dataset, cfg), data, device, split="test",
                                     detections_out=detections)
    write_json(out_dir / run_folder.TEST_GROUND_TRUTH, ground_truth(coco_dataset.coco, image_ids))
    write_json(out_dir / run_folder.TEST_DETECTIONS, {"epoch": epoch, "image_ids": list(image_ids),
                                                      "detections": top_per_image_and_class(detections, 100)})
    log.info("test split (%d images): mAP %.4f mAP50 %.4f (the reported checkpoint, epoch %s)",
             evaluation["test_images"], evaluation["mAP"], evaluation["mAP50"], epoch)
    return {"metrics": evaluation_entries(evaluation, split="test"), "num_test_images": evaluation["test_images"]}


def profile_entries(reported: ReportedCheckpoint, cfg: Config, device: torch.device) -> dict:
    """The ``summary.json`` entries of the reported model's profile (:func:`dset.model_profile.profile_model` at
    ``data.image_size``, as it runs: its token pruner at the ratio of its epoch): its final metrics under
    ``metrics`` (active params, GFLOPs in all and by component, latency, FPS, the tokens it was measured at,
    deployed speed), what they were measured on (``latency_batch_size``, ``latency_device``,
    ``profile_image_size``), the ``profile`` and ``deployment`` detail; or ``profile_error`` /
    ``deployment_error``."""
    from .. import measure, model_profile  # fvcore and onnxruntime: imported only when a run is profiled

    try:
        model, _ = reported.load()
        size = cfg.data.image_size
        prof = model_profile.profile_model(model, size=size, device=str(device), warmup=2, repeats=5)
    except Exception as exc:  # noqa: BLE001 - a measurement problem must not fail a finished run
        log.warning("profiling failed: %s", exc)
        return {"profile_error": f"{type(exc).__name__}: {exc}"}
    names = {"active_params": M.ACTIVE_PARAMS, "gflops": M.GFLOPS, "latency_ms": M.LATENCY_MS, "fps": M.FPS}
    metrics = {name: prof[key] for key, name in names.items() if prof.get(key) is not None}
    for component, value in (prof.get("gflops_by_component") or {}).items():
        metrics[M.GFLOPS_COMPONENT_PREFIX + component] = value
    # what the AIFI layer saw while it was measured: the tokens of the stride-32 map and how many it kept
    tokens = (size // 32) ** 2
    pruner = model.token_pruner
    kept = pruner.num_kept(tokens) if pruner is not None else tokens
    metrics.update({M.PROFILE_TOKENS: tokens, M.PROFILE_KEPT_TOKENS: kept, M.PROFILE_KEEP_RATIO: kept / tokens})
    memory_tokens, memory_kept = model.memory_token_counts(size)
    metrics.update({M.PROFILE_MEMORY_TOKENS: memory_tokens, M.PROFILE_MEMORY_KEPT_TOKENS: memory_kept})
    where = {"batch_size": "latency_batch_size", "device": "latency_device", "size": "profile_image_size"}
    out = {new: prof[old] for old, new in where.items() if old in prof}
    out["profile"] = json_safe({k: v for k, v in prof.items() if not isinstance(v, torch.Tensor)})
    if cfg.train.profile_deployment:
        try:  # its own failure (an export problem) keeps the rest of the profile
            out["deployment"] = json_safe(measure.deployment_latency(
                {"model": model}, size, str(device), DEPLOYMENT_BATCH_SIZES, warmup=2, repeats=5)["model"])
            metrics.update(deployment_metrics(out["deployment"]))
        except Exception as exc:  # noqa: BLE001 - a measurement problem must not fail a finished run
            log.warning("deployment timing (ONNX export, ONNX Runtime) failed: %s", exc)
            out["deployment_error"] = f"{type(exc).__name__}: {exc}"
    out["metrics"] = metrics
    return out


def picture_entries(reported: ReportedCheckpoint, data: DataBundle, out_dir: Path, num_images: int) -> dict:
    """Draw the reported model on the first ``num_images`` validation images into ``out_dir/pictures/``; the
    ``summary.json`` entries: the files (relative to ``out_dir``) under ``pictures``, or ``pictures_error``."""
    from ..pictures import draw_pictures

    try:
        model, epoch = reported.load()
        paths = draw_pictures(model, data, out_dir, num_images=num_images, epoch=epoch)
    except Exception as exc:  # noqa: BLE001 - a drawing problem must not fail a finished run
        log.warning("drawing the pictures failed: %s", exc)
        return {"pictures_error": f"{type(exc).__name__}: {exc}"}
    return {"pictures": [str(p.relative_to(out_dir)) for p in paths]}

