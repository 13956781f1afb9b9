"""Classification error of a model over a DataLoader: torch only."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def classification_error(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of misclassified examples, with the model in evaluation mode (its training flag is restored).

    Args:
        model: maps inputs to logits.
        batches: ``(x, y)`` pairs with integer labels.

    Raises:
        ValueError: ``batches`` is empty.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            wrong += (model(x).argmax(dim=1) != y).sum()
            seen += len(y)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no examples to evaluate: the data loader is empty")
    return wrong.item() / seen
