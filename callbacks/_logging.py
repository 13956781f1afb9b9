"""Logging of end-of-training numbers, shared by the callbacks.

``self.log`` is not allowed in ``on_train_end``/``on_fit_end``, so, as Lightning's ``LearningRateMonitor`` does,
the numbers go straight to every attached logger. W&B additionally gets them in the run summary, which is what
its cross-run scatter plots and tables read.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger


def log_final_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Send ``metrics`` to every logger of ``trainer`` and into the W&B run summary.

    Args:
        trainer: the trainer whose loggers receive the numbers.
        metrics: metric name -> value.
    """
    if not metrics:
        return
    values = {name: float(value) for name, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
        logger.save()
