"""Sharpness measure names in the paper's terms: the headline measures, the table columns and the table order.

A measure is a metric name without the ``sharpness/`` prefix, as ``lit_sharp.sharpness.SharpnessSpec.name`` spells it,
e.g. ``worst_linf_adaptive_ln_rho0.002``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lit_sharp.analysis.records import ASAM_SUFFIX, Record

SHARPNESS_PREFIX = "sharpness/"

#: The measures of the paper's Figure 5, per architecture (docs/protocol.md section 5).
HEADLINE_MEASURES = {
    "resnet18": ("worst_linf_adaptive_ln_rho0.002", "worst_linf_adaptive_rho0.001"),
    "simplevit": ("worst_linf_adaptive_ln_rho0.002", "worst_linf_adaptive_rho0.0005"),
}

#: The measures of the paper's Figures 2 and 3, every zoo: worst-case linf adaptive at rho 0.002 from a random start
#: (the ImageNet presets' protocol), with and without logit normalisation (the headline is the one without).
ZOO_HEADLINE_MEASURES = ("worst_linf_adaptive_rho0.002_random_start", "worst_linf_adaptive_ln_rho0.002_random_start")


def headline_measures(model: str, *, zoo: bool = False) -> tuple[str, ...]:
    """The headline measures of a model key of :func:`lit_sharp.analysis.records.model_key` (ASAM runs: their
    architecture's; ``zoo``: the key names a zoo)."""
    if zoo:
        return ZOO_HEADLINE_MEASURES
    return HEADLINE_MEASURES.get(model.removesuffix(ASAM_SUFFIX), ())


_MEASURE_NAME = re.compile(
    r"^(?P<kind>worst|average)_(?P<norm>linf|l2)_(?P<scale>adaptive|standard)(?P<ln>_ln)?_rho(?P<rho>[0-9.eE+-]+?)"
    r"(?:_steepest)?(?:_random_start)?$"  # the search's own suffixes (lit_sharp.sharpness.SharpnessSpec.name)
)


@dataclass(frozen=True)
class MeasureParts:
    """A sharpness measure name (``lit_sharp.sharpness.SharpnessSpec.name``) split into the paper's table columns."""

    kind: str
    norm: str
    adaptive: bool
    logit_norm: bool
    rho: float

    @property
    def label(self) -> str:
        """The paper's wording, e.g. ``Adaptive worst-case ℓ∞``."""
        scale = "Adaptive" if self.adaptive else "Standard"
        kind = "worst-case" if self.kind == "worst" else "avg-case"
        return f"{scale} {kind} {'ℓ∞' if self.norm == 'linf' else 'ℓ2'}"


def parse_measure(name: str) -> MeasureParts | None:
    """Split a measure name such as ``worst_linf_adaptive_ln_rho0.002``; None when it is not in that form."""
    match = _MEASURE_NAME.match(name)
    if match is None:
        return None
    try:
        rho = float(match["rho"])
    except ValueError:
        return None
    return MeasureParts(match["kind"], match["norm"], match["scale"] == "adaptive", bool(match["ln"]), rho)


def measure_sort_key(name: str) -> tuple[Any, ...]:
    """The row order of the paper's Tables 3 and 4.

    l2 before linf; within a norm standard, adaptive, adaptive with LN; average before worst case; then rho.
    """
    parts = parse_measure(name)
    if parts is None:
        return (1, name)
    return (0, parts.norm != "l2", parts.logit_norm, parts.adaptive, parts.kind != "average", parts.rho, name)


def table1_sort_key(name: str) -> tuple[Any, ...]:
    """The row order of the paper's Table 1 (the zoos): worst case before average case, with logit normalisation
    before without, then rho."""
    parts = parse_measure(name)
    if parts is None:
        return (1, name)
    return (0, parts.kind != "worst", parts.norm != "linf", not parts.adaptive, not parts.logit_norm, parts.rho, name)


def measures_in(records: Iterable[Record], sort_key: Callable[[str], Any] = measure_sort_key) -> list[str]:
    """Every sharpness measure (metric name without ``sharpness/``) in ``records``, in the paper's table order
    (``sort_key``: :func:`measure_sort_key` for Tables 3 and 4, :func:`table1_sort_key` for Table 1)."""
    names = {
        key.removeprefix(SHARPNESS_PREFIX)
        for record in records
        for key in record["metrics"]
        if key.startswith(SHARPNESS_PREFIX)
    }
    return sorted(names, key=sort_key)
