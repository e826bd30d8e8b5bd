"""The training loop's concerns around the epochs, one hook each, as detectron2's hooks are.

:func:`dset.engine.loop.fit` assembles the list (:func:`default_hooks`) and the loop calls each hook, in list
order and on rank 0 only, before the first epoch, after every epoch, after the last one and when an exception
leaves the epoch loop. A hook reads the run it is called for (:class:`dset.engine.loop.TrainingRun`: its
configuration, run folder, data, summary) and writes its own files. What each file holds: docs/runs.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import metric_names as M
from .. import run_folder
from .callbacks import Callback
from .checkpoint import CheckpointWriteError, ResumeStateWriter, atomic_save, weights_checkpoint
from .coco_eval import ground_truth, top_per_image_and_class
from .records import append_metrics, epoch_line, start_metrics_file, write_json

__all__ = ["EpochEnd", "Hook", "MetricsFile", "BestCheckpoint", "ResumeState", "LogLines", "UserCallbacks",
           "default_hooks"]

log = logging.getLogger(__name__)


@dataclass
class EpochEnd:
    """What an epoch ended with (rank 0), handed to every hook's :meth:`Hook.after_epoch`."""

    epoch: int
    metrics: dict              # the epoch's record (metrics.jsonl's line)
    state: dict                # the resume state at the end of the epoch, copied to the CPU (last.pt's content)
    improved: bool             # a new best epoch (best.pt is written)
    detections: list           # the validation detections of an evaluated epoch
    is_last: bool              # the run's last configured epoch
    stop_reason: str | None = None   # set by a hook to stop the run after this epoch


class Hook:
    """One concern of the training loop; every method is optional. ``run`` is the loop's
    :class:`~dset.engine.loop.TrainingRun`."""

    def before_train(self, run) -> None:
        """Before the first epoch (of this attempt, when resumed)."""

    def after_epoch(self, run, end: EpochEnd) -> None:
        """After every epoch, once its metrics are known."""

    def after_train(self, run) -> None:
        """After the last epoch of a completed or stopped run, before its summary is made."""

    def on_failure(self, run, exc: BaseException) -> None:
        """When an exception (Ctrl-C, SIGTERM under ``python -m dset.train``, a crash) leaves the epoch loop."""


class MetricsFile(Hook):
    """``metrics.jsonl``: started empty (resumed: its lines up to the checkpoint's epoch, whose epoch times the
    run counts again), one line appended per epoch, the first thing an epoch writes."""

    def before_train(self, run) -> None:
        kept = start_metrics_file(run.folder.metrics, run.start_epoch)
        run.epoch_times = [r[M.EPOCH_TIME] for r in kept if r.get(M.EPOCH_TIME) is not None]

    def after_epoch(self, run, end: EpochEnd) -> None:
        append_metrics(run.folder.metrics, end.metrics)


class BestCheckpoint(Hook):
    """``checkpoints/best.pt`` (the EMA weights of the best epoch) and its validation detections
    (``eval/detections.json``, beside their ground truth ``eval/ground_truth.json``, written at the start)."""

    def before_train(self, run) -> None:
        truth = run.folder.path(run_folder.GROUND_TRUTH)
        truth.parent.mkdir(parents=True, exist_ok=True)
        write_json(truth, ground_truth(run.data.val_dataset.coco, run.data.val_image_ids))

    def after_epoch(self, run, end: EpochEnd) -> None:
        if not end.improved:
            return
        atomic_save(weights_checkpoint(end.state), run.folder.best_checkpoint)
        write_json(run.folder.path(run_folder.DETECTIONS),
                   {"epoch": end.epoch, "image_ids": list(run.data.val_image_ids),
                    "detections": top_per_image_and_class(end.detections, 100)})


class ResumeState(Hook):
    """``checkpoints/last.pt``, what ``--resume`` continues from. The newest epoch's state is kept in memory and
    written at most every ``train.checkpoint_every_minutes`` (counted from the start of training), at the end
    of the run when ``train.keep_last_checkpoint``, and when an exception leaves the epoch loop
    (:class:`~dset.engine.checkpoint.ResumeStateWriter`). It comes after :class:`BestCheckpoint` in the list:
    last.pt never holds an epoch whose best.pt is not written yet."""

    def __init__(self) -> None:
        self.writer: ResumeStateWriter | None = None

    def before_train(self, run) -> None:
        self.writer = ResumeStateWriter(run.folder.resume_state, run.cfg.train.checkpoint_every_minutes * 60,
                                        written_epoch=run.start_epoch - 1)

    def after_epoch(self, run, end: EpochEnd) -> None:
        self.writer.keep(end.state)
        # the last epoch's state is left to the end of the run, where keep_last_checkpoint decides
        if not end.is_last and self.writer.due():
            self.writer.write()

    def after_train(self, run) -> None:
        # without keep_last_checkpoint, fit() deletes last.pt (possibly left by an earlier interrupted attempt):
        # writing it now would be wasted time
        if run.cfg.train.keep_last_checkpoint:
            self.writer.write()

    def on_failure(self, run, exc: BaseException) -> None:
        """Keep the newest epoch for --resume; not after a failed checkpoint write: the disk is full, a second
        try would fail the same way."""
        if self.writer is None or isinstance(exc, CheckpointWriteError):
            return
        try:
            self.writer.write()
        except Exception as write_exc:  # noqa: BLE001 - the original exception is the one to report
            log.error("could not save the resume state after %s: %s", type(exc).__name__, write_exc)


class LogLines(Hook):
    """The run's log: a line saying what is trained, one line per epoch."""

    def before_train(self, run) -> None:
        cfg, data, world_size = run.cfg, run.data, run.dinfo.world_size
        log.info("training %s (budget %s): %d train / %d val images, %d classes, %d epochs x %d steps, "
                 "device %s%s", cfg.model.name, cfg.run.budget or "none", len(data.train), len(data.val),
                 data.num_classes, cfg.train.epochs, run.steps_per_epoch, run.device,
                 f", {world_size} processes" if world_size > 1 else "")

    def after_epoch(self, run, end: EpochEnd) -> None:
        log.info(epoch_line(end.epoch, run.cfg.train.epochs, end.metrics))


class UserCallbacks(Hook):
    """The caller's :class:`~dset.engine.callbacks.Callback` objects: ``on_train_start`` and ``on_epoch_end``
    (one returning True stops the run after the epoch); ``on_train_end`` is called by ``fit`` with the summary,
    failed runs included."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    def before_train(self, run) -> None:
        info = {"config": run.cfg, "out_dir": str(run.folder.root), "device": str(run.device),
                "world_size": run.dinfo.world_size, "num_train_images": len(run.data.train),
                "num_val_images": len(run.data.val), "num_classes": run.data.num_classes,
                "params": run.summary["metrics"][M.PARAMS], "param_groups": run.param_groups(),
                "start_epoch": run.start_epoch, "steps_per_epoch": run.steps_per_epoch}
        for cb in self.callbacks:
            cb.on_train_start(info)

    def after_epoch(self, run, end: EpochEnd) -> None:
        for cb in self.callbacks:
            if cb.on_epoch_end(end.epoch, dict(end.metrics)):
                end.stop_reason = "callback"


def default_hooks(callbacks: list[Callback]) -> list[Hook]:
    """The hooks of every run, in the order they are called: an epoch's metrics line first, best.pt before
    last.pt, the callbacks last (an interruption there finds the epoch saved)."""
    return [MetricsFile(), BestCheckpoint(), ResumeState(), LogLines(), UserCallbacks(callbacks)]
