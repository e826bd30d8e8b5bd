"""MLflow for studies: parent and child runs, and the training callback that logs a run.

Tags and artifacts are named in :mod:`studies.mlflow_schema`; metrics are logged under the names the training
loop wrote them with (:mod:`dset.metric_names`), unchanged. The store itself (its URI, a client, experiments) is
:mod:`studies.mlflow_store`; all MLflow calls go through its :func:`~studies.mlflow_store.retry`, so several
worker processes can share one SQLite store.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dset import metric_names as M
from dset.engine.callbacks import Callback

from . import mlflow_schema as S
from .expert_usage import plot_expert_usage
from .mlflow_store import retry

log = logging.getLogger("studies")

MAX_PARAM_VALUE = 6000       # MLflow's limit on a parameter value
MAX_KEY = M.MAX_KEY          # ... on a parameter / metric / tag key
MAX_TAG_VALUE = 8000
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- processes
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


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def host() -> str:
    """The name an invocation records as its host ($DSET_HOSTNAME, else the machine's): process ids are
    checked only for claims of this host; other hosts' claims die by their heartbeat."""
    return os.environ.get("DSET_HOSTNAME") or socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(tags: dict, my_host: str) -> bool:
    """A RUNNING run is stale when the process that ran it (same host) is gone; runs of other hosts are
    never taken for stale."""
    if tags.get(S.TAG_HOST) != my_host:
        return tags.get(S.TAG_HOST) is None
    try:
        return not pid_alive(int(tags.get(S.TAG_PID, "0")))
    except ValueError:
        return True


# -------------------------------------------------------------------------------------------- runs
def find_child_runs(c, exp_id: str, role: str = "child") -> dict[str, Any]:
    """Runs of the experiment with ``role`` (cells and trials: "child"; stage 1: "pretrain") by fingerprint (the
    newest when, by accident, there are several)."""
    out: dict[str, Any] = {}
    for r in _runs_with_role(c, exp_id, role):
        fp = r.data.tags.get(S.TAG_FINGERPRINT)
        if fp:
            out[fp] = r
    return out


def find_run(c, exp_id: str, fingerprint: str, role: str = "child"):
    """The newest active run with ``role`` and this fingerprint, read now (another invocation may have made or
    finished it since this one started), or None."""
    from mlflow.entities import ViewType

    runs = retry(c.search_runs, [exp_id], filter_string=f"tags.`{S.TAG_ROLE}` = '{role}' and "
                 f"tags.`{S.TAG_FINGERPRINT}` = '{fingerprint}'", run_view_type=ViewType.ACTIVE_ONLY,
                 max_results=100)
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def find_stale_candidates(c, exp_id: str) -> dict[str, Any]:
    """Finished child runs by cell key (config + seed + stage 1, without code and data), the newest of each,
    leaving out those already redone (``TAG_SUPERSEDED_BY``): where a cell's fingerprint finds nothing, a run
    here is the same cell made by other code or data."""
    out: dict[str, Any] = {}
    for r in _runs_with_role(c, exp_id, "child"):
        key = r.data.tags.get(S.TAG_CELL_KEY)
        if key and r.info.status == "FINISHED" and S.TAG_SUPERSEDED_BY not in r.data.tags:
            out[key] = r
    return out


def _runs_with_role(c, exp_id: str, role: str) -> list:
    """Active runs with ``dset.role == role``, oldest first."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = retry(c.search_runs, [exp_id], filter_string=f"tags.`{S.TAG_ROLE}` = '{role}'",
                     run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def log_params(c, run_id: str, params: dict[str, Any], existing: dict[str, str] | None = None) -> list[str]:
    """Log params not yet on the run (params are immutable: a differing value is not re-logged, but
    returned so the caller can warn)."""
    from mlflow.entities import Param

    existing = existing or {}
    items, differing = [], []
    for k, v in params.items():
        key, value = str(k)[:MAX_KEY], str(v)[:MAX_PARAM_VALUE]
        if key in existing:
            if existing[key] != value:
                differing.append(key)
            continue
        items.append(Param(key, value))
    for i in range(0, len(items), 100):
        retry(c.log_batch, run_id, params=items[i:i + 100])
    return differing


def set_tags(c, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(k)[:MAX_KEY], str(v)[:MAX_TAG_VALUE]) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), 100):
        retry(c.log_batch, run_id, tags=items[i:i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k[:MAX_KEY], float(v), ts, int(step)) for k, v in metrics.items()
             if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]
    for i in range(0, len(items), 1000):
        retry(c.log_batch, run_id, metrics=items[i:i + 1000])


def delete_tag(c, run_id: str, key: str) -> None:
    try:
        retry(c.delete_tag, run_id, key)
    except Exception:  # noqa: BLE001 - the tag was not there
        pass


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


def read_records(path: Path) -> list[dict]:
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
    logged = []
    for name in ("config.yaml", "metrics.jsonl", "summary.json", S.ARTIFACT_DETECTIONS, S.ARTIFACT_GROUND_TRUTH,
                 S.ARTIFACT_TEST_DETECTIONS, S.ARTIFACT_TEST_GROUND_TRUTH):
        path = out_dir / name
        if path.is_file():
            folder = str(Path(name).parent)
            retry(c.log_artifact, run_id, str(path), None if folder == "." else folder)
            logged.append(name)
    pictures = out_dir / S.ARTIFACT_PICTURES
    if (out_dir / S.ARTIFACT_PICTURES_INDEX).is_file():
        retry(c.log_artifacts, run_id, str(pictures), S.ARTIFACT_PICTURES)
        logged.append(S.ARTIFACT_PICTURES)
        try:
            if log_pictures_as_images(c, run_id, out_dir):
                logged.append(S.ARTIFACT_IMAGES)
        except Exception as exc:  # noqa: BLE001 - the pictures are logged as plain artifacts already
            log.warning("run %s: logging the pictures as MLflow images failed: %s", run_id, exc)
    records = read_records(out_dir / "metrics.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "per_class_ap.csv"
        if write_per_class_ap(summary, records, csv_path):
            retry(c.log_artifact, run_id, str(csv_path))
            logged.append(csv_path.name)
        png = Path(tmp) / "expert_usage.png"
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

    index = json.loads((out_dir / S.ARTIFACT_PICTURES_INDEX).read_text())
    step = index.get("epoch") or 0
    keys = []
    for picture in index.get("pictures", []):
        path = out_dir / S.ARTIFACT_PICTURES / picture["file"]
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
        set_tags(self.c, self.run_id, {S.TAG_DEVICE: device, S.TAG_CHECKPOINT_DIR: str(self.out_dir / "checkpoints")})
        start = int(info.get("start_epoch", 0))
        if start > 0:  # back-fill epochs finished by an earlier process but not logged (killed in between)
            logged = {m.step for m in retry(self.c.get_metric_history, self.run_id, M.TRAIN_LOSS_PREFIX + "loss")}
            for record in read_records(self.out_dir / "metrics.jsonl"):
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
        tags = {S.TAG_STATUS: summary.get("status"), S.TAG_SCORE_SPLIT: summary.get("score_split")}
        if summary.get("stop_reason"):
            tags[S.TAG_STOP_REASON] = summary["stop_reason"]
        latency_device = summary.get("latency_device") or profile.get("device")
        if latency_device:
            batch = summary.get("latency_batch_size") or profile.get("batch_size", 1)
            tags[S.TAG_LATENCY_DEVICE] = f"{latency_device}, batch {batch}" + self.latency_note
        if profile.get("flops_tool"):
            tags[S.TAG_FLOPS_TOOL] = profile["flops_tool"]
        if summary.get("profile_error"):
            tags[S.TAG_PROFILE_ERROR] = summary["profile_error"]
        if summary.get("pictures_error"):
            tags[S.TAG_PICTURES_ERROR] = summary["pictures_error"]
        if summary.get("deployment_error"):
            tags[S.TAG_DEPLOY_ERROR] = summary["deployment_error"]
        deploy_devices = deployment_devices(summary.get("deployment"))
        if deploy_devices:
            tags[S.TAG_DEPLOY_DEVICES] = deploy_devices + self.latency_note
        set_tags(self.c, self.run_id, tags)
        try:
            log_artifacts(self.c, self.run_id, self.out_dir, summary, self.title)
        except Exception as exc:  # noqa: BLE001 - keep the run's status honest even if an upload fails
            log.warning("run %s: logging artifacts failed: %s", self.run_id, exc)
