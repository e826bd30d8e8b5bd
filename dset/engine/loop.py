"""Training one run: ``fit(cfg, out_dir, callbacks=None, resume=False) -> summary``.

What a run does, in order:

1. Data (:mod:`dset.data.loaders`): the synthetic set (default) or a COCO-format set. The model's
   ``num_classes`` is ALWAYS the data set's number of categories: when ``model.num_classes`` differs (the
   presets say 80, COCO's count) it is set from the data with a log line, and ``config.yaml`` records the
   value used.
2. Model (:func:`dset.engine.initial_weights.build_training_model`): ``build_model`` plus the local initial
   weights (``model.backbone.pretrained``, ``model.checkpoint``; MoE experts upcycled from dense FFNs). The
   names those files set are "pretrained", and so are the experts upcycled from a pretrained FFN.
3. AdamW with up to four parameter groups (:mod:`dset.engine.optim`): ``pretrained`` / ``new`` x with /
   without weight decay. Pretrained parameters (upcycled experts included) train at ``train.lr_pretrained``,
   everything else (MoE routers, the importance predictor, experts not upcycled, everything when training
   from scratch) at ``train.lr``. Norm parameters (BatchNorm, LayerNorm, GroupNorm) and biases get no weight
   decay. Frozen parameters (``model.backbone.freeze_at``) are not optimised.
4. Per step: RT-DETR's multi-scale training (``data.multi_scale``: the batch resized to a size drawn from
   the reference's list scaled to ``data.image_size``; off from ``data.stop_epoch``, RT-DETRv2's policy, which
   also ends the strong augmentations); linear warm-up then cosine (:mod:`dset.engine.schedule`) as a factor
   on each group's own rate; AMP (float16 + GradScaler) only on CUDA with ``train.amp``; gradient clipping at
   ``train.grad_clip`` (0: off); EMA update (:mod:`dset.engine.ema`). A NaN/inf loss stops the run with
   :class:`dset.engine.errors.NonFiniteLossError` naming the epoch, step and loss terms.
5. Per epoch: ``model.set_epoch(epoch)`` (token-pruning schedule; the EMA model too), evaluation of the EMA
   model every ``train.eval_every`` epochs and at the last epoch (COCO metrics on the validation split,
   :mod:`dset.engine.coco_eval`), a line in ``metrics.jsonl``, ``checkpoints/best.pt`` (when ``val/mAP``
   improved), the callbacks' ``on_epoch_end`` (:mod:`dset.engine.callbacks`), early stopping after
   ``train.early_stop_patience`` epochs without an mAP improvement. Only the epochs
   :func:`dset.engine.reported_checkpoint.eligible_epochs` names (one rule for every run: from the end of the
   pruning schedules as configured, switch on or off) can be best or stop the run.
   The resume state (``checkpoints/last.pt``: weights, EMA, optimizer, ...) is copied to the CPU at every
   epoch end but written at most every ``train.checkpoint_every_minutes`` (default 10; since the last write or
   the start of training), at the end of the run (completed or stopped) when ``train.keep_last_checkpoint``,
   and when an exception leaves the epoch loop (Ctrl-C, SIGTERM under ``python -m dset.train``, a crash):
   then the newest epoch's copy is written before the exception goes on (:mod:`dset.engine.checkpoint`). A
   ``kill -9`` loses at most one epoch or ``checkpoint_every_minutes``, whichever is longer (writing the state
   every epoch costs seconds of I/O per epoch: on short epochs, a large part of the work it protects).
6. ``summary.json``: status ``completed`` / ``stopped`` (early stopping or a callback) / ``failed`` (with the
   error) and the final metrics (:mod:`dset.engine.run_metrics`): best epoch, with a test split the reported
   checkpoint's ``test/`` metrics (evaluated once on it), parameter counts, GFLOPs and latency from
   :mod:`dset.measure` (:mod:`dset.engine.reported_checkpoint`), throughput and peak memory
   (:mod:`dset.engine.epoch_stats`, :mod:`dset.engine.memory`).
7. ``pictures/``: the reported checkpoint drawn on the first ``train.pictures`` validation images
   (:mod:`dset.pictures`: detections, and with the DSET switches the kept tokens and the experts' routing).

Files in ``out_dir`` (:mod:`dset.engine.records`): ``config.yaml`` (resolved configuration),
``metrics.jsonl`` (one JSON object per epoch, keys listed in :func:`fit`), ``summary.json``,
``checkpoints/last.pt``, ``checkpoints/best.pt``, ``eval/detections.json`` and ``eval/ground_truth.json`` (and
with a test split ``eval/test_detections.json`` and ``eval/test_ground_truth.json``), ``pictures/*.png`` and
``pictures/pictures.json``. Checkpoints are written to a temporary file and renamed (``os.replace``), so a killed
run never leaves a torn file. ``best.pt`` holds what evaluation and fine-tuning
read: the EMA weights (``ema``; the raw training weights are not kept), ``config``, ``epoch``, ``metrics`` and
the label maps.

Resume (``resume=True``): continues from ``checkpoints/last.pt`` (model, EMA, optimizer, scheduler, scaler,
RNG states of every rank, early-stopping state, epoch). With a fixed seed on CPU the resumed run reproduces
the uninterrupted one exactly. The configuration must equal the checkpoint's, except ``run.device``,
``run.progress``, ``run.out_dir`` and ``data.num_workers``.

DDP (:mod:`dset.engine.distributed`): under ``torchrun`` (``WORLD_SIZE > 1``) the process group is created
here (NCCL on CUDA, gloo on CPU); ``data.batch_size`` is per process; losses and expert usage are averaged
over ranks and detections gathered to rank 0 for COCO evaluation; only rank 0 writes files and calls the
callbacks.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import metric_names as M
from ..config import Config, load_config, multi_scale_sizes
from ..data.loaders import DataBundle, build_datasets, build_train_loader, build_val_loader, set_loader_epoch
from ..models.criterion import build_criterion, total_loss
from .callbacks import Callback, EarlyStopping
from .checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointWriteError,
    ResumeStateWriter,
    atomic_save,
    atomic_write_text,
    read_resume_state,
    weights_checkpoint,
)
from .coco_eval import evaluate_detections, ground_truth, top_per_image_and_class
from .distributed import (
    DistInfo,
    all_gather_object,
    any_rank,
    broadcast_object,
    broadcast_state,
    params_in_sync,
    resolve_device,
    setup_distributed,
    teardown_distributed,
    wrap_for_ddp,
)
from .ema import ModelEMA
from .epoch_stats import EpochStats, Throughput
from .errors import NonFiniteLossError, error_message
from .initial_weights import build_training_model
from .memory import peak_gpu_memory_mb, peak_host_memory_mb, reset_peak_memory
from .optim import build_optimizer
from .records import (
    DETECTIONS_FILE,
    GROUND_TRUTH_FILE,
    append_metrics,
    epoch_line,
    evaluation_entries,
    json_safe,
    start_metrics_file,
    write_json,
)
from .reported_checkpoint import (
    ReportedCheckpoint,
    eligible_epochs,
    picture_entries,
    profile_entries,
    score_on_test_split,
)
from .rng import rng_state, seed_everything, set_rng_state
from .run_metrics import best_epoch_metrics, train_minutes
from .schedule import WarmupCosine, build_scheduler

__all__ = ["fit"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the run
class _Run:
    """One run of :func:`fit`. ``__init__`` builds all of it in memory: device, data, model, criterion,
    optimizer, schedule, EMA and, resumed, the state of ``checkpoints/last.pt``; nothing is written before
    :meth:`run`, so a refused ``--resume`` leaves the run's files alone. :meth:`run` writes the run's files,
    trains the epochs and returns the summary."""

    def __init__(self, cfg: Config, out_dir: Path, callbacks: list[Callback], resume: bool, dinfo: DistInfo) -> None:
        self.out = out_dir
        self.callbacks = callbacks
        self.dinfo = dinfo
        self.summary: dict[str, Any] = {"status": "failed", "out_dir": str(out_dir)}
        self.wrote_outputs = False   # set by run(): fit() then records a failure in the run's files
        self.device = resolve_device(cfg.run.device, dinfo)
        _reset_process_state(cfg, self.device)
        # data first: it decides num_classes
        self.data = build_datasets(cfg)
        self.cfg = cfg = _num_classes_from_data(cfg, self.data, dinfo)
        self.train_loader = build_train_loader(self.data.train, cfg, dinfo.rank, dinfo.world_size)
        self.val_loader = build_val_loader(self.data.val, cfg, dinfo.rank, dinfo.world_size)
        model, self.pretrained_names, _ = build_training_model(cfg)
        self.model_core, self.model = wrap_for_ddp(model.to(self.device), cfg, self.device, dinfo)
        self.criterion = build_criterion(cfg).to(self.device)
        self.optimizer = build_optimizer(self.model_core, cfg, self.pretrained_names)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = _build_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.ema = ModelEMA(self.model_core, cfg.train.ema_decay, cfg.train.ema_warmup_steps)
        self.use_amp = bool(cfg.train.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.early = EarlyStopping(cfg.train.early_stop_patience)
        self.eligible_epochs = eligible_epochs(cfg)   # those that may be best or stop the run, as for every run
        if dinfo.world_size > 1:   # each rank draws its own augmentations / denoising noise (weights were broadcast)
            seed_everything(cfg.run.seed + dinfo.rank)
        self.ckpt_dir = out_dir / "checkpoints"
        self.metrics_path = out_dir / "metrics.jsonl"
        last = (self._restore_last() if resume else None) or {}
        self.start_epoch = int(last.get("epoch", -1)) + 1
        self.global_step = int(last.get("global_step", 0))
        self.best_metrics: dict | None = last.get("best_metrics")
        self.last_metrics: dict = last.get("metrics") or {}   # the newest epoch's record
        self.epochs_done = self.start_epoch
        self.last_pt = ResumeStateWriter(self.ckpt_dir / "last.pt", cfg.train.checkpoint_every_minutes * 60,
                                         written_epoch=self.start_epoch - 1)
        self.throughput = Throughput()   # of this attempt
        self.epoch_times: list[float] = []   # time/epoch_s of every epoch of the run (earlier attempts' too)

    def _restore_last(self) -> dict | None:
        """``--resume``: load ``checkpoints/last.pt`` into the model, EMA, optimizer, scheduler, scaler, early
        stopping and this rank's random state; returns it (None when there is none: start at epoch 0)."""
        path = self.ckpt_dir / "last.pt"
        if not path.is_file():
            if self.dinfo.is_main:
                log.warning("--resume: %s not found; starting from epoch 0", path)
            return None
        ckpt = read_resume_state(path, self.cfg)
        self.model_core.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.early.load_state_dict(ckpt["early_stopping"])
        rng = ckpt["rng"]
        set_rng_state(rng[self.dinfo.rank] if self.dinfo.rank < len(rng) else rng[0])
        if self.dinfo.is_main:
            log.info("resumed from %s: epoch %d done, continuing at epoch %d", path, ckpt["epoch"],
                     int(ckpt["epoch"]) + 1)
        return ckpt

    # ----- the run
    def run(self) -> dict:
        """Write the run's files, train the epochs, fill in the summary and return it."""
        self._write_run_files()
        t0 = time.time()
        self._announce_start()
        status, stop_reason = "completed", None
        self.last_pt.restart_clock()   # checkpoint_every_minutes counts from the start of training
        try:
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                stop_reason = self._run_epoch(epoch)
                if stop_reason is not None:
                    status = "stopped"
                    if self.dinfo.is_main:
                        log.info("stopping after epoch %d: %s", epoch + 1, stop_reason)
                    break
        except BaseException as exc:
            self.summary["metrics"].update(train_minutes(self.epoch_times, None))
            self._save_resume_state_after(exc)
            raise
        # completed or stopped. Without keep_last_checkpoint, fit() deletes last.pt (possibly left by an earlier
        # interrupted attempt): writing it now would be wasted time
        if self.dinfo.is_main and self.cfg.train.keep_last_checkpoint:
            self.last_pt.write()
        self._finish_summary(status, stop_reason, t0)
        return self.summary

    def _write_run_files(self) -> None:
        """config.yaml, metrics.jsonl (empty, or resumed: its lines up to the checkpoint's epoch), the validation
        ground truth; the summary's description of the run."""
        self.wrote_outputs = True
        if self.dinfo.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", self.cfg.to_yaml())
            kept = start_metrics_file(self.metrics_path, self.start_epoch)
            self.epoch_times = [r[M.EPOCH_TIME] for r in kept if r.get(M.EPOCH_TIME) is not None]
            (self.out / DETECTIONS_FILE).parent.mkdir(parents=True, exist_ok=True)
            write_json(self.out / GROUND_TRUTH_FILE, ground_truth(self.data.val_dataset.coco, self.data.val_image_ids))
        self.summary.update({
            "config_name": self.cfg.model.name,
            "world_size": self.dinfo.world_size,
            "device": str(self.device),
            "num_classes": self.data.num_classes,
            "num_train_images": len(self.data.train),
            "num_val_images": len(self.data.val),
            # the model is selected (best epoch, early stopping) on val among the eligible epochs and scored on
            # test when there is one; without one it is scored on the images that selected it
            "selection_split": "val",
            "score_split": "test" if self.data.test is not None else "val",
            "eligible_epochs": list(self.eligible_epochs),
            "metrics": {M.PARAMS: sum(p.numel() for p in self.model_core.parameters())},
        })

    def _announce_start(self) -> None:
        """Rank 0: the run's log line and the callbacks' ``on_train_start``."""
        if not self.dinfo.is_main:
            return
        cfg, data, world_size = self.cfg, self.data, self.dinfo.world_size
        info = {"config": cfg, "out_dir": str(self.out), "device": str(self.device), "world_size": world_size,
                "num_train_images": len(data.train), "num_val_images": len(data.val),
                "num_classes": data.num_classes, "params": self.summary["metrics"][M.PARAMS],
                "param_groups": self._group_info(),
                "start_epoch": self.start_epoch, "steps_per_epoch": self.steps_per_epoch}
        log.info("training %s (budget %s): %d train / %d val images, %d classes, %d epochs x %d steps, "
                 "device %s%s", cfg.model.name, cfg.run.budget or "none", len(data.train), len(data.val),
                 data.num_classes, cfg.train.epochs, self.steps_per_epoch, self.device,
                 f", {world_size} processes" if world_size > 1 else "")
        for cb in self.callbacks:
            cb.on_train_start(info)

    def _save_resume_state_after(self, exc: BaseException) -> None:
        """Interrupted (SIGINT, SIGTERM under dset.train) or crashed: keep the newest epoch for --resume. Not
        after a failed checkpoint write: the disk is full, a second try would fail the same way."""
        if self.dinfo.is_main and not isinstance(exc, CheckpointWriteError):
            try:
                self.last_pt.write()
            except Exception as write_exc:  # noqa: BLE001 - the original exception is the one to report
                log.error("could not save the resume state after %s: %s", type(exc).__name__, write_exc)

    def _finish_summary(self, status: str, stop_reason: str | None, t0: float) -> None:
        """The summary of a completed or stopped run: its outcome and, in ``metrics``, its final metrics."""
        cfg, best_epoch = self.cfg, self.early.best_epoch
        train_time_s = time.time() - t0
        self.summary.update({
            "status": status,
            "stop_reason": stop_reason,
            "epochs": cfg.train.epochs,
            "global_step": self.global_step,
            "train_time_s": train_time_s,
            **self.throughput.summary(),
        })
        metrics = self.summary["metrics"]
        metrics.update(best_epoch_metrics(self.best_metrics, best_epoch if best_epoch >= 0 else None))
        if self.last_metrics.get(M.KEEP_RATIO) is not None:
            metrics[M.FINAL_KEEP_RATIO] = self.last_metrics[M.KEEP_RATIO]
        metrics[M.EPOCHS_RUN] = self.epochs_done
        metrics.update(train_minutes(self.epoch_times, train_time_s))
        metrics.update(self.throughput.metrics())
        if self.dinfo.world_size > 1:
            self.summary["ddp_params_in_sync"] = params_in_sync(self.model_core, self.dinfo)
        if self.dinfo.is_main and (cfg.train.profile or cfg.train.pictures or self.data.test is not None):
            entries = self._describe_reported_checkpoint()
            metrics.update(entries.pop("metrics", {}))
            self.summary.update(entries)
        metrics[M.PEAK_HOST_MEMORY_MB] = peak_host_memory_mb()
        metrics[M.PEAK_GPU_MEMORY_MB] = peak_gpu_memory_mb(self.device)

    def _describe_reported_checkpoint(self) -> dict:
        """Test-split score, profile and pictures of the reported checkpoint (best.pt's EMA weights, else the final
        EMA model), loaded once for all."""
        final_epoch = self.epochs_done - 1 if self.epochs_done else None
        reported = ReportedCheckpoint(self.ckpt_dir / "best.pt", self.cfg, self.device, self.ema.module, final_epoch)
        parts = []
        if self.data.test is not None:
            parts.append(score_on_test_split(reported, self.data, self.cfg, self.device, self.out))
        if self.cfg.train.profile:
            parts.append(profile_entries(reported, self.cfg, self.device))
        if self.cfg.train.pictures:
            parts.append(picture_entries(reported, self.data, self.out, self.cfg.train.pictures))
        entries: dict[str, Any] = {"metrics": {}}
        for part in parts:  # each part's summary entries; their final metrics together
            entries["metrics"].update(part.pop("metrics", {}))
            entries.update(part)
        return entries

    # ----- one epoch
    def _run_epoch(self, epoch: int) -> str | None:
        """Train, evaluate and record one epoch; returns the reason to stop after it (None: go on), the same
        on every rank."""
        cfg, dinfo = self.cfg, self.dinfo
        t_epoch = time.time()
        self.model_core.set_epoch(epoch)
        self.ema.module.set_epoch(epoch)
        set_loader_epoch(self.train_loader, epoch, cfg.run.seed, dinfo.rank)
        lrs = {M.lr_metric(g["name"]): g["lr"] for g in self.optimizer.param_groups}  # at the epoch's first step
        with self.throughput.timing_training():
            train_metrics = self.train_one_epoch(epoch)
        counts = {"step": self.global_step, **train_metrics.pop("counts")}
        self.throughput.train_images += counts["train_images"]
        metrics: dict[str, Any] = {"epoch": epoch, **train_metrics, **lrs, "counts": counts}
        eligible = epoch in self.eligible_epochs
        evaluated = (epoch + 1) % cfg.train.eval_every == 0 or epoch == cfg.train.epochs - 1
        detections: list = []
        improved = evaluated and self._evaluate(epoch, metrics, eligible, detections)
        metrics[M.EPOCH_TIME] = time.time() - t_epoch
        self.epoch_times.append(metrics[M.EPOCH_TIME])
        self.epochs_done, self.last_metrics = epoch + 1, metrics
        rng_states = all_gather_object(rng_state(), dinfo)
        stop_reason = None
        if dinfo.is_main:
            stop_reason = self._record_epoch(epoch, metrics, rng_states, improved, detections,
                                             may_stop_early=evaluated and eligible)
        return broadcast_object(stop_reason, dinfo)

    def _evaluate(self, epoch: int, metrics: dict, eligible: bool, detections: list) -> bool:
        """COCO metrics of the EMA model added to ``metrics`` (its detections to ``detections`` on rank 0);
        True when the epoch is the new best (an ``eligible`` one: :func:`eligible_epochs`)."""
        broadcast_state(self.ema.module, self.dinfo)   # every rank evaluates the EMA model the checkpoints keep
        with self.throughput.timing_evaluation():
            ev = evaluate_detections(self.ema.module, self.val_loader, self.data, self.device, self.dinfo,
                                     detections_out=detections)
        self.throughput.eval_images += ev["val_images"]
        metrics.update(evaluation_entries(ev))
        metrics["counts"]["val_images"] = ev["val_images"]
        # only eligible epochs can be the best: the same rule for every cell of a study, and the reported
        # checkpoint runs as deployed (no epoch of a pruning warm-up or ramp), so that its GFLOPs, latency and
        # keep ratio are those of the target sparsity
        improved = eligible and self.early.update(epoch, metrics[M.VAL_MAP])
        if improved:
            self.best_metrics = json_safe(metrics)
        return improved

    def _record_epoch(self, epoch: int, metrics: dict, rng_states: list, improved: bool, detections: list,
                      may_stop_early: bool) -> str | None:
        """Rank 0: the metrics line, the epoch's resume state (kept; written when due), best.pt and the
        detections of a new best, the log line, the callbacks; returns the reason to stop, if any."""
        cfg = self.cfg
        is_last = epoch == cfg.train.epochs - 1
        append_metrics(self.metrics_path, metrics)
        # before anything that can raise (callbacks included): an interruption saves this epoch
        snapshot = self.last_pt.keep(self._training_state(epoch, metrics, rng_states))
        if improved:
            atomic_save(weights_checkpoint(snapshot), self.ckpt_dir / "best.pt")
            write_json(self.out / DETECTIONS_FILE, {"epoch": epoch, "image_ids": list(self.data.val_image_ids),
                                                    "detections": top_per_image_and_class(detections, 100)})
        # the last epoch's state is left to the end of the run, where keep_last_checkpoint decides
        if not is_last and self.last_pt.due():
            self.last_pt.write()
        log.info(epoch_line(epoch, cfg.train.epochs, metrics))
        stop_reason = None
        for cb in self.callbacks:
            if cb.on_epoch_end(epoch, dict(metrics)):
                stop_reason = "callback"
        if stop_reason is None and may_stop_early and self.early.should_stop(epoch) and not is_last:
            stop_reason = f"early_stopping: no mAP improvement for {cfg.train.early_stop_patience} epochs"
        return stop_reason

    def _training_state(self, epoch: int, metrics: dict, rng_states: list) -> dict:
        """The resume state at the end of ``epoch`` (what last.pt holds; best.pt keeps part of it)."""
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
            "metrics": json_safe(metrics),
            "rng": rng_states,
            "data_epoch": epoch + 1,   # the next epoch's shuffling seed is run.seed + data_epoch
            "world_size": self.dinfo.world_size,
            "label_to_category_id": self.data.label_to_category_id,
            "category_names": self.data.category_names,
        }

    def _multi_scale_sizes(self, epoch: int) -> list[int] | None:
        """The sizes multi-scale training draws from in ``epoch`` (None: off, or past ``data.stop_epoch``)."""
        d = self.cfg.data
        if not d.multi_scale or (d.stop_epoch is not None and epoch >= d.stop_epoch):
            return None
        return multi_scale_sizes(d.image_size)

    def _group_info(self) -> dict:
        return {g["name"]: {"lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                            "params": sum(p.numel() for p in g["params"])} for g in self.optimizer.param_groups}

    # ----- the training steps
    def train_one_epoch(self, epoch: int) -> dict:
        """One pass over the training loader; the epoch's means (:meth:`EpochStats.reduce`)."""
        cfg = self.cfg
        model, core = self.model, self.model_core
        model.train()
        self.criterion.train()
        stats = EpochStats()
        bar = self._progress_bar(epoch)
        amp_ctx = torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        try:
            sizes = self._multi_scale_sizes(epoch)
            for step, (images, targets) in enumerate(self.train_loader):
                images = images.to(self.device, non_blocking=True)
                if sizes:
                    # RT-DETR's multi-scale training: the whole batch at one size drawn per step (nearest
                    # resize, as the reference); boxes are normalised, so targets are unchanged
                    size = random.choice(sizes)
                    if tuple(images.shape[-2:]) != (size, size):
                        images = torch.nn.functional.interpolate(images, size=(size, size))
                targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
                with amp_ctx:
                    outputs = model(images, targets)
                loss_dict = self.criterion(outputs, targets)
                loss = total_loss(loss_dict)
                loss_value = _finite_loss(loss, loss_dict, self.dinfo,
                                          f"epoch {epoch}, step {step} (global step {self.global_step})")
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
                stats.add(loss_dict, loss_value, images.shape[0], core.sparse_stats())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", avg=f"{stats.total_sum / stats.steps:.3f}")
        finally:
            if bar is not None:
                bar.close()
        return stats.reduce(self.dinfo)

    def _progress_bar(self, epoch: int):
        """Rank 0's tqdm bar over the epoch's steps with ``run.progress``, else None."""
        if not (self.dinfo.is_main and self.cfg.run.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False,
                    dynamic_ncols=True, unit="it")


# ------------------------------------------------------------------------------------ building blocks
def _reset_process_state(cfg: Config, device: torch.device) -> None:
    """What a run resets in its process first: the peak memory counters, deterministic algorithms (with
    ``run.deterministic``), every random generator (``run.seed``)."""
    reset_peak_memory(device)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.run.seed)


def _num_classes_from_data(cfg: Config, data: DataBundle, dinfo: DistInfo) -> Config:
    """``cfg`` with ``model.num_classes`` set to the data set's number of categories (logged when it changes)."""
    if cfg.model.num_classes == data.num_classes:
        return cfg
    if dinfo.is_main:
        log.info("model.num_classes %d -> %d: set from the data set's categories (%s)",
                 cfg.model.num_classes, data.num_classes, ", ".join(data.category_names))
    return load_config(cfg, [f"model.num_classes={data.num_classes}"])


def _build_schedule(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> WarmupCosine:
    """Warm-up then cosine over the run's optimizer steps (warned about when the warm-up outlasts them)."""
    total_steps = max(1, cfg.train.epochs * steps_per_epoch)
    if cfg.train.warmup_steps >= total_steps:
        log.warning("train.warmup_steps (%d) >= the run's %d optimizer steps: the learning rate never "
                    "reaches its peak", cfg.train.warmup_steps, total_steps)
    return build_scheduler(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)


def _finite_loss(loss: torch.Tensor, loss_dict: dict, dinfo: DistInfo, where: str) -> float:
    """The total loss as a number; a :class:`NonFiniteLossError` naming ``where`` and the non-finite terms when
    it is NaN/inf here or on another process (every rank stops together)."""
    value = float(loss.detach().float().item())
    if not any_rank(not math.isfinite(value), loss.device, dinfo):
        return value
    bad = [f"{k}={float(t.detach().float().item())}" for k, t in loss_dict.items()
           if not math.isfinite(float(t.detach().float().item()))]
    if bad:
        raise NonFiniteLossError(f"non-finite loss at {where}: {', '.join(bad)} (total loss {value})")
    raise NonFiniteLossError(f"non-finite loss at {where} on another process (rank 0's total loss {value})")


# ---------------------------------------------------------------------------------------------- fit
def fit(cfg: Config | str, out_dir: str | os.PathLike, callbacks: Callback | Sequence[Callback] | None = None,
        resume: bool = False) -> dict:
    """Train and evaluate one run; returns the ``summary.json`` content.

    ``metrics.jsonl`` records (and the ``metrics`` passed to ``Callback.on_epoch_end``) name every metric as
    :mod:`dset.metric_names` does (the names MLflow and the report use): ``epoch`` (0-based; MLflow's step),
    ``train/loss`` (mean total loss over the epoch's steps), every weighted loss term by its criterion name
    (``train/loss_vfl``, ``train/loss_bbox_aux_0``, ``train/loss_giou_dn_2``, ``train/loss_enc_moe_balance``,
    ``train/loss_pruning``, ... means over the epoch), ``lr/<group>`` (the rate at the epoch's first step); on
    evaluated epochs ``val/mAP``, ``val/mAP50``, ``val/mAP75``, ``val/mAP_small``, ``val/mAP_medium``,
    ``val/mAP_large``, ``val/AR100``, ``val/AP/<class name>`` (of the EMA model; the class name with the
    characters MLflow rejects made ``_``); with token pruning ``sparse/keep_ratio`` (mean tokens kept / tokens
    over the epoch's forwards) and ``sparse/scheduled_keep_ratio``; with MoE
    ``sparse/<encoder_moe|decoder_moe>/layer<i>/expert<j>`` (fraction of routing slots per expert, mean over
    the epoch's forwards) and ``sparse/<site>/layer<i>/entropy`` (of those shares, nats); ``time/epoch_s``.
    Beside the metrics, ``counts``: ``step`` (optimizer steps so far), ``train_images``, ``train_steps`` and on
    evaluated epochs ``val_images``. Metrics without ground truth are NaN in the callback and ``null`` in the
    file.

    ``summary.json`` (also returned): ``metrics``, the run's final metrics under their :mod:`dset.metric_names`
    names (what MLflow logs): ``params``; for a completed or stopped run also ``best/mAP``, ``best/mAP50``,
    ``best/mAP75``, ``best/epoch`` (0-based; of the best epoch, EMA weights), ``final/keep_ratio`` (the last
    epoch's ``sparse/keep_ratio``), ``epochs_run``, ``train_minutes`` (the epochs' ``time/epoch_s``, those of an
    interrupted earlier attempt included), ``perf/train_images_per_s`` and ``perf/eval_images_per_s`` (this
    attempt's images over its seconds in training steps, data loading included, all ranks' images, and in
    evaluation with COCO scoring; None when nothing was timed), ``perf/peak_host_memory_mb`` (peak resident
    memory of this process, rank 0 under DDP, MiB: Linux VmHWM from the run's start, else ``ru_maxrss``),
    ``perf/peak_gpu_memory_mb`` (``torch.cuda.max_memory_allocated`` from the run's start, MiB; None off CUDA);
    with ``train.profile``, from :func:`dset.measure.profile_model` on the best EMA weights at
    ``data.image_size``: ``active_params``, ``gflops`` (2 x multiply-adds, fvcore), ``gflops/<component>``,
    ``latency_ms``/``fps`` (eval forward, batch ``latency_batch_size`` on ``latency_device``),
    ``profile/tokens``, ``profile/kept_tokens``, ``profile/keep_ratio``; with ``train.profile_deployment`` the
    ``deploy/...`` metrics; with a test split (``data.test``, ``data.synthetic.num_test``) the reported
    checkpoint's ``test/mAP``, ``test/mAP50``, ``test/mAP75``, ``test/mAP_small``, ``test/mAP_medium``,
    ``test/mAP_large``, ``test/AR100`` and ``test/AP/<class name>``. Beside it: ``status`` (completed / stopped /
    failed), ``stop_reason``, ``error`` (failed runs), ``epochs`` (configured), ``eligible_epochs`` (those that
    could be best), ``selection_split`` ("val": it chose the best epoch), ``score_split`` ("test", or "val" when
    there is no test split: the model was then scored on the images that selected it), ``global_step``,
    ``num_classes``, ``num_train_images``, ``num_val_images``, ``num_test_images`` (with a test split),
    ``world_size``, ``device``, ``train_time_s`` (this attempt), ``train_images_processed``, ``train_seconds``,
    ``eval_images_processed``, ``eval_seconds``, ``profile`` (everything the profile measured) or
    ``profile_error``, ``deployment`` (:func:`dset.measure.deployment_latency`: eager PyTorch next to ONNX
    Runtime at batch 1 and 8, timed round-robin in this process, and the ONNX check against eager) or
    ``deployment_error``.

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
    callbacks = list(callbacks)
    out = Path(out_dir)
    dinfo = setup_distributed(cfg.run.device)
    run: _Run | None = None
    try:
        try:
            run = _Run(cfg, out, callbacks, resume, dinfo)
            summary = run.run()
        except BaseException as exc:
            summary = run.summary if run is not None else {"status": "failed", "out_dir": str(out)}
            summary.update({"status": "failed", "error": f"{type(exc).__name__}: {error_message(exc)}"})
            # a refused --resume (nothing written yet) leaves the files of the run it would continue alone
            if dinfo.is_main and ((run is not None and run.wrote_outputs) or not resume):
                _end_run(out, summary, callbacks)
            raise
        if dinfo.is_main:
            _end_run(out, summary, callbacks)
            if not run.cfg.train.keep_last_checkpoint:
                _remove_resume_state(run.ckpt_dir / "last.pt")
        return summary
    finally:
        teardown_distributed(dinfo)


def _end_run(out: Path, summary: dict, callbacks: list[Callback]) -> None:
    """Rank 0: ``summary.json`` and the callbacks' ``on_train_end``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", json_safe(summary), indent=2)
    for cb in callbacks:
        cb.on_train_end(dict(summary))


def _remove_resume_state(last: Path) -> None:
    """The resume state (weights, EMA and the optimizer's two moments: four times best.pt) is dead weight once a
    run has ended; a grid of 16 runs would otherwise keep gigabytes of it."""
    if last.is_file():
        last.unlink()
        log.info("removed %s (train.keep_last_checkpoint=false); best.pt keeps the weights", last)
