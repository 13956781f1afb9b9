"""Classification error, counted in one place: the validation curve, the final errors and CIFAR-10-C all use it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchmetrics import Metric

from lit_sharp.eval_mode import evaluation_mode
from lit_sharp.top1 import misclassified


class ClassificationError(Metric):
    """Top-1 error ``wrong / seen``, a torchmetrics metric (accumulates over batches and devices).

    A mistake is :func:`lit_sharp.top1.misclassified`: the arg-max of the logits differs from the label (soft labels
    count as their arg-max). The counts are integers, summed across processes; :meth:`compute` divides them in
    float64, so the error of ``n`` images is exactly the fraction ``wrong / n`` (what ``results.json`` records and the
    tests check). Arguments are not validated on update: validation reads tensors back to the host, and a running
    metric must not synchronise on every batch.

    Example::

        metric = ClassificationError()
        metric.update(model(x), y)
        metric.compute()  # tensor(0.25, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("wrong", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("seen", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count the mistakes of one batch of ``(B, classes)`` logits against ``(B,)`` or ``(B, classes)`` labels."""
        mistakes = misclassified(logits, targets)
        self.wrong += mistakes.sum()
        self.seen += mistakes.numel()

    def compute(self) -> torch.Tensor:
        """``wrong / seen`` in float64 (NaN before any update)."""
        wrong, seen = self.counts_tensor()
        return wrong.double() / seen.double()

    def counts_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(wrong, seen)`` as integer tensors on the metric's device (no host synchronisation)."""
        return self.wrong, self.seen

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
    metric = ClassificationError().to(device)
    with evaluation_mode(model):
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            metric.update(model(x), y)
    wrong, seen = metric.counts()
    if seen == 0:
        raise ValueError("no examples to evaluate: the data loader is empty")
    return wrong / seen
