"""The paper's Figures 5 (error against sharpness) and 6 (sharpness against learning rate) as PNGs, by subgroup."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lit_sharp.analysis.kendall import kendall_tau, paired_values
from lit_sharp.analysis.measures import SHARPNESS_PREFIX
from lit_sharp.analysis.records import C10C_ERR, SUBGROUP_ORDER, TEST_ERR, Record, metric, subgroup_sort_key
from lit_sharp.results import subgroup_of

_SUBGROUP_COLOURS = dict(zip(SUBGROUP_ORDER, ("tab:blue", "tab:orange", "tab:green", "tab:red")))


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
        groups[subgroup_of(record["hparams"])].append(record)
    all_x: list[float] = []
    all_y: list[float] = []
    for subgroup in sorted(groups, key=subgroup_sort_key):
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
