"""What a grid is made of and how far it has got: ``python -m lit_sharp.grid status GRID [overrides...]``.

``python -m lit_sharp.grid sync GRID [overrides...]`` uploads the grid's offline W&B runs (run it where there is
internet, e.g. a cluster's login node).

A grid is a ``configs/grid/<name>.yaml`` whose ``hydra.sweeper.params`` Hydra's basic sweeper expands into runs.
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
import functools
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lit_sharp.config import CONFIG_DIR
from lit_sharp.locks import is_held
from lit_sharp.results import ResultsError, read_results, run_status
from lit_sharp.run_folder import CHECKPOINT_DIR, LAST_CHECKPOINT, RUN_LOCK, run_dir_of

STATES = ("completed", "running", "resumable", "failed", "diverged", "pending")


def expand(grid: str, overrides: list[str] | tuple[str, ...] = ()) -> list[DictConfig]:
    """The config of every run of ``grid`` (with extra ``overrides``), as ``python train.py grid=<grid>`` launches them."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        hydra_cfg = compose(config_name="train", overrides=[f"grid={grid}", *overrides], return_hydra_config=True).hydra
        params = OmegaConf.to_container(hydra_cfg.sweeper.params or {}, resolve=False)
        # As a multirun sweeps: the grid's parameters, then the command line's task overrides (a later value of a key
        # replaces an earlier one); Hydra's own overrides (hydra.*, hydra/...) go before every run's.
        sweep = [*(f"{key}={value}" for key, value in params.items()), *hydra_cfg.overrides.task]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        return compose_runs(list(hydra_cfg.overrides.hydra), sweep_combos(parser.parse_overrides(sweep)))


def sweep_combos(sweep: list[Override]) -> list[list[str]]:
    """The overrides of each run, in launch order, as Hydra's basic sweeper expands ``sweep``."""
    # Hydra has no public API for this expansion (the cartesian product, the runs' order, a later override of a key
    # replacing an earlier one), so call the basic sweeper's own; tests/test_grid.py fails if Hydra changes it.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(sweep, max_batch_size=None)[0]


def compose_runs(hydra_overrides: list[str], combos: list[list[str]]) -> list[DictConfig]:
    """The config of each run from its overrides ``combos``, as Hydra composes it (without the ``hydra`` node)."""
    parsed = [OverridesParser.create().parse_overrides(combo) for combo in combos]
    groups_under = functools.cache(GlobalHydra.instance().config_loader().list_groups)
    runs = [_split_groups(overrides, groups_under) for overrides in parsed]
    if any(groups != runs[0][0] for groups, _ in runs):
        return [compose(config_name="train", overrides=[*hydra_overrides, *combo]) for combo in combos]
    # The usual grid: runs differ in values only. Composing each of a paper grid's 204 runs takes ~20 s of CPU;
    # composing the shared config once and applying each run's values as Hydra does after composing, ~1 s.
    shared = compose(config_name="train", overrides=[*hydra_overrides, *runs[0][0]])
    return [with_values(shared, values) for _, values in runs]


def _split_groups(overrides: list[Override], groups_under: Callable[[str], list[str]]
                  ) -> tuple[list[str], list[Override]]:
    # Hydra's rule: an override of a config group's name picks an option of the group, unless its value is a dict.
    groups, values = [], []
    for override in overrides:
        parent, _, name = override.key_or_group.rpartition("/")
        if name in groups_under(parent) and not isinstance(override.value(), dict):
            groups.append(override.input_line)
        else:
            values.append(override)
    return groups, values


def with_values(cfg: DictConfig, overrides: list[Override]) -> DictConfig:
    """A copy of ``cfg`` with the value overrides ``overrides`` applied in order, see :func:`apply_value`."""
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        apply_value(cfg, override)
    return cfg


def apply_value(cfg: DictConfig, override: Override) -> None:
    """Apply a value override to ``cfg`` as Hydra 1.3 does after composing, with its errors and their messages.

    ``key=v`` sets an existing key; ``+key=v`` adds a key that is not there (or merges a dict or list into it);
    ``++key=v`` sets or adds; ``~key`` deletes, ``~key=v`` only if the value is ``v``.
    """
    key, value, line = override.key_or_group, override.value(), override.input_line
    if override.package is not None:
        raise ConfigCompositionException(f"Override {line} looks like a config group override, but config group "
                                         f"'{key}' does not exist.")
    try:
        if override.is_delete():
            _delete(cfg, key, value)
        elif (override.is_add() and OmegaConf.select(cfg, key, throw_on_missing=False) is not None
              and not isinstance(value, (dict, list))):
            raise ConfigCompositionException(
                f"Could not append to config. An item is already at '{key}'.\nEither remove + prefix: "
                f"'{line[1:]}'\nOr add a second + to add or override '{key}': '+{line}'\n")
        elif override.is_add() or override.is_force_add():
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        else:
            try:
                OmegaConf.update(cfg, key, value, merge=True)
            except (ConfigAttributeError, ConfigKeyError) as exc:
                raise ConfigCompositionException(
                    f"Could not override '{key}'.\nTo append to your config use +{line}") from exc
    except OmegaConfBaseException as exc:
        raise ConfigCompositionException(f"Error merging override {line}") from exc


def _delete(cfg: DictConfig, key: str, value: object) -> None:
    current = OmegaConf.select(cfg, key, throw_on_missing=False)
    if current is None:
        raise ConfigCompositionException(f"Could not delete from config. '{key}' does not exist.")
    if value is not None and value != current:
        raise ConfigCompositionException(
            f"Could not delete from config. The value of '{key}' is {current} and not {value}.")
    parent, _, name = key.rpartition(".")
    with open_dict(cfg):
        del (OmegaConf.select(cfg, parent) if parent else cfg)[name]


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
        each.add_argument("grid", help="a name in configs/grid/, e.g. paper_resnet18")
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
    try:
        if args.command == "sync":
            return _sync(args.grid, args.overrides, dry_run=args.dry_run)
        rows = status_with_reasons(args.grid, args.overrides)
    except HydraException as exc:  # an override the grid's config refuses
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
