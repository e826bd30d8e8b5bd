"""Training one run: ``fit(cfg, out_dir, callbacks=None, resume=False) -> summary``.

:class:`TrainingRun` is the loop itself: it builds the run (data, model, optimizer, schedule, EMA; resumed, the
state of ``checkpoints/last.pt``), trains and evaluates the epochs and makes the summary. The files of the run
folder (:mod:`dset.run_folder`) are written by the hooks of :mod:`dset.engine.hooks`, which ``fit`` assembles.
What a run does step by step, resume and DDP: docs/training.md; the files and their keys: docs/runs.md.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .. import metric_names as M
from ..config import Config, load_config, multi_scale_sizes, with_values
from ..data.loaders import DataBundle, build_datasets, build_train_loader, build_val_loader, set_loader_epoch
from ..data.preflight import check_configured_data, learning_risks, refuse_unusable
from ..models.criterion import build_criterion, total_loss
from ..run_folder import RunFolder
from .callbacks import Callback, EarlyStopping
from .checkpoint import CHECKPOINT_VERSION, atomic_write_text, cpu_copy, read_resume_state
from .coco_eval import evaluate_detections
from .distributed import (
    DistInfo,
    all_gather_object,
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
from .errors import error_message
from .hooks import EpochEnd, Hook, default_hooks
from .initial_weights import build_training_model
from .loss_check import LossCheck
from .memory import peak_gpu_memory_mb, peak_host_memory_mb, reset_peak_memory
from .optim import build_optimizer
from .records import evaluation_entries, json_safe, write_json
from .reported_checkpoint import eligible_epochs, reported_checkpoint_entries
from .rng import rng_state, seed_everything, set_rng_state
from .run_metrics import best_epoch_metrics, train_minutes
from .schedule import WarmupCosine, build_scheduler
from .step_settings import StepSettings

__all__ = ["fit", "TrainingRun"]

log = logging.getLogger(__name__)


def _heads_from_scratch(reports: list) -> str | None:
    """What the weight files' reports say of class heads re-initialised with no class carried over, or None."""
    for r in reports:
        if r.class_heads_reinitialised and not r.carried_classes:
            return f"{r.file_num_classes} classes in {r.source}, {r.model_num_classes} in the model"
    return None


# ------------------------------------------------------------------------------------------ the run
class TrainingRun:
    """One run of :func:`fit`. ``__init__`` builds all of it in memory: device, data, model, criterion,
    optimizer, schedule, EMA and, resumed, the state of ``checkpoints/last.pt``; nothing is written before
    :meth:`run`, so a refused ``--resume`` leaves the run's files alone. :meth:`run` trains the epochs, calling
    the ``hooks`` on rank 0, and returns the summary."""

    def __init__(self, cfg: Config, out_dir: Path, hooks: list[Hook], resume: bool, dinfo: DistInfo) -> None:
        self.folder = RunFolder(out_dir)
        self.hooks = hooks if dinfo.is_main else []   # only rank 0 writes files and calls the callbacks
        self.dinfo = dinfo
        self.summary: dict[str, Any] = {"status": "failed", "out_dir": str(out_dir)}
        self.wrote_outputs = False   # set by run(): fit() then records a failure in the run's files
        self.device = resolve_device(cfg.run.device, dinfo)
        _reset_process_state(cfg, self.device)
        # the data check first: unusable data is refused with its report, not a traceback from the matcher
        self.data_check = check_configured_data(cfg)
        refuse_unusable(self.data_check)
        # data first: it decides num_classes
        self.data = build_datasets(cfg)
        self.cfg = cfg = _num_classes_from_data(cfg, self.data, dinfo)
        self.train_loader = build_train_loader(self.data.train, cfg, dinfo.rank, dinfo.world_size,
                                               pin_memory=self.device.type == "cuda")
        self.val_loader = build_val_loader(self.data.val, cfg, dinfo.rank, dinfo.world_size)
        model, self.pretrained_names, self.load_reports = build_training_model(
            cfg, class_names=self.data.category_names, log_reports=dinfo.is_main)
        self.step_settings = StepSettings.of(cfg.train, self.device)
        model = self.step_settings.prepare_model(model.to(self.device))
        self.model_core, self.model = wrap_for_ddp(model, cfg, self.device, dinfo)
        self.criterion = build_criterion(cfg).to(self.device)
        self.optimizer = build_optimizer(self.model_core, cfg, self.pretrained_names)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = _build_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.ema = ModelEMA(self.model_core, cfg.train.ema_decay, cfg.train.ema_warmup_steps)
        self.step_settings.compile_model(self.model_core)
        self.scaler = self.step_settings.grad_scaler()
        self.loss_check = LossCheck(cfg.train.loss_check_every, dinfo)
        self.early = EarlyStopping(cfg.train.early_stop_patience)
        self.eligible_epochs = eligible_epochs(cfg)   # those that may be best or stop the run, as for every run
        if dinfo.world_size > 1:   # each rank draws its own augmentations / denoising noise (weights were broadcast)
            seed_everything(cfg.run.seed + dinfo.rank)
        last = (self._restore_last() if resume else None) or {}
        self.start_epoch = int(last.get("epoch", -1)) + 1
        self.global_step = int(last.get("global_step", 0))
        self.best_metrics: dict | None = last.get("best_metrics")
        self.last_metrics: dict = last.get("metrics") or {}   # the newest epoch's record
        self.epochs_done = self.start_epoch
        self.throughput = Throughput()   # of this attempt
        # time/epoch_s of every epoch of the run (earlier attempts' too: the MetricsFile hook reads them back)
        self.epoch_times: list[float] = []

    def _restore_last(self) -> dict | None:
        """``--resume``: load ``checkpoints/last.pt`` into the model, EMA, optimizer, scheduler, scaler, early
        stopping and this rank's random state; returns it (None when there is none: start at epoch 0)."""
        path = self.folder.resume_state
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
        """Write the configuration, train the epochs, fill in the summary and return it."""
        self.wrote_outputs = True
        if self.dinfo.is_main:
            self.folder.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder.config, self.cfg.to_yaml())
        self._describe_run()
        for hook in self.hooks:
            hook.before_train(self)
        t0 = time.time()
        status, stop_reason = "completed", None
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
            for hook in self.hooks:
                hook.on_failure(self, exc)
            raise
        for hook in self.hooks:
            hook.after_train(self)
        self._finish_summary(status, stop_reason, t0)
        return self.summary

    def _describe_run(self) -> None:
        """The summary's description of the run: what trains on what, and how it is selected and scored."""
        self.summary.update({
            "config_name": self.cfg.model.name,
            "world_size": self.dinfo.world_size,
            "device": str(self.device),
            "precision": self.step_settings.precision,
            "num_classes": self.data.num_classes,
            "num_train_images": len(self.data.train),
            "num_val_images": len(self.data.val),
            # the model is selected (best epoch, early stopping) on val among the eligible epochs and scored on
            # test when there is one; without one it is scored on the images that selected it
            "selection_split": "val",
            "score_split": "test" if self.data.test is not None else "val",
            "eligible_epochs": list(self.eligible_epochs),
            "metrics": {M.PARAMS: sum(p.numel() for p in self.model_core.parameters())},
            # why this budget may not learn these data (dset.data.preflight), said where a baseline does not learn
            "learning_risks": learning_risks(self.data_check, self.cfg.data.image_size, self.cfg.train.epochs,
                                             self.steps_per_epoch, _heads_from_scratch(self.load_reports)),
        })

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
            final_epoch = self.epochs_done - 1 if self.epochs_done else None
            entries = reported_checkpoint_entries(self.folder, self.cfg, self.device, self.data, self.ema.module,
                                                  final_epoch)
            metrics.update(entries.pop("metrics", {}))
            self.summary.update(entries)
        metrics[M.PEAK_HOST_MEMORY_MB] = peak_host_memory_mb()
        metrics[M.PEAK_GPU_MEMORY_MB] = peak_gpu_memory_mb(self.device)

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
            is_last = epoch == cfg.train.epochs - 1
            # the epoch's resume state, copied off the training state before anything that can raise: an
            # interruption in a hook (a callback included) saves this epoch
            end = EpochEnd(epoch, metrics, cpu_copy(self._training_state(epoch, metrics, rng_states)), improved,
                           detections, is_last)
            for hook in self.hooks:
                hook.after_epoch(self, end)
            stop_reason = end.stop_reason
            if stop_reason is None and evaluated and eligible and self.early.should_stop(epoch) and not is_last:
                stop_reason = f"early_stopping: no mAP improvement for {cfg.train.early_stop_patience} epochs"
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

    def param_groups(self) -> dict:
        """The optimizer's parameter groups: ``{name: {lr, weight_decay, params}}``."""
        return {g["name"]: {"lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                            "params": sum(p.numel() for p in g["params"])} for g in self.optimizer.param_groups}

    # ----- the training steps
    def train_one_epoch(self, epoch: int) -> dict:
        """One pass over the training loader; the epoch's means (:meth:`EpochStats.reduce`)."""
        self.model.train()
        self.criterion.train()
        stats = EpochStats()
        bar = self._progress_bar(epoch)
        try:
            sizes = self._multi_scale_sizes(epoch)
            for step, (images, targets) in enumerate(self.train_loader):
                checked = self.train_step(images, targets, stats, sizes,
                                          f"epoch {epoch}, step {step} (global step {self.global_step})")
                if bar is not None:
                    bar.update(1)
                    if checked is not None:   # the loss was read back (train.loss_check_every)
                        bar.set_postfix(loss=f"{checked:.3f}", avg=f"{stats.mean_loss():.3f}")
            self.loss_check.check()   # before the epoch's state can be saved
        finally:
            if bar is not None:
                bar.close()
        return stats.reduce(self.dinfo)

    def train_step(self, images: torch.Tensor, targets: list[dict], stats: EpochStats, sizes: list[int] | None,
                   where: str, part: Callable[[str], Any] = lambda name: nullcontext()) -> float | None:
        """One optimiser step on a batch from the loader; the newest loss when this step read it back to the host
        (every ``train.loss_check_every`` steps), else None. ``part(name)`` is a context around each part of the
        step (copy, forward, loss, backward, optimizer, stats): ``dset.bench train`` times them there."""
        cfg, core, settings = self.cfg, self.model_core, self.step_settings
        with part("copy"):
            images = images.to(self.device, non_blocking=True)
            if sizes:
                # RT-DETR's multi-scale training: the whole batch at one size drawn per step (nearest resize, as
                # the reference); boxes are normalised, so targets are unchanged
                size = random.choice(sizes)
                if tuple(images.shape[-2:]) != (size, size):
                    images = torch.nn.functional.interpolate(images, size=(size, size))
            images = settings.prepare_images(images)
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with part("forward"):
            with settings.autocast(self.device):
                outputs = self.model(images, targets)
        with part("loss"):
            loss_dict = self.criterion(outputs, targets)
            loss = total_loss(loss_dict)
            checked = self.loss_check.record(loss, loss_dict, where)
        with part("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
        with part("backward"):
            self.scaler.scale(loss).backward()
        with part("optimizer"):
            if cfg.train.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.ema.update(core)
            self.global_step += 1
        with part("stats"):
            stats.add(loss_dict, loss.detach(), images.shape[0], core.sparse_stats())
        return checked

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
    return with_values(cfg, {"model.num_classes": data.num_classes})


def _build_schedule(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> WarmupCosine:
    """Warm-up then cosine over the run's optimizer steps (warned about when the warm-up outlasts them)."""
    total_steps = max(1, cfg.train.epochs * steps_per_epoch)
    if cfg.train.warmup_steps >= total_steps:
        log.warning("train.warmup_steps (%d) >= the run's %d optimizer steps: the learning rate never "
                    "reaches its peak", cfg.train.warmup_steps, total_steps)
    return build_scheduler(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)


# ---------------------------------------------------------------------------------------------- fit
def fit(cfg: Config | str, out_dir: str | os.PathLike, callbacks: Callback | Sequence[Callback] | None = None,
        resume: bool = False) -> dict:
    """Train and evaluate one run into the run folder ``out_dir``; returns the ``summary.json`` content.

    ``callbacks`` (:class:`~dset.engine.callbacks.Callback`) see every epoch's ``metrics.jsonl`` record and the
    summary; ``resume`` continues from ``checkpoints/last.pt``. A failure (bad data, NaN loss, an interruption,
    ...) writes the newest epoch's resume state (unless it failed writing a checkpoint), writes ``summary.json``
    with status ``failed`` and ``error``, calls ``on_train_end`` and re-raises. The steps: docs/training.md; the
    records' and the summary's keys: docs/runs.md.
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
    run: TrainingRun | None = None
    try:
        try:
            run = TrainingRun(cfg, out, default_hooks(callbacks), resume, dinfo)
            summary = run.run()
        except BaseException as exc:
            summary = run.summary if run is not None else {"status": "failed", "out_dir": str(out)}
            summary.update({"status": "failed", "error": f"{type(exc).__name__}: {error_message(exc)}"})
            # a refused --resume (nothing written yet) leaves the files of the run it would continue alone
            if dinfo.is_main and ((run is not None and run.wrote_outputs) or not resume):
                _end_run(RunFolder(out), summary, callbacks)
            raise
        if dinfo.is_main:
            _end_run(run.folder, summary, callbacks)
            if not run.cfg.train.keep_last_checkpoint:
                _remove_resume_state(run.folder.resume_state)
        return summary
    finally:
        teardown_distributed(dinfo)


def _end_run(folder: RunFolder, summary: dict, callbacks: list[Callback]) -> None:
    """Rank 0: ``summary.json`` and the callbacks' ``on_train_end``."""
    folder.root.mkdir(parents=True, exist_ok=True)
    write_json(folder.summary, json_safe(summary), indent=2)
    for cb in callbacks:
        cb.on_train_end(dict(summary))


def _remove_resume_state(last: Path) -> None:
    """The resume state (weights, EMA and the optimizer's two moments: four times best.pt) is dead weight once a
    run has ended; a grid of 16 runs would otherwise keep gigabytes of it."""
    if last.is_file():
        last.unlink()
        log.info("removed %s (train.keep_last_checkpoint=false); best.pt keeps the weights", last)
