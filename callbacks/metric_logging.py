"""Logging of the callbacks' numbers, shared by the callbacks.

``self.log`` is not allowed in ``on_train_end``/``on_fit_end``, so, as Lightning's ``LearningRateMonitor`` does,
the numbers go straight to every attached logger, at the trainer's global step. End-of-training numbers also go
into the W&B run summary, which is what its cross-run scatter plots and tables read.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], *, summary: bool = False) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at its global step.

    Args:
        trainer: the trainer whose loggers receive the numbers.
        metrics: metric name -> value.
        summary: also write them into the W&B run summary.
    """
    if not metrics:
        return
    values = {name: float(value) for name, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
        if summary and isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
        logger.save()


def log_final_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send end-of-training ``metrics`` to every logger of ``trainer`` and into the W&B run summary."""
    log_metrics(trainer, metrics, summary=True)
