"""What the analysis of a pretrained model zoo needs beyond a CIFAR-10 grid: its targets and its models' encodings.

The paper's Section 4 and Table 1 correlate sharpness with the error on ImageNet and five distribution shifts, and
App. B with the generalization gap ``imagenet/err - final/train_err``. A zoo record holds ``<set>/err`` for every
evaluation set that was given; each becomes a target ``<set>_err`` (named like ``c10c_err`` for ``c10c/err``), so an
absent set gives no column at all. Figures 2 and 3 encode each model's own hyperparameters: for AugReg colour =
dropout / stochastic depth, marker = weight decay, size = augmentation strength; for the CLIP fine-tunes colour =
fine-tuning learning rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from lit_sharp.analysis.records import IMAGENET_ERR, TRAIN_ERR, Record, metric

#: Target name of the generalization gap (App. B) in ``correlations.csv``.
GEN_GAP = "gen_gap"

#: The evaluation sets in the column order of the paper's Table 1, ImageNet-ReaL (beyond the paper) after them.
EVAL_SET_LABELS = {
    "imagenet": "IN",
    "imagenet_v2": "IN-v2",
    "imagenet_r": "IN-R",
    "imagenet_sketch": "IN-Sketch",
    "imagenet_a": "IN-A",
    "objectnet": "ObjectNet",
    "imagenet_real": "IN-ReaL",
}

#: The paper's augmentation groups, weakest first; AugReg's ``aug`` values are a group and a level (``medium1``).
AUG_STRENGTHS = ("none", "light", "medium", "strong")

#: Per zoo family, the hyperparameters that Figures 2 and 3 encode (also the W&B table's columns).
ENCODED_HPARAMS = {"augreg": ("do", "sd", "wd", "aug", "adapt_lr"), "clip": ("lr",), "other": ()}

_SET_ERR = re.compile(r"^(?P<set>[a-z0-9_]+)/err$")


def zoo_family(zoo: str) -> str:
    """``augreg`` for the AugReg zoos, ``clip`` for the CLIP fine-tunes, ``other`` for any other zoo (e.g. timm)."""
    if zoo.startswith("augreg"):
        return "augreg"
    return "clip" if zoo.startswith("clip") else "other"


def eval_sets_in(records: Iterable[Record]) -> list[str]:
    """The evaluation sets with a ``<set>/err`` metric in some record: Table 1's order, then others by name."""
    found = {match["set"] for record in records for key in record["metrics"] if (match := _SET_ERR.match(key))}
    known = [name for name in EVAL_SET_LABELS if name in found]
    return known + sorted(found - set(known))


def zoo_targets(records: Iterable[Record]) -> dict[str, str]:
    """Target name -> value key (for :func:`target_value`) of a zoo's table columns.

    ``<set>_err -> <set>/err`` for each set of :func:`eval_sets_in`, then ``gen_gap -> gen_gap`` when some record
    has both ``imagenet/err`` and ``final/train_err``.
    """
    records = list(records)
    targets = {f"{name}_err": f"{name}/err" for name in eval_sets_in(records)}
    if any(generalization_gap(record) is not None for record in records):
        targets[GEN_GAP] = GEN_GAP
    return targets


def target_label(target: str) -> str:
    """A target's column title, in the paper's words: ``imagenet_v2_err`` -> ``IN-v2``, ``gen_gap`` -> ``Gen. gap
    (IN)``."""
    if target == GEN_GAP:
        return "Gen. gap (IN)"
    name = target.removesuffix("_err")
    return EVAL_SET_LABELS.get(name, name)


def generalization_gap(record: Mapping[str, Any]) -> float | None:
    """App. B's generalization gap ``imagenet/err - final/train_err`` (test minus training error); None without
    either."""
    test_err, train_err = metric(record, IMAGENET_ERR), metric(record, TRAIN_ERR)
    if test_err is None or train_err is None:
        return None
    return test_err - train_err


def target_value(record: Mapping[str, Any], key: str) -> float | None:
    """The value of metric ``key`` in ``record``, or for ``gen_gap`` the :func:`generalization_gap`."""
    return generalization_gap(record) if key == GEN_GAP else metric(record, key)


def aug_strength(hparams: Mapping[str, Any]) -> int | None:
    """The rank of an AugReg model's augmentation group in :data:`AUG_STRENGTHS` (``none`` 0 ... ``strong`` 3).

    ``aug`` values are a group and a level (``light0``, ``medium1``, ``strong2``): the level is dropped.

    Returns:
        The rank, or None when ``aug`` is absent or names no known group.
    """
    aug = hparams.get("aug")
    if not isinstance(aug, str):
        return None
    group = aug.rstrip("0123456789")
    return AUG_STRENGTHS.index(group) if group in AUG_STRENGTHS else None
