"""What counts as a classification error, in one place: the prediction is the arg-max of the logits, and it is wrong
where it differs from the label.

:class:`lit_sharp.evaluation.ClassificationError` accumulates these mistakes over batches and devices (validation,
final errors, CIFAR-10-C); :func:`batch_error` is the error of one batch, for the training step's logged error and
the sharpness search. Imports torch only.
"""

from __future__ import annotations

import torch

__all__ = ["batch_error", "misclassified"]


def misclassified(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """bool ``(B,)``: where the arg-max of ``(B, classes)`` logits is not the label.

    ``targets`` are class indices ``(B,)`` or soft labels ``(B, classes)``, which count as their most likely class.
    Nothing is read back to the host.
    """
    labels = targets if targets.dim() == logits.dim() - 1 else targets.argmax(dim=-1)
    return logits.argmax(dim=-1) != labels


def batch_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 scalar on the logits' device: the fraction of :func:`misclassified` examples of one batch."""
    return misclassified(logits, targets).float().mean()
