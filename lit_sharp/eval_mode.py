"""Evaluation mode for the length of a ``with`` block, every module's own training flag restored afterwards.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluation_mode"]


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` and all its submodules in evaluation mode; afterwards give each back its own training flag.

    The flags come back even when the block raises. ``model.train(was_training)`` would not do: it sets every
    submodule to the flag of the top-level module, so a submodule the caller keeps in evaluation mode (a frozen
    BatchNorm inside a training model) would come back training.

    Example::

        with evaluation_mode(model), torch.no_grad():
            logits = model(x)
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
