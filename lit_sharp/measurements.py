"""The measurements of a trained model: the configured callbacks that have a ``measure()`` method.

Final errors, sharpness and the CIFAR-10-C error are such callbacks. A run calls ``measure()`` after ``fit``, one
measurement at a time (so a crash is recorded against the measurement under way), and ``mode=eval`` calls it on a
checkpoint. A measurement on a schedule (``every_n_epochs``/``every_n_steps``) also joins the Trainer, for its curve
during training.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def is_measurement(callback: Callback) -> bool:
    """Whether the callback measures a model on demand (has a ``measure(model, datamodule, progress=...)``)."""
    return callable(getattr(callback, "measure", None))


def split_measures(named: dict[str, Callback]) -> tuple[dict[str, Callback], list[Callback]]:
    """Measurements, which the run calls after ``fit``, and the Trainer's callbacks.

    A measurement on a schedule also joins the Trainer's callbacks, for its curve during training, but leaves its
    final measurement to the run.
    """
    measures = {key: cb for key, cb in named.items() if is_measurement(cb)}
    in_trainer = [cb for key, cb in named.items() if key not in measures]
    for callback in measures.values():
        if getattr(callback, "every_n_epochs", None) or getattr(callback, "every_n_steps", None):
            callback.measure_at_end = False
            in_trainer.append(callback)
    return measures, in_trainer


def measured_at(callback: Callback, step: int) -> dict[str, float] | None:
    """The results of a scheduled measurement already taken of the final weights (at ``step``), if any."""
    history = getattr(callback, "history", None)
    if history and history[-1].get("step") == step and getattr(callback, "results", None):
        return dict(callback.results)
    return None


class MeasurementChecks(Callback):
    """Runs the measurements' ``setup`` checks at the start of fitting (a bad path fails before training), and counts
    the steps this process trained (none when the checkpoint says training had ended)."""

    def __init__(self, measures: list[Callback]) -> None:
        self.measures = measures
        self.steps_trained = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for measure in self.measures:
            measure.setup(trainer, pl_module, stage)

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps_trained += 1
