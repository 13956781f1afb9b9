"""The quantity sharpness perturbs: the loss (and error) of one batch at the loaded weights, logits optionally
normalized."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lit_sharp.sharpness.spec import SharpnessSpec
from lit_sharp.sharpness.weights import FlatWeights
from lit_sharp.top1 import batch_error

_LOGIT_NORM_FLOOR = 1e-10

LossFn = Callable[[Tensor, Tensor], Tensor]


def normalize_logits(logits: Tensor) -> Tensor:
    """Logit normalization of the released code: ``z <- z - mean(z)``, then ``z / max(||z||_2, 1e-10)``.

    The paper's Eq. 5 divides by the standard deviation instead (a factor ``sqrt(K)`` apart); the radii of the
    paper were tuned for the L2 norm, so that is what is used.

    Args:
        logits: ``(batch, classes)``.

    Returns:
        The normalized logits, same shape.
    """
    centered = logits - logits.mean(dim=-1, keepdim=True)
    return centered / centered.norm(dim=-1, keepdim=True).clamp_min(_LOGIT_NORM_FLOOR)


class Objective:
    """Loss and error of one batch at the weights currently loaded, optionally with the flat gradient."""

    def __init__(
        self, model: nn.Module, weights: FlatWeights, x: Tensor, y: Tensor, spec: SharpnessSpec, loss_fn: LossFn
    ) -> None:
        self.model, self.weights, self.x, self.y = model, weights, x, y
        self.normalize = spec.normalize_logits
        self.loss_fn = loss_fn

    def loss_with_graph(self) -> Tensor:
        """The batch loss at the loaded weights, with its graph (for Hessian-vector products)."""
        return self._loss_and_logits()[0]

    def __call__(self, with_gradient: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        with torch.set_grad_enabled(with_gradient):
            loss, logits = self._loss_and_logits()
        gradient = self.weights.gradient(loss) if with_gradient else None
        return loss.detach(), batch_error(logits.detach(), self.y), gradient

    def _loss_and_logits(self) -> tuple[Tensor, Tensor]:
        logits = self.model(self.x)
        if self.normalize:
            logits = normalize_logits(logits)
        loss = self.loss_fn(logits, self.y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor (e.g. a mean over the batch)")
        return loss.reshape(()), logits
