"""What a sharpness measure is: :class:`SharpnessSpec` and its metric name, the paper's presets, the result."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from torch import Tensor

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
#: Draws per batch of the average case in the paper's ImageNet protocol (App. C).
IMAGENET_N_SAMPLES = 100
#: Name suffix of a worst-case spec searched from a uniform random start (``random_start=True``).
RANDOM_START_SUFFIX = "_random_start"

_CURVATURE_NAME_PATTERN = re.compile(
    r"^(?:sharpness/)?(?P<kind>hessian_trace|hessian_max_eig)_(?P<scale>adaptive|standard)(?P<ln>_ln)?$"
)
_NAME_PATTERN = re.compile(
    r"^(?:sharpness/)?(?P<kind>[a-z0-9]+)_(?P<norm>[a-z0-9]+)_(?P<scale>adaptive|standard)(?P<ln>_ln)?"
    r"_rho(?P<rho>.+?)(?:_(?P<method>steepest))?(?P<random_start>_random_start)?$"
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
        random_start: worst case only. False (default): Auto-PGD starts at ``delta = 0``, as the released CIFAR-10
            code does. True: it starts at a point drawn uniformly from the feasible set, as the paper's ImageNet
            evaluation (App. C): ``delta / c`` uniform in the box ``[-rho, rho]^p`` (linf) or in the ball
            ``||delta / c||_2 <= rho`` (l2; uniform in the ellipsoid in ``delta``), drawn from the call's local
            generator; the value is still the largest increase over the start, the iterates and ``delta = 0``. The
            name ends in ``_random_start``.

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
    random_start: bool = False

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
        self._check_random_start()

    def _check_random_start(self) -> None:
        if not isinstance(self.random_start, bool):
            raise ValueError(f"SharpnessSpec.random_start must be a bool, got {self.random_start!r}")
        if self.random_start and self.kind != "worst":
            raise ValueError(
                f"SharpnessSpec.random_start is the start of the worst-case search; kind={self.kind!r} has none"
            )

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
        """The metric name, e.g. ``worst_linf_adaptive_ln_rho0.002`` (docs/design.md); ``..._steepest`` for that method,
        then ``..._random_start`` for a random start; ``<kind>_<adaptive|standard>[_ln]`` for curvature kinds, e.g.
        ``hessian_trace_adaptive_ln``."""
        scale = "adaptive" if self.adaptive else "standard"
        ln = "_ln" if self.normalize_logits else ""
        if self.kind in CURVATURE_KINDS:
            return f"{self.kind}_{scale}{ln}"
        suffix = ("_steepest" if self.method == "steepest" else "") + (RANDOM_START_SUFFIX if self.random_start else "")
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
                ``<kind>_<norm>_<adaptive|standard>[_ln]_rho<rho>[_steepest][_random_start]`` or
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
            random_start=match["random_start"] is not None,
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


# Radii of docs/protocol.md section 3, per (kind, norm, scale): those of the paper's Tables 3 and 4 and those its
# released evaluation script runs. Where the two differ a definition holds both, so that the published tau and the
# released script's numbers can both be computed (one case: SimpleViT, worst-case adaptive l2 with logit
# normalisation, Table 4 0.25 to 2, the script 0.5 to 4).
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
        ("worst", "l2", "adaptive_ln"): (0.25, 0.5, 1.0, 2.0, 4.0),
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


#: Table 1's radii of the ImageNet zoos: worst case (every zoo), average case (AugReg ViTs, CLIP fine-tunes).
_IMAGENET_WORST_RADII = (0.001, 0.002, 0.004)
_IMAGENET_AVERAGE_RADII = {"imagenet_augreg": (0.05, 0.1, 0.2), "imagenet_clip": (0.001, 0.002, 0.004)}


def _imagenet_specs(average_radii: tuple[float, ...]) -> tuple[SharpnessSpec, ...]:
    """Table 1's protocol (App. C): worst-case and average-case linf adaptive, without and with logit normalization;
    the worst case from a uniform random start, the average case over 100 draws per batch."""
    worst = tuple(
        SharpnessSpec("worst", "linf", rho, normalize_logits=ln, random_start=True)
        for ln in (False, True)
        for rho in _IMAGENET_WORST_RADII
    )
    average = tuple(
        SharpnessSpec("average", "linf", rho, normalize_logits=ln, n_samples=IMAGENET_N_SAMPLES)
        for ln in (False, True)
        for rho in average_radii
    )
    return worst + average


#: The headline measure of the ImageNet zoos: worst-case linf adaptive sharpness at rho 0.002, random start.
IMAGENET_HEADLINE = SharpnessSpec("worst", "linf", 0.002, random_start=True)

#: The specs the paper evaluated on CIFAR-10, per architecture: 12 definitions at 4 radii each, 5 where the paper's
#: tables and the released script differ (48 for the ResNet-18, 49 for the SimpleViT); the 12 specs of
#: Table 1 per ImageNet zoo (``imagenet_augreg``: the AugReg ViTs, ``imagenet_clip``: the CLIP fine-tunes); the opt-in
#: ``curvature`` preset: trace and top eigenvalue of the Hessian, standard, adaptive and adaptive with LN.
PRESETS: dict[str, tuple[SharpnessSpec, ...]] = {
    **{name: _specs_from_radii(radii) for name, radii in _PAPER_RADII.items()},
    **{name: _imagenet_specs(radii) for name, radii in _IMAGENET_AVERAGE_RADII.items()},
    "curvature": tuple(
        SharpnessSpec(kind, adaptive=adaptive, normalize_logits=ln)
        for kind in CURVATURE_KINDS
        for adaptive, ln in ((False, False), (True, False), (True, True))
    ),
}


def preset(name: str, *, n_iters: int | None = None, n_samples: int | None = None) -> list[SharpnessSpec]:
    """The specs of a named preset.

    Args:
        name: ``"paper_resnet18"``, ``"paper_simplevit"``, ``"imagenet_augreg"``, ``"imagenet_clip"`` or
            ``"curvature"``.
        n_iters: Auto-PGD iterations of the worst-case specs (Lanczos iterations of ``hessian_max_eig``); None keeps
            the preset's 20.
        n_samples: draws of the average-case specs; Hutchinson vectors of ``hessian_trace``. None keeps the
            preset's own: 20 per batch as the released CIFAR-10 script, 100 in the ImageNet presets.

    Returns:
        For a paper preset, every definition of docs/protocol.md's radius table at its radii (48 specs for
        ``paper_resnet18``, 49 for ``paper_simplevit``). For an ImageNet preset, Table 1's 12 specs (docs/protocol.md,
        the ImageNet protocol). For ``curvature``, 6 specs: ``hessian_trace`` and ``hessian_max_eig``, each standard,
        adaptive, adaptive + LN.

    Raises:
        ValueError: an unknown preset; the message lists the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown sharpness preset {name!r}; known presets: {sorted(PRESETS)}")
    return [
        dataclasses.replace(
            spec,
            n_iters=spec.n_iters if n_iters is None else n_iters,
            n_samples=spec.n_samples if n_samples is None else n_samples,
        )
        for spec in PRESETS[name]
    ]
