"""Classification error, counted in one place: the validation curve, the final errors and CIFAR-10-C all use it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lit_sharp.constants import NUM_CLASSES
from lit_sharp.eval_mode import evaluation_mode


class ClassificationError(MulticlassAccuracy):
    """Top-1 error ``1 - accuracy`` = ``wrong / seen``, a torchmetrics metric (accumulates over batches and devices).

    torchmetrics' micro-averaged ``MulticlassAccuracy`` keeps integer counts (``tp``: right, ``fn``: wrong) and
    divides in float32. :meth:`compute` divides the same counts in float64 instead, so the error of ``n`` images is
    exactly the fraction ``wrong / n`` (what ``results.json`` records and the tests check), not ``1 - acc`` rounded
    to float32. Arguments are not validated on update: validation reads tensors back to the host, and a running
    metric must not synchronise on every batch.

    Args:
        num_classes: number of classes of the logits.

    Example::

        metric = ClassificationError()
        metric.update(model(x), y)
        metric.compute()  # tensor(0.25, dtype=torch.float64)
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(num_classes=num_classes, average="micro", validate_args=False)

    def compute(self) -> torch.Tensor:
        """``wrong / seen`` in float64 (NaN before any update)."""
        wrong, seen = self.counts_tensor()
        return wrong.double() / seen.double()

    def counts_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wrong, seen)`` as integer tensors on the metric's device (no host synchronisation)."""
        # micro top-1: every sample adds 1 to tp (right) or to fn (wrong)
        return self.fn.sum(), (self.tp + self.fn).sum()

    def counts(self) -> tuple[int, int]:
        """``(wrong, seen)`` as Python integers (one host synchronisation)."""
        wrong, seen = self.counts_tensor()
        return int(wrong), int(seen)


@torch.no_grad()
def classification_error(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of misclassified examples, with the model in evaluation mode (every module's training flag is restored).

    Args:
        model: maps inputs to logits.
        batches: ``(x, y)`` pairs with integer labels.

    Raises:
        ValueError: ``batches`` is empty.
    """
    device = next(model.parameters()).device
    metric = None
    with evaluation_mode(model):
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            if metric is None:
                metric = ClassificationError(logits.shape[-1]).to(device)
            metric.update(logits, y)
    if metric is None:
        raise ValueError("no examples to evaluate: the data loader is empty")
    wrong, seen = metric.counts()
    return wrong / seen
