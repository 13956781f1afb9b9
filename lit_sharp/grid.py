"""What a grid is made of and how far it has got: ``python -m lit_sharp.grid status GRID [overrides...]``.

``python -m lit_sharp.grid sync GRID [overrides...]`` uploads the grid's offline W&B runs (run it where there is
internet, e.g. a cluster's login node).

A grid is a ``lit_sharp/configs/grid/<name>.yaml`` whose ``hydra.sweeper.params`` Hydra's basic sweeper expands into runs.
The same expansion here gives every run's folder, and each folder's state says where the run stands:

- ``completed`` / ``diverged``: its ``results.json`` says so;
- ``running``: a live process owns the folder's lock (read from the lock's owner file; status takes no lock);
- ``failed``: its ``results.json`` says so, with the reason (``--list`` prints it); a relaunch retries it;
- ``resumable``: a checkpoint but no result and no process (a relaunch resumes it);
- ``pending``: nothing yet.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lit_sharp.cli import CONFIG_DIR
from lit_sharp.locks import is_held
from lit_sharp.results import ResultsError, read_results, run_status
from lit_sharp.run_folder import CHECKPOINT_DIR, LAST_CHECKPOINT, RUN_LOCK, run_dir_of
STATES = ("completed", "running", "resumable", "failed", "diverged", "pending")


def expand(grid: str, overrides: list[str] | tuple[str, ...] = ()) -> list[DictConfig]:
    """The config of every run of ``grid`` (with extra ``overrides``), as ``python train.py grid=<grid>`` launches them."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        base = [f"grid={grid}", *overrides]
        hydra_cfg = compose(config_name="train", overrides=base, return_hydra_config=True).hydra
        params = OmegaConf.to_container(hydra_cfg.sweeper.params or {}, resolve=False)
        sweep = [f"{key}={value}" for key, value in params.items()]
        parsed = OverridesParser.create().parse_overrides(sweep)
        combos = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0] if sweep else [[]]
        if any(_is_group(override.key_or_group) for override in parsed):
            return [compose(config_name="train", overrides=[*base, *combo]) for combo in combos]
        # Value overrides only (the usual grid): compose once, then set the values, as Hydra's own merge would.
        root = compose(config_name="train", overrides=base)
        return [_with_values(root, combo) for combo in combos]


def _is_group(key: str) -> bool:
    return (CONFIG_DIR / key).is_dir()


def _with_values(root: DictConfig, combo: list[str]) -> DictConfig:
    cfg = copy.deepcopy(root)
    for override in OverridesParser.create().parse_overrides(combo):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


def run_state(run_dir: Path) -> str:
    """One of :data:`STATES` for the run folder ``run_dir``; reads files only, takes no lock."""
    status = run_status(run_dir)
    if status in ("completed", "diverged"):
        return status
    if is_held(run_dir / RUN_LOCK):
        return "running"
    if status is not None:
        return status
    return "resumable" if (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file() else "pending"


def reason(run_dir: Path) -> str:
    """Why a run failed, as its ``results.json`` says; empty when it says nothing."""
    try:
        return str(read_results(run_dir)["run"].get("error") or "")
    except ResultsError:
        return ""


def status(grid: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """Run folders of ``grid`` grouped by state."""
    by_state: dict[str, list[Path]] = {state: [] for state in STATES}
    for run_dir, state, _ in status_with_reasons(grid, overrides):
        by_state[state].append(run_dir)
    return by_state


def status_with_reasons(grid: str, overrides: list[str] | tuple[str, ...] = ()) -> list[tuple[Path, str, str]]:
    """``(run folder, state, reason)`` of every run of ``grid``; reads files only, takes no lock."""
    rows = []
    for cfg in expand(grid, overrides):
        run_dir = run_dir_of(cfg)
        state = run_state(run_dir)
        rows.append((run_dir, state, reason(run_dir) if state == "failed" else ""))
    return rows


def offline_wandb_runs(grid: str, overrides: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The offline W&B run folders of every run of ``grid``."""
    return [path for cfg in expand(grid, overrides) for path in sorted(run_dir_of(cfg).glob("wandb/offline-run-*"))]


def progress_line(by_state: dict[str, list[Path]]) -> str:
    """``completed/total``, running and failed counts, and an ETA from the completed runs' recorded seconds.

    ETA = mean seconds of a completed run x runs left (neither completed nor diverged; a relaunch trains failed runs
    again) / runs training now (at least 1): the time left if the launches keep as many runs going as they do now.
    """
    total = sum(len(runs) for runs in by_state.values())
    done, running, failed = (len(by_state[state]) for state in ("completed", "running", "failed"))
    line = f"progress: {done}/{total} completed ({100 * done / max(total, 1):.0f}%), {running} running, {failed} failed"
    seconds = [_seconds(run_dir) for run_dir in by_state["completed"]]
    seconds = [value for value in seconds if value is not None]
    left = total - done - len(by_state["diverged"])
    if not left:
        return line + ", nothing left"
    if not seconds:
        return line + ", ETA unknown (no completed run yet)"
    eta = sum(seconds) / len(seconds) * left / max(running, 1)
    return line + f", ETA {_duration(eta)} ({left} runs x {_duration(sum(seconds) / len(seconds))} / {max(running, 1)})"


def _seconds(run_dir: Path) -> float | None:
    try:
        value = read_results(run_dir)["run"].get("seconds")
    except (ResultsError, OSError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_sharp.grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("status", help="count the runs of a grid by state")
    sync = sub.add_parser("sync", help="upload the grid's offline W&B runs (needs internet and a W&B login)")
    for each in (show, sync):
        each.add_argument("grid", help="a name in lit_sharp/configs/grid/, e.g. paper_resnet18")
        each.add_argument("overrides", nargs="*",
                          help="the overrides the grid was launched with, e.g. paths.root=/scratch/runs")
    show.add_argument("--list", action="store_true", help="also print every run folder that is not completed, "
                      "with the reason of the failed ones")
    sync.add_argument("--dry-run", action="store_true", help="print the wandb sync command instead of running it")
    args = parser.parse_args(argv)
    available = sorted(path.stem for path in (CONFIG_DIR / "grid").glob("*.yaml"))
    if args.grid not in available:
        print(f"error: unknown grid {args.grid!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    if args.command == "sync":
        return _sync(args.grid, args.overrides, dry_run=args.dry_run)
    rows = status_with_reasons(args.grid, args.overrides)
    counts = Counter(state for _, state, _ in rows)
    print(f"grid {args.grid}: {len(rows)} runs")
    by_state: dict[str, list[Path]] = {state: [] for state in STATES}
    for run_dir, state, _ in rows:
        by_state[state].append(run_dir)
    print(progress_line(by_state))
    for state in STATES:
        print(f"  {state:<10} {counts[state]}")
    if args.list:
        for state in STATES[1:]:
            for run_dir, row_state, why in rows:
                if row_state == state:
                    print(f"{state:<10} {run_dir}" + (f": {why}" if why else ""))
    return 0


def _sync(grid: str, overrides: list[str], *, dry_run: bool) -> int:
    runs = offline_wandb_runs(grid, overrides)
    if not runs:
        print(f"grid {grid}: no offline W&B runs to upload")
        return 0
    command = [sys.executable, "-m", "wandb", "sync", *map(str, runs)]
    if dry_run:
        print(" ".join(command))
        return 0
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
