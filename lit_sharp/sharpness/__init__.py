"""Adaptive sharpness of a trained network, as evaluated in "A Modern Look at the Relationship between Sharpness
and Generalization" (Andriushchenko et al., ICML 2023), following the authors' released evaluation code.

For a batch ``B`` with mean loss ``L_B``, trained weights ``w`` and scale ``c`` (``|w|`` for adaptive sharpness,
Kwon et al. 2021; ``1`` for standard sharpness):

- average case: ``E_xi[L_B(w + rho * c * xi) - L_B(w)]``, ``xi ~ N(0, I)`` (l2) or ``U(-1, 1)^p`` (linf);
- worst case: ``max_{||delta / c||_p <= rho} L_B(w + delta) - L_B(w)``, estimated with Auto-PGD in weight space
  (Croce and Hein 2020), 20 steps from ``delta = 0``, exactly as the released code does it (a spec name means that
  algorithm; ``method="steepest"`` is a stronger maximizer for adaptive l2, and ``random_start=True`` the paper's
  ImageNet start drawn uniformly from the feasible set, each with its own name suffix).

Sharpness is the mean of the per-batch values (m-sharpness with m the batch size). Pure torch: the Lightning
callback in ``callbacks/sharpness.py`` is a thin wrapper around :func:`sharpness`.

Modules, each importing only those above it:

- :mod:`~lit_sharp.sharpness.spec`: :class:`SharpnessSpec`, its metric names, the presets, :class:`SharpnessResult`.
- :mod:`~lit_sharp.sharpness.weights`: the parameters as one flat vector, the evaluation context that leaves no
  trace (eval mode, float32, forked RNG, everything restored bitwise) and the local generator.
- :mod:`~lit_sharp.sharpness.objective`: the loss and error of one batch, logits optionally normalized.
- :mod:`~lit_sharp.sharpness.worst_case`: Auto-PGD in weight space, its step schedule and projections.
- :mod:`~lit_sharp.sharpness.average_case`: the mean over random perturbations.
- :mod:`~lit_sharp.sharpness.curvature`: Hessian-vector products, Hutchinson's trace, the Lanczos top eigenvalue.
- :mod:`~lit_sharp.sharpness.measure`: :func:`sharpness`, which checks its inputs and dispatches each batch.
"""

from lit_sharp.sharpness.measure import sharpness
from lit_sharp.sharpness.objective import LossFn, normalize_logits
from lit_sharp.sharpness.spec import (
    CURVATURE_KINDS,
    IMAGENET_HEADLINE,
    IMAGENET_N_SAMPLES,
    KINDS,
    METHODS,
    NORMS,
    PAPER_N_SAMPLES,
    PERTURBATION_KINDS,
    PRESETS,
    RANDOM_START_SUFFIX,
    SharpnessResult,
    SharpnessSpec,
    preset,
)
from lit_sharp.sharpness.weights import DEFAULT_SEED
from lit_sharp.sharpness.worst_case import (
    APGD_INITIAL_STEP,
    APGD_MIN_UPDATE_RATIO,
    APGD_MOMENTUM,
    APGD_STEP_DECAY,
    apgd_checkpoints,
    uniform_start,
)

__all__ = [
    "APGD_INITIAL_STEP",
    "APGD_MIN_UPDATE_RATIO",
    "APGD_MOMENTUM",
    "APGD_STEP_DECAY",
    "CURVATURE_KINDS",
    "DEFAULT_SEED",
    "IMAGENET_HEADLINE",
    "IMAGENET_N_SAMPLES",
    "KINDS",
    "METHODS",
    "NORMS",
    "PAPER_N_SAMPLES",
    "PERTURBATION_KINDS",
    "PRESETS",
    "RANDOM_START_SUFFIX",
    "LossFn",
    "SharpnessResult",
    "SharpnessSpec",
    "apgd_checkpoints",
    "normalize_logits",
    "preset",
    "sharpness",
    "uniform_start",
]
