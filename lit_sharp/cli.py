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

import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lit_sharp.config import CONFIG_DIR
from lit_sharp.errors import UserError

OUTCOME_FILE = "outcome.json"
#: Outcomes of a job whose run needs nothing more.
FINISHED = ("completed", "diverged")
#: How the count line names each kind of unfinished outcome, in its order ("failed" always shows).
KINDS = {"failed": "failed", "refused": "refused", "running": "held by another process"}
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
        _write_outcome("refused", str(exc), _run_name(cfg))
        return
    except Exception as exc:
        if not in_grid:
            raise
        log.exception("run failed")  # the traceback goes to the job's log; the grid goes on
        _write_outcome("failed", f"{type(exc).__name__}: {exc}", _run_name(cfg))
        return
    if in_grid:
        run_info = record.get("run", {})
        _write_outcome(str(run_info.get("status")), run_info.get("error"), run_info.get("name"))


def _run_name(cfg: DictConfig) -> str | None:
    from lit_sharp.run_folder import run_dir_of

    try:
        return run_dir_of(cfg).name
    except Exception:  # noqa: BLE001 - a config too broken to name its run; the outcome's overrides still say which
        return None


def _write_outcome(status: str, error: str | None, run_name: str | None) -> None:
    hydra_cfg = HydraConfig.get()
    write_outcome(Path(hydra_cfg.runtime.output_dir), status, error, run_name, list(hydra_cfg.overrides.task))


def write_outcome(job_dir: Path, status: str, error: str | None, run_name: str | None, overrides: list[str]) -> None:
    """Write a job's ``outcome.json`` (status, error, run folder name, overrides) into its Hydra job folder."""
    outcome = {"status": status, "error": error, "run": run_name, "overrides": overrides}
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / OUTCOME_FILE).write_text(json.dumps(outcome, indent=2))


def read_outcomes(sweep_dir: Path) -> list[dict[str, Any]]:
    """The outcome of every job of a grid launch (its sweep folder)."""
    outcomes = []
    for path in sorted(Path(sweep_dir).glob(f"*/{OUTCOME_FILE}")):
        try:
            outcomes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            outcomes.append({"status": "failed", "error": f"unreadable {path}"})
    return outcomes


def failure_line(outcomes: list[dict[str, Any]], n_jobs: int) -> str | None:
    """One line counting the jobs of a grid launch whose run did not finish, by kind, or None when all finished."""
    counts = Counter(str(outcome["status"]) for outcome in outcomes if outcome["status"] not in FINISHED)
    silent = max(n_jobs - len(outcomes), 0)
    if not counts and not silent:
        return None
    kinds = [kind for kind in KINDS if kind == "failed" or counts[kind]] + sorted(set(counts) - set(KINDS))
    parts = [f"{counts[kind]} {KINDS.get(kind, kind)}" for kind in kinds] + \
        ([f"{silent} ended without an outcome"] if silent else [])
    return f"error: {sum(counts.values()) + silent} of {n_jobs} runs did not finish ({', '.join(parts)})"


def unfinished_lines(outcomes: list[dict[str, Any]]) -> list[str]:
    """One line per unfinished run: its folder name (or its overrides) and why, e.g. ``  <run>: running: held by
    host:pid``."""
    lines = []
    for outcome in outcomes:
        if outcome["status"] in FINISHED:
            continue
        who = outcome.get("run") or " ".join(outcome.get("overrides") or []) or "?"
        why = " ".join(str(outcome.get("error") or "no reason recorded").split())
        lines.append(f"  {who}: {outcome['status']}: {why}")
    return lines


def status_command(config: DictConfig) -> str:
    """The ``grid status`` command that lists this launch's runs with the reasons of the failed ones."""
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
