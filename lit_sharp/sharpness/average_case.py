"""The average case on one batch: the mean loss increase over random perturbations ``rho * c * xi``."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_sharp.sharpness.objective import Objective
from lit_sharp.sharpness.spec import SharpnessSpec
from lit_sharp.sharpness.weights import FlatWeights


def average_case_on_batch(
    objective: Objective,
    weights: FlatWeights,
    spec: SharpnessSpec,
    scale: Tensor | None,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Mean loss and error increase over ``n_samples`` draws of ``delta = rho * c * xi`` on one batch."""
    with torch.no_grad():
        loss0, err0, _ = objective(with_gradient=False)
        radius = None if scale is None else spec.rho * scale
        noise = torch.empty_like(weights.origin)
        losses, errors = [], []
        for _ in range(spec.n_samples):
            if spec.norm == "l2":
                noise.normal_(generator=generator)
            else:
                noise.uniform_(-1.0, 1.0, generator=generator)
            if scale is None:
                weights.load(torch.add(weights.origin, noise, alpha=spec.rho))
            else:
                weights.load(torch.addcmul(weights.origin, noise, radius))
            loss, err, _ = objective(with_gradient=False)
            losses.append(loss)
            errors.append(err)
        return torch.stack(losses).mean() - loss0, torch.stack(errors).mean() - err0
