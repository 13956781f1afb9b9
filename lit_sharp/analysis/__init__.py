"""Kendall tau tables and figures over a grid of runs (docs/protocol.md section 5; the paper's Tables 3-4, Figures 5-6).

Andriushchenko et al., "A Modern Look at the Relationship between Sharpness and Generalization", ICML 2023,
correlate every sharpness measure with test error and CIFAR-10-C error over the models of one architecture whose
clean training error is at most 1%, overall and within each ``augment x mixup`` subgroup. This package does the same
over the ``results.json`` records of a grid, and adds the granulated Kendall coefficient of Jiang et al.,
"Fantastic Generalization Measures and Where to Find Them", ICLR 2020.

Run it as::

    python -m lit_sharp.analysis runs/<grid> --out runs/<grid>/analysis [--max-train-err 0.01] \
        [--measure NAME ...] [--bootstrap N] [--wandb [--wandb-mode offline|online]]

It writes into ``--out``:

- ``correlations.csv``: columns ``model, measure, target, subgroup, tau, n, ci_low, ci_high``. ``measure`` is the
  metric name without the ``sharpness/`` prefix; ``target`` is ``test_err`` (``final/test_err``) or ``c10c_err``
  (``c10c/err``); ``subgroup`` is ``all``, ``augment=<true|false>,mixup=<true|false>`` (mixup on when
  ``mixup_alpha > 0``), ``granulated:<axis>`` for the axes ``lr``, ``sam_rho``, ``mixup``, ``augment``, or
  ``granulated:mean``.
  ``tau`` is empty where it is undefined (fewer than 3 runs, or a constant column); ``n`` is the number of runs
  that entered the coefficient; ``ci_low, ci_high`` its 95% percentile bootstrap interval (models resampled with
  replacement, ``--bootstrap`` resamples, seeded), on the ``all`` and subgroup rows where tau is defined.
- ``tables.md``: per architecture, the layout of the paper's Tables 3 and 4, then the per-subgroup and granulated taus.
- ``runs.csv``: one row per completed run, kept or dropped, with its hyperparameters and metrics.
- ``fig5_<model>_<measure>.png`` (sharpness vs test error and vs CIFAR-10-C error) and ``fig6_<model>_<measure>.png``
  (sharpness vs learning rate) for the paper's headline measures and every ``--measure``.

Modules, each importing only those above it:

- :mod:`~lit_sharp.analysis.records`: reading the grid's ``results.json`` files, the training-error filter, grouping
  by architecture, the subgroup order.
- :mod:`~lit_sharp.analysis.measures`: measure names in the paper's terms (headline measures, table columns, order).
- :mod:`~lit_sharp.analysis.kendall`: Kendall's tau, bootstrap intervals, the granulated coefficient and the rows of
  ``correlations.csv`` (a module named ``correlations`` would be shadowed by the function the package exports).
- :mod:`~lit_sharp.analysis.tables`: ``correlations.csv``, ``runs.csv`` and ``tables.md``.
- :mod:`~lit_sharp.analysis.figures`: Figures 5 and 6 with matplotlib.
- :mod:`~lit_sharp.analysis.wandb_logging`: the ``analysis`` W&B run.
- :mod:`~lit_sharp.analysis.cli`: the command line (``__main__`` runs it).
"""

from lit_sharp.analysis.cli import build_parser, main
from lit_sharp.analysis.figures import draw_figures, plot_error_vs_sharpness, plot_sharpness_vs_lr
from lit_sharp.analysis.kendall import (
    CI_LEVEL,
    DEFAULT_BOOTSTRAP,
    GRANULATED_AXES,
    TARGETS,
    bootstrap_ci,
    bootstrap_taus,
    bootstrap_weights,
    correlations,
    granulated_tau,
    kendall_tau,
    paired_values,
)
from lit_sharp.analysis.measures import (
    HEADLINE_MEASURES,
    SHARPNESS_PREFIX,
    MeasureParts,
    measure_sort_key,
    measures_in,
    parse_measure,
)
from lit_sharp.analysis.records import (
    C10C_ERR,
    DEFAULT_MAX_TRAIN_ERR,
    TEST_ERR,
    TRAIN_ERR,
    Record,
    by_model,
    completed,
    load_runs,
    metric,
    model_key,
    split_by_train_err,
)
from lit_sharp.analysis.tables import CSV_COLUMNS, write_correlations_csv, write_runs_csv, write_tables_md
from lit_sharp.analysis.wandb_logging import SCATTER_COLUMNS, log_to_wandb, scatter_runs, wandb_target

__all__ = [
    "C10C_ERR",
    "CI_LEVEL",
    "CSV_COLUMNS",
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_MAX_TRAIN_ERR",
    "GRANULATED_AXES",
    "HEADLINE_MEASURES",
    "SCATTER_COLUMNS",
    "SHARPNESS_PREFIX",
    "TARGETS",
    "TEST_ERR",
    "TRAIN_ERR",
    "MeasureParts",
    "Record",
    "bootstrap_ci",
    "bootstrap_taus",
    "bootstrap_weights",
    "build_parser",
    "by_model",
    "completed",
    "correlations",
    "draw_figures",
    "granulated_tau",
    "kendall_tau",
    "load_runs",
    "log_to_wandb",
    "main",
    "measure_sort_key",
    "measures_in",
    "metric",
    "model_key",
    "paired_values",
    "parse_measure",
    "plot_error_vs_sharpness",
    "plot_sharpness_vs_lr",
    "scatter_runs",
    "split_by_train_err",
    "wandb_target",
    "write_correlations_csv",
    "write_runs_csv",
    "write_tables_md",
]
