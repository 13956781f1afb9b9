"""A training progress bar that never reads a device value back to the host between logger flushes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

#: Step metrics the bar shows (logged by :class:`lit_sharp.module.ClassifierModule` with ``on_step=True``).
SHOWN = {"train/loss_step": "loss", "train/err_step": "err"}


class LoggedStepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn every ``trainer.log_every_n_steps`` steps, showing the last logged loss and error.

    A metric logged with ``prog_bar=True`` is turned into a Python number by Lightning after every batch
    (``.item()``: on a GPU, the host waits for the step to finish). Here the metrics are logged without
    ``prog_bar`` and the bar reads ``train/loss`` and ``train/err`` itself, only at the steps where Lightning flushes
    its loggers (``global_step % log_every_n_steps == 0``) and so synchronises anyway; between those steps it shows
    the values read last. The redraw itself (tqdm) is host work without a sync; it is done every
    ``log_every_n_steps`` batches and at the end of an epoch rather than every batch.

    Args:
        refresh_rate: batches between redraws; ``None`` follows ``trainer.log_every_n_steps`` (50 when that is 0).
        **kwargs: passed to ``TQDMProgressBar`` (``process_position``, ``leave``).
    """

    def __init__(self, refresh_rate: int | None = None, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate or 1, **kwargs)
        self._follow_logging = refresh_rate is None
        self._shown: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._follow_logging:
            self._refresh_rate = trainer.log_every_n_steps or 50

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            metrics = trainer.callback_metrics
            self._shown = {label: float(metrics[name]) for name, label in SHOWN.items() if name in metrics}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Lightning's standard items (the logger's version), then the loss and error read at the last flush."""
        return {**super().get_metrics(trainer, pl_module), **self._shown}
