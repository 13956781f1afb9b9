"""The training command: ``python -m lit_sharp [overrides]`` (``python train.py`` in a checkout), one run or a grid.

One run: a user error (bad config, missing data, a run folder holding another configuration) prints one line and
exits 2; a bug keeps its traceback. A grid (``-m``): no run stops the others. Each job that fails or is refused
writes its reason into its run's ``results.json`` and into ``outcome.json`` in its Hydra job folder, and ends
normally; when the grid is done, :class:`GridReport` prints one line counting the runs that did not finish, then one
line per such run with why, and the command exits 1. A run that another live process holds (its lock) did not
finish either. A job killed outright (out of memory, a node failure, ``scancel``, a signal) writes nothing itself:
the project's launchers (:mod:`lit_sharp.launchers`) write its outcome for it. This holds on every launcher, since
the outcome files are read from the sweep folder, wherever the jobs ran.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lit_sharp.config import CONFIG_DIR
from lit_sharp.errors import UserError
from lit_sharp.outcomes import failure_line, read_outcomes, run_name_of, unfinished_lines, write_outcome

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Train (or evaluate) the run ``cfg`` describes; see the module docstring for what failures do."""
    # Imported here, not at the top: torch and Lightning load only for a job that runs (not for --help or --cfg).
    from lit_sharp.train import run

    in_grid = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        record = run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not in_grid:
            sys.exit(2)
        _write_outcome("refused", str(exc), run_name_of(cfg))
        return
    except Exception as exc:
        if not in_grid:
            raise
        log.exception("run failed")  # the traceback goes to the job's log; the grid goes on
        _write_outcome("failed", f"{type(exc).__name__}: {exc}", run_name_of(cfg))
        return
    if in_grid:
        run_info = record.get("run", {})
        _write_outcome(str(run_info.get("status")), run_info.get("error"), run_info.get("name"))


def _write_outcome(status: str, error: str | None, run_name: str | None) -> None:
    hydra_cfg = HydraConfig.get()
    write_outcome(Path(hydra_cfg.runtime.output_dir), status, error, run_name, list(hydra_cfg.overrides.task))


def status_command(config: DictConfig) -> str:
    """The ``grid status`` command that lists this launch's runs with the reasons of the failed ones.

    A zoo launch (``mode=zoo``) has no grid config for ``grid status`` to expand; its hint is the launch itself, which
    skips the measured models and measures the rest.
    """
    if config.get("mode") == "zoo":
        return "the same command again, which measures only what is missing"
    overrides = [str(o) for o in config.hydra.overrides.task]
    grid = next((o.split("=", 1)[1] for o in overrides if o.startswith("grid=")), "GRID")
    rest = " ".join(o for o in overrides if not o.startswith("grid="))
    return f"python -m lit_sharp.grid status {grid} {rest} --list".replace("  ", " ")


class GridReport(Callback):
    """At the end of a grid, one line counting the runs that did not finish, one line naming each with why, and exit
    status 1 if any."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lit_sharp.launchers import register

        register()  # before Hydra instantiates the launcher

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        n_jobs = sum(1 for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()) \
            if sweep_dir.is_dir() else 0
        outcomes = read_outcomes(sweep_dir)
        line = failure_line(outcomes, n_jobs)
        if line is None:
            return
        print("\n".join([f"{line}; see {status_command(config)}", *unfinished_lines(outcomes)]), file=sys.stderr)
        sys.exit(1)  # SystemExit passes through Hydra's callback and error handling
