"""Training progress for logs: one status line per epoch instead of Lightning's progress bar.

Lightning's bar, written to a file, leaves every redraw behind (about 87 kB per epoch of
Fashion-MNIST). :class:`EpochStatus` prints ``epoch 3/10: 469/469 (100%), 41 s, train/loss=...,
val/elbo=...`` once per epoch, and a line every ``interval`` seconds within a long epoch.
"""

from __future__ import annotations

from typing import Any, Optional, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vilab.inference.common.progress import STATUS_INTERVAL, StatusLine

__all__ = ["EpochStatus"]

# Epoch metrics worth a place on the line, in order.
_SHOWN = ("train/loss_epoch", "val/elbo", "val/iwae")


class EpochStatus(Callback):
    """Print one status line per training epoch (rank 0 only) to ``stream`` (default stderr)."""

    def __init__(self, interval: float = STATUS_INTERVAL, stream: Optional[TextIO] = None):
        self.interval, self.stream = interval, stream
        self.status: Optional[StatusLine] = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.num_training_batches
        self.status = StatusLine(
            total=int(total) if total != float("inf") else None,
            interval=self.interval,
            desc=f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
            stream=self.stream,
            enabled=trainer.is_global_zero,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.status is not None:
            self.status.update(1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation has run by now, so its metrics are among the callback metrics.
        if self.status is None:
            return
        metrics = trainer.callback_metrics
        self.status.set_postfix(
            **{name.replace("_epoch", ""): f"{float(metrics[name]):.4g}" for name in _SHOWN if name in metrics}
        )
        self.status.close()
        self.status = None
