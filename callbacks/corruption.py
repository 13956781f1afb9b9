"""CIFAR-10-C error of the trained model, computed once at the end of training."""

from __future__ import annotations

import os
from typing import Any
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lit_sharp.callbacks.metric_logging import log_final_metrics
from lit_sharp.corruptions import PROTOCOLS, check_cifar10c, corruption_error


class CorruptionError(Callback):
    r"""Measure the trained model's error on CIFAR-10-C (Hendrycks and Dietterich, ICLR 2019) when training ends.

    The number the paper ("A Modern Look at the Relationship between Sharpness and Generalization", Andriushchenko
    et al., ICML 2023) correlates with sharpness in Tables 3 and 4: with ``protocol="paper"``, the error over the
    first 1,000 severity-5 images of each of the 15 standard corruptions (the released code evaluates a shuffled
    10,000 of these 15,000 images: the same quantity with more noise); with ``protocol="full"``, every corruption
    and severity as well as their mean (:func:`lit_sharp.corruptions.corruption_error`).

    The folder is checked when fitting starts, so a missing or broken CIFAR-10-C fails before any training.
    The numbers are computed in ``on_train_end``, go to every logger and the W&B run summary, and stay in
    :attr:`results` for the training entry point to write into ``results.json``. Works with any LightningModule whose
    ``forward`` maps normalized CIFAR images to logits.

    Args:
        root: the data root that holds ``CIFAR-10-C/``.
        protocol: ``"paper"`` or ``"full"``.
        batch_size: images per forward pass.

    Raises:
        ValueError: if ``protocol`` is not ``"paper"`` or ``"full"``, or ``batch_size`` is not an integer >= 1.
        TypeError: if ``root`` is not a path.
        lit_sharp.corruptions.CorruptionDataError: at setup, if ``root/CIFAR-10-C`` is missing or malformed.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lit_sharp.callbacks.corruption import CorruptionError
        >>> corruption_error = CorruptionError("data", protocol="paper")
        >>> trainer = Trainer(callbacks=[corruption_error])
        >>> corruption_error.results
        {}

    Attributes:
        results: metric name -> error in [0, 1] (``c10c/err`` and, for ``"full"``, ``c10c/<corruption>/s<k>``);
            empty until training ends.
    """

    def __init__(self, root: str | os.PathLike[str], protocol: str = "paper", batch_size: int = 500) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path to the folder that holds CIFAR-10-C/, got {root!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.root = Path(root)
        self.protocol = protocol
        self.batch_size = batch_size
        self.results: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(root=str(self.root), protocol=self.protocol)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the CIFAR-10-C folder before fitting, so a bad path fails before the first step."""
        if stage == "fit":
            check_cifar10c(self.root)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the errors, keep them in :attr:`results` and log them."""
        self.measure(pl_module)
        log_final_metrics(trainer, self.results)

    def measure(self, model: torch.nn.Module, datamodule: Any = None, *, progress: bool = True) -> dict[str, float]:
        """Compute the CIFAR-10-C errors of ``model`` (outside a Trainer too); also kept in :attr:`results`.

        ``datamodule`` and ``progress`` are accepted for the common signature of the end-of-training measures.
        """
        self.results = corruption_error(model, self.root, protocol=self.protocol, batch_size=self.batch_size)
        rank_zero_info(f"CIFAR-10-C error ({self.protocol} protocol): {self.results['c10c/err']:.4f}")
        return self.results
