"""The command line ``python -m lit_sharp.analysis ROOT --out OUT``: arguments, checks, the run and its summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lit_sharp.analysis.figures import draw_figures, draw_zoo_figures
from lit_sharp.analysis.kendall import DEFAULT_BOOTSTRAP, correlations
from lit_sharp.analysis.measures import SHARPNESS_PREFIX, headline_measures
from lit_sharp.analysis.records import (
    DEFAULT_MAX_TEST_ERR,
    DEFAULT_MAX_TRAIN_ERR,
    Record,
    by_model,
    check_max_train_err,
    completed,
    filter_rule,
    is_zoo_record,
    load_runs,
    split_runs,
)
from lit_sharp.analysis.tables import write_correlations_csv, write_runs_csv, write_tables_md
from lit_sharp.analysis.wandb_logging import log_to_wandb, scatter_runs, wandb_target

# The package's logger, so the command's messages come from ``lit_sharp.analysis`` whichever module prints them.
log = logging.getLogger("lit_sharp.analysis")


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
            "OUT/fig6_<model>_<measure>.png. Records of pretrained zoo models (hparams.zoo) are analysed per zoo: "
            "tau against every <set>/err present and the generalization gap imagenet/err - final/train_err "
            "(target gen_gap), over the models with imagenet/err <= --max-test-err, and the figures "
            "OUT/zoo_<zoo>_<measure>.png."
        ),
    )
    parser.add_argument(
        "root", type=Path, metavar="ROOT", help="folder of the grid's runs; every results.json below it is read"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables and figures (created)")
    parser.add_argument(
        "--max-train-err", type=_fraction, default=DEFAULT_MAX_TRAIN_ERR,
        help="keep CIFAR-10 runs with final/train_err at most this fraction (default: %(default)s, the paper's 1%%); "
        "not applied to zoo models",
    )
    parser.add_argument(
        "--max-test-err", type=_fraction, default=DEFAULT_MAX_TEST_ERR,
        help="keep zoo models with imagenet/err at most this fraction (default: %(default)s): a model near 100%% "
        "error failed and is dropped, as the paper drops two ImageNet-21k AugReg models; models without "
        "imagenet/err are kept",
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
        check_max_train_err(value)
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
    rows = correlations(runs, args.max_train_err, bootstrap=args.bootstrap, seed=args.seed,
                        max_test_err=args.max_test_err)
    summaries: dict[str, str] = {}
    kept: list[Record] = []
    dropped: list[tuple[Record, str]] = []
    for model, model_runs in by_model(runs).items():
        model_kept, model_dropped = split_runs(model_runs, args.max_train_err, args.max_test_err)
        rule = filter_rule(model_runs, args.max_train_err, args.max_test_err)
        summaries[model] = _keep_summary(model, model_kept, model_dropped, rule)
        log.info(summaries[model])
        kept += model_kept
        dropped += model_dropped
    figures = _draw_all_figures(kept, args.measure, args.out)
    zoos = {model for model, model_runs in by_model(runs).items() if _is_zoo(model_runs)}
    written = [
        write_correlations_csv(rows, args.out / "correlations.csv"),
        write_tables_md(rows, summaries, args.out / "tables.md", zoos),
        write_runs_csv(kept, dropped, args.out / "runs.csv"),
        *(path for paths in figures.values() for path in paths),
    ]
    if args.wandb:
        _log_runs_to_wandb(args, runs, rows, figures, scatter_runs(kept, args.measure))
    log.info("wrote %s", ", ".join(str(path) for path in written))
    return 0


def _draw_all_figures(kept: Sequence[Record], requested: Sequence[str], out_dir: Path) -> dict[str, list[Path]]:
    extra = [name.removeprefix(SHARPNESS_PREFIX) for name in requested]
    figures: dict[str, list[Path]] = {}
    for model, model_kept in by_model(kept).items():
        zoo = _is_zoo(model_kept)
        measures = list(dict.fromkeys([*headline_measures(model, zoo=zoo), *extra]))
        draw = draw_zoo_figures if zoo else draw_figures
        paths, notes = draw(model_kept, model, measures, out_dir)
        for note in notes:
            log.info(note)
        figures[model] = paths
    return figures


def _is_zoo(records: Sequence[Record]) -> bool:
    return any(is_zoo_record(record) for record in records)


def _keep_summary(model: str, kept: Sequence[Record], dropped: Sequence[tuple[Record, str]], rule: str) -> str:
    reasons = Counter(reason for _, reason in dropped)
    why = "; ".join(f"{count} with {reason}" for reason, count in sorted(reasons.items()))
    total = len(kept) + len(dropped)
    summary = f"{model}: {len(kept)} of {total} completed runs kept ({rule}), {len(dropped)} dropped"
    return f"{summary} ({why})" if dropped else summary


def _log_runs_to_wandb(args: argparse.Namespace, runs: Sequence[Record], rows: Sequence[Mapping[str, Any]],
                       figures: Mapping[str, Sequence[Path]],
                       scatters: Sequence[tuple[str, str, Sequence[Record]]]) -> None:
    # One analysis run per W&B group, so a zoo's tables and plots sit beside its models' runs even when ROOT holds
    # several grids or zoos.
    models_of: dict[tuple[str, str], list[str]] = defaultdict(list)
    for model, model_runs in by_model(runs).items():
        models_of[wandb_target(model_runs, args.root)].append(model)
    for (project, group), models in models_of.items():
        log_to_wandb(
            [row for row in rows if row["model"] in models],
            [path for model in models for path in figures.get(model, ())],
            project=project, group=group, out_dir=args.out, mode=args.wandb_mode,
            config={"root": str(args.root), "max_train_err": args.max_train_err, "max_test_err": args.max_test_err,
                    "bootstrap": args.bootstrap, "seed": args.seed, "models": models},
            scatters=[scatter for scatter in scatters if scatter[0] in models],
        )
        log.info("logged to W&B (%s): project %s, group %s, run 'analysis' (%s)", args.wandb_mode, project, group,
                 ", ".join(models))
