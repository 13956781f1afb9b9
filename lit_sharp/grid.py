"""What a grid is made of and how far it has got: ``python -m lit_sharp.grid status GRID [overrides...]``.

A grid is a ``configs/grid/<name>.yaml`` whose ``hydra.sweeper.params`` Hydra's basic sweeper expands into runs.
The same expansion here gives every run's folder, and each folder's state says where the run stands:

- ``completed`` / ``diverged`` / ``failed``: its ``results.json`` says so (``failed`` runs are trained again on relaunch);
- ``running``: a process holds the folder's lock;
- ``resumable``: a checkpoint but no result and no process (a relaunch resumes it);
- ``pending``: nothing yet.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from pathlib import Path

from filelock import FileLock, Timeout
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lit_sharp.results import ResultsError, read_results, run_status
from lit_sharp.train import CHECKPOINT_DIR, LAST_CHECKPOINT, run_dir_of

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
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
    """One of :data:`STATES` for the run folder ``run_dir``."""
    status = run_status(run_dir)
    if status is not None:
        return status
    lock = run_dir / ".lock"
    if lock.exists():
        try:
            with FileLock(str(lock), timeout=0):
                pass
        except Timeout:
            return "running"
    return "resumable" if (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file() else "pending"


def status(grid: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """Run folders of ``grid`` grouped by state."""
    by_state: dict[str, list[Path]] = {state: [] for state in STATES}
    for cfg in expand(grid, overrides):
        run_dir = run_dir_of(cfg)
        by_state[run_state(run_dir)].append(run_dir)
    return by_state


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
    show.add_argument("grid", help="a name in configs/grid/, e.g. paper_resnet18")
    show.add_argument("overrides", nargs="*", help="the overrides the grid was launched with, e.g. paths.root=/scratch/runs")
    show.add_argument("--list", action="store_true", help="also print every run folder that is not completed")
    args = parser.parse_args(argv)
    available = sorted(path.stem for path in (CONFIG_DIR / "grid").glob("*.yaml"))
    if args.grid not in available:
        print(f"error: unknown grid {args.grid!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    by_state = status(args.grid, args.overrides)
    total = sum(len(runs) for runs in by_state.values())
    counts = Counter({state: len(runs) for state, runs in by_state.items()})
    print(f"grid {args.grid}: {total} runs")
    print(progress_line(by_state))
    for state in STATES:
        print(f"  {state:<10} {counts[state]}")
    if args.list:
        for state in STATES[1:]:
            for run_dir in by_state[state]:
                print(f"{state:<10} {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
