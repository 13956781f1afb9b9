"""Logging the analysis to an ``analysis`` W&B run in the grid's group: the correlations, figures and scatter plots."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_sharp.analysis.measures import SHARPNESS_PREFIX, headline_measures
from lit_sharp.analysis.records import C10C_ERR, TEST_ERR, Record, by_model, is_zoo_record, metric
from lit_sharp.analysis.tables import CSV_COLUMNS
from lit_sharp.analysis.zoo import ENCODED_HPARAMS, target_label, target_value, zoo_family, zoo_targets
from lit_sharp.results import subgroup_of

#: Columns of the per-measure table of runs behind the W&B scatter plots.
SCATTER_COLUMNS = ("run", "subgroup", "lr", "sharpness", "test_err", "c10c_err")


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
    For a zoo, the table ``runs/<zoo>/<measure>`` holds per model its name, the hyperparameters Figures 2 and 3
    encode, sharpness and every target of :func:`lit_sharp.analysis.zoo.zoo_targets`, with one scatter plot per
    target, ``zoo/<zoo>/<measure>/<target>``.

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


def scatter_runs(
    kept: Sequence[Record], requested: Sequence[str] = ()
) -> list[tuple[str, str, list[Record]]]:
    """``(model, measure, runs)`` for each figure the analysis draws: headline and requested measures that runs have."""
    extra = [name.removeprefix(SHARPNESS_PREFIX) for name in requested]
    out = []
    for model, model_kept in by_model(kept).items():
        zoo = any(is_zoo_record(record) for record in model_kept)
        for measure in dict.fromkeys([*headline_measures(model, zoo=zoo), *extra]):
            runs = [record for record in model_kept if metric(record, SHARPNESS_PREFIX + measure) is not None]
            if runs:
                out.append((model, measure, runs))
    return out


def _scatter_plots(wandb: Any, model: str, measure: str, runs: Sequence[Record]) -> dict[str, Any]:
    if any(is_zoo_record(record) for record in runs):
        return _zoo_scatter_plots(wandb, model, measure, runs)
    data = [
        [record["run"]["name"], subgroup_of(record["hparams"]), float(record["hparams"]["lr"]),
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


def zoo_scatter_columns(zoo: str, runs: Sequence[Record]) -> list[str]:
    """Columns of a zoo's W&B table of models: ``run``, the encoded hyperparameters, ``sharpness``, the targets."""
    return ["run", *ENCODED_HPARAMS[zoo_family(zoo)], "sharpness", *zoo_targets(runs)]


def _zoo_scatter_plots(wandb: Any, zoo: str, measure: str, runs: Sequence[Record]) -> dict[str, Any]:
    targets = zoo_targets(runs)
    encoded = ENCODED_HPARAMS[zoo_family(zoo)]
    data = [
        [record["run"]["name"], *(record["hparams"].get(name) for name in encoded),
         metric(record, SHARPNESS_PREFIX + measure), *(target_value(record, key) for key in targets.values())]
        for record in runs
    ]
    table = wandb.Table(columns=zoo_scatter_columns(zoo, runs), data=data)
    key = f"{zoo}/{measure}"
    plots = {f"runs/{key}": table}
    for target in targets:
        plots[f"zoo/{key}/{target}"] = wandb.plot.scatter(
            table, "sharpness", target, title=f"{zoo}: {target_label(target)} vs {measure}")
    return plots
