"""A learning-rate schedule for Lightning training that survives a resume exactly."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["PlateauSchedule"]


class PlateauSchedule(Callback):
    r"""Multiply the learning rate by ``factor`` after ``patience`` epochs without a better
    ``monitor`` (higher is better), with PyTorch's ``ReduceLROnPlateau``.

    Lightning's own plateau stepping comes after the epoch's checkpoints are written, so a
    resumed run would miss the last decision. This callback decides at the end of the training
    epoch (after validation), before the checkpoint callbacks, and its state travels in the
    checkpoint.
    """

    def __init__(self, monitor: str, factor: float, patience: int):
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.scheduler: Optional[torch.optim.lr_scheduler.ReduceLROnPlateau] = None
        self._restored: Optional[dict] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # "abs" with threshold 0: any strictly better value counts. The default relative
        # threshold, on a bound near -226 nats, would take a value up to 0.02 *worse* than the
        # best for progress and never decay on a noisy plateau.
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            trainer.optimizers[0],
            mode="max",
            factor=self.factor,
            patience=self.patience,
            threshold=0.0,
            threshold_mode="abs",
        )
        if self._restored:
            self.scheduler.load_state_dict(self._restored)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if self.scheduler is not None and value is not None:
            self.scheduler.step(float(value))

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict
