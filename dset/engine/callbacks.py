"""What a caller can hook into a run (:class:`Callback`) and when a run stops early (:class:`EarlyStopping`)."""

from __future__ import annotations

import math

__all__ = ["Callback", "EarlyStopping"]


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
