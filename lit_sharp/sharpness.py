"""Adaptive sharpness of a trained network, as evaluated in "A Modern Look at the Relationship between Sharpness
and Generalization" (Andriushchenko et al., ICML 2023), following the authors' released evaluation code.

For a batch ``B`` with mean loss ``L_B``, trained weights ``w`` and scale ``c`` (``|w|`` for adaptive sharpness,
Kwon et al. 2021; ``1`` for standard sharpness):

- average case: ``E_xi[L_B(w + rho * c * xi) - L_B(w)]``, ``xi ~ N(0, I)`` (l2) or ``U(-1, 1)^p`` (linf);
- worst case: ``max_{||delta / c||_p <= rho} L_B(w + delta) - L_B(w)``, estimated with Auto-PGD in weight space
  (Croce and Hein 2020), 20 steps from ``delta = 0``, exactly as the released code does it (a spec name means that
  algorithm; ``method="steepest"`` is a stronger maximizer for adaptive l2, with its own name).

Sharpness is the mean of the per-batch values (m-sharpness with m the batch size). Pure torch: the Lightning
callback in ``callbacks/sharpness.py`` is a thin wrapper around :func:`sharpness`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_sharp.eval_mode import evaluation_mode
from lit_sharp.top1 import batch_error

__all__ = [
    "CURVATURE_KINDS",
    "KINDS",
    "NORMS",
    "PERTURBATION_KINDS",
    "PRESETS",
    "SharpnessResult",
    "SharpnessSpec",
    "apgd_checkpoints",
    "normalize_logits",
    "preset",
    "sharpness",
]

#: Kinds defined by a perturbation of norm ``norm`` and radius ``rho``.
PERTURBATION_KINDS = ("worst", "average")
#: Local curvature kinds (the rho -> 0 limits of the paper's Appendix A.1), without norm or radius: the trace
#: (Hutchinson) and the largest eigenvalue (Lanczos) of the Hessian ``H`` or of the rescaled ``diag(c) H diag(c)``.
CURVATURE_KINDS = ("hessian_trace", "hessian_max_eig")
KINDS = PERTURBATION_KINDS + CURVATURE_KINDS
NORMS = ("linf", "l2")
#: Maximizers of the worst case: ``"released"`` is the paper's algorithm (what a spec name means);
#: ``"steepest"`` steps along the steepest ascent of the ellipsoid's geometry (adaptive l2 only, where it differs).
METHODS = ("released", "steepest")
#: Draws per batch of the average case, as in the released CIFAR-10 script (``--n_iters=20``).
PAPER_N_SAMPLES = 20

#: Auto-PGD constants of the released code (Croce and Hein 2020): momentum coefficient, the fraction of
#: iterations between two checkpoints that must improve the best value to keep the step size, the factor
#: applied to the step size at a checkpoint, and the initial step size as a multiple of rho.
APGD_MOMENTUM = 0.75
APGD_MIN_UPDATE_RATIO = 0.75
APGD_STEP_DECAY = 0.5
APGD_INITIAL_STEP = 2.0

DEFAULT_SEED = 0
_LOGIT_NORM_FLOOR = 1e-10
_GRAD_NORM_EPS = 1e-12
#: Newton steps on the secular equation of the ellipsoid projection. Started at mu = 0 the iterates increase
#: monotonically to the root (1 / ||x(mu)|| is concave); the point an APGD step projects lies within 3 rho of the
#: center, and 30 steps reach the root to float precision on trained networks, with a final radial rescaling that
#: makes the result feasible whatever the count.
_ELLIPSOID_NEWTON_STEPS = 30

LossFn = Callable[[Tensor, Tensor], Tensor]

_CURVATURE_NAME_PATTERN = re.compile(
    r"^(?:sharpness/)?(?P<kind>hessian_trace|hessian_max_eig)_(?P<scale>adaptive|standard)(?P<ln>_ln)?$"
)
_NAME_PATTERN = re.compile(
    r"^(?:sharpness/)?(?P<kind>[a-z0-9]+)_(?P<norm>[a-z0-9]+)_(?P<scale>adaptive|standard)(?P<ln>_ln)?"
    r"_rho(?P<rho>.+?)(?:_(?P<method>steepest))?$"
)


@dataclass(frozen=True)
class SharpnessSpec:
    """One sharpness definition at one radius (docs/protocol.md section 3).

    Args:
        kind: ``"worst"`` (Auto-PGD maximum) or ``"average"`` (mean over random perturbations); or a curvature kind,
            ``"hessian_trace"`` (``tr(diag(c) H diag(c))`` by Hutchinson's estimator) or ``"hessian_max_eig"``
            (``lambda_max(diag(c) H diag(c))`` by Lanczos), ``H`` the Hessian of the batch loss at ``w``.
        norm: ``"linf"`` or ``"l2"``: the norm of ``delta / c`` bounded by ``rho`` (worst case), or the noise law
            (average case: uniform in the box for linf, Gaussian for l2). None (and only None) for curvature kinds.
        rho: the radius, > 0. None (and only None) for curvature kinds.
        adaptive: ``c = |w|`` (elementwise adaptive sharpness) if True, else ``c = 1``.
        normalize_logits: center each example's logits and divide them by their L2 norm before the loss.
        n_iters: Auto-PGD iterations per batch (worst case); Lanczos iterations per batch (``hessian_max_eig``).
        n_samples: perturbations drawn per batch (average case), 20 as in the released CIFAR-10 script; Rademacher
            vectors per batch (``hessian_trace``).
        method: the worst-case maximizer. ``"released"`` (default) is the paper's algorithm, the one a name without
            suffix means. ``"steepest"`` (worst-case adaptive l2 only, the one definition where the two differ)
            steps along the steepest ascent direction of the ellipsoid ``||delta / c||_2 <= rho`` and finds higher
            values: a stronger but different measure, not comparable with the paper's tables; its name ends in
            ``_steepest``.

    Raises:
        ValueError: a field outside its domain; the message names the field.
    """

    kind: str
    norm: str | None = None
    rho: float | None = None
    adaptive: bool = True
    normalize_logits: bool = False
    n_iters: int = 20
    n_samples: int = PAPER_N_SAMPLES
    method: str = "released"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SharpnessSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in CURVATURE_KINDS:
            if self.norm is not None or self.rho is not None:
                raise ValueError(
                    f"SharpnessSpec.norm and SharpnessSpec.rho must be None for the curvature kind {self.kind!r} "
                    f"(a local measure, without radius), got norm={self.norm!r}, rho={self.rho!r}"
                )
            self._check_flags_and_counts()
            return
        if self.norm not in NORMS:
            raise ValueError(f"SharpnessSpec.norm must be one of {NORMS}, got {self.norm!r}")
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)):
            raise ValueError(f"SharpnessSpec.rho must be a positive number, got {self.rho!r}")
        if not (math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"SharpnessSpec.rho must be a finite number > 0, got {self.rho!r}")
        object.__setattr__(self, "rho", float(self.rho))
        self._check_flags_and_counts()

    def _check_flags_and_counts(self) -> None:
        for flag in ("adaptive", "normalize_logits"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"SharpnessSpec.{flag} must be a bool, got {getattr(self, flag)!r}")
        for count in ("n_iters", "n_samples"):
            value = getattr(self, count)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SharpnessSpec.{count} must be an integer >= 1, got {value!r}")
        self._check_method()

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"SharpnessSpec.method must be one of {METHODS}, got {self.method!r}")
        if self.method == "steepest" and (self.kind, self.norm, self.adaptive) != ("worst", "l2", True):
            # Elsewhere the steepest ascent step is the released one: a second name would duplicate a measure.
            raise ValueError(
                "SharpnessSpec.method='steepest' only differs from the released algorithm for worst-case adaptive "
                f"l2 sharpness; got kind={self.kind!r}, norm={self.norm!r}, adaptive={self.adaptive}"
            )

    @property
    def name(self) -> str:
        """The metric name, e.g. ``worst_linf_adaptive_ln_rho0.002`` (docs/design.md); ``..._steepest`` for that method;
        ``<kind>_<adaptive|standard>[_ln]`` for curvature kinds, e.g. ``hessian_trace_adaptive_ln``."""
        scale = "adaptive" if self.adaptive else "standard"
        ln = "_ln" if self.normalize_logits else ""
        if self.kind in CURVATURE_KINDS:
            return f"{self.kind}_{scale}{ln}"
        suffix = "_steepest" if self.method == "steepest" else ""
        return f"{self.kind}_{self.norm}_{scale}{ln}_rho{self.rho:g}{suffix}"

    @classmethod
    def from_name(cls, name: str, *, n_iters: int = 20, n_samples: int = PAPER_N_SAMPLES) -> SharpnessSpec:
        """Parse a metric name back into a spec (the inverse of :attr:`name`).

        Args:
            name: e.g. ``"worst_linf_adaptive_ln_rho0.002"`` or ``"hessian_trace_adaptive"``; a leading
                ``"sharpness/"`` is accepted.
            n_iters: Auto-PGD (or Lanczos) iterations (not part of the name).
            n_samples: average-case draws or Hutchinson vectors (not part of the name); 20, as the paper's presets.

        Returns:
            The spec whose ``name`` is ``name`` (up to the formatting of rho).

        Raises:
            ValueError: ``name`` does not have the form
                ``<kind>_<norm>_<adaptive|standard>[_ln]_rho<rho>[_steepest]`` or
                ``<hessian_trace|hessian_max_eig>_<adaptive|standard>[_ln]``, or one of its fields is invalid.
        """
        curvature = _CURVATURE_NAME_PATTERN.match(name) if isinstance(name, str) else None
        if curvature is not None:
            return cls(
                kind=curvature["kind"],
                adaptive=curvature["scale"] == "adaptive",
                normalize_logits=curvature["ln"] is not None,
                n_iters=n_iters,
                n_samples=n_samples,
            )
        match = _NAME_PATTERN.match(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(
                f"cannot parse sharpness name {name!r}: expected "
                "'<kind>_<norm>_<adaptive|standard>[_ln]_rho<rho>[_steepest]', e.g. 'worst_linf_adaptive_ln_rho0.002'"
            )
        try:
            rho = float(match["rho"])
        except ValueError:
            raise ValueError(f"cannot parse the radius {match['rho']!r} of sharpness name {name!r}") from None
        return cls(
            kind=match["kind"],
            norm=match["norm"],
            rho=rho,
            adaptive=match["scale"] == "adaptive",
            normalize_logits=match["ln"] is not None,
            n_iters=n_iters,
            n_samples=n_samples,
            method=match["method"] or "released",
        )


@dataclass
class SharpnessResult:
    """What :func:`sharpness` returns.

    Attributes:
        value: sharpness, the mean of ``per_batch``.
        err_increase: mean over batches of the classification error (a fraction) at the chosen perturbation minus
            the error at ``w``; for the average case, the mean over draws.
        per_batch: the per-batch sharpness values.
        perturbations: worst case with ``return_perturbations=True``: one dict per batch, parameter name (as in
            ``named_parameters()``) -> the ``delta`` attaining that batch's value; otherwise None.
    """

    value: float
    err_increase: float
    per_batch: list[float]
    perturbations: list[dict[str, Tensor]] | None = None


# Radii of docs/protocol.md section 3 (Tables 3 and 4 of the paper), per (kind, norm, scale).
_PAPER_RADII: dict[str, dict[tuple[str, str, str], tuple[float, ...]]] = {
    "paper_resnet18": {
        ("average", "l2", "standard"): (0.05, 0.1, 0.2, 0.4),
        ("average", "l2", "adaptive"): (0.05, 0.1, 0.2, 0.4),
        ("average", "l2", "adaptive_ln"): (0.05, 0.1, 0.2, 0.4),
        ("average", "linf", "standard"): (0.1, 0.2, 0.4, 0.8),
        ("average", "linf", "adaptive"): (0.1, 0.2, 0.4, 0.8),
        ("average", "linf", "adaptive_ln"): (0.1, 0.2, 0.4, 0.8),
        ("worst", "l2", "standard"): (0.25, 0.5, 1.0, 2.0),
        ("worst", "l2", "adaptive"): (0.25, 0.5, 1.0, 2.0),
        ("worst", "l2", "adaptive_ln"): (0.25, 0.5, 1.0, 2.0),
        ("worst", "linf", "standard"): (0.0005, 0.001, 0.002, 0.004),
        ("worst", "linf", "adaptive"): (0.001, 0.002, 0.004, 0.008),
        ("worst", "linf", "adaptive_ln"): (0.001, 0.002, 0.004, 0.008),
    },
    "paper_simplevit": {
        ("average", "l2", "standard"): (0.005, 0.01, 0.02, 0.04),
        ("average", "l2", "adaptive"): (0.1, 0.2, 0.4, 0.8),
        ("average", "l2", "adaptive_ln"): (0.1, 0.2, 0.4, 0.8),
        ("average", "linf", "standard"): (0.01, 0.02, 0.04, 0.08),
        ("average", "linf", "adaptive"): (0.1, 0.2, 0.4, 0.8),
        ("average", "linf", "adaptive_ln"): (0.1, 0.2, 0.4, 0.8),
        ("worst", "l2", "standard"): (0.025, 0.05, 0.1, 0.2),
        ("worst", "l2", "adaptive"): (0.5, 1.0, 2.0, 4.0),
        ("worst", "l2", "adaptive_ln"): (0.25, 0.5, 1.0, 2.0),
        ("worst", "linf", "standard"): (0.00001, 0.00002, 0.00004, 0.00008),
        ("worst", "linf", "adaptive"): (0.0005, 0.001, 0.002, 0.004),
        ("worst", "linf", "adaptive_ln"): (0.0005, 0.001, 0.002, 0.004),
    },
}


def _specs_from_radii(radii: dict[tuple[str, str, str], tuple[float, ...]]) -> tuple[SharpnessSpec, ...]:
    return tuple(
        SharpnessSpec(kind, norm, rho, adaptive=scale != "standard", normalize_logits=scale == "adaptive_ln")
        for (kind, norm, scale), values in radii.items()
        for rho in values
    )


#: The 48 specs (12 definitions x 4 radii) the paper evaluated on CIFAR-10, per architecture; and the opt-in
#: ``curvature`` preset: trace and top eigenvalue of the Hessian, standard, adaptive and adaptive with LN.
PRESETS: dict[str, tuple[SharpnessSpec, ...]] = {
    **{name: _specs_from_radii(radii) for name, radii in _PAPER_RADII.items()},
    "curvature": tuple(
        SharpnessSpec(kind, adaptive=adaptive, normalize_logits=ln)
        for kind in CURVATURE_KINDS
        for adaptive, ln in ((False, False), (True, False), (True, True))
    ),
}


def preset(name: str, *, n_iters: int = 20, n_samples: int = PAPER_N_SAMPLES) -> list[SharpnessSpec]:
    """The specs of a named preset.

    Args:
        name: ``"paper_resnet18"``, ``"paper_simplevit"`` or ``"curvature"``.
        n_iters: Auto-PGD iterations of the worst-case specs (Lanczos iterations of ``hessian_max_eig``).
        n_samples: draws of the average-case specs (20 per batch, as the released CIFAR-10 script); Hutchinson
            vectors of ``hessian_trace``.

    Returns:
        For a paper preset, 48 specs: every definition of docs/protocol.md's radius table at its 4 radii. For
        ``curvature``, 6 specs: ``hessian_trace`` and ``hessian_max_eig``, each standard, adaptive, adaptive + LN.

    Raises:
        ValueError: an unknown preset; the message lists the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown sharpness preset {name!r}; known presets: {sorted(PRESETS)}")
    return [dataclasses.replace(spec, n_iters=n_iters, n_samples=n_samples) for spec in PRESETS[name]]


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

    Cost per batch: worst case ``n_iters + 1`` forward and ``n_iters`` backward passes; average case
    ``n_samples + 1`` forward passes; curvature one forward and one double backward, then ``n_samples``
    (trace) or ``n_iters`` (top eigenvalue) Hessian-vector products, each about twice a backward pass.

    Args:
        model: returns logits ``(batch, classes)`` from ``x``; float32 parameters on one device.
        batches: ``(x, y)`` pairs; moved to the model's device; floating ``x`` is cast to float32.
        spec: the definition and radius.
        loss_fn: ``loss_fn(logits, y) -> scalar``; defaults to the mean cross-entropy.
        generator: seed or generator of the average-case noise, Hutchinson's vectors or the Lanczos start (a
            generator on the model's device type); None uses seed 0, so a call is reproducible.
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
    with _evaluation_context(model) as weights:
        rng = _local_generator(generator, weights.device)
        c = _scale_vector(weights, spec, scale)
        values: list[Tensor] = []
        errors: list[Tensor] = []
        perturbations: list[dict[str, Tensor]] = []
        for index, batch in enumerate(batches):
            weights.load(weights.origin)  # the previous batch left its last iterate in the model
            objective = _Objective(model, weights, *_to_device(batch, index, weights.device), spec, loss_fn)
            if spec.kind == "worst":
                value, err, delta = _worst_case(objective, weights, spec, c)
                if return_perturbations:
                    perturbations.append(weights.as_dict(delta))
            elif spec.kind == "average":
                value, err = _average_case(objective, weights, spec, c, rng)
            else:
                value, err = _curvature(objective, weights, spec, c, rng), torch.full((), math.nan)
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


def _scale_vector(weights: _FlatWeights, spec: SharpnessSpec, scale: Mapping[str, Tensor] | None) -> Tensor | None:
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


class _FlatWeights:
    """The parameters of a model seen as one flat float32 vector (named_parameters order).

    Work vectors (perturbations, gradients) are flat so that each update is a single elementwise op; they are
    written into the parameters in place and the original values copied back at the end, which restores them
    bitwise without any state_dict copy.
    """

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters: there is nothing to perturb")
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        for name, param in named:
            if param.dtype != torch.float32:
                raise ValueError(
                    f"sharpness is evaluated in float32 but parameter {name!r} is {param.dtype}: "
                    "call model.float() first"
                )
        devices = {param.device for param in self.params}
        if len(devices) > 1:
            raise ValueError(
                f"model parameters are spread over {sorted(map(str, devices))}: move the model to one device"
            )
        self.device = self.params[0].device
        self.numels = [param.numel() for param in self.params]
        self.shapes = [param.shape for param in self.params]
        self.origin = torch.cat([param.detach().reshape(-1) for param in self.params])  # (n_weights,)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(flat.split(self.numels), self.shapes)]

    def as_dict(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.views(flat)))

    def load(self, flat: Tensor) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views(flat))

    def gradient(self, loss: Tensor) -> Tensor:
        # autograd.grad leaves every .grad untouched; parameters the loss does not reach get a zero gradient.
        grads = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
        return torch.cat([grad.reshape(-1) for grad in grads])


@contextmanager
def _evaluation_context(model: nn.Module) -> Iterator[_FlatWeights]:
    """Eval mode, float32 with gradients, private RNG; on exit, everything restored bitwise."""
    with ExitStack() as stack:
        # Entered first so that the saved copies below are ordinary tensors even for a caller in inference mode.
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        weights = _FlatWeights(model)
        stack.enter_context(torch.autocast(device_type=weights.device.type, enabled=False))
        stack.enter_context(_forked_rng(weights.device))
        stack.enter_context(evaluation_mode(model))
        requires_grad = [param.requires_grad for param in weights.params]
        buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
        try:
            for param in weights.params:
                param.requires_grad_(True)
            yield weights
        finally:
            weights.load(weights.origin)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for param, flag in zip(weights.params, requires_grad):
                param.requires_grad_(flag)


def _forked_rng(device: torch.device) -> AbstractContextManager[None]:
    # A model may draw random numbers even in eval mode; whatever it draws must not move the caller's RNG.
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=cuda_devices, device_type="cuda")


def _local_generator(generator: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        if generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model is on {device}: "
                f"pass a seed or a generator on {device.type}"
            )
        return generator
    if generator is not None and (isinstance(generator, bool) or not isinstance(generator, int)):
        raise ValueError(f"generator must be an int seed, a torch.Generator or None, got {generator!r}")
    return torch.Generator(device=device).manual_seed(DEFAULT_SEED if generator is None else generator)


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


class _Objective:
    """Loss and error of one batch at the weights currently loaded, optionally with the flat gradient."""

    def __init__(
        self, model: nn.Module, weights: _FlatWeights, x: Tensor, y: Tensor, spec: SharpnessSpec, loss_fn: LossFn
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


def _worst_case(
    objective: _Objective, weights: _FlatWeights, spec: SharpnessSpec, scale: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Auto-PGD on one batch; returns (value, error increase, delta), all on the device.

    Works in ``u = delta / c``, where the feasible set is the plain ball ``||u||_p <= rho``. Every decision is a
    tensor op (no host sync in the loop), and the loss of an iterate comes from the forward pass that also gives
    the gradient for the next step.
    """
    loss0, err0, gradient = objective(with_gradient=True)
    step_direction, project = _worst_case_geometry(spec, scale)
    u = torch.zeros_like(weights.origin)  # u_k
    u_before = u  # u_{k-1}: the released code's momentum term mixes in the iterate before last
    best_u, best_loss, best_err, best_gradient = u, loss0, err0, gradient
    schedule = _StepSizeSchedule(spec.rho, loss0, spec.n_iters)
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
    delta = best_u if scale is None else scale * best_u
    return best_loss - loss0, best_err - err0, delta


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
    return _unit, lambda u: _project_onto_ellipsoid(u, scale_squared, rho)


def _unit(vector: Tensor) -> Tensor:
    return vector / (vector.norm() + _GRAD_NORM_EPS)


def _rescale_onto_ball(u: Tensor, rho: float) -> Tensor:
    # Branch-free rescaling onto the ball: the factor is exactly 1 inside it.
    return u.mul_((rho / u.norm()).clamp(max=1.0))


def _project_onto_ellipsoid(u: Tensor, scale_squared: Tensor, rho: float) -> Tensor:
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


def _average_case(
    objective: _Objective,
    weights: _FlatWeights,
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


# ----------------------------------------------------------------------------------------------- curvature kinds


def _curvature(
    objective: _Objective,
    weights: _FlatWeights,
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


def _hessian_vector_product(objective: _Objective, weights: _FlatWeights) -> Callable[[Tensor], Tensor]:
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
