"""Kendall tau tables and figures over a grid of runs (docs/protocol.md section 5; the paper's Tables 3-4, Figures 5-6).

Andriushchenko et al., "A Modern Look at the Relationship between Sharpness and Generalization", ICML 2023,
correlate every sharpness measure with test error and CIFAR-10-C error over the models of one architecture whose
clean training error is at most 1%, overall and within each ``augment x mixup`` subgroup. This package does the same
over the ``results.json`` records of a grid, and adds the granulated Kendall coefficient of Jiang et al.,
"Fantastic Generalization Measures and Where to Find Them", ICLR 2020. Records of pretrained models of a zoo
(``hparams.zoo``; the paper's Section 4) are analysed per zoo as the paper's Table 1 and Figures 2 and 3: tau of every
measure against each evaluation set's error and the generalization gap, over the models whose ImageNet error is at
most ``--max-test-err``.

Run it as::

    python -m lit_sharp.analysis runs/<grid> --out runs/<grid>/analysis [--max-train-err 0.01] \
        [--max-test-err 0.9] [--measure NAME ...] [--bootstrap N] [--wandb [--wandb-mode offline|online]]

It writes into ``--out``:

- ``correlations.csv``: columns ``model, measure, target, subgroup, tau, n, ci_low, ci_high``. ``measure`` is the
  metric name without the ``sharpness/`` prefix; ``target`` is ``test_err`` (``final/test_err``) or ``c10c_err``
  (``c10c/err``); ``subgroup`` is ``all``, ``augment=<true|false>,mixup=<true|false>`` (mixup on when
  ``mixup_alpha > 0``), ``granulated:<axis>`` for the axes ``lr``, ``sam_rho``, ``mixup``, ``augment``, or
  ``granulated:mean``.
  ``tau`` is empty where it is undefined (fewer than 3 runs, or a constant column); ``n`` is the number of runs
  that entered the coefficient; ``ci_low, ci_high`` its 95% percentile bootstrap interval (models resampled with
  replacement, ``--bootstrap`` resamples, seeded), on the ``all`` and subgroup rows where tau is defined.
  For a zoo, ``model`` is the zoo's name, ``subgroup`` is ``all``, ``target`` is ``<set>_err`` (``<set>/err``) for
  each evaluation set present or ``gen_gap`` (``imagenet/err - final/train_err``).
- ``tables.md``: per architecture, the layout of the paper's Tables 3 and 4, then the per-subgroup and granulated taus;
  per zoo, the layout of Table 1.
- ``runs.csv``: one row per completed run, kept or dropped, with its hyperparameters and metrics.
- ``fig5_<model>_<measure>.png`` (sharpness vs test error and vs CIFAR-10-C error) and ``fig6_<model>_<measure>.png``
  (sharpness vs learning rate) for the paper's headline measures and every ``--measure``; per zoo,
  ``zoo_<zoo>_<measure>.png`` (Figures 2 and 3: each evaluation set's error and the gap against sharpness).

Modules, each importing only those above it:

- :mod:`~lit_sharp.analysis.records`: reading the grid's ``results.json`` files, the training-error filter, grouping
  by architecture, the subgroup order.
- :mod:`~lit_sharp.analysis.zoo`: a zoo's targets (evaluation sets, generalization gap) and its models' encodings.
- :mod:`~lit_sharp.analysis.measures`: measure names in the paper's terms (headline measures, table columns, order).
- :mod:`~lit_sharp.analysis.kendall`: Kendall's tau, bootstrap intervals, the granulated coefficient and the rows of
  ``correlations.csv`` (a module named ``correlations`` would be shadowed by the function the package exports).
- :mod:`~lit_sharp.analysis.tables`: ``correlations.csv``, ``runs.csv`` and ``tables.md``.
- :mod:`~lit_sharp.analysis.figures`: Figures 5 and 6 with matplotlib.
- :mod:`~lit_sharp.analysis.wandb_logging`: the ``analysis`` W&B run.
- :mod:`~lit_sharp.analysis.cli`: the command line (``__main__`` runs it).
"""

from lit_sharp.analysis.cli import build_parser, main
from lit_sharp.analysis.figures import (
    AUG_SIZES,
    PointStyles,
    draw_figures,
    draw_zoo_figures,
    plot_error_vs_sharpness,
    plot_sharpness_vs_lr,
    plot_zoo_error_vs_sharpness,
    zoo_figure_name,
    zoo_point_styles,
)
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
    ZOO_HEADLINE_MEASURES,
    MeasureParts,
    measure_sort_key,
    measures_in,
    parse_measure,
    table1_sort_key,
)
from lit_sharp.analysis.records import (
    C10C_ERR,
    DEFAULT_MAX_TEST_ERR,
    DEFAULT_MAX_TRAIN_ERR,
    IMAGENET_ERR,
    TEST_ERR,
    TRAIN_ERR,
    ZOO_KEY,
    Record,
    by_model,
    completed,
    is_zoo_record,
    load_runs,
    metric,
    model_key,
    split_by_test_err,
    split_by_train_err,
    split_runs,
)
from lit_sharp.analysis.tables import CSV_COLUMNS, write_correlations_csv, write_runs_csv, write_tables_md
from lit_sharp.analysis.wandb_logging import (
    SCATTER_COLUMNS,
    log_to_wandb,
    scatter_runs,
    wandb_target,
    zoo_scatter_columns,
)
from lit_sharp.analysis.zoo import (
    AUG_STRENGTHS,
    EVAL_SET_LABELS,
    GEN_GAP,
    aug_strength,
    eval_sets_in,
    generalization_gap,
    target_label,
    target_value,
    zoo_family,
    zoo_targets,
)

__all__ = [
    "AUG_SIZES",
    "AUG_STRENGTHS",
    "C10C_ERR",
    "CI_LEVEL",
    "CSV_COLUMNS",
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_MAX_TEST_ERR",
    "DEFAULT_MAX_TRAIN_ERR",
    "EVAL_SET_LABELS",
    "GEN_GAP",
    "GRANULATED_AXES",
    "HEADLINE_MEASURES",
    "IMAGENET_ERR",
    "SCATTER_COLUMNS",
    "SHARPNESS_PREFIX",
    "TARGETS",
    "TEST_ERR",
    "TRAIN_ERR",
    "ZOO_HEADLINE_MEASURES",
    "ZOO_KEY",
    "MeasureParts",
    "PointStyles",
    "Record",
    "aug_strength",
    "bootstrap_ci",
    "bootstrap_taus",
    "bootstrap_weights",
    "build_parser",
    "by_model",
    "completed",
    "correlations",
    "draw_figures",
    "draw_zoo_figures",
    "eval_sets_in",
    "generalization_gap",
    "granulated_tau",
    "is_zoo_record",
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
    "plot_zoo_error_vs_sharpness",
    "scatter_runs",
    "split_by_test_err",
    "split_by_train_err",
    "split_runs",
    "table1_sort_key",
    "target_label",
    "target_value",
    "wandb_target",
    "write_correlations_csv",
    "write_runs_csv",
    "write_tables_md",
    "zoo_family",
    "zoo_figure_name",
    "zoo_point_styles",
    "zoo_scatter_columns",
    "zoo_targets",
]
