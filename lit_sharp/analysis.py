"""Kendall tau tables and figures over a grid of runs (docs/protocol.md section 5; the paper's Tables 3-4, Figures 5-6).

Andriushchenko et al., "A Modern Look at the Relationship between Sharpness and Generalization", ICML 2023,
correlate every sharpness measure with test error and CIFAR-10-C error over the models of one architecture whose
clean training error is at most 1%, overall and within each ``augment x mixup`` subgroup. This module does the same
over the ``results.json`` records of a grid, and adds the granulated Kendall coefficient of Jiang et al.,
"Fantastic Generalization Measures and Where to Find Them", ICLR 2020.

Run it as::

    python -m lit_sharp.analysis runs/<grid> --out runs/<grid>/analysis [--max-train-err 0.01] \
        [--measure NAME ...] [--bootstrap N] [--wandb [--wandb-mode offline|online]]

It writes into ``--out``:

- ``correlations.csv``: columns ``model, measure, target, subgroup, tau, n, ci_low, ci_high``. ``measure`` is the metric name without
  the ``sharpness/`` prefix; ``target`` is ``test_err`` (``final/test_err``) or ``c10c_err`` (``c10c/err``);
  ``subgroup`` is ``all``, ``augment=<true|false>,mixup=<true|false>`` (mixup on when ``mixup_alpha > 0``),
  ``granulated:<axis>`` for the axes ``lr``, ``sam_rho``, ``mixup``, ``augment``, or ``granulated:mean``.
  ``tau`` is empty where it is undefined (fewer than 3 runs, or a constant column); ``n`` is the number of runs
  that entered the coefficient; ``ci_low, ci_high`` its 95% percentile bootstrap interval (models resampled with
  replacement, ``--bootstrap`` resamples, seeded), on the ``all`` and subgroup rows where tau is defined.
- ``tables.md``: per architecture, the layout of the paper's Tables 3 and 4, then the per-subgroup and granulated taus.
- ``runs.csv``: one row per completed run, kept or dropped, with its hyperparameters and metrics.
- ``fig5_<model>_<measure>.png`` (sharpness vs test error and vs CIFAR-10-C error) and ``fig6_<model>_<measure>.png``
  (sharpness vs learning rate) for the paper's headline measures and every ``--measure``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import re
import statistics
import sys
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import kendalltau

from lit_sharp.results import ResultsError, find_results, mixup_on, read_results, subgroup_of

log = logging.getLogger(__name__)

Record = dict[str, Any]

SHARPNESS_PREFIX = "sharpness/"
TRAIN_ERR = "final/train_err"
TEST_ERR = "final/test_err"
C10C_ERR = "c10c/err"
#: Target name in ``correlations.csv`` -> metric key in ``results.json``.
TARGETS = {"test_err": TEST_ERR, "c10c_err": C10C_ERR}
CSV_COLUMNS = ("model", "measure", "target", "subgroup", "tau", "n", "ci_low", "ci_high")
DEFAULT_MAX_TRAIN_ERR = 0.01
#: Bootstrap resamples behind each confidence interval, and the interval's coverage.
DEFAULT_BOOTSTRAP = 1000
CI_LEVEL = 0.95

#: The measures of the paper's Figure 5, per architecture (docs/protocol.md section 5).
HEADLINE_MEASURES = {
    "resnet18": ("worst_linf_adaptive_ln_rho0.002", "worst_linf_adaptive_rho0.001"),
    "simplevit": ("worst_linf_adaptive_ln_rho0.002", "worst_linf_adaptive_rho0.0005"),
}


#: The grid's hyperparameter axes, as Jiang et al.'s granulated coefficient varies them one at a time.
GRANULATED_AXES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "lr": lambda hparams: float(hparams["lr"]),
    "sam_rho": lambda hparams: float(hparams["sam_rho"]),
    "mixup": mixup_on,
    "augment": lambda hparams: bool(hparams["augment"]),
}

_NUMBER_HPARAMS = ("lr", "sam_rho", "mixup_alpha")
_SUBGROUP_ORDER = tuple(
    f"augment={augment},mixup={mixup}" for augment in ("false", "true") for mixup in ("false", "true")
)
_SUBGROUP_COLOURS = dict(zip(_SUBGROUP_ORDER, ("tab:blue", "tab:orange", "tab:green", "tab:red")))


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


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
    for key in _NUMBER_HPARAMS:
        if not _is_number(hparams.get(key)):
            raise ResultsError(path, f"hparams.{key} is {hparams.get(key)!r}, expected a number")
    if not isinstance(hparams.get("augment"), bool):
        raise ResultsError(path, f"hparams.augment is {hparams.get('augment')!r}, expected true or false")
    for key, value in record["metrics"].items():
        if value is not None and not _is_number(value):
            raise ResultsError(path, f"metrics[{key!r}] is {value!r}, expected a number or null")


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


def by_model(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Group records by ``hparams.model`` (ASAM runs apart, as ``<model>_asam``), models in sorted order."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[model_key(record["hparams"])].append(record)
    return dict(sorted(groups.items()))


def model_key(hparams: Mapping[str, Any]) -> str:
    """The architecture, with ``_asam`` for ASAM runs: SAM and ASAM minimise different objectives, never pooled."""
    return str(hparams["model"]) + ("_asam" if hparams.get("sam_adaptive") else "")


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
    _check_max_train_err(max_train_err)
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


def _check_max_train_err(max_train_err: float) -> None:
    if not 0 <= max_train_err <= 1:
        raise ValueError(f"max_train_err must be a fraction in [0, 1], got {max_train_err!r}")


def _subgroup(record: Mapping[str, Any]) -> str:
    return subgroup_of(record["hparams"])


def measures_in(records: Iterable[Record]) -> list[str]:
    """Every sharpness measure (metric name without ``sharpness/``) in ``records``, in the paper's table order."""
    names = {
        key.removeprefix(SHARPNESS_PREFIX)
        for record in records
        for key in record["metrics"]
        if key.startswith(SHARPNESS_PREFIX)
    }
    return sorted(names, key=measure_sort_key)


# ----------------------------------------------------------------------------------------------------------------------
# Kendall's tau
# ----------------------------------------------------------------------------------------------------------------------


def kendall_tau(x: Sequence[float], y: Sequence[float], *, min_n: int = 3) -> float | None:
    """Kendall's rank correlation between ``x`` and ``y``.

    The paper's Eq. 4, ``tau = 2 / (M (M - 1)) * sum_{i<j} sign(x_i - x_j) sign(y_i - y_j)``, is tau-a; with ties
    this returns tau-b (``scipy.stats.kendalltau``), which equals Eq. 4 when there are none.

    Args:
        x: the first variable, one value per model.
        y: the second variable, as long as ``x``.
        min_n: the fewest runs for which the coefficient is reported.

    Returns:
        tau in [-1, 1], or None when there are fewer than ``min_n`` pairs or either variable is constant.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < min_n or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    tau = float(kendalltau(x, y, variant="b").statistic)
    return None if math.isnan(tau) else tau


def paired_values(records: Iterable[Record], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """The values of metrics ``x_key`` and ``y_key`` over the runs that have both (a run lacking one is left out)."""
    xs: list[float] = []
    ys: list[float] = []
    for record in records:
        x, y = metric(record, x_key), metric(record, y_key)
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def bootstrap_weights(n: int, resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """How often each of ``n`` models is drawn in each of ``resamples`` bootstrap samples (with replacement).

    Returns:
        int64 ``(resamples, n)``, each row summing to ``n``.
    """
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def bootstrap_taus(x: Sequence[float], y: Sequence[float], weights: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of every bootstrap sample described by ``weights``, all at once.

    A sample that draws model ``k`` ``w_k`` times has, over its ordered pairs, ``sum_kl w_k w_l S_kl`` for any
    pairwise quantity ``S`` that is 0 on the diagonal (a model paired with a copy of itself is tied in both
    variables). With ``X_kl = sign(x_k - x_l)`` and ``Y_kl = sign(y_k - y_l)``, tau-b of the sample is
    ``w^T (X * Y) w / sqrt(w^T |X| w * w^T |Y| w)``: the same number as :func:`kendall_tau` of the resampled lists,
    for ``(resamples, n) @ (n, n)`` products instead of a loop over samples.

    Args:
        x: one value per model.
        y: one value per model, as long as ``x``.
        weights: ``(resamples, n)`` draw counts, e.g. from :func:`bootstrap_weights`.

    Returns:
        float64 ``(resamples,)``; NaN where a sample is constant in ``x`` or ``y`` (tau-b undefined).
    """
    x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    sign_x = np.sign(x_arr[:, None] - x_arr[None, :])  # (n, n)
    sign_y = np.sign(y_arr[:, None] - y_arr[None, :])
    w = np.asarray(weights, dtype=np.float64)  # (resamples, n)

    def quadratic(matrix: np.ndarray) -> np.ndarray:
        return np.einsum("bk,bk->b", w @ matrix, w)

    denominator = np.sqrt(quadratic(np.abs(sign_x)) * quadratic(np.abs(sign_y)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, quadratic(sign_x * sign_y) / denominator, np.nan)


def bootstrap_ci(
    x: Sequence[float], y: Sequence[float], *, resamples: int = DEFAULT_BOOTSTRAP, seed: int | Sequence[int] = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of Kendall's tau, resampling models with replacement (Efron 1979).

    Args:
        x: one value per model.
        y: one value per model.
        resamples: bootstrap samples; 0 turns the interval off.
        seed: seeds the resampling, so the same data give the same interval.
        level: coverage of the interval.

    Returns:
        ``(low, high)``, the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the samples' taus (samples
        where tau is undefined left out), or None where :func:`kendall_tau` is undefined, with ``resamples=0``,
        or when fewer than half the samples have a tau.
    """
    if resamples <= 0 or kendall_tau(x, y) is None:
        return None
    taus = bootstrap_taus(x, y, bootstrap_weights(len(x), resamples, seed))
    taus = taus[~np.isnan(taus)]
    if len(taus) < resamples / 2:
        return None
    low, high = np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def granulated_tau(
    records: Sequence[Record],
    x_key: str,
    y_key: str,
    axes: Mapping[str, Callable[[Mapping[str, Any]], Any]] = GRANULATED_AXES,
) -> dict[str, tuple[float | None, int]]:
    """Jiang et al. (2020)'s granulated Kendall coefficient of metrics ``x_key`` and ``y_key``.

    For axis ``i`` the runs are grouped by every hyperparameter except ``i`` (the other axes and the seed), so each
    group holds runs that differ in axis ``i`` only; ``psi_i`` is the mean of the groups' taus,
    ``psi_i = 1/m_i * sum_{theta_-i} tau({(x(theta), y(theta)) : theta_i in Theta_i})``, and the overall coefficient
    is ``Psi = 1/|axes| * sum_i psi_i``. A group enters only when its tau is defined (at least 2 runs, neither
    variable constant: tau-b is undefined on a constant column), so ``m_i`` counts those groups; an axis with no
    such group is left out of ``Psi``.

    Args:
        records: the runs (already filtered), each with ``hparams``.
        x_key: metric key of the measure, e.g. ``sharpness/worst_linf_adaptive_rho0.001``.
        y_key: metric key of the target, e.g. ``final/test_err``.
        axes: axis name -> function of ``hparams`` giving the run's value on that axis.

    Returns:
        ``{axis: (psi_axis, n_runs), ..., "mean": (Psi, n_runs)}``, tau None where undefined; ``n_runs`` counts the
        runs of the groups that entered (for ``mean``: of any axis).
    """
    result: dict[str, tuple[float | None, int]] = {}
    runs_used: set[int] = set()
    for axis in axes:
        taus, used = _axis_taus(records, x_key, y_key, axis, axes)
        result[axis] = (statistics.fmean(taus) if taus else None, len(used))
        runs_used |= used
    psis = [psi for psi, _ in result.values() if psi is not None]
    result["mean"] = (statistics.fmean(psis) if psis else None, len(runs_used))
    return result


def _axis_taus(
    records: Sequence[Record],
    x_key: str,
    y_key: str,
    axis: str,
    axes: Mapping[str, Callable[[Mapping[str, Any]], Any]],
) -> tuple[list[float], set[int]]:
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if metric(record, x_key) is not None and metric(record, y_key) is not None:
            hparams = record["hparams"]
            fixed = tuple(value(hparams) for name, value in axes.items() if name != axis)
            groups[(*fixed, hparams.get("seed"))].append(index)
    taus: list[float] = []
    used: set[int] = set()
    for members in groups.values():
        xs, ys = paired_values((records[i] for i in members), x_key, y_key)
        tau = kendall_tau(xs, ys, min_n=2)
        if tau is not None:
            taus.append(tau)
            used.update(members)
    return taus, used


def correlations(
    records: Iterable[Record], max_train_err: float = DEFAULT_MAX_TRAIN_ERR, *, bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Kendall's tau of every sharpness measure against test and CIFAR-10-C error, per architecture.

    Only completed runs with ``final/train_err <= max_train_err`` enter. Per model, measure and target there is one
    row over all kept runs (``subgroup="all"``), one per ``augment x mixup`` subgroup present among the model's
    completed runs, one per granulated axis (``granulated:<axis>``) and their mean (``granulated:mean``); see
    :func:`granulated_tau`. The ``all`` and subgroup rows carry a 95% percentile bootstrap interval
    (:func:`bootstrap_ci`), seeded per row from ``seed`` and the row's names, so a row's interval does not depend on
    which other measures or runs the grid holds.

    Args:
        records: run records, e.g. from :func:`load_runs`.
        max_train_err: the largest clean training error (a fraction) of a kept run.
        bootstrap: resamples per interval; 0 leaves the intervals out.
        seed: seeds the resampling.

    Returns:
        Rows with the keys ``model, measure, target, subgroup, tau, n, ci_low, ci_high`` (``tau`` None where
        undefined; ``ci_low``/``ci_high`` None where there is no interval, and on granulated rows).

    Raises:
        ValueError: ``max_train_err`` is not in [0, 1].
    """
    rows: list[dict[str, Any]] = []
    for model, model_records in by_model(completed(records)).items():
        kept, _ = split_by_train_err(model_records, max_train_err)
        subgroups = sorted({_subgroup(record) for record in model_records}, key=_subgroup_sort_key)
        for measure in measures_in(model_records):
            for target, target_key in TARGETS.items():
                cells = _correlation_cells(kept, SHARPNESS_PREFIX + measure, target_key, subgroups)
                intervals = _interval_cells(kept, SHARPNESS_PREFIX + measure, target_key, subgroups, bootstrap,
                                            (seed, model, measure, target))
                rows += [
                    {"model": model, "measure": measure, "target": target, "subgroup": subgroup, "tau": tau, "n": n,
                     "ci_low": intervals.get(subgroup, (None, None))[0],
                     "ci_high": intervals.get(subgroup, (None, None))[1]}
                    for subgroup, (tau, n) in cells.items()
                ]
    return rows


def _interval_cells(
    kept: Sequence[Record], x_key: str, y_key: str, subgroups: Sequence[str], resamples: int, names: tuple[Any, ...]
) -> dict[str, tuple[float, float]]:
    intervals: dict[str, tuple[float, float]] = {}
    for subgroup in ("all", *subgroups):
        members = kept if subgroup == "all" else [r for r in kept if _subgroup(r) == subgroup]
        xs, ys = paired_values(members, x_key, y_key)
        # A stable seed per row: crc32 of the row's names (Python's hash() changes between processes).
        seed = [names[0], zlib.crc32("|".join(map(str, (*names[1:], subgroup))).encode())]
        interval = bootstrap_ci(xs, ys, resamples=resamples, seed=seed)
        if interval is not None:
            intervals[subgroup] = interval
    return intervals


def _correlation_cells(
    kept: Sequence[Record], x_key: str, y_key: str, subgroups: Sequence[str]
) -> dict[str, tuple[float | None, int]]:
    cells: dict[str, tuple[float | None, int]] = {}
    xs, ys = paired_values(kept, x_key, y_key)
    cells["all"] = (kendall_tau(xs, ys), len(xs))
    for subgroup in subgroups:
        xs, ys = paired_values((r for r in kept if _subgroup(r) == subgroup), x_key, y_key)
        cells[subgroup] = (kendall_tau(xs, ys), len(xs))
    for axis, cell in granulated_tau(kept, x_key, y_key).items():
        cells[f"granulated:{axis}"] = cell
    return cells


def _subgroup_sort_key(subgroup: str) -> tuple[int, str]:
    return (_SUBGROUP_ORDER.index(subgroup) if subgroup in _SUBGROUP_ORDER else len(_SUBGROUP_ORDER), subgroup)


# ----------------------------------------------------------------------------------------------------------------------
# Measure names in the paper's terms
# ----------------------------------------------------------------------------------------------------------------------

_MEASURE_NAME = re.compile(
    r"^(?P<kind>worst|average)_(?P<norm>linf|l2)_(?P<scale>adaptive|standard)(?P<ln>_ln)?_rho(?P<rho>[0-9.eE+-]+)$"
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


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def write_correlations_csv(rows: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Write rows from :func:`correlations` as CSV with columns ``model, measure, target, subgroup, tau, n``.

    ``tau`` is written with ``repr`` (every digit of the float) and left empty where undefined.

    Args:
        rows: rows from :func:`correlations`.
        path: the file to write.

    Returns:
        ``path``.
    """
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(row[column]) for column in CSV_COLUMNS])
    return path


def write_runs_csv(kept: Sequence[Record], dropped: Sequence[tuple[Record, str]], path: Path | str) -> Path:
    """Write one row per completed run: name, ``kept``, ``drop_reason``, its hyperparameters and its metrics.

    Args:
        kept: the runs that passed the training-error filter.
        dropped: ``(record, reason)`` for the runs that did not.
        path: the file to write.

    Returns:
        ``path``.
    """
    runs = [(record, "") for record in kept] + list(dropped)
    runs.sort(key=lambda pair: pair[0]["run"]["name"])
    hparam_keys = _union_keys(record["hparams"] for record, _ in runs)
    metric_keys = sorted(_union_keys(record["metrics"] for record, _ in runs))
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "kept", "drop_reason", *hparam_keys, *metric_keys])
        for record, reason in runs:
            hparams, metrics = record["hparams"], record["metrics"]
            writer.writerow(
                [record["run"]["name"], not reason, reason]
                + [_csv_cell(hparams.get(key)) for key in hparam_keys]
                + [_csv_cell(metrics.get(key)) for key in metric_keys]
            )
    return path


def _union_keys(mappings: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for mapping in mappings for key in mapping))


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def write_tables_md(rows: Sequence[Mapping[str, Any]], summaries: Mapping[str, str], path: Path | str) -> Path:
    """Write the Markdown tables: per model, the layout of the paper's Tables 3 and 4, then subgroups and granulated.

    Args:
        rows: rows from :func:`correlations`.
        summaries: model -> one sentence on which runs were kept.
        path: the file to write.

    Returns:
        ``path``.
    """
    cells = {(r["model"], r["measure"], r["target"], r["subgroup"]): (_md_tau(r["tau"]) + _md_ci(r), r["n"])
             for r in rows}
    lines = ["# Rank correlation between sharpness and generalization", ""]
    for model in sorted({row["model"] for row in rows} | set(summaries)):
        model_rows = [row for row in rows if row["model"] == model]
        measures = list(dict.fromkeys(row["measure"] for row in model_rows))
        groups = list(dict.fromkeys(row["subgroup"] for row in model_rows if row["subgroup"] != "all"))
        lines += [f"## {model}", "", summaries.get(model, ""), ""]
        lines += _paper_table(model, measures, cells) + [""]
        lines += _subgroup_table(model, measures, groups, cells) + [""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _paper_table(model: str, measures: Sequence[str], cells: Mapping[tuple[str, ...], tuple[Any, int]]) -> list[str]:
    lines = ["| Sharpness | LogitNorm | ρ | τ CIFAR-10 [95% CI] | τ CIFAR-10-C [95% CI] | n |", "|---|---|---|---|---|---|"]
    for measure in measures:
        test_tau, n = cells[(model, measure, "test_err", "all")]
        c10c_tau, _ = cells[(model, measure, "c10c_err", "all")]
        lines.append(f"| {_measure_columns(measure)} | {test_tau} | {c10c_tau} | {n} |")
    return lines


def _subgroup_table(
    model: str, measures: Sequence[str], groups: Sequence[str], cells: Mapping[tuple[str, ...], tuple[Any, int]]
) -> list[str]:
    header = "| Sharpness | LogitNorm | ρ | " + " | ".join(f"{group} (n)" for group in groups) + " |"
    lines = ["τ CIFAR-10 / τ CIFAR-10-C within each subgroup and granulated (Jiang et al. 2020):", "", header]
    lines.append("|---|---|---|" + "---|" * len(groups))
    for measure in measures:
        parts = []
        for group in groups:
            test_tau, n = cells[(model, measure, "test_err", group)]
            c10c_tau, _ = cells[(model, measure, "c10c_err", group)]
            parts.append(f"{test_tau} / {c10c_tau} ({n})")
        lines.append(f"| {_measure_columns(measure)} | " + " | ".join(parts) + " |")
    return lines


def _measure_columns(measure: str) -> str:
    parts = parse_measure(measure)
    if parts is None:
        return f"{measure} | | "
    return f"{parts.label} | {'Yes' if parts.logit_norm else 'No'} | {parts.rho:g}"


def _md_ci(row: Mapping[str, Any]) -> str:
    low, high = row.get("ci_low"), row.get("ci_high")
    return "" if low is None or high is None else f" [{low:.2f}, {high:.2f}]"


def _md_tau(tau: float | None) -> str:
    if tau is None:
        return "–"
    # The paper boldfaces |tau| > 0.5 as a reasonably strong correlation.
    return f"**{tau:.2f}**" if abs(tau) > 0.5 else f"{tau:.2f}"


# ----------------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------------


def plot_error_vs_sharpness(records: Sequence[Record], measure: str, path: Path | str) -> Path:
    """The paper's Figure 5 for one measure: test error and CIFAR-10-C error against sharpness, by subgroup.

    Each panel's title gives Kendall's tau over all plotted runs; the legend gives it within each subgroup.

    Args:
        records: the runs to plot (the kept runs of one architecture).
        measure: the measure name without ``sharpness/``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    figure = Figure(figsize=(10, 5), layout="constrained")
    key = SHARPNESS_PREFIX + measure
    for axes, (target_key, label) in zip(
        figure.subplots(1, 2), ((TEST_ERR, "test error"), (C10C_ERR, "CIFAR-10-C error"))
    ):
        _scatter_by_subgroup(axes, records, lambda r: metric(r, key), lambda r: metric(r, target_key), log_y=False)
        axes.set_xlabel(f"sharpness: {measure}")
        axes.set_ylabel(label)
        xs, ys = paired_values(records, key, target_key)
        axes.set_title(f"{label}: {_title_tau(kendall_tau(xs, ys), len(xs))}")
    figure.suptitle(f"{_model_of(records)}: {measure} vs error")
    return _save(figure, path)


def plot_sharpness_vs_lr(records: Sequence[Record], measure: str, path: Path | str) -> Path:
    """The paper's Figure 6 for one measure: sharpness against the peak learning rate, by subgroup.

    Args:
        records: the runs to plot (the kept runs of one architecture).
        measure: the measure name without ``sharpness/``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    figure = Figure(figsize=(6, 5.2), layout="constrained")
    axes = figure.subplots()
    key = SHARPNESS_PREFIX + measure
    _scatter_by_subgroup(axes, records, lambda r: float(r["hparams"]["lr"]), lambda r: metric(r, key), log_y=True)
    axes.set_xlabel("learning rate")
    axes.set_ylabel(f"sharpness: {measure}")
    lrs, values = _values(records, lambda r: float(r["hparams"]["lr"]), lambda r: metric(r, key))
    axes.set_title(f"{_model_of(records)}: {_title_tau(kendall_tau(lrs, values), len(lrs))}")
    return _save(figure, path)


def _scatter_by_subgroup(
    axes: Any,
    records: Sequence[Record],
    x_of: Callable[[Record], float | None],
    y_of: Callable[[Record], float | None],
    *,
    log_y: bool,
) -> None:
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[_subgroup(record)].append(record)
    all_x: list[float] = []
    all_y: list[float] = []
    for subgroup in sorted(groups, key=_subgroup_sort_key):
        xs, ys = _values(groups[subgroup], x_of, y_of)
        if xs:
            tau = kendall_tau(xs, ys)
            label = f"{subgroup} (τ={'–' if tau is None else f'{tau:.2f}'}, n={len(xs)})"
            axes.scatter(xs, ys, s=18, color=_SUBGROUP_COLOURS.get(subgroup, "tab:gray"), label=label)
            all_x += xs
            all_y += ys
    # Sharpness and learning rates span decades, errors do not; a log axis needs every value positive.
    if all_x and min(all_x) > 0:
        axes.set_xscale("log")
    if log_y and all_y and min(all_y) > 0:
        axes.set_yscale("log")
    if all_x:
        # Below the panel: inside it, four long labels hide the points.
        axes.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.15))


def _values(
    records: Iterable[Record], x_of: Callable[[Record], float | None], y_of: Callable[[Record], float | None]
) -> tuple[list[float], list[float]]:
    pairs = [(x_of(record), y_of(record)) for record in records]
    kept = [(x, y) for x, y in pairs if x is not None and y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def _title_tau(tau: float | None, n: int) -> str:
    return f"τ = {tau:.2f} (n={n})" if tau is not None else f"τ undefined (n={n})"


def _model_of(records: Sequence[Record]) -> str:
    return ", ".join(sorted({record["hparams"]["model"] for record in records}))


def _save(figure: Figure, path: Path | str) -> Path:
    # A bare Figure renders with Agg and touches no pyplot state, so no display or backend choice is involved.
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def draw_figures(
    kept: Sequence[Record], model: str, measures: Sequence[str], out_dir: Path
) -> tuple[list[Path], list[str]]:
    """Draw Figures 5 and 6 of one architecture for each of ``measures`` that some kept run has.

    Args:
        kept: the kept runs of the architecture.
        model: its name, used in the file names.
        measures: measure names without ``sharpness/``.
        out_dir: the folder for the PNGs.

    Returns:
        ``(paths, notes)``: the PNGs written (``fig5_<model>_<measure>.png``, ``fig6_<model>_<measure>.png``) and one
        note per measure that was skipped because no kept run has it.
    """
    paths: list[Path] = []
    notes: list[str] = []
    for measure in measures:
        runs = [record for record in kept if metric(record, SHARPNESS_PREFIX + measure) is not None]
        if not runs:
            notes.append(f"no figure for {model} {measure}: no kept run has {SHARPNESS_PREFIX}{measure}")
            continue
        paths.append(plot_error_vs_sharpness(runs, measure, out_dir / f"fig5_{model}_{measure}.png"))
        paths.append(plot_sharpness_vs_lr(runs, measure, out_dir / f"fig6_{model}_{measure}.png"))
    return paths, notes


# ----------------------------------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------------------------------


def wandb_target(records: Sequence[Record], root: Path | str) -> tuple[str, str]:
    """The W&B ``(project, group)`` of a grid: the runs' ``logger.project``/``logger.group`` config values.

    Args:
        records: the grid's runs, their ``config`` holding flat dotted keys.
        root: the grid's folder, whose name is the group when no run names one.

    Returns:
        ``(project, group)``; the project falls back to ``lit_sharp``.
    """

    def most_common(keys: Sequence[str]) -> str | None:
        values = [record.get("config", {}).get(key) for record in records for key in keys]
        counts = Counter(value for value in values if isinstance(value, str) and value)
        return counts.most_common(1)[0][0] if counts else None

    # The logger config group holds either the WandbLogger itself or it under the name ``wandb``.
    project = most_common(("logger.project", "logger.wandb.project")) or "lit_sharp"
    group = most_common(("logger.group", "logger.wandb.group")) or Path(root).resolve().name
    return project, group


def log_to_wandb(
    rows: Sequence[Mapping[str, Any]],
    figures: Sequence[Path],
    *,
    project: str,
    group: str,
    out_dir: Path,
    mode: str,
    config: Mapping[str, Any] | None = None,
    scatters: Sequence[tuple[str, str, Sequence[Record]]] = (),
) -> None:
    """Log the correlations as a ``wandb.Table``, the figures as images, and Figures 5 and 6 as W&B plots.

    Each ``(model, measure, runs)`` in ``scatters`` becomes a table ``runs/<model>/<measure>`` (one row per run:
    run name, subgroup, lr, sharpness, test and CIFAR-10-C error) and three interactive scatter plots on it,
    ``fig5/<model>/<measure>/test_err``, ``.../c10c_err`` and ``fig6/<model>/<measure>`` (sharpness against lr).
    The table's ``subgroup`` and ``run`` columns let a W&B panel colour by subgroup and show run names on hover.

    Args:
        rows: rows from :func:`correlations`.
        figures: PNG files; each is logged under ``figures/<file stem>``.
        project: the W&B project.
        group: the grid's W&B group.
        out_dir: where W&B keeps its run files (``out_dir/wandb``).
        mode: ``offline`` or ``online``.
        config: settings of the analysis recorded as the run's config.
        scatters: from :func:`scatter_runs`.
    """
    import wandb  # only when asked: importing W&B is slow

    run = wandb.init(
        project=project, group=group, job_type="analysis", name="analysis", dir=str(out_dir), mode=mode,
        config=dict(config or {}),
    )
    try:
        table = wandb.Table(columns=list(CSV_COLUMNS), data=[[row[c] for c in CSV_COLUMNS] for row in rows])
        payload: dict[str, Any] = {"correlations": table}
        payload.update({f"figures/{path.stem}": wandb.Image(str(path)) for path in figures})
        for model, measure, runs in scatters:
            payload.update(_scatter_plots(wandb, model, measure, runs))
        run.log(payload)
    finally:
        run.finish()


SCATTER_COLUMNS = ("run", "subgroup", "lr", "sharpness", "test_err", "c10c_err")


def scatter_runs(
    kept: Sequence[Record], requested: Sequence[str] = ()
) -> list[tuple[str, str, list[Record]]]:
    """``(model, measure, runs)`` for each figure the analysis draws: headline and requested measures that runs have."""
    extra = [name.removeprefix(SHARPNESS_PREFIX) for name in requested]
    out = []
    for model, model_kept in by_model(kept).items():
        for measure in dict.fromkeys([*HEADLINE_MEASURES.get(model, ()), *extra]):
            runs = [record for record in model_kept if metric(record, SHARPNESS_PREFIX + measure) is not None]
            if runs:
                out.append((model, measure, runs))
    return out


def _scatter_plots(wandb: Any, model: str, measure: str, runs: Sequence[Record]) -> dict[str, Any]:
    data = [
        [record["run"]["name"], _subgroup(record), float(record["hparams"]["lr"]),
         metric(record, SHARPNESS_PREFIX + measure), metric(record, TEST_ERR), metric(record, C10C_ERR)]
        for record in runs
    ]
    table = wandb.Table(columns=list(SCATTER_COLUMNS), data=data)
    key = f"{model}/{measure}"
    return {
        f"runs/{key}": table,
        f"fig5/{key}/test_err": wandb.plot.scatter(table, "sharpness", "test_err",
                                                   title=f"{model}: test error vs {measure}"),
        f"fig5/{key}/c10c_err": wandb.plot.scatter(table, "sharpness", "c10c_err",
                                                   title=f"{model}: CIFAR-10-C error vs {measure}"),
        f"fig6/{key}": wandb.plot.scatter(table, "lr", "sharpness", title=f"{model}: {measure} vs learning rate"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lit_sharp.analysis``."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_sharp.analysis",
        description=(
            "Kendall tau between every sharpness/... metric and final/test_err and c10c/err over the completed runs "
            "under ROOT, per architecture (hparams.model), for the runs with final/train_err <= --max-train-err. "
            "Writes OUT/correlations.csv (columns model, measure, target, subgroup, tau, n, ci_low, ci_high: "
            "a 95% bootstrap interval over models; subgroup is 'all', "
            "'augment=<true|false>,mixup=<true|false>', 'granulated:<lr|sam_rho|mixup|augment>' for Jiang et al. "
            "(2020)'s coefficient varying one axis with the others fixed, or 'granulated:mean' for their average), "
            "OUT/tables.md, OUT/runs.csv and the figures OUT/fig5_<model>_<measure>.png, "
            "OUT/fig6_<model>_<measure>.png."
        ),
    )
    parser.add_argument(
        "root", type=Path, metavar="ROOT", help="folder of the grid's runs; every results.json below it is read"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables and figures (created)")
    parser.add_argument(
        "--max-train-err", type=_fraction, default=DEFAULT_MAX_TRAIN_ERR,
        help="keep runs with final/train_err at most this fraction (default: %(default)s, the paper's 1%%)",
    )
    parser.add_argument(
        "--measure", action="append", default=[], metavar="NAME",
        help="also draw figures for this measure (with or without the sharpness/ prefix); repeatable",
    )
    parser.add_argument(
        "--bootstrap", type=_resamples, default=DEFAULT_BOOTSTRAP, metavar="N",
        help="bootstrap resamples of the models behind each tau's 95%% confidence interval (ci_low, ci_high); "
        "0 turns the intervals off (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap (default: %(default)s)")
    parser.add_argument("--wandb", action="store_true", help="log the table and figures to an 'analysis' W&B run")
    parser.add_argument(
        "--wandb-mode", choices=("offline", "online"), default=_default_wandb_mode(),
        help="W&B mode (default: $WANDB_MODE when it is offline or online, else offline, so nothing is uploaded "
        "unless asked; offline runs can be uploaded later with `wandb sync`)",
    )
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
        _check_max_train_err(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] such as 0.01, got {text!r}") from None
    return value


def _resamples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of resamples >= 0 such as 1000, got {text!r}")
    return value


def _default_wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE", "")
    return mode if mode in ("offline", "online") else "offline"


@contextmanager
def _console() -> Iterator[None]:
    # The summary is the command's output; the handler lives only as long as the command.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the analysis from the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success.

    Raises:
        SystemExit: with a message naming ROOT when it is missing or holds no completed run (exit status 1),
            or on bad arguments (argparse, exit status 2).
    """
    args = build_parser().parse_args(argv)
    with _console():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        records, skipped = load_runs(args.root)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    for path, why in skipped:
        log.warning("skipped %s: %s", path, why)
    runs = completed(records)
    log.info(
        "%s: %d results.json found, %d readable, %d completed",
        args.root, len(records) + len(skipped), len(records), len(runs),
    )
    if not records and not skipped:
        raise SystemExit(f"no results.json under {args.root}: point ROOT at a grid folder (paths.root/<grid>)")
    if not runs:
        raise SystemExit(
            f"no completed run under {args.root}: {len(records)} readable runs, none with status completed"
        )
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"--out {args.out} is a file: pass a folder for the tables and figures")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = correlations(runs, args.max_train_err, bootstrap=args.bootstrap, seed=args.seed)
    summaries: dict[str, str] = {}
    kept: list[Record] = []
    dropped: list[tuple[Record, str]] = []
    for model, model_runs in by_model(runs).items():
        model_kept, model_dropped = split_by_train_err(model_runs, args.max_train_err)
        summaries[model] = _keep_summary(model, model_kept, model_dropped, args.max_train_err)
        log.info(summaries[model])
        kept += model_kept
        dropped += model_dropped
    figures = _draw_all_figures(kept, args.measure, args.out)
    written = [
        write_correlations_csv(rows, args.out / "correlations.csv"),
        write_tables_md(rows, summaries, args.out / "tables.md"),
        write_runs_csv(kept, dropped, args.out / "runs.csv"),
        *figures,
    ]
    if args.wandb:
        _log_run_to_wandb(args, records, rows, figures, scatter_runs(kept, args.measure))
    log.info("wrote %s", ", ".join(str(path) for path in written))
    return 0


def _draw_all_figures(kept: Sequence[Record], requested: Sequence[str], out_dir: Path) -> list[Path]:
    extra = [name.removeprefix(SHARPNESS_PREFIX) for name in requested]
    figures: list[Path] = []
    for model, model_kept in by_model(kept).items():
        measures = list(dict.fromkeys([*HEADLINE_MEASURES.get(model.removesuffix("_asam"), ()), *extra]))
        paths, notes = draw_figures(model_kept, model, measures, out_dir)
        for note in notes:
            log.info(note)
        figures += paths
    return figures


def _keep_summary(model: str, kept: Sequence[Record], dropped: Sequence[tuple[Record, str]], limit: float) -> str:
    reasons = Counter(reason for _, reason in dropped)
    why = "; ".join(f"{count} with {reason}" for reason, count in sorted(reasons.items()))
    total = len(kept) + len(dropped)
    summary = f"{model}: {len(kept)} of {total} completed runs kept ({TRAIN_ERR} <= {limit:g}), {len(dropped)} dropped"
    return f"{summary} ({why})" if dropped else summary


def _log_run_to_wandb(args: argparse.Namespace, records: Sequence[Record], rows: Sequence[Mapping[str, Any]],
                      figures: Sequence[Path], scatters: Sequence[tuple[str, str, Sequence[Record]]]) -> None:
    project, group = wandb_target(records, args.root)
    log_to_wandb(
        rows, figures, project=project, group=group, out_dir=args.out, mode=args.wandb_mode,
        config={"root": str(args.root), "max_train_err": args.max_train_err, "bootstrap": args.bootstrap,
                "seed": args.seed},
        scatters=scatters,
    )
    log.info("logged to W&B (%s): project %s, group %s, run 'analysis'", args.wandb_mode, project, group)


if __name__ == "__main__":
    sys.exit(main())
