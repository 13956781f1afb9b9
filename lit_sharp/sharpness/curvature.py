"""The curvature kinds on one batch: Hessian-vector products by double backward, Hutchinson's trace and the
Lanczos top eigenvalue of ``diag(c) H diag(c)``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from lit_sharp.sharpness.objective import Objective
from lit_sharp.sharpness.spec import SharpnessSpec
from lit_sharp.sharpness.weights import FlatWeights


def curvature_on_batch(
    objective: Objective,
    weights: FlatWeights,
    spec: SharpnessSpec,
    scale: Tensor | None,
    generator: torch.Generator,
) -> Tensor:
    """Hutchinson trace or Lanczos top eigenvalue of ``C H C`` (``C = diag(c)``, identity if ``scale`` is None)."""
    product = _hessian_vector_product(objective, weights)
    if scale is not None:
        unscaled = product
        product = lambda vector: scale * unscaled(scale * vector)  # noqa: E731
    size, device = weights.origin.numel(), weights.device
    if spec.kind == "hessian_trace":
        estimates = []
        for _ in range(spec.n_samples):
            z = torch.randint(0, 2, (size,), generator=generator, device=device).mul_(2).sub_(1).float()
            estimates.append(torch.dot(z, product(z)))
        return torch.stack(estimates).mean()
    start = torch.randn(size, generator=generator, device=device)
    return _lanczos_max_eigenvalue(product, start, spec.n_iters)


def _hessian_vector_product(objective: Objective, weights: FlatWeights) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` for the batch loss at the loaded weights: one forward pass and one graph-building backward
    pass, then a double backward pass per product through the retained graph."""
    with _twice_differentiable_attention():
        loss = objective.loss_with_graph()
        gradients = torch.autograd.grad(loss, weights.params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)  # fmt: skip
    # A gradient that does not depend on the weights (e.g. of a bias in a linear loss) has a zero Hessian row.
    live = [index for index, gradient in enumerate(gradients) if gradient.requires_grad]

    def product(vector: Tensor) -> Tensor:
        if not live:
            return torch.zeros_like(vector)
        views = weights.views(vector)
        with _twice_differentiable_attention():
            columns = torch.autograd.grad([gradients[i] for i in live], weights.params,
                                          grad_outputs=[views[i] for i in live], retain_graph=True,
                                          allow_unused=True, materialize_grads=True)  # fmt: skip
        return torch.cat([column.reshape(-1) for column in columns])

    return product


def _twice_differentiable_attention() -> AbstractContextManager[None]:
    # The fused attention kernels (flash, memory-efficient) have no double backward; the math kernel has.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _lanczos_max_eigenvalue(product: Callable[[Tensor], Tensor], start: Tensor, n_iters: int) -> Tensor:
    """Largest eigenvalue of the symmetric operator ``product`` after ``n_iters`` Lanczos iterations.

    Full reorthogonalization against the stored basis keeps the Ritz values free of the spurious copies that
    plain Lanczos produces in floating point; the basis costs ``n_iters`` vectors of the parameter count. The
    iteration stops early when the Krylov space is invariant (the Ritz values are then exact).
    """
    basis = [start / start.norm()]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for _ in range(min(n_iters, start.numel())):
        w = product(basis[-1])
        alphas.append(torch.dot(w, basis[-1]))
        stacked = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan's "twice is enough" for Gram-Schmidt)
            w = w - stacked.T @ (stacked @ w)
        beta = w.norm()
        if len(alphas) == n_iters or beta <= 1e-6 * alphas[0].abs().clamp_min(1e-30):
            break
        betas.append(beta)
        basis.append(w / beta)
    alpha = torch.stack(alphas).double()
    tridiagonal = torch.diag(alpha)
    if betas:
        off = torch.stack(betas[: len(alphas) - 1]).double()
        tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(tridiagonal)[-1].to(start.dtype)
