"""Clean training error and test error at the end of training."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_sharp.callbacks.metric_logging import log_final_metrics
from lit_sharp.evaluation import classification_error


class FinalErrors(Callback):
    """Record ``final/train_err`` and ``final/test_err`` once training ends.

    The clean training error uses ``datamodule.clean_train_dataloader()`` (the first 10,000 training images, no
    augmentation) and the test error ``datamodule.test_dataloader()``, both in evaluation mode (BN running statistics),
    as in the paper (docs/protocol.md section 4). Values are fractions in [0, 1], logged to every logger and kept in
    ``self.results``.

    Example::

        trainer = Trainer(callbacks=[FinalErrors()])
        trainer.fit(module, datamodule=CIFAR10DataModule(...))
        trainer.callbacks[0].results["final/test_err"]

    Raises:
        ValueError: the trainer's datamodule has no ``clean_train_dataloader`` or ``test_dataloader``.
    """

    def __init__(self) -> None:
        self.results: dict[str, float] = {}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure both errors on the trained module and log them."""
        self.measure(pl_module, trainer.datamodule)
        log_final_metrics(trainer, self.results)

    def measure(self, model: torch.nn.Module, datamodule: Any, *, progress: bool = True) -> dict[str, float]:
        """Both errors of ``model`` on ``datamodule``'s clean training subset and test set (also kept in ``results``)."""
        for name in ("clean_train_dataloader", "test_dataloader"):
            if not callable(getattr(datamodule, name, None)):
                raise ValueError(f"FinalErrors needs a datamodule with `{name}()`; {type(datamodule).__name__} has none")
        self.results = {
            "final/train_err": classification_error(model, datamodule.clean_train_dataloader()),
            "final/test_err": classification_error(model, datamodule.test_dataloader()),
        }
        rank_zero_info(
            f"final errors: train {self.results['final/train_err']:.4f}, test {self.results['final/test_err']:.4f}"
        )
        return self.results
