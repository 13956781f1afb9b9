"""The worst case on one batch: Auto-PGD in weight space as the released code runs it (step schedule, momentum,
restarts), with the projection onto the feasible set of each norm (the ellipsoid for adaptive l2), from ``delta = 0``
or from a uniform random point of the feasible set."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lit_sharp.sharpness.objective import Objective
from lit_sharp.sharpness.spec import SharpnessSpec
from lit_sharp.sharpness.weights import FlatWeights

#: Auto-PGD constants of the released code (Croce and Hein 2020): momentum coefficient, the fraction of
#: iterations between two checkpoints that must improve the best value to keep the step size, the factor
#: applied to the step size at a checkpoint, and the initial step size as a multiple of rho.
APGD_MOMENTUM = 0.75
APGD_MIN_UPDATE_RATIO = 0.75
APGD_STEP_DECAY = 0.5
APGD_INITIAL_STEP = 2.0

_GRAD_NORM_EPS = 1e-12
#: Newton steps on the secular equation of the ellipsoid projection. Started at mu = 0 the iterates increase
#: monotonically to the root (1 / ||x(mu)|| is concave); the point an APGD step projects lies within 3 rho of the
#: center, and 30 steps reach the root to float precision on trained networks, with a final radial rescaling that
#: makes the result feasible whatever the count.
_ELLIPSOID_NEWTON_STEPS = 30


def apgd_checkpoints(n_iters: int) -> tuple[int, ...]:
    """The 0-based iterations after which Auto-PGD may halve its step size (Croce and Hein 2020).

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; checkpoint ``ceil(p_j * n_iters)``.
    The float arithmetic is the released code's, so 20 iterations give ``(5, 9, 12, 15, 16, 18, 19)``.

    Args:
        n_iters: the number of iterations, >= 1.

    Returns:
        The checkpoints below ``n_iters``, increasing.
    """
    fractions = [0.0, 0.22]
    marks = [0, math.ceil(n_iters * 0.22)]
    while marks[-1] < n_iters and marks[-1] != marks[-2]:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
        marks.append(math.ceil(fractions[-1] * n_iters))
    return tuple(sorted({mark for mark in marks[1:] if mark < n_iters}))


def worst_case_on_batch(
    objective: Objective,
    weights: FlatWeights,
    spec: SharpnessSpec,
    scale: Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Auto-PGD on one batch; returns (value, error increase, delta), all on the device.

    Works in ``u = delta / c``, where the feasible set is the plain ball ``||u||_p <= rho``. Every decision is a
    tensor op (no host sync in the loop), and the loss of an iterate comes from the forward pass that also gives
    the gradient for the next step. With ``spec.random_start`` the search starts at :func:`uniform_start` (drawn
    from ``generator``) as Auto-PGD starts from any point; ``delta = 0`` then still competes for the best value.
    """
    loss0, err0, gradient = objective(with_gradient=not spec.random_start)
    u = torch.zeros_like(weights.origin)  # u_k
    start_loss, start_err = loss0, err0
    if spec.random_start:
        if generator is None:
            raise ValueError(f"spec {spec.name!r} starts at a random point: pass the local generator")
        u = uniform_start(spec, scale, weights.origin, generator)
        weights.load(_displace(weights.origin, scale, u))
        start_loss, start_err, gradient = objective(with_gradient=True)
    step_direction, project = _worst_case_geometry(spec, scale)
    u_before = u  # u_{k-1}: the released code's momentum term mixes in the iterate before last
    best_u, best_loss, best_err, best_gradient = u, start_loss, start_err, gradient
    schedule = _StepSizeSchedule(spec.rho, start_loss, spec.n_iters)
    for k in range(1, spec.n_iters + 1):
        ascent = torch.addcmul(u, step_direction(gradient), schedule.step)
        u_before, u = u, torch.add(project(ascent).mul_(APGD_MOMENTUM), u_before, alpha=1 - APGD_MOMENTUM)
        weights.load(_displace(weights.origin, scale, u))
        is_last = k == spec.n_iters
        loss, err, gradient = objective(with_gradient=not is_last)
        improved = loss > best_loss
        best_loss = torch.where(improved, loss, best_loss)
        best_err = torch.where(improved, err, best_err)
        best_u = torch.where(improved, u, best_u)
        if is_last:
            break
        best_gradient = torch.where(improved, gradient, best_gradient)
        restart = schedule.update(k - 1, improved, best_loss)  # the released code's 0-based iteration index
        if restart is not None:
            # As in the released code, a restart takes the next gradient at the best point while the iterate and
            # its momentum carry on.
            gradient = torch.where(restart, best_gradient, gradient)
    if spec.random_start:
        # delta = 0 is feasible: a search that never beat its origin reports 0, as the zero start does.
        gained = best_loss > loss0
        best_loss = torch.where(gained, best_loss, loss0)
        best_err = torch.where(gained, best_err, err0)
        best_u = torch.where(gained, best_u, 0.0)
    delta = best_u if scale is None else scale * best_u
    return best_loss - loss0, best_err - err0, delta


def uniform_start(spec: SharpnessSpec, scale: Tensor | None, like: Tensor, generator: torch.Generator) -> Tensor:
    """A point ``u = delta / c`` drawn uniformly from the feasible set, the random start of Auto-PGD (paper, App. C).

    linf: ``u ~ U(-rho, rho)`` per coordinate, so ``delta`` is uniform in the box ``[-rho c, rho c]``. l2: ``u``
    uniform in the ball ``||u||_2 <= rho`` of the ``m`` coordinates that can move (``c > 0``; all for standard
    sharpness), the others 0: a Gaussian direction times the radius ``rho * U^(1/m)``. ``delta = c * u`` is then
    uniform in the ellipsoid ``||delta / c||_2 <= rho``, since a linear map keeps a uniform law uniform. In high
    dimension nearly all of that volume lies near the boundary.

    Args:
        spec: the worst-case spec (its norm and radius).
        scale: the flat ``c`` (None for ``c = 1``).
        like: a flat tensor giving the size, dtype and device.
        generator: the local generator the draw comes from.
    """
    rho = spec.rho
    if spec.norm == "linf":
        return torch.empty_like(like).uniform_(-rho, rho, generator=generator)
    direction = torch.empty_like(like).normal_(generator=generator)
    dimension = torch.tensor(like.numel(), dtype=like.dtype, device=like.device)
    if scale is not None:
        movable = scale > 0
        direction = torch.where(movable, direction, 0.0)
        dimension = movable.sum().to(like.dtype)
    radius = rho * torch.rand((), generator=generator, dtype=like.dtype, device=like.device).pow(1.0 / dimension)
    return direction.mul_(radius / (direction.norm() + _GRAD_NORM_EPS))


class _StepSizeSchedule:
    """Auto-PGD's step size (Croce and Hein 2020): ``2 rho``, halved at a checkpoint if the search stalled.

    It stalled if (1) the best value improved in fewer than 75% of the iterations since the last checkpoint, or
    (2) neither the step size nor the best value changed since then. The state stays on the device, so that no
    decision needs a host sync.
    """

    def __init__(self, rho: float, initial_loss: Tensor, n_iters: int) -> None:
        self.checkpoints = apgd_checkpoints(n_iters)
        self.step = torch.full((), APGD_INITIAL_STEP * rho, device=initial_loss.device)
        self._step_then, self._best_then, self._iteration_then = self.step, initial_loss, 0
        self._improvements = torch.zeros((), dtype=torch.long, device=initial_loss.device)

    def update(self, iteration: int, improved: Tensor, best_loss: Tensor) -> Tensor | None:
        """Count an improvement at ``iteration``; at a checkpoint, return whether to restart from the best point."""
        self._improvements = self._improvements + improved
        if iteration not in self.checkpoints:
            return None
        stalled = self._improvements < APGD_MIN_UPDATE_RATIO * (iteration - self._iteration_then)
        unchanged = (self._step_then == self.step) & (self._best_then == best_loss)
        restart = stalled | unchanged
        self._step_then, self._best_then, self._iteration_then = self.step, best_loss, iteration
        self._improvements = torch.zeros_like(self._improvements)
        self.step = torch.where(restart, self.step * APGD_STEP_DECAY, self.step)
        return restart


def _worst_case_geometry(
    spec: SharpnessSpec, scale: Tensor | None
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """The ascent direction (from the weight gradient ``g``) and the projection, both in ``u = delta / c``.

    In these coordinates a step ``s`` in ``delta`` is ``s / c``, and the Euclidean projection of ``delta`` onto
    the ellipsoid ``||delta / c||_2 <= rho`` maps ``u`` to ``u * c^2 / (c^2 + mu)``.
    """
    rho = spec.rho
    if spec.norm == "linf":
        # Released step c * sign(g) is sign(g) in u (where c = 0 the coordinate cannot move anyway).
        return torch.sign, lambda u: u.clamp_(-rho, rho)
    if scale is None:
        return _unit, lambda u: _rescale_onto_ball(u, rho)
    if spec.method == "steepest":
        return lambda gradient: _unit(gradient * scale), lambda u: _rescale_onto_ball(u, rho)
    scale_squared = scale * scale
    # Released step c * g / ||g||_2 in delta is g / ||g||_2 in u.
    return _unit, lambda u: project_onto_ellipsoid(u, scale_squared, rho)


def _unit(vector: Tensor) -> Tensor:
    return vector / (vector.norm() + _GRAD_NORM_EPS)


def _rescale_onto_ball(u: Tensor, rho: float) -> Tensor:
    # Branch-free rescaling onto the ball: the factor is exactly 1 inside it.
    return u.mul_((rho / u.norm()).clamp(max=1.0))


def project_onto_ellipsoid(u: Tensor, scale_squared: Tensor, rho: float) -> Tensor:
    """Euclidean projection of ``delta = c * u`` onto ``||delta / c||_2 <= rho``, returned in ``u`` coordinates.

    KKT: ``delta* = delta / (1 + mu / c^2)``, i.e. ``u* = u * c^2 / (c^2 + mu)``, with ``mu = 0`` inside and
    otherwise the root of ``||u*(mu)||_2 = rho``. Newton's method on ``1 / ||u*(mu)|| = 1 / rho`` (the trust-region
    secular equation, concave in ``mu``) from ``mu = 0`` increases monotonically to that root without a branch
    or a host sync; the released code bisects on ``mu`` until ``| ||u*|| - rho | < 1e-5``. Coordinates with
    ``c = 0`` cannot move and are set to 0.
    """
    movable = scale_squared > 0
    mu = torch.zeros((), dtype=u.dtype, device=u.device)
    for _ in range(_ELLIPSOID_NEWTON_STEPS):
        denominator = scale_squared + mu
        shrunk = torch.where(movable, u * scale_squared / denominator, 0.0)
        norm = shrunk.norm()
        slope = torch.where(movable, shrunk.square() / denominator, 0.0).sum()  # -d||u*||^2 / dmu / 2
        step = norm.square() * (norm - rho) / (rho * slope)
        mu = torch.where(slope > 0, mu + step, mu).clamp_min(0.0)
    shrunk = torch.where(movable, u * scale_squared / (scale_squared + mu), 0.0)
    return _rescale_onto_ball(shrunk, rho)


def _displace(origin: Tensor, scale: Tensor | None, u: Tensor) -> Tensor:
    return origin + u if scale is None else torch.addcmul(origin, scale, u)
