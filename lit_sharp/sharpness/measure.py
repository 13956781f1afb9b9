"""The public entry :func:`sharpness`: checks the inputs, builds the flat ``c`` and dispatches each batch to the
worst case, the average case or the curvature kinds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_sharp.sharpness.average_case import average_case_on_batch
from lit_sharp.sharpness.curvature import curvature_on_batch
from lit_sharp.sharpness.objective import LossFn, Objective
from lit_sharp.sharpness.spec import SharpnessResult, SharpnessSpec
from lit_sharp.sharpness.weights import FlatWeights, evaluation_context, local_generator
from lit_sharp.sharpness.worst_case import worst_case_on_batch


def sharpness(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    spec: SharpnessSpec,
    *,
    loss_fn: LossFn | None = None,
    generator: int | torch.Generator | None = None,
    return_perturbations: bool = False,
    scale: Mapping[str, Tensor] | None = None,
) -> SharpnessResult:
    """Sharpness of ``model`` on ``batches`` as defined by ``spec`` (docs/protocol.md section 3).

    Every entry of ``model.named_parameters()`` is perturbed (buffers never are). The model runs in evaluation
    mode and float32 (autocast off), with gradients enabled even under ``torch.no_grad()`` or
    ``torch.inference_mode()``. Afterwards every parameter and buffer is bitwise as before, and so are the
    ``.grad`` fields, ``requires_grad`` and training flags and the global RNG.

    Worst case (``max_{||delta / c||_p <= rho} L_B(w + delta) - L_B(w)``): Auto-PGD in weight space as in the
    released code: start at ``delta = 0``; step ``eta * c * sign(g)`` (linf) or ``eta * c * g / ||g||_2`` (l2)
    with ``g`` the gradient at the current iterate; Euclidean projection ``P`` onto the feasible set (a clamp for
    linf, a rescaling onto the ball for standard l2, and for adaptive l2 the projection onto the ellipsoid
    ``||delta / c||_2 <= rho``: ``delta_i / (1 + mu / c_i^2)`` with the Lagrange multiplier ``mu`` the root of
    ``||delta(mu) / c||_2 = rho``, found by bisection in the released code and by Newton's method here);
    ``delta_{k+1} = 0.75 * P(delta_k + step) + 0.25 * delta_{k-1}``; initial ``eta = 2 rho``, halved at a
    checkpoint of :func:`apgd_checkpoints` when the best value improved in fewer than 75% of the iterations since
    the last one or neither ``eta`` nor the best value changed, the next gradient then being taken at the best
    point. The per-batch value is the largest increase seen over all iterates, ``delta = 0`` included.
    ``spec.random_start`` (the paper's ImageNet protocol) starts the search at a point drawn uniformly from the
    feasible set (``delta / c`` uniform in the box for linf, in the ball for l2) instead of ``delta = 0``, which
    still counts, so the value stays >= 0; one more forward pass per batch.
    ``spec.method == "steepest"`` (adaptive l2) steps along ``c^2 g / ||c g||_2`` instead, the steepest ascent
    direction of the ellipsoid's geometry, and rescales onto it: higher values than the paper's algorithm.

    Average case: ``mean_s L_B(w + rho * c * xi_s) - L_B(w)`` over ``spec.n_samples`` draws of ``xi``
    (``N(0, I)`` for l2, ``U(-1, 1)`` elementwise for linf) from a local generator.

    Curvature kinds (no perturbation): with ``H`` the Hessian of the batch loss at ``w`` and ``C = diag(c)``,
    ``hessian_trace`` is Hutchinson's estimate ``mean_s z_s^T C H C z_s`` over ``spec.n_samples`` Rademacher
    vectors (unbiased; variance per draw ``2 sum_{i != j} (CHC)_ij^2``), ``hessian_max_eig`` the largest Ritz value
    of ``spec.n_iters`` Lanczos iterations (full reorthogonalization) on ``C H C`` from a Gaussian start, i.e. the
    largest algebraic eigenvalue. Both use Hessian-vector products by double backward through one graph per batch,
    never a dense Hessian; for ``rho -> 0`` they are the limits ``2 / rho^2`` times average-case l2 sharpness and
    worst-case l2 sharpness of the paper's Appendix A.1. There is no perturbation, so ``err_increase`` is NaN.

    Cost per batch: worst case ``n_iters + 1`` forward (``n_iters + 2`` from a random start) and ``n_iters``
    backward passes; average case
    ``n_samples + 1`` forward passes; curvature one forward and one double backward, then ``n_samples``
    (trace) or ``n_iters`` (top eigenvalue) Hessian-vector products, each about twice a backward pass.

    Args:
        model: returns logits ``(batch, classes)`` from ``x``; float32 parameters on one device.
        batches: ``(x, y)`` pairs; moved to the model's device; floating ``x`` is cast to float32.
        spec: the definition and radius.
        loss_fn: ``loss_fn(logits, y) -> scalar``; defaults to the mean cross-entropy.
        generator: seed or generator of the average-case noise, the worst case's random start, Hutchinson's vectors
            or the Lanczos start (a generator on the model's device type); None uses seed 0, so a call is
            reproducible.
        return_perturbations: worst case only: also return, per batch, the ``delta`` attaining its value.
        scale: adaptive specs only: the scale ``c`` per parameter name (as in ``named_parameters()``, every
            parameter, same shapes), replacing ``|w|`` for models whose invariances call for another one, e.g.
            ``c_u = sqrt(|u| / |v|)``, ``c_v = sqrt(|v| / |u|)`` for a diagonal linear network ``beta = u * v``
            (the paper's Section 5.2).

    Returns:
        The value, error increase, per-batch values and optionally the perturbations.

    Raises:
        TypeError: ``spec`` is not a :class:`SharpnessSpec`.
        ValueError: the model has no parameters, parameters that are not float32 or on several devices; a batch is
            not an ``(x, y)`` pair; ``batches`` is empty; ``loss_fn`` does not return a scalar; ``generator`` is
            on another device type; ``scale`` with a standard spec, or not matching the parameters.
    """
    if not isinstance(spec, SharpnessSpec):
        raise TypeError(f"spec must be a SharpnessSpec, got {type(spec).__name__}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    with evaluation_context(model) as weights:
        rng = local_generator(generator, weights.device)
        c = _scale_vector(weights, spec, scale)
        values: list[Tensor] = []
        errors: list[Tensor] = []
        perturbations: list[dict[str, Tensor]] = []
        for index, batch in enumerate(batches):
            weights.load(weights.origin)  # the previous batch left its last iterate in the model
            objective = Objective(model, weights, *_to_device(batch, index, weights.device), spec, loss_fn)
            if spec.kind == "worst":
                value, err, delta = worst_case_on_batch(objective, weights, spec, c, rng)
                if return_perturbations:
                    perturbations.append(weights.as_dict(delta))
            elif spec.kind == "average":
                value, err = average_case_on_batch(objective, weights, spec, c, rng)
            else:
                value, err = curvature_on_batch(objective, weights, spec, c, rng), torch.full((), math.nan)
            values.append(value)
            errors.append(err)
    if not values:
        raise ValueError("batches is empty: sharpness needs at least one (x, y) batch")
    per_batch: list[float] = torch.stack(values).cpu().double().tolist()
    err_increase = float(torch.stack(errors).double().mean())
    return SharpnessResult(
        value=math.fsum(per_batch) / len(per_batch),
        err_increase=err_increase,
        per_batch=per_batch,
        perturbations=perturbations if (return_perturbations and spec.kind == "worst") else None,
    )


def _scale_vector(weights: FlatWeights, spec: SharpnessSpec, scale: Mapping[str, Tensor] | None) -> Tensor | None:
    """The flat ``c``: None for standard sharpness (``c = 1``), ``|w|`` or the caller's ``scale`` otherwise."""
    if scale is None:
        return weights.origin.abs() if spec.adaptive else None
    if not spec.adaptive:
        raise ValueError(f"scale is the c of adaptive sharpness, but spec {spec.name!r} is standard (c = 1)")
    if not isinstance(scale, Mapping) or set(scale) != set(weights.names):
        given = sorted(scale) if isinstance(scale, Mapping) else type(scale).__name__
        raise ValueError(f"scale must map every parameter name {weights.names} to a tensor, got {given}")
    chunks = []
    for name, shape in zip(weights.names, weights.shapes):
        value = scale[name]
        if not isinstance(value, Tensor) or value.shape != shape:
            raise ValueError(f"scale[{name!r}] must be a tensor of shape {tuple(shape)}, got {value!r:.80}")
        chunks.append(value.detach().to(weights.device, torch.float32).reshape(-1))
    return torch.cat(chunks)


def _to_device(batch: Any, index: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch {index} is not an (x, y) pair: got {type(batch).__name__}")
    x, y = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"batch {index} must hold two tensors (x, y), got ({type(x).__name__}, {type(y).__name__})")
    x = x.to(device, dtype=torch.float32 if x.is_floating_point() else None)
    y = y.to(device)
    # Tensors made under inference mode cannot be saved for backward: give autograd ordinary copies.
    return (x.clone() if x.is_inference() else x), (y.clone() if y.is_inference() else y)
