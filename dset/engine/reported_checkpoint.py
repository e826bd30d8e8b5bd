"""The reported checkpoint of a finished run, measured and drawn for ``summary.json``.

The reported checkpoint is ``best.pt``'s EMA weights, or the final EMA model when no epoch was best (its
epoch: the last one run). Its token pruner runs at the ratio of its epoch, which is the target ratio (best
epochs are chosen among those), so it is profiled as deployed. It is loaded once
(:class:`ReportedCheckpoint`), then:

- with ``train.profile``: :func:`profile_entries`, active params / GFLOPs / latency via :mod:`dset.measure`
  (and with ``train.profile_deployment`` eager PyTorch next to ONNX Runtime), as final metrics
  (``summary["metrics"]``, :mod:`dset.metric_names`) beside the detail of what was measured;
- with ``train.pictures``: :func:`picture_entries`, the first validation images drawn into ``pictures/``
  (:func:`dset.pictures.draw_pictures`).

A measurement or drawing failure is recorded (``profile_error``, ``deployment_error``, ``pictures_error``)
and never fails a finished run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import metric_names as M
from ..config import Config
from ..data.loaders import DataBundle
from ..models.detector import Detector, build_model
from .records import json_safe
from .run_metrics import deployment_metrics

__all__ = ["DEPLOYMENT_BATCH_SIZES", "ReportedCheckpoint", "profile_entries", "picture_entries"]

log = logging.getLogger(__name__)

# batch sizes at which a run's profile times eager PyTorch next to ONNX Runtime (train.profile_deployment)
DEPLOYMENT_BATCH_SIZES = (1, 8)


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


def profile_entries(reported: ReportedCheckpoint, cfg: Config, device: torch.device) -> dict:
    """The ``summary.json`` entries of the reported model's profile (:func:`dset.measure.profile_model` at
    ``data.image_size``, as it runs: its token pruner at the ratio of its epoch): its final metrics under
    ``metrics`` (active params, GFLOPs in all and by component, latency, FPS, the tokens it was measured at,
    deployed speed), what they were measured on (``latency_batch_size``, ``latency_device``,
    ``profile_image_size``), the ``profile`` and ``deployment`` detail; or ``profile_error`` /
    ``deployment_error``."""
    from .. import measure  # fvcore and onnxruntime: imported only when a run is profiled

    try:
        model, _ = reported.load()
        size = cfg.data.image_size
        prof = measure.profile_model(model, size=size, device=str(device), warmup=2, repeats=5)
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

