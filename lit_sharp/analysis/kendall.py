"""Kendall's tau between sharpness and error: plain, per subgroup, granulated (Jiang et al. 2020), with bootstrap CIs.

:func:`correlations` gives the rows of ``correlations.csv``: per architecture, measure and target, the tau over all
kept runs, within each ``augment x mixup`` subgroup and granulated over the grid's hyperparameter axes; per zoo, the
tau over its kept models against each evaluation set's error and the generalization gap (the paper's Table 1).
"""

from __future__ import annotations

import math
import statistics
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from lit_sharp.analysis.measures import SHARPNESS_PREFIX, measures_in, table1_sort_key
from lit_sharp.analysis.records import (
    C10C_ERR,
    DEFAULT_MAX_TEST_ERR,
    DEFAULT_MAX_TRAIN_ERR,
    TEST_ERR,
    Record,
    by_model,
    completed,
    is_zoo_record,
    metric,
    split_by_test_err,
    split_by_train_err,
    subgroup_sort_key,
)
from lit_sharp.analysis.zoo import target_value, zoo_targets
from lit_sharp.results import mixup_on, subgroup_of

#: Target name in ``correlations.csv`` -> metric key in ``results.json``.
TARGETS = {"test_err": TEST_ERR, "c10c_err": C10C_ERR}
#: Bootstrap resamples behind each confidence interval, and the interval's coverage.
DEFAULT_BOOTSTRAP = 1000
CI_LEVEL = 0.95

#: The grid's hyperparameter axes, as Jiang et al.'s granulated coefficient varies them one at a time.
GRANULATED_AXES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "lr": lambda hparams: float(hparams["lr"]),
    "sam_rho": lambda hparams: float(hparams["sam_rho"]),
    "mixup": mixup_on,
    "augment": lambda hparams: bool(hparams["augment"]),
}


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
    """The values of metrics ``x_key`` and ``y_key`` over the runs that have both (a run lacking one is left out).

    A key may also be ``gen_gap``, the generalization gap of :func:`lit_sharp.analysis.zoo.generalization_gap`.
    """
    xs: list[float] = []
    ys: list[float] = []
    for record in records:
        x, y = target_value(record, x_key), target_value(record, y_key)
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
    seed: int = 0, max_test_err: float = DEFAULT_MAX_TEST_ERR,
) -> list[dict[str, Any]]:
    """Kendall's tau of every sharpness measure against test and CIFAR-10-C error, per architecture; per zoo, against
    each evaluation set's error and the generalization gap.

    Only completed runs with ``final/train_err <= max_train_err`` enter. Per model, measure and target there is one
    row over all kept runs (``subgroup="all"``), one per ``augment x mixup`` subgroup present among the model's
    completed runs, one per granulated axis (``granulated:<axis>``) and their mean (``granulated:mean``); see
    :func:`granulated_tau`. A zoo (records with ``hparams.zoo``, grouped by zoo) has only ``all`` rows, over the models
    with ``imagenet/err <= max_test_err``, one per measure and target of :func:`lit_sharp.analysis.zoo.zoo_targets`
    (``<set>_err`` per evaluation set present, ``gen_gap``). The ``all`` and subgroup rows carry a 95% percentile
    bootstrap interval (:func:`bootstrap_ci`), seeded per row from ``seed`` and the row's names, so a row's interval
    does not depend on which other measures or runs the grid holds.

    Args:
        records: run records, e.g. from :func:`load_runs`.
        max_train_err: the largest clean training error (a fraction) of a kept CIFAR-10 run.
        bootstrap: resamples per interval; 0 leaves the intervals out.
        seed: seeds the resampling.
        max_test_err: the largest ImageNet error (a fraction) of a kept zoo model.

    Returns:
        Rows with the keys ``model, measure, target, subgroup, tau, n, ci_low, ci_high`` (``tau`` None where
        undefined; ``ci_low``/``ci_high`` None where there is no interval, and on granulated rows).

    Raises:
        ValueError: ``max_train_err`` or ``max_test_err`` is not in [0, 1].
    """
    rows: list[dict[str, Any]] = []
    for model, model_records in by_model(completed(records)).items():
        if any(is_zoo_record(record) for record in model_records):
            rows += _zoo_rows(model, model_records, max_test_err, bootstrap, seed)
            continue
        kept, _ = split_by_train_err(model_records, max_train_err)
        subgroups = sorted({subgroup_of(record["hparams"]) for record in model_records}, key=subgroup_sort_key)
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


def _zoo_rows(
    zoo: str, records: Sequence[Record], max_test_err: float, bootstrap: int, seed: int
) -> list[dict[str, Any]]:
    kept, _ = split_by_test_err(records, max_test_err)
    rows = []
    for measure in measures_in(records, table1_sort_key):
        for target, target_key in zoo_targets(records).items():
            xs, ys = paired_values(kept, SHARPNESS_PREFIX + measure, target_key)
            intervals = _interval_cells(kept, SHARPNESS_PREFIX + measure, target_key, (), bootstrap,
                                        (seed, zoo, measure, target))
            low, high = intervals.get("all", (None, None))
            rows.append({"model": zoo, "measure": measure, "target": target, "subgroup": "all",
                         "tau": kendall_tau(xs, ys), "n": len(xs), "ci_low": low, "ci_high": high})
    return rows


def _interval_cells(
    kept: Sequence[Record], x_key: str, y_key: str, subgroups: Sequence[str], resamples: int, names: tuple[Any, ...]
) -> dict[str, tuple[float, float]]:
    intervals: dict[str, tuple[float, float]] = {}
    for subgroup in ("all", *subgroups):
        members = kept if subgroup == "all" else [r for r in kept if subgroup_of(r["hparams"]) == subgroup]
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
        xs, ys = paired_values((r for r in kept if subgroup_of(r["hparams"]) == subgroup), x_key, y_key)
        cells[subgroup] = (kendall_tau(xs, ys), len(xs))
    for axis, cell in granulated_tau(kept, x_key, y_key).items():
        cells[f"granulated:{axis}"] = cell
    return cells
