"""Run records of a grid: reading every ``results.json``, checking what the analysis needs, filtering and grouping.

Two kinds of record share the ``results.json`` contract: CIFAR-10 runs (``hparams`` with ``lr, sam_rho, mixup_alpha,
augment``) and measurements of pretrained models of a zoo (``hparams.zoo`` names the zoo, the rest of ``hparams`` is
the model's own training hyperparameters). Each kind has its own filter: CIFAR-10 runs must fit their training set
(``final/train_err <= 1%``, the paper's rule); ImageNet models never do, so a zoo model is dropped only when it
failed outright (``imagenet/err`` above ``max_test_err``, as the paper drops two ImageNet-21k AugReg models at about
100% test error).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lit_sharp.results import ResultsError, find_results, read_results, subgroup_of

#: Appended to the architecture of ASAM runs (:func:`model_key`).
ASAM_SUFFIX = "_asam"

Record = dict[str, Any]

TRAIN_ERR = "final/train_err"
TEST_ERR = "final/test_err"
C10C_ERR = "c10c/err"
DEFAULT_MAX_TRAIN_ERR = 0.01
#: Names the zoo of a pretrained model's record (:func:`is_zoo_record`).
ZOO_KEY = "zoo"
IMAGENET_ERR = "imagenet/err"
#: A zoo model with a higher ImageNet error is a failed model (1000 classes: chance is 0.999), not a data point.
DEFAULT_MAX_TEST_ERR = 0.9

#: The ``augment x mixup`` subgroups in table and legend order; names from :func:`lit_sharp.results.subgroup_of`.
SUBGROUP_ORDER = tuple(
    subgroup_of({"augment": augment, "mixup_alpha": mixup_alpha})
    for augment in (False, True)
    for mixup_alpha in (0.0, 1.0)
)

_NUMBER_HPARAMS = ("lr", "sam_rho", "mixup_alpha")


def load_runs(root: Path | str) -> tuple[list[Record], list[tuple[Path, str]]]:
    """Read every ``results.json`` below ``root``.

    Args:
        root: the folder of a grid (or of several); searched recursively, W&B folders excepted.

    Returns:
        ``(records, skipped)``: the readable records of any status, in path order, and ``(path, why)`` for every
        file that could not be read or whose completed run lacks what the analysis needs.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the folder holding a grid's run folders")
    records: list[Record] = []
    skipped: list[tuple[Path, str]] = []
    for path in find_results(root):
        try:
            record = read_results(path)
            if record["run"]["status"] == "completed":
                _check_completed(path, record)
        except ResultsError as exc:
            skipped.append((exc.path, exc.why))
        except OSError as exc:
            skipped.append((path, f"cannot be read ({exc.strerror or exc})"))
        else:
            records.append(record)
    return records, skipped


def _check_completed(path: Path, record: Record) -> None:
    # read_results checks the sections; the analysis also needs usable hyperparameters and numeric metrics.
    hparams = record["hparams"]
    if not isinstance(hparams.get("model"), str):
        raise ResultsError(path, f"hparams.model is {hparams.get('model')!r}, expected a model name")
    if ZOO_KEY in hparams:
        if not isinstance(hparams[ZOO_KEY], str) or not hparams[ZOO_KEY]:
            raise ResultsError(path, f"hparams.{ZOO_KEY} is {hparams[ZOO_KEY]!r}, expected a zoo name")
    else:
        _check_cifar_hparams(path, hparams)
    for key, value in record["metrics"].items():
        if value is not None and not _is_number(value):
            raise ResultsError(path, f"metrics[{key!r}] is {value!r}, expected a number or null")


def _check_cifar_hparams(path: Path, hparams: Mapping[str, Any]) -> None:
    for key in _NUMBER_HPARAMS:
        if not _is_number(hparams.get(key)):
            raise ResultsError(path, f"hparams.{key} is {hparams.get(key)!r}, expected a number")
    if not isinstance(hparams.get("augment"), bool):
        raise ResultsError(path, f"hparams.augment is {hparams.get('augment')!r}, expected true or false")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric(record: Mapping[str, Any], key: str) -> float | None:
    """The finite value of metric ``key`` in ``record``, or None when it is absent or was not finite."""
    value = record["metrics"].get(key)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def completed(records: Iterable[Record]) -> list[Record]:
    """The records whose run status is ``completed``."""
    return [record for record in records if record["run"]["status"] == "completed"]


def is_zoo_record(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` measured a pretrained model of a zoo (its ``hparams`` name the zoo) rather than a CIFAR-10
    run."""
    return ZOO_KEY in record["hparams"]


def by_model(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Group records by :func:`model_key` (architecture, ASAM apart; or zoo), keys in sorted order."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[model_key(record["hparams"])].append(record)
    return dict(sorted(groups.items()))


def model_key(hparams: Mapping[str, Any]) -> str:
    """The architecture, with ``_asam`` for ASAM runs: SAM and ASAM minimise different objectives, never pooled.

    A zoo model's key is its zoo (``augreg_in1k``): the paper correlates over a zoo, and two zoos of one architecture
    (AugReg from ImageNet-1k and from -21k) are separate studies.
    """
    if ZOO_KEY in hparams:
        return str(hparams[ZOO_KEY])
    return str(hparams["model"]) + (ASAM_SUFFIX if hparams.get("sam_adaptive") else "")


def split_by_train_err(
    records: Iterable[Record], max_train_err: float = DEFAULT_MAX_TRAIN_ERR
) -> tuple[list[Record], list[tuple[Record, str]]]:
    """Keep the completed runs whose clean training error is at most ``max_train_err`` (the paper keeps <= 1%).

    Args:
        records: run records; runs that did not complete are ignored.
        max_train_err: the largest ``final/train_err`` (a fraction) a kept run may have.

    Returns:
        ``(kept, dropped)``, ``dropped`` as ``(record, reason)`` pairs.

    Raises:
        ValueError: ``max_train_err`` is not in [0, 1].
    """
    check_max_train_err(max_train_err)
    kept: list[Record] = []
    dropped: list[tuple[Record, str]] = []
    for record in completed(records):
        train_err = metric(record, TRAIN_ERR)
        if train_err is None:
            dropped.append((record, f"no {TRAIN_ERR}"))
        elif train_err > max_train_err:
            dropped.append((record, f"{TRAIN_ERR} > {max_train_err:g}"))
        else:
            kept.append(record)
    return kept, dropped


def split_by_test_err(
    records: Iterable[Record], max_test_err: float = DEFAULT_MAX_TEST_ERR
) -> tuple[list[Record], list[tuple[Record, str]]]:
    """Keep the completed zoo models whose ImageNet error is at most ``max_test_err``: the zoos' filter.

    The paper drops two ImageNet-21k AugReg models "close to 100% test error"; this is that rule on measured error,
    not a list of names. There is no training-error filter for zoos: ImageNet models never reach 1% training error.
    A model without ``imagenet/err`` (the ImageNet val set was not given) is kept: there is nothing to judge it by.

    Args:
        records: zoo records; runs that did not complete are ignored.
        max_test_err: the largest ``imagenet/err`` (a fraction) a kept model may have.

    Returns:
        ``(kept, dropped)``, ``dropped`` as ``(record, reason)`` pairs.

    Raises:
        ValueError: ``max_test_err`` is not in [0, 1].
    """
    check_max_train_err(max_test_err, "max_test_err")
    kept: list[Record] = []
    dropped: list[tuple[Record, str]] = []
    for record in completed(records):
        test_err = metric(record, IMAGENET_ERR)
        if test_err is not None and test_err > max_test_err:
            dropped.append((record, f"{IMAGENET_ERR} > {max_test_err:g}"))
        else:
            kept.append(record)
    return kept, dropped


def split_runs(
    records: Iterable[Record], max_train_err: float = DEFAULT_MAX_TRAIN_ERR,
    max_test_err: float = DEFAULT_MAX_TEST_ERR,
) -> tuple[list[Record], list[tuple[Record, str]]]:
    """Each record through its kind's filter: :func:`split_by_test_err` for zoo models, :func:`split_by_train_err`
    for CIFAR-10 runs.

    Returns:
        ``(kept, dropped)`` of both kinds together, each in input order.
    """
    records = list(records)
    zoo_kept, zoo_dropped = split_by_test_err([r for r in records if is_zoo_record(r)], max_test_err)
    cifar_kept, cifar_dropped = split_by_train_err([r for r in records if not is_zoo_record(r)], max_train_err)
    order = {id(record): index for index, record in enumerate(records)}
    kept = sorted(zoo_kept + cifar_kept, key=lambda r: order[id(r)])
    dropped = sorted(zoo_dropped + cifar_dropped, key=lambda pair: order[id(pair[0])])
    return kept, dropped


def filter_rule(records: Iterable[Record], max_train_err: float, max_test_err: float) -> str:
    """The filter that :func:`split_runs` applies to ``records`` (one model key's), e.g. ``final/train_err <= 0.01``."""
    if any(is_zoo_record(record) for record in records):
        return f"{IMAGENET_ERR} <= {max_test_err:g}"
    return f"{TRAIN_ERR} <= {max_train_err:g}"


def check_max_train_err(max_train_err: float, name: str = "max_train_err") -> None:
    """Raise ValueError unless ``max_train_err`` (or another error limit, called ``name``) is a fraction in [0, 1]."""
    if not 0 <= max_train_err <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {max_train_err!r}")


def subgroup_sort_key(subgroup: str) -> tuple[int, str]:
    """The position of ``subgroup`` in :data:`SUBGROUP_ORDER`, unknown names last and by name."""
    return (SUBGROUP_ORDER.index(subgroup) if subgroup in SUBGROUP_ORDER else len(SUBGROUP_ORDER), subgroup)
