"""Training one run: ``fit(cfg, out_dir, callbacks=None, resume=False) -> summary``.

What a run does, in order:

1. Data (:mod:`dset.data.loaders`): the synthetic set (default) or a COCO-format set. The model's
   ``num_classes`` is ALWAYS the data set's number of categories: when ``model.num_classes`` differs (the
   presets say 80, COCO's count) it is set from the data with a log line, and ``config.yaml`` records the
   value used.
2. Model (:func:`build_training_model`): ``build_model`` plus the local initial weights
   (``model.backbone.pretrained``, ``model.checkpoint``; MoE experts upcycled from dense FFNs). The names
   those files set are "pretrained", and so are the experts upcycled from a pretrained FFN.
3. AdamW with up to four parameter groups (:func:`param_groups`): ``pretrained`` / ``new`` x with / without
   weight decay. Pretrained parameters (upcycled experts included) train at ``train.lr_pretrained``, everything
   else (MoE routers, the importance predictor, experts not upcycled, everything when training from scratch)
   at ``train.lr``. Norm
   parameters (BatchNorm, LayerNorm, GroupNorm) and biases get no weight decay. Frozen parameters
   (``model.backbone.freeze_at``) are not optimised.
4. Per step: RT-DETR's multi-scale training (``data.multi_scale``: the batch resized to a size drawn from
   the reference's list scaled to ``data.image_size``; off from ``data.stop_epoch``, RT-DETRv2's policy, which
   also ends the strong augmentations); linear warm-up then cosine (:mod:`dset.engine.schedule`) as a factor on each group's own rate;
   AMP (float16 + GradScaler) only on CUDA with ``train.amp``; gradient clipping at ``train.grad_clip``
   (0: off); EMA update (:mod:`dset.engine.ema`). A NaN/inf loss stops the run with
   :class:`NonFiniteLossError` naming the epoch, step and loss terms.
5. Per epoch: ``model.set_epoch(epoch)`` (token-pruning schedule; the EMA model too), evaluation of the EMA
   model every ``train.eval_every`` epochs and at the last epoch (COCO metrics on the validation split),
   a line in ``metrics.jsonl``, ``checkpoints/best.pt`` (when mAP@[.5:.95] improved), the callbacks'
   ``on_epoch_end``, early stopping after ``train.early_stop_patience`` epochs without an mAP improvement.
   The resume state (``checkpoints/last.pt``: weights, EMA, optimizer, ...) is copied to the CPU at every
   epoch end but written at most every ``train.checkpoint_every_minutes`` (default 10; since the last write or
   the start of training), at the end of the run (completed or stopped) when ``train.keep_last_checkpoint``,
   and when an exception leaves the epoch loop (Ctrl-C, SIGTERM under ``python -m dset.train``, a crash):
   then the newest epoch's copy is written before the exception goes on. A ``kill -9`` loses at most one
   epoch or ``checkpoint_every_minutes``, whichever is longer (writing the state every epoch costs seconds of
   I/O per epoch: on short epochs, a large part of the work it protects).
6. ``summary.json``: status ``completed`` / ``stopped`` (early stopping or a callback) / ``failed`` (with the
   error), best epoch and metrics, parameter counts, GFLOPs and latency from :mod:`dset.measure`.
7. ``pictures/``: the reported checkpoint drawn on the first ``train.pictures`` validation images
   (:mod:`dset.pictures`: detections, and with the DSET switches the kept tokens and the experts' routing).

Files in ``out_dir``: ``config.yaml`` (resolved configuration), ``metrics.jsonl`` (one JSON object per epoch,
keys listed in :func:`fit`), ``summary.json``, ``checkpoints/last.pt``, ``checkpoints/best.pt``,
``eval/detections.json`` and ``eval/ground_truth.json``, ``pictures/*.png`` and ``pictures/pictures.json``. Checkpoints
are written to a temporary file and renamed (``os.replace``), so a killed run never leaves a torn file.
``best.pt`` holds what evaluation and fine-tuning read: the EMA weights (``ema``; the raw training weights are
not kept), ``config``, ``epoch``, ``metrics`` and the label maps.

Resume (``resume=True``): continues from ``checkpoints/last.pt`` (model, EMA, optimizer, scheduler, scaler,
RNG states of every rank, early-stopping state, epoch). With a fixed seed on CPU the resumed run reproduces
the uninterrupted one exactly. The configuration must equal the checkpoint's, except ``run.device``,
``run.progress``, ``run.out_dir`` and ``data.num_workers``.

DDP: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is created here (NCCL on CUDA, gloo on CPU);
``data.batch_size`` is per process; losses and expert usage are averaged over ranks and detections gathered
to rank 0 for COCO evaluation; only rank 0 writes files and calls the callbacks.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import RESULT_NEUTRAL_KEYS, Config, ConfigError, flatten, load_config, multi_scale_sizes
from ..data.loaders import DataBundle, build_datasets, build_train_loader, build_val_loader, set_loader_epoch
from ..models.criterion import build_criterion, total_loss
from ..models.detector import Detector, build_model, load_backbone_weights, load_checkpoint
from ..models.moe import UPCYCLED_EXPERT_PARAMS
from .ema import ModelEMA
from .evaluate import coco_metrics, predict_detections
from .schedule import build_scheduler

__all__ = ["fit", "Callback", "NonFiniteLossError", "build_training_model", "param_groups", "build_optimizer",
           "EarlyStopping", "evaluate_detections", "error_message", "CHECKPOINT_VERSION"]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
# the reported (best) checkpoint's detections on the validation images, and their ground truth: what a report
# needs to bootstrap intervals over images (written beside metrics.jsonl)
DETECTIONS_FILE = "eval/detections.json"
GROUND_TRUTH_FILE = "eval/ground_truth.json"
# configuration keys that may differ between a run and its resumption
RESUME_MUTABLE_KEYS = RESULT_NEUTRAL_KEYS
# batch sizes at which a run's profile times eager PyTorch next to ONNX Runtime (train.profile_deployment)
DEPLOYMENT_BATCH_SIZES = (1, 8)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


# ------------------------------------------------------------------------------------------ callbacks
class Callback:
    """Hooks a caller (e.g. a study's MLflow/Optuna adapter) implements; every method is optional.

    Only rank 0 calls them.
    - ``on_train_start(info)``: ``info`` has ``config`` (the resolved Config), ``out_dir``, ``device``,
      ``world_size``, ``num_train_images``, ``num_val_images``, ``num_classes``, ``params``,
      ``param_groups`` ({group: {lr, weight_decay, params}}), ``start_epoch`` (> 0 when resumed).
    - ``on_epoch_end(epoch, metrics) -> bool | None``: ``metrics`` is the epoch's ``metrics.jsonl`` record
      (flat: numbers by name). Return True to stop after this epoch (status ``stopped``, reason ``callback``).
    - ``on_train_end(summary)``: the ``summary.json`` content, also when the run failed.
    """

    def on_train_start(self, info: dict) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict) -> bool | None:
        return None

    def on_train_end(self, summary: dict) -> None:
        pass


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch, step and the loss terms concerned."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the message names the file and the free
    space. The previous checkpoint of that name is left intact, so the run can resume once there is room."""


class EarlyStopping:
    """Stop when mAP has not improved (by more than ``min_delta``) for ``patience`` epochs.

    ``update(epoch, value)`` returns True when the value is a new best. ``should_stop(epoch)``: True when
    ``epoch - best_epoch >= patience``. NaN values never count as improvements.
    """

    def __init__(self, patience: int | None, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best: float = -math.inf
        self.best_epoch: int = -1

    def update(self, epoch: int, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_epoch < 0 or value > self.best + self.min_delta:
            self.best, self.best_epoch = float(value), int(epoch)
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        if self.patience is None:
            return False
        return epoch - self.best_epoch >= self.patience  # best_epoch is -1 before any finite value

    def state_dict(self) -> dict:
        return {"patience": self.patience, "min_delta": self.min_delta, "best": self.best,
                "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])


# -------------------------------------------------------------------------------- model and optimizer
def build_training_model(cfg: Config) -> tuple[Detector, set[str], list]:
    """``build_model(cfg)`` plus the configured local weights. Returns ``(model, pretrained_names,
    load_reports)``: the parameter/buffer names the weight files set (``LoadReport.loaded``)."""
    model = build_model(cfg, load_weights=False)
    reports = []
    m = cfg.model
    if m.backbone.pretrained:
        reports.append(load_backbone_weights(model, m.backbone.pretrained))
    if m.checkpoint:
        reports.append(load_checkpoint(model, m.checkpoint,
                                       upcycle_noise=(m.encoder_moe.upcycle_noise, m.decoder_moe.upcycle_noise)))
    for r in reports:
        log.info("initial weights: %s", r.summary())
    pretrained: set[str] = set()
    for r in reports:
        pretrained |= set(r.loaded)
        # upcycled experts are the pretrained FFN they were copied from: they keep its rate and weight decay, so
        # that switching MoE on changes nothing else (its router is new)
        pretrained |= {f"{moe}.{p}" for moe in r.upcycled for p in UPCYCLED_EXPERT_PARAMS}
    return model, pretrained, reports


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of norm parameters (BatchNorm, LayerNorm, GroupNorm) and biases: ``*.bias``, ``*_bias``
    (attention's ``in_proj_bias``) and the MoE experts' stacked ``b1``/``b2``."""
    from ..models.moe import MoEFFN

    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            if (isinstance(mod, _NORM_TYPES) or p_name == "bias" or p_name.endswith("_bias")
                    or (isinstance(mod, MoEFFN) and p_name in ("b1", "b2"))):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def param_groups(model: nn.Module, pretrained_names: Iterable[str], lr: float, lr_pretrained: float,
                 weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``pretrained``, ``pretrained_no_decay``, ``new``, ``new_no_decay`` (empty
    groups are left out). Each group dict has ``name``, ``params``, ``param_names``, ``lr``,
    ``weight_decay``. Norm parameters and biases are the ``no_decay`` ones."""
    pretrained_names = set(pretrained_names)
    no_decay = _no_decay_names(model)
    buckets: dict[str, list] = {"pretrained": [], "pretrained_no_decay": [], "new": [], "new_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("pretrained" if name in pretrained_names else "new") + ("_no_decay" if name in no_decay else "")
        buckets[key].append((name, p))
    groups = []
    for key, items in buckets.items():
        if not items:
            continue
        groups.append({
            "name": key,
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "lr": lr_pretrained if key.startswith("pretrained") else lr,
            "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay,
        })
    return groups


def build_optimizer(model: nn.Module, cfg: Config, pretrained_names: Iterable[str] = ()) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``train.lr``, ``train.lr_pretrained``, ``train.weight_decay``,
    ``train.betas``."""
    t = cfg.train
    groups = param_groups(model, pretrained_names, t.lr, t.lr_pretrained, t.weight_decay)
    params = [p for g in groups for p in g["params"]]
    # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop on CPU
    fused = bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params) \
        and len({p.device for p in params}) == 1
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                             fused=fused or None)


# ------------------------------------------------------------------------------------------- helpers
@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_setting: str) -> _Dist:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Dist(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if env_world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_setting != "cpu"
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
        info.created_group = True
    if dist.is_available() and dist.is_initialized():
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info


def _resolve_device(setting: str, dinfo: _Dist) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {setting!r} requested but CUDA is not available")
    if setting == "cuda":
        return torch.device("cuda", dinfo.local_rank)
    if setting.startswith("cuda") or setting == "cpu" or setting == "mps":
        return torch.device(setting)
    raise ConfigError(f"run.device: expected 'auto', 'cpu' or 'cuda[:N]', got {setting!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Every random state training draws from, as plain Python data (safe to gather and to ``torch.load``
    with ``weights_only``)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cpu_copy(value: Any) -> Any:
    """``value`` (a checkpoint dict) with every tensor copied to the CPU and every container rebuilt: the
    resume state of one epoch, which later training steps (updating parameters, optimizer moments and EMA
    buffers in place) cannot change. State dicts keep their class and ``_metadata`` (module versions)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        out = {k: _cpu_copy(v) for k, v in value.items()}
        if isinstance(value, OrderedDict):
            out = OrderedDict(out)
            if hasattr(value, "_metadata"):
                out._metadata = copy.deepcopy(value._metadata)
        return out
    if isinstance(value, list):
        return [_cpu_copy(v) for v in value]
    if type(value) is tuple:
        return tuple(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def _reset_peak_host_memory() -> None:
    """Linux: restart the peak resident set size (VmHWM) from the current one, so that a run's peak is its own
    and not that of an earlier run in the same process (a study trains many). Elsewhere: nothing to do."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_host_memory_mb() -> float | None:
    """Peak resident memory of this process in MiB: VmHWM on Linux (since :func:`_reset_peak_host_memory`),
    else ``ru_maxrss`` (since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024   # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, kB on Linux


def error_message(exc: BaseException) -> str:
    """One readable line for an exception: errors raised in a data-loader worker arrive with the worker's
    traceback in their message; keep its last line, without the exception's class path."""
    msg = str(exc)
    if "Original Traceback" in msg:
        lines = [line for line in msg.splitlines() if line.strip()]
        msg = lines[-1] if lines else msg
        msg = re.sub(r"^[\w.]*(Error|Exception): ", "", msg)   # "dset.data.DatasetError: ..." -> "..."
    return msg


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), tensors -> numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flat_config_diff(a: dict, b: dict, ignore: Sequence[str]) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def _all_gather_object(obj: Any, dinfo: _Dist) -> list:
    if dinfo.world_size == 1:
        return [obj]
    out = [None] * dinfo.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any, dinfo: _Dist) -> Any:
    if dinfo.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _top_per_image_and_class(detections: list[dict], limit: int) -> list[dict]:
    """The ``limit`` best-scored detections of each (image, category): all that COCOeval's maxDets=100 reads."""
    groups: dict[tuple, list[dict]] = {}
    for d in detections:
        groups.setdefault((d["image_id"], d["category_id"]), []).append(d)
    out = []
    for key in sorted(groups):
        out += sorted(groups[key], key=lambda d: -d["score"])[:limit]
    return out


def _ground_truth(coco, image_ids: list[int]) -> dict:
    """The COCO ground truth of ``image_ids`` (images, their annotations, every category)."""
    ids = set(image_ids)
    return {"images": [coco.imgs[i] for i in image_ids],
            "annotations": [a for a in coco.dataset.get("annotations", []) if a["image_id"] in ids],
            "categories": list(coco.dataset.get("categories", []))}


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


# ------------------------------------------------------------------------------------ one epoch / eval
class _EpochStats:
    """Sums over the epoch's steps, kept as tensors (no host sync per step except the loss check)."""

    def __init__(self) -> None:
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.loss_counts: dict[str, int] = {}
        self.total_sum = 0.0
        self.steps = 0
        self.images = 0
        self.usage_sums: dict[str, list[torch.Tensor]] = {}
        self.usage_count = 0
        self.keep_sum = 0.0
        self.scheduled_keep = None
        self.keep_count = 0

    def add(self, loss_dict: dict[str, torch.Tensor], total: float, batch: int, sparse: dict) -> None:
        for k, v in loss_dict.items():
            v = v.detach().float()
            self.loss_sums[k] = self.loss_sums[k] + v if k in self.loss_sums else v.clone()
            self.loss_counts[k] = self.loss_counts.get(k, 0) + 1
        self.total_sum += total
        self.steps += 1
        self.images += batch
        any_usage = False
        for kind in ("encoder_moe", "decoder_moe"):
            usages = sparse.get(kind)
            if usages:
                any_usage = True
                sums = self.usage_sums.setdefault(kind, [torch.zeros_like(u, dtype=torch.float32) for u in usages])
                for s, u in zip(sums, usages):
                    s.add_(u.float())
        self.usage_count += int(any_usage)
        tp = sparse.get("token_pruning")
        if tp:
            self.keep_sum += float(tp["keep_ratio"])
            self.scheduled_keep = float(tp["scheduled_keep_ratio"])
            self.keep_count += 1

    def reduce(self, dinfo: _Dist) -> dict:
        """Means over the epoch's steps (and over ranks)."""
        local = {
            "losses": {k: (float(v.item()), self.loss_counts[k]) for k, v in self.loss_sums.items()},
            "total": (self.total_sum, self.steps),
            "images": self.images,
            "usage": {k: ([u.tolist() for u in v], self.usage_count) for k, v in self.usage_sums.items()},
            "keep": (self.keep_sum, self.keep_count, self.scheduled_keep),
        }
        parts = _all_gather_object(local, dinfo)
        out: dict[str, Any] = {}
        total_sum = sum(p["total"][0] for p in parts)
        total_n = sum(p["total"][1] for p in parts)
        out["loss"] = total_sum / max(1, total_n)
        names = sorted({k for p in parts for k in p["losses"]}, key=_loss_sort_key)
        for k in names:
            s = sum(p["losses"][k][0] for p in parts if k in p["losses"])
            n = sum(p["losses"][k][1] for p in parts if k in p["losses"])
            out[k] = s / max(1, n)
        out["train_images"] = sum(p["images"] for p in parts)
        out["train_steps"] = total_n
        keep_sum = sum(p["keep"][0] for p in parts)
        keep_n = sum(p["keep"][1] for p in parts)
        if keep_n:
            out["keep_ratio"] = keep_sum / keep_n
            out["scheduled_keep_ratio"] = parts[0]["keep"][2]
        for kind in ("encoder_moe", "decoder_moe"):
            have = [p["usage"][kind] for p in parts if kind in p["usage"]]
            if not have:
                continue
            count = sum(c for _, c in have)
            for layer in range(len(have[0][0])):
                for e in range(len(have[0][0][layer])):
                    value = sum(u[layer][e] for u, _ in have) / max(1, count)
                    out[f"{kind}_usage/layer{layer}/expert{e}"] = value
        return out


def _loss_sort_key(name: str) -> tuple:
    # main losses first, then aux, dn, extra, each in a stable order
    rank = 0 if not any(s in name for s in ("_aux_", "_dn_")) else (1 if "_aux_" in name else 2)
    return (rank, name)


@torch.no_grad()
def evaluate_detections(model: nn.Module, loader, bundle: DataBundle, device: torch.device,
                        dinfo: _Dist | None = None, num_top_queries: int = 300,
                        detections_out: list | None = None) -> dict:
    """COCO metrics of ``model`` (eval mode) on ``loader`` (the validation split of ``bundle``); under DDP
    each rank predicts its shard, detections are gathered to rank 0 and the metrics broadcast back.
    ``detections_out`` (rank 0) receives the detections that were scored."""
    dinfo = dinfo or _Dist()
    detections, n_images = predict_detections(model, loader, bundle.label_to_category_id, device, num_top_queries)
    parts = _all_gather_object((detections, n_images), dinfo)
    metrics = None
    if dinfo.is_main:
        all_dets = [d for p in parts for d in p[0]]
        if detections_out is not None:
            detections_out.extend(all_dets)
        metrics = coco_metrics(bundle.val_dataset.coco, all_dets, bundle.category_names,
                               image_ids=bundle.val_image_ids)
        metrics["val_images"] = sum(p[1] for p in parts)
    return _broadcast_object(metrics, dinfo)


def _flatten_eval(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k != "per_class_AP"}
    for name, ap in (metrics.get("per_class_AP") or {}).items():
        out[f"AP/{name}"] = ap
    return out


# ---------------------------------------------------------------------------------------------- fit
class _Run:
    def __init__(self, cfg: Config, out_dir: Path, callbacks: list[Callback], resume: bool) -> None:
        self.cfg = cfg
        self.out = out_dir
        self.callbacks = callbacks
        self.resume = resume
        self.dinfo = _setup_distributed(cfg.run.device)
        self.summary: dict[str, Any] = {"status": "failed", "out_dir": str(out_dir)}
        self.wrote_outputs = False   # a refused --resume leaves the run's files alone

    # ----- set-up
    def setup(self) -> None:
        cfg, dinfo = self.cfg, self.dinfo
        self.device = _resolve_device(cfg.run.device, dinfo)
        _reset_peak_host_memory()
        if self.device.type == "cuda":
            torch.cuda.init()   # resetting the peak of a device CUDA has not initialised yet is an error
            torch.cuda.reset_peak_memory_stats(self.device)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(cfg.run.seed)

        # data first: it decides num_classes
        self.data = build_datasets(cfg)
        if cfg.model.num_classes != self.data.num_classes:
            if dinfo.is_main:
                log.info("model.num_classes %d -> %d: set from the data set's categories (%s)",
                         cfg.model.num_classes, self.data.num_classes, ", ".join(self.data.category_names))
            cfg = load_config(cfg, [f"model.num_classes={self.data.num_classes}"])
        self.cfg = cfg
        self.train_loader = build_train_loader(self.data.train, cfg, dinfo.rank, dinfo.world_size)
        self.val_loader = build_val_loader(self.data.val, cfg, dinfo.rank, dinfo.world_size)

        # model, criterion, optimizer, schedule, EMA
        model, pretrained, reports = build_training_model(cfg)
        self.pretrained_names = pretrained
        model.to(self.device)
        self.model_core: Detector = model
        if dinfo.world_size > 1:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.model_core = model
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            # experts that receive no token in a step (and the denoising embedding without denoising)
            # get no gradient: DDP must then look for unused parameters
            m = cfg.model
            find_unused = (m.encoder_moe.enabled or m.decoder_moe.enabled or m.token_pruning.enabled
                           or m.decoder.num_denoising == 0)
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused, **ddp_kwargs)
        self.model = model
        self.criterion = build_criterion(cfg).to(self.device)
        self.optimizer = build_optimizer(self.model_core, cfg, pretrained)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = max(1, cfg.train.epochs * self.steps_per_epoch)
        if cfg.train.warmup_steps >= self.total_steps:
            log.warning("train.warmup_steps (%d) >= the run's %d optimizer steps: the learning rate never "
                        "reaches its peak", cfg.train.warmup_steps, self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.warmup_steps, self.total_steps,
                                         cfg.train.min_lr_ratio)
        self.ema = ModelEMA(self.model_core, cfg.train.ema_decay, cfg.train.ema_warmup_steps)
        self.use_amp = bool(cfg.train.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.early = EarlyStopping(cfg.train.early_stop_patience)
        self.best_metrics: dict | None = None
        self.last_metrics: dict = {}
        self.start_epoch = 0
        self.global_step = 0
        # each rank draws its own augmentations / denoising noise (weights were broadcast by DDP)
        if dinfo.world_size > 1:
            seed_everything(cfg.run.seed + dinfo.rank)

        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        if self.resume:
            self._load_last()
        self.wrote_outputs = True
        if dinfo.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
            if self.start_epoch == 0:
                self.metrics_path.write_text("")
            else:  # drop lines of epochs after the checkpoint (a run killed between the two writes)
                keep = []
                if self.metrics_path.exists():
                    for line in self.metrics_path.read_text().splitlines():
                        if line.strip() and json.loads(line).get("epoch", -1) < self.start_epoch:
                            keep.append(line)
                self.metrics_path.write_text("".join(line + "\n" for line in keep))
        if dinfo.is_main:
            (self.out / DETECTIONS_FILE).parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / GROUND_TRUTH_FILE,
                               json.dumps(_ground_truth(self.data.val_dataset.coco, self.data.val_image_ids)) + "\n")
        self.summary.update({
            "config_name": cfg.model.name,
            "world_size": dinfo.world_size,
            "device": str(self.device),
            "num_classes": self.data.num_classes,
            "num_train_images": len(self.data.train),
            "num_val_images": len(self.data.val),
            "params": sum(p.numel() for p in self.model_core.parameters()),
        })

    def _multi_scale_sizes(self, epoch: int) -> list[int] | None:
        """The sizes multi-scale training draws from in ``epoch`` (None: off, or past ``data.stop_epoch``)."""
        d = self.cfg.data
        if not d.multi_scale or (d.stop_epoch is not None and epoch >= d.stop_epoch):
            return None
        return multi_scale_sizes(d.image_size)

    def _at_target_sparsity(self, epoch: int) -> bool:
        """Token pruning runs at its target keep ratio in ``epoch`` (always true without pruning)."""
        pruner = self.model_core.token_pruner
        return pruner is None or epoch >= pruner.target_epoch

    def _group_info(self) -> dict:
        return {g["name"]: {"lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                            "params": sum(p.numel() for p in g["params"])} for g in self.optimizer.param_groups}

    def _load_last(self) -> None:
        path = self.ckpt_dir / "last.pt"
        if not path.is_file():
            if self.dinfo.is_main:
                log.warning("--resume: %s not found; starting from epoch 0", path)
            return
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        diff = _flat_config_diff(ckpt["config"], self.cfg.to_dict(), RESUME_MUTABLE_KEYS)
        if diff:
            raise ConfigError(f"--resume: the configuration differs from the checkpoint {path} in: {', '.join(diff)}")
        self.model_core.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.early.load_state_dict(ckpt["early_stopping"])
        self.best_metrics = ckpt.get("best_metrics")
        self.last_metrics = ckpt.get("metrics") or {}
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt["global_step"])
        rng = ckpt["rng"]
        _set_rng_state(rng[self.dinfo.rank] if self.dinfo.rank < len(rng) else rng[0])
        if self.dinfo.is_main:
            log.info("resumed from %s: epoch %d done, continuing at epoch %d", path, ckpt["epoch"], self.start_epoch)

    # ----- training
    def train_one_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        model, core = self.model, self.model_core
        model.train()
        self.criterion.train()
        stats = _EpochStats()
        loader = self.train_loader
        bar = None
        if self.dinfo.is_main and cfg.run.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                       dynamic_ncols=True, unit="it")
        amp_ctx = torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        try:
            sizes = self._multi_scale_sizes(epoch)
            for step, (images, targets) in enumerate(loader):
                images = images.to(self.device, non_blocking=True)
                if sizes:
                    # RT-DETR's multi-scale training: the whole batch at one size drawn per step (nearest
                    # resize, as the reference); boxes are normalised, so targets are unchanged
                    size = random.choice(sizes)
                    if tuple(images.shape[-2:]) != (size, size):
                        images = torch.nn.functional.interpolate(images, size=(size, size))
                targets = _to_device(targets, self.device)
                with amp_ctx:
                    outputs = model(images, targets)
                loss_dict = self.criterion(outputs, targets)
                loss = total_loss(loss_dict)
                self._check_finite(loss, loss_dict, epoch, step)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.train.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.ema.update(core)
                self.global_step += 1
                stats.add(loss_dict, self._last_loss, images.shape[0], core.sparse_stats())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{self._last_loss:.3f}", avg=f"{stats.total_sum / stats.steps:.3f}")
        finally:
            if bar is not None:
                bar.close()
        return stats.reduce(self.dinfo)

    def _check_finite(self, loss: torch.Tensor, loss_dict: dict, epoch: int, step: int) -> None:
        value = loss.detach().float()
        if self.dinfo.world_size > 1:  # every rank stops together
            flag = torch.tensor([0.0 if torch.isfinite(value) else 1.0], device=value.device)
            dist.all_reduce(flag)
            bad_somewhere = flag.item() > 0
        else:
            bad_somewhere = False
        v = float(value.item())
        self._last_loss = v
        if math.isfinite(v) and not bad_somewhere:
            return
        bad = [f"{k}={float(t.detach().float().item())}" for k, t in loss_dict.items()
               if not math.isfinite(float(t.detach().float().item()))]
        where = f"epoch {epoch}, step {step} (global step {self.global_step})"
        if bad:
            msg = f"non-finite loss at {where}: {', '.join(bad)} (total loss {v})"
        else:
            msg = f"non-finite loss at {where} on another process (rank 0's total loss {v})"
        raise NonFiniteLossError(msg)

    # ----- checkpoints
    def _checkpoint(self, epoch: int, metrics: dict, rng_states: list) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "model": self.model_core.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "early_stopping": self.early.state_dict(),
            "best_metrics": self.best_metrics,
            "metrics": _json_safe(metrics),
            "rng": rng_states,
            "data_epoch": epoch + 1,   # the next epoch's shuffling seed is run.seed + data_epoch
            "world_size": self.dinfo.world_size,
            "label_to_category_id": self.data.label_to_category_id,
            "category_names": self.data.category_names,
        }

    @staticmethod
    def _weights_checkpoint(full: dict) -> dict:
        """best.pt: what evaluation, profiling and fine-tuning read (the EMA weights), half the size it would
        be with the raw training weights too, which nothing reads from it."""
        keep = ("version", "config", "epoch", "global_step", "ema", "metrics", "label_to_category_id",
                "category_names")
        return {k: full[k] for k in keep}

    def _write_last(self) -> None:
        """Write the newest epoch's resume state to checkpoints/last.pt, unless last.pt holds it already."""
        if self._snapshot is None or self._snapshot["epoch"] <= self._written_epoch:
            return
        _atomic_save(self._snapshot, self.ckpt_dir / "last.pt")
        self._written_epoch = self._snapshot["epoch"]
        self._last_write = time.monotonic()

    # ----- the loop
    def run(self) -> dict:
        cfg, dinfo = self.cfg, self.dinfo
        t0 = time.time()
        if dinfo.is_main:
            info = {"config": cfg, "out_dir": str(self.out), "device": str(self.device),
                    "world_size": dinfo.world_size, "num_train_images": len(self.data.train),
                    "num_val_images": len(self.data.val), "num_classes": self.data.num_classes,
                    "params": self.summary["params"], "param_groups": self._group_info(),
                    "start_epoch": self.start_epoch, "steps_per_epoch": self.steps_per_epoch}
            log.info("training %s (budget %s): %d train / %d val images, %d classes, %d epochs x %d steps, "
                     "device %s%s", cfg.model.name, cfg.run.budget or "none", len(self.data.train),
                     len(self.data.val), self.data.num_classes, cfg.train.epochs, self.steps_per_epoch, self.device,
                     f", {dinfo.world_size} processes" if dinfo.world_size > 1 else "")
            for cb in self.callbacks:
                cb.on_train_start(info)
        status, stop_reason = "completed", None
        last_metrics: dict = self.last_metrics
        epochs_done = self.start_epoch
        # the resume state of the newest epoch (a CPU copy, rank 0) and what last.pt holds: writing it costs
        # seconds on a large model, so it is written every checkpoint_every_minutes, at the end of the run and
        # when an exception leaves the loop (see _write_last)
        self._snapshot: dict | None = None
        self._written_epoch = self.start_epoch - 1   # resumed: last.pt holds the epoch before start_epoch
        self._last_write = time.monotonic()
        every_s = cfg.train.checkpoint_every_minutes * 60
        # throughput of this attempt: images over the seconds spent in training steps / in evaluation
        train_images = val_images = 0
        train_s = eval_s = 0.0
        try:
            for epoch in range(self.start_epoch, cfg.train.epochs):
                t_epoch = time.time()
                self.model_core.set_epoch(epoch)
                self.ema.module.set_epoch(epoch)
                set_loader_epoch(self.train_loader, epoch, cfg.run.seed, dinfo.rank)
                lrs = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}  # at the epoch's first step
                t_train = time.perf_counter()
                train_metrics = self.train_one_epoch(epoch)
                train_s += time.perf_counter() - t_train
                train_images += train_metrics["train_images"]
                metrics: dict[str, Any] = {"epoch": epoch, "step": self.global_step, **train_metrics, **lrs}
                is_last = epoch == cfg.train.epochs - 1
                improved = evaluated = False
                at_target = self._at_target_sparsity(epoch)
                detections: list = []
                if (epoch + 1) % cfg.train.eval_every == 0 or is_last:
                    evaluated = True
                    t_eval = time.perf_counter()
                    ev = evaluate_detections(self.ema.module, self.val_loader, self.data, self.device, dinfo,
                                             detections_out=detections)
                    eval_s += time.perf_counter() - t_eval
                    val_images += ev["val_images"]
                    metrics.update(_flatten_eval(ev))
                    # the reported checkpoint runs as deployed: epochs still in token pruning's warm-up or ramp
                    # (fewer tokens pruned than the target) cannot be the best, so that its GFLOPs, latency and
                    # keep ratio are those of the target sparsity
                    improved = at_target and self.early.update(epoch, ev["mAP"])
                    if improved:
                        self.best_metrics = _json_safe({k: v for k, v in metrics.items()})
                metrics["epoch_time_s"] = time.time() - t_epoch
                epochs_done = epoch + 1
                last_metrics = metrics
                rng_states = _all_gather_object(_rng_state(), dinfo)
                stop = False
                if dinfo.is_main:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(_json_safe(metrics)) + "\n")
                    # before anything that can raise (callbacks included): an interruption saves this epoch
                    self._snapshot = _cpu_copy(self._checkpoint(epoch, metrics, rng_states))
                    if improved:
                        _atomic_save(self._weights_checkpoint(self._snapshot), self.ckpt_dir / "best.pt")
                        _atomic_write_text(self.out / DETECTIONS_FILE, json.dumps(
                            {"epoch": epoch, "image_ids": list(self.data.val_image_ids),
                             "detections": _top_per_image_and_class(detections, 100)}) + "\n")
                    # the last epoch's state is left to the end of the run, where keep_last_checkpoint decides
                    if not is_last and time.monotonic() - self._last_write >= every_s:
                        self._write_last()
                    log.info(_epoch_line(epoch, cfg.train.epochs, metrics))
                    for cb in self.callbacks:
                        if cb.on_epoch_end(epoch, dict(metrics)):
                            stop = True
                            stop_reason = "callback"
                    if not stop and evaluated and at_target and self.early.should_stop(epoch) and not is_last:
                        stop, stop_reason = True, (f"early_stopping: no mAP improvement for "
                                                   f"{cfg.train.early_stop_patience} epochs")
                stop, stop_reason = _broadcast_object((stop, stop_reason), dinfo)
                if stop:
                    status = "stopped"
                    if dinfo.is_main:
                        log.info("stopping after epoch %d: %s", epoch + 1, stop_reason)
                    break
        except BaseException as exc:
            # interrupted (SIGINT, SIGTERM under dset.train) or crashed: keep the newest epoch for --resume. Not
            # after a failed checkpoint write: the disk is full, a second try would fail the same way.
            if dinfo.is_main and not isinstance(exc, CheckpointWriteError):
                try:
                    self._write_last()
                except Exception as write_exc:  # noqa: BLE001 - the original exception is the one to report
                    log.error("could not save the resume state after %s: %s", type(exc).__name__, write_exc)
            raise
        # completed or stopped. Without keep_last_checkpoint, fit() deletes last.pt (possibly left by an earlier
        # interrupted attempt): writing it now would be wasted time
        if dinfo.is_main and cfg.train.keep_last_checkpoint:
            self._write_last()

        self.summary.update({
            "status": status,
            "stop_reason": stop_reason,
            "epochs_completed": epochs_done,
            "epochs": cfg.train.epochs,
            "global_step": self.global_step,
            "best_epoch": self.early.best_epoch if self.early.best_epoch >= 0 else None,
            "best_mAP": self.early.best if self.early.best_epoch >= 0 else None,
            "best_metrics": self.best_metrics,
            "final_metrics": _json_safe(last_metrics),
            "train_time_s": time.time() - t0,
            "train_images_processed": train_images,
            "train_seconds": train_s,
            "train_images_per_s": train_images / train_s if train_s > 0 else None,
            "eval_images_processed": val_images,
            "eval_seconds": eval_s,
            "eval_images_per_s": val_images / eval_s if eval_s > 0 else None,
        })
        if self.dinfo.world_size > 1:
            self.summary["ddp_params_in_sync"] = self._params_in_sync()
        if dinfo.is_main and cfg.train.profile:
            self.summary.update(self._profile())
        if dinfo.is_main and cfg.train.pictures:
            self.summary.update(self._pictures())
        self.summary["peak_host_memory_mb"] = _peak_host_memory_mb()
        self.summary["peak_gpu_memory_mb"] = (torch.cuda.max_memory_allocated(self.device) / 2**20
                                              if self.device.type == "cuda" else None)
        return self.summary

    def _params_in_sync(self) -> bool:
        """All ranks hold the same weights (a cheap DDP sanity check, recorded in the summary)."""
        with torch.no_grad():
            checksum = torch.stack([p.detach().double().sum() for p in self.model_core.parameters()]).sum().cpu()
        values = _all_gather_object(float(checksum), self.dinfo)
        return all(v == values[0] for v in values)

    def _reported_model(self) -> tuple[Detector, int | None]:
        """The reported checkpoint and its epoch: best.pt's EMA weights, or the final EMA model when no epoch was
        best (its epoch: the last one run). Its token pruner runs at the ratio of its epoch."""
        best = self.ckpt_dir / "best.pt"
        if not best.is_file():
            done = self.summary.get("epochs_completed")
            return self.ema.module, done - 1 if done else None
        checkpoint = torch.load(best, map_location="cpu", weights_only=True)
        model = build_model(self.cfg, load_weights=False)
        model.load_state_dict(checkpoint["ema"]["module"])
        return model.to(self.device), checkpoint.get("epoch")

    def _profile(self) -> dict:
        """Params / active params / GFLOPs / latency of the reported checkpoint (:meth:`_reported_model`), as it
        runs: its token pruner at the ratio of its epoch, which is the target ratio (best epochs are chosen among
        those), via dset.measure."""
        try:
            from .. import measure
        except ImportError:  # pragma: no cover - dset.measure is part of the package
            return {"profile": None}
        try:
            model, _ = self._reported_model()
            size = self.cfg.data.image_size
            prof = measure.profile_model(model, size=size, device=str(self.device), warmup=2, repeats=5)
        except Exception as exc:  # noqa: BLE001 - a measurement problem must not fail a finished run
            log.warning("profiling failed: %s", exc)
            return {"profile_error": f"{type(exc).__name__}: {exc}"}
        keys = {"active_params": "active_params", "gflops": "gflops", "latency_ms": "latency_ms", "fps": "fps",
                "batch_size": "latency_batch_size", "device": "latency_device", "size": "profile_image_size"}
        out = {new: prof[old] for old, new in keys.items() if old in prof}
        # what the AIFI layer saw while it was measured: the tokens of the stride-32 map and how many it kept
        tokens = (size // 32) ** 2
        pruner = model.token_pruner
        kept = pruner.num_kept(tokens) if pruner is not None else tokens
        out.update({"profile_tokens": tokens, "profile_kept_tokens": kept, "profile_keep_ratio": kept / tokens})
        out["profile"] = _json_safe({k: v for k, v in prof.items() if not isinstance(v, torch.Tensor)})
        if self.cfg.train.profile_deployment:
            try:  # its own failure (an export problem) keeps the rest of the profile
                out["deployment"] = _json_safe(measure.deployment_latency(
                    {"model": model}, size, str(self.device), DEPLOYMENT_BATCH_SIZES, warmup=2, repeats=5)["model"])
            except Exception as exc:  # noqa: BLE001 - a measurement problem must not fail a finished run
                log.warning("deployment timing (ONNX export, ONNX Runtime) failed: %s", exc)
                out["deployment_error"] = f"{type(exc).__name__}: {exc}"
        return out

    def _pictures(self) -> dict:
        """Draw the reported checkpoint (:meth:`_reported_model`) on the first ``train.pictures`` validation
        images into ``pictures/`` (:func:`dset.pictures.draw_pictures`); the files, relative to the run folder."""
        from ..pictures import draw_pictures

        try:
            model, epoch = self._reported_model()
            paths = draw_pictures(model, self.data, self.out, num_images=self.cfg.train.pictures, epoch=epoch)
        except Exception as exc:  # noqa: BLE001 - a drawing problem must not fail a finished run
            log.warning("drawing the pictures failed: %s", exc)
            return {"pictures_error": f"{type(exc).__name__}: {exc}"}
        return {"pictures": [str(p.relative_to(self.out)) for p in paths]}


def _epoch_line(epoch: int, epochs: int, m: dict) -> str:
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {m['loss']:.4f}"]
    if "mAP" in m:
        parts.append(f"mAP {m['mAP']:.4f} mAP50 {m['mAP50']:.4f}")
    lr = [v for k, v in m.items() if k.startswith("lr/new")] or [v for k, v in m.items() if k.startswith("lr/")]
    if lr:
        parts.append(f"lr {lr[0]:.2e}")
    if "keep_ratio" in m:
        parts.append(f"keep {m['keep_ratio']:.3f}")
    parts.append(f"{m['epoch_time_s']:.1f} s")
    return " | ".join(parts)


def fit(cfg: Config | str, out_dir: str | os.PathLike, callbacks: Callback | Sequence[Callback] | None = None,
        resume: bool = False) -> dict:
    """Train and evaluate one run; returns the ``summary.json`` content.

    ``metrics.jsonl`` records (and the ``metrics`` passed to ``Callback.on_epoch_end``) are flat:
    ``epoch`` (0-based), ``step`` (optimizer steps so far), ``loss`` (mean total loss over the epoch's
    steps), every weighted loss term by its criterion name (``loss_vfl``, ``loss_bbox_aux_0``,
    ``loss_giou_dn_2``, ``loss_enc_moe_balance``, ``loss_pruning``, ... means over the epoch),
    ``lr/<group>`` (the rate at the epoch's first step), ``train_images``, ``train_steps``; on evaluated
    epochs ``mAP``, ``mAP50``, ``mAP75``, ``mAP_small``, ``mAP_medium``, ``mAP_large``, ``AR100``,
    ``AP/<class name>``, ``val_images`` (of the EMA model); with token pruning ``keep_ratio`` (mean
    tokens kept / tokens over the epoch's forwards) and ``scheduled_keep_ratio``; with MoE
    ``encoder_moe_usage/layer<i>/expert<j>`` and ``decoder_moe_usage/...`` (fraction of routing slots per
    expert, mean over the epoch's forwards); ``epoch_time_s``. Metrics without ground truth are NaN in
    the callback and ``null`` in the file.

    ``summary.json`` (also returned): ``status`` (completed / stopped / failed), ``stop_reason``, ``error``
    (failed runs), ``epochs_completed``, ``epochs``, ``global_step``, ``best_epoch`` (0-based), ``best_mAP``,
    ``best_metrics`` (the metrics record of the best epoch), ``final_metrics``, ``num_classes``,
    ``num_train_images``, ``num_val_images``, ``world_size``, ``device``, ``train_time_s``, ``params``;
    throughput and memory of this attempt (a resumed run counts its own epochs only): ``train_images_per_s``
    (``train_images_processed`` over ``train_seconds``, the seconds spent in the epochs' training steps, data
    loading included, all ranks' images), ``eval_images_per_s`` (``eval_images_processed`` over
    ``eval_seconds``, the validation passes with COCO scoring; None when nothing was timed),
    ``peak_host_memory_mb`` (peak resident memory of this process, rank 0 under DDP, MiB: Linux VmHWM from the
    run's start, else ``ru_maxrss``), ``peak_gpu_memory_mb`` (``torch.cuda.max_memory_allocated`` from the run's
    start, MiB; None off CUDA); and with ``train.profile`` from :func:`dset.measure.profile_model` on the best
    EMA weights at ``data.image_size``: ``active_params``, ``gflops`` (2 x multiply-adds, fvcore),
    ``latency_ms``/``fps`` (eval forward, batch ``latency_batch_size`` on ``latency_device``), ``profile``
    (everything it measured), or ``profile_error``; with ``train.profile_deployment`` also ``deployment``
    (:func:`dset.measure.deployment_latency`: eager PyTorch next to ONNX Runtime at batch 1 and 8, timed
    round-robin in this process, and the ONNX check against eager) or ``deployment_error``.

    Pictures (``train.pictures`` > 0, default 4): :func:`dset.pictures.draw_pictures` draws the same reported
    checkpoint on the first ``train.pictures`` validation images into ``out_dir/pictures/``:
    ``detections_<image id>.png`` (ground truth beside the predictions), with token pruning
    ``kept_tokens_<id>.png``, with encoder MoE ``encoder_experts_<id>.png``, with decoder MoE
    ``decoder_experts_<id>.png``, and ``pictures.json`` describing them. ``summary.json`` lists the files under
    ``pictures`` (paths relative to ``out_dir``), or says why there are none under ``pictures_error``: a drawing
    failure does not fail a finished run.

    A failure (bad data, NaN loss, an interruption, ...) writes the newest epoch's resume state to
    ``checkpoints/last.pt`` (unless it failed writing a checkpoint), writes ``summary.json`` with status
    ``failed`` and ``error``, calls ``on_train_end`` and re-raises.
    """
    if not isinstance(cfg, Config):
        cfg = load_config(cfg)
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    out = Path(out_dir)
    run = _Run(cfg, out, list(callbacks), resume)
    try:
        try:
            run.setup()
            summary = run.run()
        except BaseException as exc:
            run.summary.update({"status": "failed", "error": f"{type(exc).__name__}: {error_message(exc)}"})
            if run.dinfo.is_main and (run.wrote_outputs or not resume):
                out.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(out / "summary.json", json.dumps(_json_safe(run.summary), indent=2) + "\n")
                for cb in run.callbacks:
                    cb.on_train_end(dict(run.summary))
            raise
        if run.dinfo.is_main:
            _atomic_write_text(out / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
            for cb in run.callbacks:
                cb.on_train_end(dict(summary))
            if not run.cfg.train.keep_last_checkpoint:
                # the resume state (weights, EMA and the optimizer's two moments: four times best.pt) is dead weight
                # once a run has ended; a grid of 16 runs would otherwise keep gigabytes of it
                last = run.ckpt_dir / "last.pt"
                if last.is_file():
                    last.unlink()
                    log.info("removed %s (train.keep_last_checkpoint=false); best.pt keeps the weights", last)
        return summary
    finally:
        if run.dinfo.created_group and dist.is_initialized():
            dist.destroy_process_group()
