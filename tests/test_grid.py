"""Grids: expansion, the local and submitit launchers, relaunch without repeats, locks, resume after a kill."""

import itertools
import re
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONFIGS, REPO, compose_config, subprocess_env, tiny_run_overrides
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from wandb_offline import offline_runs

import lit_sharp.grid
from lit_sharp.callbacks.run_clock import ATTEMPTS_FILE, read_attempts
from lit_sharp.analysis import main as analysis_main
from lit_sharp.gpu_slots import gpu_slot
from lit_sharp.grid import expand, main as grid_main, status, sweep_combos
from lit_sharp.results import read_results
from lit_sharp.train import run, run_dir_of


@pytest.mark.parametrize("grid", ["paper_resnet18", "paper_simplevit"])
def test_paper_grids_expand_to_204_distinct_runs(grid):
    cfgs = expand(grid)
    assert len(cfgs) == 204
    assert len({run_dir_of(cfg) for cfg in cfgs}) == 204
    assert {(cfg.data.augment, cfg.module.mixup_alpha, cfg.module.sam_rho) for cfg in cfgs} == {
        (aug, mix, rho) for aug in (False, True) for mix in (0.0, 0.5) for rho in (0.0, 0.05, 0.1)
    }
    lrs = sorted({cfg.module.lr for cfg in cfgs})
    assert len(lrs) == 17
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) / min(ratios) < 1.01  # log-spaced
    first = cfgs[0]
    assert first.model.name == grid.removeprefix("paper_")
    assert (first.trainer.max_epochs, first.data.batch_size, first.module.momentum) == (200, 128, 0.9)
    assert (first.module.weight_decay, first.module.warmup_fraction) == (5e-4, 0.4)
    assert first.logger.group == grid


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """A copy of the configs, read by lit_sharp.grid, that a test adds grids to."""
    copy = tmp_path / "configs"
    shutil.copytree(CONFIGS, copy)
    monkeypatch.setattr(lit_sharp.grid, "CONFIG_DIR", copy)
    return copy


def write_grid(configs, name, params):
    """A grid of the quickstart experiment sweeping ``params`` ({key: sweep string})."""
    grid = {"defaults": [{"override /experiment": "quickstart"}], "name": name,
            "hydra": {"mode": "MULTIRUN", "sweeper": {"params": params}}}
    (configs / "grid" / f"{name}.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(grid))


def hydra_compose(configs, overrides):
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


EDITS = {
    "+module.extra": "1,2",  # adds a key
    "++module.sam_rho": "0,0.05",  # sets a key that is there
    "++data.note": "a",  # adds a key that is not there
    "~trainer.enable_progress_bar": "true",  # deletes a key if its value matches
    "~callbacks.corruption": "null",  # deletes a key
}


@pytest.mark.parametrize("groups", [(), ("resnet18", "simplevit")], ids=["values", "values_and_groups"])
def test_sweeps_that_add_force_and_delete_give_the_configs_hydra_composes(configs, groups):
    write_grid(configs, "edits", {**({"model": ",".join(groups)} if groups else {}), **EDITS})
    launch = ["~callbacks.sharpness", "+module.note=x", "++seed=3"]
    cfgs = expand("edits", launch)
    # The overrides of each run, in the basic sweeper's order: the grid's parameters, then the launch's.
    runs = [[*([f"model={model}"] if model else []), f"+module.extra={extra}", f"++module.sam_rho={rho}",
             "++data.note=a", "~trainer.enable_progress_bar=true", "~callbacks.corruption=null", "grid=edits", *launch]
            for model, extra, rho in itertools.product(groups or [None], (1, 2), (0, 0.05))]
    assert [OmegaConf.to_yaml(cfg) for cfg in cfgs] == [OmegaConf.to_yaml(hydra_compose(configs, run)) for run in runs]
    assert [(cfg.module.extra, cfg.module.sam_rho, cfg.module.note, cfg.seed) for cfg in cfgs[:2]] == [
        (1, 0, "x", 3), (1, 0.05, "x", 3)]
    assert all(cfg.data.note == "a" and "enable_progress_bar" not in cfg.trainer for cfg in cfgs)
    assert all(set(cfg.callbacks) == {"final_errors"} for cfg in cfgs)
    if groups:
        assert [cfg.model.name for cfg in cfgs] == [model for model in groups for _ in range(4)]


@pytest.mark.parametrize("key,value", [("+module.lr", "1"), ("~module.lr", "3"), ("~module.nokey", "null"),
                                       ("module.nokey", "1"), ("+module.nokey@foo", "1")])
def test_a_sweep_hydra_refuses_fails_with_hydras_message(configs, capsys, key, value):
    write_grid(configs, "refused", {key: value})
    with pytest.raises(ConfigCompositionException) as hydra_error:
        hydra_compose(configs, [f"{key}={value}", "grid=refused"])
    with pytest.raises(ConfigCompositionException) as error:
        expand("refused")
    assert str(error.value) == str(hydra_error.value)
    assert grid_main(["status", "refused"]) == 2
    assert capsys.readouterr().err == f"error: {hydra_error.value}\n"


def test_a_launch_override_of_a_swept_key_replaces_the_sweep_as_in_hydra():
    cfgs = expand("smoke", ["module.sam_rho=0.1"])
    assert [(cfg.module.sam_rho, cfg.module.mixup_alpha) for cfg in cfgs] == [(0.1, 0.0), (0.1, 0.5)]


def test_hydra_basic_sweeper_still_expands_sweeps_as_grid_expects():
    # sweep_combos calls a Hydra internal (there is no public API for the basic sweeper's expansion).
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        sweep = parser.parse_overrides(["model=glob([resnet18,simplevit])", "seed=range(0,3)",
                                        "module.lr=choice(0.1,0.2)", "name=x", "module.lr=0.3"])
        try:
            combos = sweep_combos(sweep)
        except (ImportError, AttributeError, TypeError) as exc:
            pytest.fail(f"Hydra's basic sweeper (hydra._internal.core_plugins.basic_sweeper.BasicSweeper."
                        f"split_arguments) is gone or changed its signature; lit_sharp.grid.sweep_combos must "
                        f"follow: {exc!r}")
    expected = [[f"model={model}", f"seed={seed}", "module.lr=0.3", "name=x"]
                for model in ("resnet18", "simplevit") for seed in range(3)]
    assert combos == expected, (
        "Hydra's basic sweeper no longer expands a glob x range sweep (a later value of a key replacing an earlier "
        f"choice) into these 6 runs in this order; lit_sharp.grid.sweep_combos must follow.\ngot:      {combos}"
        f"\nexpected: {expected}")


def smoke_command(synthetic_root, runs, *launcher):
    tiny = [o for o in tiny_run_overrides(synthetic_root, runs) if not o.startswith(("experiment=", "trainer.max_epochs"))]
    return [sys.executable, "train.py", "-m", "grid=smoke", *tiny, *launcher]


def run_cli(command, timeout=600):
    # One thread per process: the launchers run several training processes at once on few cores.
    env = subprocess_env(OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def smoke_run_dirs(runs):
    return sorted(path.parent for path in (runs / "smoke").glob("*/results.json"))


def test_smoke_grid_on_the_local_launcher_then_relaunch_creates_nothing(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    run_cli(smoke_command(synthetic_root, runs, "hydra/launcher=local", "hydra.launcher.n_jobs=2"))
    run_dirs = smoke_run_dirs(runs)
    assert len(run_dirs) == 4
    records = [read_results(d) for d in run_dirs]
    assert all(r["run"]["status"] == "completed" for r in records)
    assert {(r["hparams"]["sam_rho"], r["hparams"]["mixup_alpha"]) for r in records} == {
        (0.0, 0.0), (0.0, 0.5), (0.05, 0.0), (0.05, 0.5)}
    assert all(len(offline_runs(d)) == 1 for d in run_dirs)
    assert all(any(k.startswith("sharpness/") for k in r["metrics"]) and "c10c/err" in r["metrics"] for r in records)
    stamps = {d: (d / "results.json").stat().st_mtime_ns for d in run_dirs}

    # The grid's records feed the analysis (the tiny one-epoch models miss 1% training error: keep them all).
    out = tmp_path / "analysis"
    assert analysis_main([str(runs / "smoke"), "--out", str(out), "--max-train-err", "1"]) == 0
    rows = (out / "correlations.csv").read_text().splitlines()
    assert rows[0] == "model,measure,target,subgroup,tau,n,ci_low,ci_high"
    assert any(row.startswith("resnet18,worst_linf_adaptive_ln_rho0.002,test_err,all,") for row in rows)
    assert (out / "tables.md").is_file() and (out / "runs.csv").is_file()
    assert (out / "fig5_resnet18_worst_linf_adaptive_ln_rho0.002.png").read_bytes()[:4] == b"\x89PNG"

    started = time.monotonic()
    run_cli(smoke_command(synthetic_root, runs, "hydra/launcher=local", "hydra.launcher.n_jobs=2"))
    assert time.monotonic() - started < 120
    assert smoke_run_dirs(runs) == run_dirs
    assert all(len(offline_runs(d)) == 1 for d in run_dirs)
    assert {d: (d / "results.json").stat().st_mtime_ns for d in run_dirs} == stamps
    assert grid_main(["status", "smoke", f"paths.root={runs}", f"data.root={synthetic_root}"]) == 0
    assert [len(v) for v in status("smoke", [f"paths.root={runs}"]).values()] == [4, 0, 0, 0, 0, 0]


def test_smoke_grid_on_submitit_local(synthetic_root, tmp_path):
    runs = tmp_path / "runs"
    run_cli(smoke_command(synthetic_root, runs, "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=30"))
    records = [read_results(d) for d in smoke_run_dirs(runs)]
    assert len(records) == 4 and all(r["run"]["status"] == "completed" for r in records)


def _hold(path, ready, release):
    with FileLock(str(path)):
        ready.set()
        release.wait(600)


def test_a_run_locked_by_another_process_is_not_trained_twice(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "trainer.max_steps=2")
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(run_dir / ".lock", ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        assert run(cfg)["run"]["status"] == "running"
        assert not (run_dir / "results.json").exists() and not (run_dir / "wandb").exists()
        assert status("smoke", [f"paths.root={tmp_path}"])  # expansion works while a lock is held
    finally:
        release.set()
        holder.join()


def test_a_killed_run_resumes_on_relaunch(synthetic_root, tmp_path):
    # Many short epochs: the kill lands after the first checkpoint with seconds to spare, even on a loaded machine.
    overrides = [*tiny_run_overrides(synthetic_root, tmp_path), "trainer.max_epochs=10", "data.batch_size=64",
                 "data.augment=false", "~callbacks.sharpness", "~callbacks.corruption"]
    command = [sys.executable, "train.py", *overrides]
    env = subprocess_env()
    cfg = compose_config(*overrides)
    checkpoint = run_dir_of(cfg) / "checkpoints" / "last.ckpt"
    output = (tmp_path / "first_attempt.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)
    attempts = run_dir_of(cfg) / ATTEMPTS_FILE
    deadline = time.monotonic() + 300
    # Kill once the attempt has recorded its seconds after its last checkpoint: time that checkpoint does not hold.
    while not (checkpoint.exists() and _recorded_since(attempts, checkpoint)) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    output.close()
    log = (tmp_path / "first_attempt.log").read_text()[-3000:]
    assert checkpoint.exists(), log
    (first_seconds,) = read_attempts(attempts).values()
    (clock_state,) = [v for k, v in torch.load(checkpoint, weights_only=False)["callbacks"].items()
                      if k.startswith("RunClock")]
    assert first_seconds > clock_state["seconds"]  # the killed attempt worked on after its last checkpoint
    assert not (run_dir_of(cfg) / "results.json").exists(), log
    from lit_sharp.grid import run_state

    assert run_state(run_dir_of(cfg)) == "resumable"
    wandb_id = (run_dir_of(cfg) / "wandb_id.txt").read_text().strip()

    result = run_cli(command)
    record = read_results(run_dir_of(cfg))
    assert record["run"]["status"] == "completed"
    assert record["run"]["wandb_id"] == wandb_id  # the same W&B run continues
    assert "resuming" in result.stderr + result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    # seconds = both attempts' time, the killed one's after its last checkpoint included
    by_attempt = read_attempts(attempts)
    assert len(by_attempt) == 2 and first_seconds in by_attempt.values()
    assert record["run"]["seconds"] == pytest.approx(sum(by_attempt.values()))


def _recorded_since(attempts, checkpoint):
    """Whether the attempts file was written after the checkpoint (a time-based record, not the checkpoint's own)."""
    try:
        return attempts.stat().st_mtime_ns > checkpoint.stat().st_mtime_ns + 200_000_000
    except FileNotFoundError:
        return False


def _take_slot(lock_dir, queue, release):
    with gpu_slot(["GPU-0", "GPU-1"], 2, lock_dir=lock_dir, poll_seconds=0.05) as gpu:
        queue.put(gpu)
        release.wait(600)


def test_gpu_slots_spread_runs_over_gpus_and_cap_runs_per_gpu(tmp_path):
    ctx = mp.get_context("spawn")
    queue, release = ctx.Queue(), ctx.Event()
    holders = []
    for _ in range(4):
        holder = ctx.Process(target=_take_slot, args=(tmp_path, queue, release))
        holder.start()
        holders.append(holder)
        holders_gpu = queue.get(timeout=60)
        holders[-1].gpu = holders_gpu
    assert [h.gpu for h in holders] == [0, 1, 0, 1]
    fifth = ctx.Process(target=_take_slot, args=(tmp_path, queue, release))
    fifth.start()
    time.sleep(1.0)
    assert queue.empty()  # all four slots are taken: the fifth run waits
    release.set()
    assert queue.get(timeout=60) in (0, 1)
    for process in [*holders, fifth]:
        process.join(timeout=60)
    with pytest.raises(ValueError, match="runs_per_gpu"):
        with gpu_slot(["GPU-0"], 0, lock_dir=tmp_path):
            pass


def test_progress_line_counts_and_eta_from_completed_runs(tmp_path):
    from lit_sharp.grid import STATES, progress_line
    from lit_sharp.results import make_record, write_results

    by_state = {state: [] for state in STATES}
    hparams = {"model": "resnet18", "lr": 0.1, "sam_rho": 0.0, "mixup_alpha": 0.0, "augment": False, "seed": 0}
    for name, status, seconds in (("a", "completed", 100.0), ("b", "completed", 500.0), ("c", "failed", 7.0)):
        write_results(tmp_path / name, make_record(name=name, status=status, seconds=seconds, wandb_id=None,
                                                   hparams=hparams, config={}, metrics={}))
        by_state[status].append(tmp_path / name)
    by_state["running"] = [tmp_path / "d", tmp_path / "e"]
    by_state["pending"] = [tmp_path / f"p{i}" for i in range(5)]
    # 10 runs; left: 1 failed (a relaunch trains it again) + 2 running + 5 pending = 8;
    # mean 300 s per run, 2 at a time: 8 x 300 / 2 = 1200 s = 20 min.
    assert progress_line(by_state) == ("progress: 2/10 completed (20%), 2 running, 1 failed, "
                                       "ETA 20 min (8 runs x 5 min / 2)")
    assert progress_line({**by_state, "completed": []}).endswith("ETA unknown (no completed run yet)")


def test_each_launch_gets_its_own_sweep_folder():
    from hydra.core.utils import setup_globals

    setup_globals()  # Hydra's ${now:...}, as a launch has it
    folders = []
    for _ in range(2):  # two launches within the same second
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["grid=smoke"], return_hydra_config=True)
        folder = cfg.hydra.sweep.dir
        assert folder == cfg.hydra.sweep.dir  # one launch resolves one folder, for all of its jobs
        folders.append(folder)
    assert folders[0] != folders[1]
    assert all(re.fullmatch(r".*/smoke/_hydra/multirun_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", f) for f in folders)
