"""The analysis' files of numbers: ``correlations.csv``, ``runs.csv`` and the Markdown tables ``tables.md``."""

from __future__ import annotations

import csv
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_sharp.analysis.measures import parse_measure
from lit_sharp.analysis.records import Record
from lit_sharp.analysis.zoo import target_label

CSV_COLUMNS = ("model", "measure", "target", "subgroup", "tau", "n", "ci_low", "ci_high")


def write_correlations_csv(rows: Iterable[Mapping[str, Any]], path: Path | str) -> Path:
    """Write rows from :func:`correlations` as CSV with the columns of ``CSV_COLUMNS``.

    Floats are written with ``repr`` (every digit); None (an undefined tau, no interval) as an empty cell.

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


def write_tables_md(
    rows: Sequence[Mapping[str, Any]], summaries: Mapping[str, str], path: Path | str, zoos: Collection[str] = ()
) -> Path:
    """Write the Markdown tables: per model, the layout of the paper's Tables 3 and 4, then subgroups and granulated;
    per zoo, the layout of the paper's Table 1 (one column per evaluation set present, and the generalization gap).

    Args:
        rows: rows from :func:`correlations`.
        summaries: model -> one sentence on which runs were kept.
        path: the file to write.
        zoos: the model keys that are zoos.

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
        if model in zoos:
            targets = list(dict.fromkeys(row["target"] for row in model_rows))
            lines += _table1(model, measures, targets, cells) + [""]
            continue
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


def _table1(
    zoo: str, measures: Sequence[str], targets: Sequence[str], cells: Mapping[tuple[str, ...], tuple[Any, int]]
) -> list[str]:
    header = "| Sharpness | LogitNorm | ρ | " + " | ".join(f"τ {target_label(t)} [95% CI]" for t in targets) + " | n |"
    lines = [header, "|---|---|---|" + "---|" * (len(targets) + 1)]
    for measure in measures:
        taus = [cells[(zoo, measure, target, "all")] for target in targets]
        n = max((count for _, count in taus), default=0)
        # The n column is the most models behind any cell; a cell resting on fewer says so.
        parts = [tau if count == n else f"{tau} (n={count})" for tau, count in taus]
        lines.append(f"| {_measure_columns(measure)} | " + " | ".join(parts) + f" | {n} |")
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
