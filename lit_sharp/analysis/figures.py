"""The paper's Figures 5 (error against sharpness) and 6 (sharpness against learning rate) as PNGs, by subgroup;
for the zoos, Figures 2 and 3 (each evaluation set's error and the generalization gap against sharpness)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lit_sharp.analysis.kendall import kendall_tau, paired_values
from lit_sharp.analysis.measures import SHARPNESS_PREFIX
from lit_sharp.analysis.records import C10C_ERR, SUBGROUP_ORDER, TEST_ERR, Record, metric, subgroup_sort_key
from lit_sharp.analysis.zoo import (
    AUG_STRENGTHS,
    GEN_GAP,
    aug_strength,
    target_label,
    target_value,
    zoo_family,
    zoo_targets,
)
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


# ----------------------------------------------------------------------------------------------------------------------
# The zoos: Figures 2 (AugReg) and 3 (CLIP fine-tunes)
# ----------------------------------------------------------------------------------------------------------------------

#: Marker area per augmentation strength (none, light, medium, strong), and for a model without one.
AUG_SIZES = (12.0, 28.0, 52.0, 88.0)
UNKNOWN_AUG_SIZE = 28.0
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:olive")
_NO_VALUE_COLOUR = "tab:gray"
_PLAIN = "tab:blue"


@dataclass(frozen=True)
class PointStyles:
    """How each model of a zoo is drawn, and the legend that explains it.

    Attributes:
        colours: one matplotlib colour per model.
        markers: one marker per model.
        sizes: one marker area (points^2) per model.
        legend: ``(label, colour, marker, size)`` entries.
        colour_scale: ``(norm, cmap name, label)`` when colour is a continuous value (a colour bar), else None.
    """

    colours: list[Any]
    markers: list[str]
    sizes: list[float]
    legend: list[tuple[str, Any, str, float]]
    colour_scale: tuple[Normalize, str, str] | None = None


def zoo_point_styles(records: Sequence[Record], zoo: str) -> PointStyles:
    """The encodings of the paper's Figures 2 and 3 for ``records`` of ``zoo``.

    AugReg (Figure 2): colour = dropout / stochastic depth, marker = weight decay, size = augmentation strength
    (none < light < medium < strong). CLIP fine-tunes (Figure 3): colour = fine-tuning learning rate, darker for
    larger (log scale when every rate is positive). Any other zoo: one colour, one marker, one size.
    """
    family = zoo_family(zoo)
    if family == "augreg":
        return _augreg_styles(records)
    if family == "clip":
        return _clip_styles(records)
    count = len(records)
    return PointStyles([_PLAIN] * count, ["o"] * count, [UNKNOWN_AUG_SIZE] * count, [])


def _augreg_styles(records: Sequence[Record]) -> PointStyles:
    regularisation = [(r["hparams"].get("do"), r["hparams"].get("sd")) for r in records]
    weight_decays = [r["hparams"].get("wd") for r in records]
    colour_of = _assign(regularisation, _COLOURS)
    marker_of = _assign(weight_decays, _MARKERS)
    strengths = [aug_strength(r["hparams"]) for r in records]
    sizes = [UNKNOWN_AUG_SIZE if s is None else AUG_SIZES[s] for s in strengths]
    legend = [(f"do={do}, sd={sd}", colour, "o", UNKNOWN_AUG_SIZE) for (do, sd), colour in colour_of.items()]
    legend += [(f"wd={wd}", "black", marker, UNKNOWN_AUG_SIZE) for wd, marker in marker_of.items()]
    legend += [(f"aug {AUG_STRENGTHS[s]}", "black", "o", AUG_SIZES[s]) for s in sorted({s for s in strengths
                                                                                       if s is not None})]
    return PointStyles([colour_of[v] for v in regularisation], [marker_of[v] for v in weight_decays], sizes, legend)


def _assign(values: Sequence[Any], palette: Sequence[str]) -> dict[Any, str]:
    # Sorted by text so that the same values get the same colour or marker in every figure of a zoo.
    distinct = sorted(set(values), key=str)
    return {value: palette[index % len(palette)] for index, value in enumerate(distinct)}


def _clip_styles(records: Sequence[Record]) -> PointStyles:
    lrs = [_positive_number(r["hparams"].get("lr")) for r in records]
    known = [lr for lr in lrs if lr is not None]
    count = len(records)
    if not known:
        return PointStyles([_NO_VALUE_COLOUR] * count, ["o"] * count, [UNKNOWN_AUG_SIZE] * count, [])
    low, high = min(known), max(known)
    norm: Normalize = LogNorm(low, high) if low < high else Normalize(low - 1, high + 1)
    cmap = colormaps["viridis_r"]  # dark for large rates, as the paper's Figure 3
    colours = [_NO_VALUE_COLOUR if lr is None else cmap(norm(lr)) for lr in lrs]
    legend = [("no lr", _NO_VALUE_COLOUR, "o", UNKNOWN_AUG_SIZE)] if len(known) < count else []
    return PointStyles(colours, ["o"] * count, [UNKNOWN_AUG_SIZE] * count, legend,
                       (norm, "viridis_r", "fine-tuning learning rate"))


def _positive_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def plot_zoo_error_vs_sharpness(records: Sequence[Record], zoo: str, measure: str, path: Path | str) -> Path:
    """The paper's Figure 2 (AugReg) or 3 (CLIP) for one measure: one panel per evaluation set's error and one for the
    generalization gap (App. B's Figures 8 and 9), against sharpness, encoded as :func:`zoo_point_styles` says.

    Each panel's title gives Kendall's tau over the models plotted in it.

    Args:
        records: the kept models of one zoo.
        zoo: the zoo's name, which picks the encodings.
        measure: the measure name without ``sharpness/``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    targets = zoo_targets(records)
    columns = min(max(len(targets), 1), 4)
    rows = max(math.ceil(len(targets) / columns), 1)
    figure = Figure(figsize=(3.8 * columns + 1.2, 3.4 * rows + 1.0), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    styles = zoo_point_styles(records, zoo)
    key = SHARPNESS_PREFIX + measure
    for axes, (target, target_key) in zip(grid.flat, targets.items()):
        xs = _zoo_panel(axes, records, styles, key, target_key)
        axes.set_xlabel(f"sharpness: {measure}")
        axes.set_ylabel(target_label(target) if target == GEN_GAP else f"{target_label(target)} error")
        paired_x, paired_y = paired_values(records, key, target_key)
        axes.set_title(f"{target_label(target)}: {_title_tau(kendall_tau(paired_x, paired_y), len(paired_x))}",
                       fontsize="medium")
        # A log axis where sharpness spans decades; over a narrower range it only crowds the tick labels.
        if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
            axes.set_xscale("log")
    for axes in list(grid.flat)[len(targets):]:
        axes.set_visible(False)
    _zoo_legend(figure, grid, styles)
    figure.suptitle(f"{zoo}: error vs {measure} ({len(records)} models)")
    return _save(figure, path)


def _zoo_panel(axes: Any, records: Sequence[Record], styles: PointStyles, x_key: str, y_key: str) -> list[float]:
    # One scatter call per marker: matplotlib varies colour and size within a call, not the marker.
    by_marker: dict[str, list[tuple[float, float, Any, float]]] = defaultdict(list)
    for index, record in enumerate(records):
        x, y = target_value(record, x_key), target_value(record, y_key)
        if x is not None and y is not None:
            by_marker[styles.markers[index]].append((x, y, styles.colours[index], styles.sizes[index]))
    for marker, points in by_marker.items():
        axes.scatter([p[0] for p in points], [p[1] for p in points], c=[p[2] for p in points],
                     s=[p[3] for p in points], marker=marker, edgecolors="none", alpha=0.85)
    return [p[0] for points in by_marker.values() for p in points]


def _zoo_legend(figure: Figure, grid: Any, styles: PointStyles) -> None:
    if styles.legend:
        handles = [Line2D([], [], linestyle="", marker=marker, color=colour, markersize=math.sqrt(size), label=label)
                   for label, colour, marker, size in styles.legend]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize="small")
    if styles.colour_scale is not None:
        norm, cmap, label = styles.colour_scale
        figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=grid, label=label, shrink=0.8)


def zoo_figure_name(zoo: str, measure: str) -> str:
    """The PNG file name of a zoo's figure for ``measure``: ``zoo_<zoo>_<measure>.png``."""
    return f"zoo_{zoo}_{measure}.png"


def draw_zoo_figures(
    kept: Sequence[Record], zoo: str, measures: Sequence[str], out_dir: Path
) -> tuple[list[Path], list[str]]:
    """Draw :func:`plot_zoo_error_vs_sharpness` of one zoo for each of ``measures`` that some kept model has.

    Returns:
        ``(paths, notes)``: the PNGs written (:func:`zoo_figure_name`) and one note per measure skipped because no kept
        model has it.
    """
    paths: list[Path] = []
    notes: list[str] = []
    for measure in measures:
        models = [record for record in kept if metric(record, SHARPNESS_PREFIX + measure) is not None]
        if not models:
            notes.append(f"no figure for {zoo} {measure}: no kept model has {SHARPNESS_PREFIX}{measure}")
            continue
        paths.append(plot_zoo_error_vs_sharpness(models, zoo, measure, out_dir / zoo_figure_name(zoo, measure)))
    return paths, notes
