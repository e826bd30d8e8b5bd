"""Logging a training run to MLflow: the training callback that writes a run's params, per-epoch and final
metrics, status tags and artifacts (the run folder's files under the same relative paths, per_class_ap.csv and
expert_usage.png), and MLflow's system metrics monitor.

Metrics are logged under the names the training loop wrote them with (:mod:`dset.metric_names`), unchanged; tags and
artifacts are named in :mod:`studies.tracking.schema`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from pathlib import Path

from dset import metric_names as M
from dset import run_folder
from dset.engine.callbacks import Callback
from dset.run_folder import RunFolder

from . import schema
from .expert_usage import plot_expert_usage
from .mlflow_runs import log_metrics, log_params, set_tags
from .mlflow_store import retry

log = logging.getLogger("studies")


def system_metrics_monitor(run_id: str, uri: str, resume: bool = False):
    """MLflow's system metrics monitor for a run, started (CPU, memory, disk, network; GPU utilisation and
    memory where NVML sees a GPU), sampling every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 5
    here); None when it cannot start (psutil missing). Call ``finish()`` on it when the run ends."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=resume, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - monitoring must never fail a run
        log.warning("system metrics are not logged for run %s: %s", run_id, exc)
        return None


# ---------------------------------------------------------------------------------------- metrics
def _finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def epoch_metrics(record: dict) -> dict[str, float]:
    """One ``metrics.jsonl`` record (the ``on_epoch_end`` dict): its metrics, the finite numbers other than
    ``epoch`` (the step they are logged at), named as the training loop named them."""
    return _finite({k: v for k, v in record.items() if k != "epoch"})


def final_metrics(summary: dict) -> dict[str, float]:
    """The final metrics of a run: the finite numbers of its summary's ``metrics`` block, as named there."""
    return _finite(summary.get("metrics") or {})


def deployment_devices(deployment: dict | None) -> str:
    """Where each runtime of a ``deployment`` block ran, for the TAG_DEPLOY_DEVICES tag."""
    if not deployment:
        return ""
    return "; ".join(f"{runtime}: {next(iter(by_batch.values()))['device']}"
                     for runtime, by_batch in deployment.get("runtimes", {}).items() if by_batch)


# -------------------------------------------------------------------------------------- artifacts
def write_per_class_ap(summary: dict, records: list[dict], path: Path) -> bool:
    """per_class_ap.csv: each class's ``val/AP/<class>`` at the best and at the last epoch."""
    best_epoch = (summary.get("metrics") or {}).get(M.BEST_EPOCH)
    best = next((r for r in records if best_epoch is not None and r.get("epoch") == best_epoch), {})
    last = records[-1] if records else {}
    prefix = M.VAL_AP_PREFIX
    names = [k[len(prefix):] for k in best if k.startswith(prefix)] or [k[len(prefix):] for k in last
                                                                        if k.startswith(prefix)]
    if not names:
        return False
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "AP_best_epoch", "AP_last_epoch", "best_epoch", "last_epoch"])
        for n in names:
            b, lv = best.get(prefix + n), last.get(prefix + n)
            w.writerow([n, "" if b is None else f"{b:.6f}", "" if lv is None else f"{lv:.6f}",
                        "" if best_epoch is None else best_epoch, last.get("epoch", "")])
    return True


def log_artifacts(c, run_id: str, out_dir: Path, summary: dict, title: str) -> list[str]:
    """config.yaml, metrics.jsonl, summary.json, eval/ (the reported checkpoint's detections and their
    ground truth, on the validation and, when there is one, the test split) and pictures/ (:mod:`dset.pictures`;
    each PNG also through :func:`log_pictures_as_images`) from the run folder, per_class_ap.csv and
    expert_usage.png (written here). Returns the names logged."""
    run = RunFolder(out_dir)
    logged = []
    for name in run_folder.TEXT_FILES:
        path = run.path(name)
        if path.is_file():
            folder = str(Path(name).parent)
            retry(c.log_artifact, run_id, str(path), None if folder == "." else folder)
            logged.append(name)
    if run.pictures_index.is_file():
        retry(c.log_artifacts, run_id, str(run.pictures), schema.ARTIFACT_PICTURES)
        logged.append(schema.ARTIFACT_PICTURES)
        try:
            if log_pictures_as_images(c, run_id, out_dir):
                logged.append(schema.ARTIFACT_IMAGES)
        except Exception as exc:  # noqa: BLE001 - the pictures are logged as plain artifacts already
            log.warning("run %s: logging the pictures as MLflow images failed: %s", run_id, exc)
    records = run.records()
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / schema.ARTIFACT_PER_CLASS_AP
        if write_per_class_ap(summary, records, csv_path):
            retry(c.log_artifact, run_id, str(csv_path))
            logged.append(csv_path.name)
        png = Path(tmp) / schema.ARTIFACT_EXPERT_USAGE
        try:
            if plot_expert_usage(records, png, title):
                retry(c.log_artifact, run_id, str(png))
                logged.append(png.name)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not fail a finished run
            log.warning("expert usage plot failed: %s", exc)
    return logged


def log_pictures_as_images(c, run_id: str, out_dir: Path) -> list[str]:
    """Log the run's pictures (those ``pictures.json`` lists) with ``MlflowClient.log_image``, the way the MLflow
    run page shows images: key = the file name without ``.png``, step = the epoch of the drawn weights. MLflow
    stores them under ``images/`` (a full-size PNG and a compressed preview each). Returns the keys logged."""
    from PIL import Image

    run = RunFolder(out_dir)
    index = json.loads(run.pictures_index.read_text())
    step = index.get("epoch") or 0
    keys = []
    for picture in index.get("pictures", []):
        path = run.pictures / picture["file"]
        key = Path(picture["file"]).stem
        with Image.open(path) as image:
            image.load()
            retry(c.log_image, run_id, image, key=key, step=step, synchronous=True)
        keys.append(key)
    return keys


# --------------------------------------------------------------------------------------- callback
class MlflowCallback(Callback):
    """Logs one training run into an existing MLflow child run (``run_id``).

    ``on_train_start``: params (the resolved configuration as fit uses it, flat dotted keys; only the keys
    not yet logged), the training device tag, and on a resumed run the epochs that an earlier process
    finished but did not log. ``on_epoch_end``: per-epoch metrics at ``step=epoch``. ``on_train_end``:
    final metrics, status tags and artifacts."""

    def __init__(self, c, run_id: str, out_dir: Path, title: str, latency_note: str = "") -> None:
        self.c = c
        self.run_id = run_id
        self.out_dir = Path(out_dir)
        self.title = title
        self.latency_note = latency_note
        self.summary: dict | None = None

    def on_train_start(self, info: dict) -> None:
        cfg = info["config"]
        run = retry(self.c.get_run, self.run_id)
        differing = log_params(self.c, self.run_id, cfg.flat(), run.data.params)
        if differing:
            log.warning("run %s: params %s differ from those logged before (MLflow params are immutable; "
                        "kept the first values)", self.run_id, ", ".join(differing[:5]))
        device = str(info.get("device", ""))
        if device.startswith("cuda"):
            import torch

            device = torch.cuda.get_device_name(torch.device(device))
        run = RunFolder(self.out_dir)
        set_tags(self.c, self.run_id, {schema.TAG_DEVICE: device, schema.TAG_CHECKPOINT_DIR: str(run.checkpoints)})
        start = int(info.get("start_epoch", 0))
        if start > 0:  # back-fill epochs finished by an earlier process but not logged (killed in between)
            logged = {m.step for m in retry(self.c.get_metric_history, self.run_id, M.TRAIN_LOSS_PREFIX + "loss")}
            for record in run.records():
                ep = int(record.get("epoch", -1))
                if 0 <= ep < start and ep not in logged:
                    log_metrics(self.c, self.run_id, epoch_metrics(record), ep)

    def on_epoch_end(self, epoch: int, metrics: dict) -> bool | None:
        log_metrics(self.c, self.run_id, epoch_metrics(metrics), epoch)
        return None

    def on_train_end(self, summary: dict) -> None:
        self.summary = summary
        log_metrics(self.c, self.run_id, final_metrics(summary), 0)
        profile = summary.get("profile") or {}
        tags = {schema.TAG_STATUS: summary.get("status"), schema.TAG_SCORE_SPLIT: summary.get("score_split")}
        if summary.get("stop_reason"):
            tags[schema.TAG_STOP_REASON] = summary["stop_reason"]
        if summary.get("learning_risks"):
            tags[schema.TAG_LEARNING_RISKS] = "; ".join(summary["learning_risks"])
        latency_device = summary.get("latency_device") or profile.get("device")
        if latency_device:
            batch = summary.get("latency_batch_size") or profile.get("batch_size", 1)
            tags[schema.TAG_LATENCY_DEVICE] = f"{latency_device}, batch {batch}" + self.latency_note
        if profile.get("flops_tool"):
            tags[schema.TAG_FLOPS_TOOL] = profile["flops_tool"]
        if summary.get("profile_error"):
            tags[schema.TAG_PROFILE_ERROR] = summary["profile_error"]
        if summary.get("pictures_error"):
            tags[schema.TAG_PICTURES_ERROR] = summary["pictures_error"]
        if summary.get("deployment_error"):
            tags[schema.TAG_DEPLOY_ERROR] = summary["deployment_error"]
        deploy_devices = deployment_devices(summary.get("deployment"))
        if deploy_devices:
            tags[schema.TAG_DEPLOY_DEVICES] = deploy_devices + self.latency_note
        set_tags(self.c, self.run_id, tags)
        try:
            log_artifacts(self.c, self.run_id, self.out_dir, summary, self.title)
        except Exception as exc:  # noqa: BLE001 - keep the run's status honest even if an upload fails
            log.warning("run %s: logging artifacts failed: %s", self.run_id, exc)
