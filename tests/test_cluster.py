"""Runs at cluster scale: measurements that survive a crash, grids that survive a run, W&B that cannot lose a run,
locks that fit shared machines and file systems, and an installed package."""

import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, subprocess_env, tiny_run_overrides
from wandb_offline import offline_runs, read_offline_run, run_id_of

import lit_sharp.training as training_module
from lit_sharp.analysis import correlations
from lit_sharp.assembly import download_lock
from lit_sharp.errors import UserError
from lit_sharp.gpu_slots import gpu_slot, scheduler_owns_gpus, slot_lock_names
from lit_sharp.grid import main as grid_main, run_state, status
from lit_sharp.locks import LockBusy, hold, is_held, owner_path, read_owner
from lit_sharp.module import ClassifierModule, Diverged
from lit_sharp.results import make_record, read_results
from lit_sharp.run_folder import hparams_of
from lit_sharp.train import run, run_dir_of

QUICK = ["~callbacks.sharpness", "~callbacks.corruption", "trainer.max_steps=2"]


def test_a_crash_while_measuring_is_measured_on_relaunch_without_training_again(synthetic_root, tmp_path, monkeypatch):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "~callbacks.sharpness", "trainer.max_steps=2")
    build = training_module.build_named_callbacks

    def corruption_crashes(cfg):
        callbacks = build(cfg)

        def crash(*args, **kwargs):
            raise OSError("simulated crash while measuring")

        callbacks["corruption"].measure = crash
        return callbacks

    monkeypatch.setattr(training_module, "build_named_callbacks", corruption_crashes)
    with pytest.raises(OSError, match="simulated crash"):
        run(cfg)
    run_dir = run_dir_of(cfg)
    failed = read_results(run_dir)
    assert failed["run"]["status"] == "failed"
    assert failed["run"]["measurement"] == "corruption" and "simulated crash" in failed["run"]["error"]
    assert failed["run"]["measured"] == ["final_errors"] and "final/test_err" in failed["metrics"]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    trained = checkpoint.stat().st_mtime_ns
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2

    monkeypatch.setattr(training_module, "build_named_callbacks", build)
    record = run(cfg)  # relaunch: training had ended, so only the missing measurement runs
    assert record["run"]["status"] == "completed" and "error" not in record["run"]
    assert record["run"]["measured"] == ["final_errors", "corruption"]
    assert record["metrics"]["final/test_err"] == failed["metrics"]["final/test_err"]
    assert 0.0 <= record["metrics"]["c10c/err"] <= 1.0
    assert checkpoint.stat().st_mtime_ns == trained  # no training step ran, no checkpoint was written
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    first, resumed = offline_runs(run_dir)  # the same W&B run, resumed by id
    assert run_id_of(first) == run_id_of(resumed) == record["run"]["wandb_id"]
    summary = read_offline_run(resumed)["summary"]
    assert summary["c10c/err"] == record["metrics"]["c10c/err"] and summary["run/status"] == "completed"
    assert summary["final/test_err"] == record["metrics"]["final/test_err"]


def smoke_grid(synthetic_root, runs, *extra):
    tiny = [o for o in tiny_run_overrides(synthetic_root, runs) if not o.startswith(("experiment=", "trainer.max_epochs"))]
    return [sys.executable, "train.py", "-m", "grid=smoke", *tiny, "logger=none", *QUICK, *extra]


def _kill_when_locked(run_dir, killed, stop):
    """SIGKILL the process that takes ``run_dir``'s lock, as the OOM killer or a node failure would."""
    owner = run_dir / ".lock.owner"
    while not stop.is_set():
        try:
            pid = json.loads(owner.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.02)
            continue
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return


@pytest.mark.parametrize("launcher", [(), ("hydra/launcher=local", "hydra.launcher.n_jobs=2"),
                                      ("hydra/launcher=slurm_local", "hydra.launcher.timeout_min=30")],
                         ids=["basic", "joblib", "submitit_local"])
def test_a_refused_held_or_killed_run_does_not_stop_its_grid(synthetic_root, tmp_path, launcher):
    runs = tmp_path / "runs"
    refused = runs / "smoke" / "resnet18_lr0.05_rho0_mix0_aug1_s0"
    refused.mkdir(parents=True)
    (refused / "run_config.json").write_text(json.dumps({"seed": 99}))
    held = runs / "smoke" / "resnet18_lr0.05_rho0.05_mix0_aug1_s0"
    held.mkdir()
    holder = _start_holder(held / ".lock")  # another launch, alive, training this run
    # The basic launcher runs every job in its own process: a kill there is the launch's own end.
    victim = runs / "smoke" / "resnet18_lr0.05_rho0_mix0.5_aug1_s0"
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_when_locked, args=(victim, killed, stop), daemon=True)
    if launcher:
        killer.start()
    try:
        result = subprocess.run(smoke_grid(synthetic_root, runs, *launcher), cwd=REPO, capture_output=True,
                                text=True, timeout=600, env=subprocess_env(OMP_NUM_THREADS="1"))
    finally:
        stop.set()
        _kill(holder)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    count_lines = [line for line in lines if "runs did not finish" in line]
    expected = ("error: 3 of 4 runs did not finish (1 failed, 1 refused, 1 held by another process)" if launcher
                else "error: 2 of 4 runs did not finish (0 failed, 1 refused, 1 held by another process)")
    assert len(count_lines) == 1 and count_lines[0].startswith(expected), result.stderr[-3000:]
    assert "python -m lit_sharp.grid status smoke" in count_lines[0]
    named = {line.split(":", 1)[0].strip(): line for line in lines[lines.index(count_lines[0]) + 1:]}
    assert f"refused: config name='smoke': {refused}" in named[refused.name]
    assert named[held.name] == f"  {held.name}: running: held by {socket.gethostname()}:{holder.pid}"
    records = {path.parent.name: read_results(path.parent) for path in (runs / "smoke").glob("*/results.json")}
    assert sum(r["run"]["status"] == "completed" for r in records.values()) == (1 if launcher else 2)
    mine = records[refused.name]["run"]
    assert mine["status"] == "failed" and mine["refused"] and "another configuration" in mine["error"]
    assert json.loads((refused / "run_config.json").read_text()) == {"seed": 99}  # the other run's identity is kept
    assert held.name not in records  # the holder's run is left alone
    if not launcher:
        return
    assert len(killed) == 1 and victim.name not in records
    why = "its process was killed by SIGKILL" if launcher[0] == "hydra/launcher=local" else "ended without a result"
    assert why in named[victim.name], named[victim.name]
    if launcher[0] != "hydra/launcher=local":
        return
    # The one command that finishes what is missing: the same launch again, once the causes are gone.
    shutil.rmtree(refused)
    again = subprocess.run(smoke_grid(synthetic_root, runs, *launcher), cwd=REPO, capture_output=True, text=True,
                           timeout=600, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert [len(status("smoke", [f"paths.root={runs}"])[s]) for s in ("completed", "failed")] == [4, 0]
    assert len(list((runs / "smoke" / "_hydra").glob("multirun_*"))) == 2  # each launch its own sweep folder


def test_wandb_that_cannot_go_online_falls_back_to_offline_files(synthetic_root, tmp_path):
    cfg_overrides = [*tiny_run_overrides(synthetic_root, tmp_path), *QUICK, "logger.mode=online"]
    env = subprocess_env(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="0123456789" * 4, WANDB_INIT_TIMEOUT="3")
    env.pop("WANDB_MODE")
    result = subprocess.run([sys.executable, "train.py", *cfg_overrides], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(compose_config(*cfg_overrides))
    record = read_results(run_dir)
    assert record["run"]["status"] == "completed"
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "W&B could not start online" in line]
    assert len(warnings) == 1 and f"wandb sync {run_dir}/wandb/offline-run-*" in warnings[0]
    (wandb_run,) = offline_runs(run_dir)
    summary = read_offline_run(wandb_run)["summary"]
    assert summary["final/test_err"] == record["metrics"]["final/test_err"] and summary["run/status"] == "completed"
    assert wandb_run.name.endswith(record["run"]["wandb_id"])


def _slot_holder(uuids, lock_dir, queue, release):
    with gpu_slot(uuids, 1, lock_dir=lock_dir, poll_seconds=0.05) as gpu:
        queue.put((tuple(uuids), gpu))
        release.wait(600)


def test_gpu_slots_are_named_by_uuid_and_skipped_for_slurm_gpus(tmp_path):
    slurm = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "3", "SUBMITIT_EXECUTOR": "slurm"}
    assert scheduler_owns_gpus(slurm)
    assert not scheduler_owns_gpus({**slurm, "SLURM_JOB_GPUS": ""})  # a SLURM job without GPUs of its own
    assert not scheduler_owns_gpus({k: v for k, v in slurm.items() if k != "SUBMITIT_EXECUTOR"})  # a pool in a job
    assert not scheduler_owns_gpus({"CUDA_VISIBLE_DEVICES": "0"})
    assert slot_lock_names(["GPU-a", "GPU-b"], 2) == [(0, "GPU-a-slot0.lock"), (1, "GPU-b-slot0.lock"),
                                                     (0, "GPU-a-slot1.lock"), (1, "GPU-b-slot1.lock")]
    # Two jobs on one node that each see "device 0" but hold different GPUs do not wait for each other ...
    ctx = mp.get_context("spawn")
    queue, release = ctx.Queue(), ctx.Event()
    first = ctx.Process(target=_slot_holder, args=(["GPU-aaaa"], tmp_path, queue, release))
    second = ctx.Process(target=_slot_holder, args=(["GPU-bbbb"], tmp_path, queue, release))
    first.start()
    second.start()
    assert sorted([queue.get(timeout=60), queue.get(timeout=60)]) == [(("GPU-aaaa",), 0), (("GPU-bbbb",), 0)]
    # ... while a third process on the first one's GPU waits for its slot.
    third = ctx.Process(target=_slot_holder, args=(["GPU-aaaa"], tmp_path, queue, release))
    third.start()
    time.sleep(1.5)
    assert queue.empty()
    release.set()
    assert queue.get(timeout=60) == (("GPU-aaaa",), 0)
    for process in (first, second, third):
        process.join(timeout=60)


def _lock_holder(lock, mode, ready):
    with hold(Path(lock), mode=mode):
        ready.set()
        time.sleep(600)


def _start_holder(lock, mode="auto"):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_lock_holder, args=(str(lock), mode, ready))
    holder.start()
    assert ready.wait(60)
    return holder


def _kill(process):
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=60)


def test_grid_status_reads_without_locking_and_eval_takes_the_lock(synthetic_root, tmp_path):
    overrides = [*tiny_run_overrides(synthetic_root, tmp_path), *QUICK, "logger=none"]
    cfg = compose_config(*overrides)
    run(cfg)
    run_dir = run_dir_of(cfg)
    recorded = (run_dir / "results.json").read_text()
    (run_dir / "results.json").unlink()  # as if the run had been killed after its last checkpoint
    assert run_state(run_dir) == "resumable"
    holder = _start_holder(run_dir / ".lock")
    try:
        owner = read_owner(run_dir / ".lock")
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        assert run_state(run_dir) == "running"
        assert grid_main(["status", "smoke", f"paths.root={tmp_path}"]) == 0
        skipped = run(cfg)["run"]  # a launch skips it: the holder trains it
        assert skipped == {"name": run_dir.name, "status": "running",
                           "error": f"held by {socket.gethostname()}:{holder.pid}"}
        (run_dir / "results.json").write_text(recorded)
        with pytest.raises(UserError, match="another process"):
            run(compose_config(*overrides, "mode=eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
        assert (run_dir / "results.json").read_text() == recorded
    finally:
        _kill(holder)
    # The holder died without cleaning up: its owner file names a dead pid, so nothing holds the run.
    assert owner_path(run_dir / ".lock").exists() and not is_held(run_dir / ".lock")
    record = run(compose_config(*overrides, "mode=eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
    assert "final/test_err" in record["metrics"]
    assert not is_held(run_dir / ".lock")


def test_owner_file_locks_without_flock_and_take_over_dead_owners(tmp_path):
    lock = tmp_path / "run.lock"
    holder = _start_holder(lock, mode="file")
    try:
        with pytest.raises(LockBusy) as busy:
            with hold(lock, mode="file"):
                pass
        assert busy.value.owner["pid"] == holder.pid
    finally:
        _kill(holder)
    with hold(lock, mode="file"):  # the owner's pid is dead on this host: stale, taken over
        assert read_owner(lock)["pid"] == os.getpid()
    assert not owner_path(lock).exists()
    # An owner on another host is honoured while its heartbeat is fresh, and taken over once it is stale.
    owner_path(lock).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "x"}))
    with pytest.raises(LockBusy):
        with hold(lock, mode="file", stale_seconds=60):
            pass
    os.utime(owner_path(lock), (time.time() - 120, time.time() - 120))
    with hold(lock, mode="file", stale_seconds=60):
        assert read_owner(lock)["host"] == socket.gethostname()


def _die_holding(lock, marker, violations):
    """Take ``lock`` (file mode), check no one else holds it, then die holding it: the next taker must take over."""
    with hold(Path(lock), mode="file", wait=60, poll_seconds=0.01):
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            violations.value += 1  # another process believes it holds the lock too
        else:
            os.close(fd)
        time.sleep(0.05)
        Path(marker).unlink(missing_ok=True)
        os._exit(0)  # no release: the owner file names a dead pid


def test_stale_owner_files_are_taken_over_by_exactly_one_process(tmp_path):
    lock = tmp_path / "run.lock"
    owner_path(lock).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "started": 0,
                                            "token": "dead"}))
    ctx = mp.get_context("fork")
    violations = ctx.Value("i", 0)
    takers = [ctx.Process(target=_die_holding, args=(str(lock), str(tmp_path / "inside"), violations))
              for _ in range(6)]
    for taker in takers:
        taker.start()
    alive = list(takers)
    while alive:  # each dies holding the lock; reaping it at once makes its pid dead for the others
        ended = mp.connection.wait([taker.sentinel for taker in alive], timeout=120)
        assert ended, "no process took the stale lock over"
        for taker in [taker for taker in alive if taker.sentinel in ended]:
            taker.join()
            alive.remove(taker)
    assert violations.value == 0 and all(taker.exitcode == 0 for taker in takers)
    assert read_owner(lock)["pid"] in {taker.pid for taker in takers}  # the last one's, left stale
    assert not is_held(lock)


def _orphaning_holder(lock, ready):
    # As an owner whose forked child (a DataLoader worker) inherits its kernel lock; filelock closes inherited lock
    # descriptors in a forked child, so the lock is taken here with fcntl itself.
    import fcntl

    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    owner_path(Path(lock)).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0}))
    if os.fork() == 0:
        time.sleep(15)
        os._exit(0)
    ready.set()
    os._exit(0)


def test_a_lock_held_past_its_owner_is_reported_then_taken_when_free(tmp_path):
    lock = tmp_path / "run.lock"
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    owner = ctx.Process(target=_orphaning_holder, args=(str(lock), ready))
    owner.start()
    assert ready.wait(60)
    owner.join(timeout=60)
    with pytest.raises(LockBusy) as busy:
        with hold(lock):
            pass
    assert busy.value.holder == f"{socket.gethostname()}:{owner.pid} (gone; a process it started still holds the lock)"
    with hold(lock, orphan_wait=60):  # the child lets go within seconds; the run folder's lock waits that long
        assert read_owner(lock)["pid"] == os.getpid()


def test_downloads_into_one_folder_wait_for_each_other(tmp_path):
    cfg = compose_config("experiment=quickstart", f"paths.root={tmp_path}", f"data.root={tmp_path / 'data'}",
                         "data.download=true")
    (tmp_path / "data").mkdir()
    holder = _start_holder(tmp_path / "data" / ".download.lock")
    entered = threading.Event()

    def download():
        with download_lock(cfg):
            entered.set()

    waiting = threading.Thread(target=download)
    waiting.start()
    try:
        assert not entered.wait(1.5)
    finally:
        _kill(holder)
    assert entered.wait(30)
    waiting.join()


def test_a_nan_in_the_last_steps_is_caught(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *QUICK, "logger=none", "module.lr=1e30",
                         "module.warmup_fraction=0", "module.sam_rho=0", "module.mixup_alpha=0",
                         "data.augment=false", "module.check_finite_every=1000")
    record = run(cfg)
    assert record["run"]["status"] == "diverged" and record["metrics"] == {}


def test_the_non_finite_flag_survives_a_checkpoint():
    module = ClassifierModule(torch.nn.Linear(2, 2), check_finite_every=1000)
    module._nonfinite = ~torch.isfinite(torch.tensor(float("nan")))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = ClassifierModule(torch.nn.Linear(2, 2), check_finite_every=1000)
    resumed.check_finite()  # nothing seen yet
    resumed.on_load_checkpoint(checkpoint)
    with pytest.raises(Diverged):
        resumed.check_finite()


def test_sam_and_asam_are_recorded_and_analysed_apart(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "module.sam_adaptive=true")
    assert hparams_of(cfg)["sam_adaptive"] is True
    assert run_dir_of(cfg).name.endswith("_asam")
    records = []
    # SAM runs: sharpness rises with test error (tau = +1); ASAM runs: falls (tau = -1). Pooled, tau would be 0.
    for adaptive, sign in ((False, 1), (True, -1)):
        for i in range(4):
            hparams = {"model": "resnet18", "lr": 0.01 * (i + 1), "sam_rho": 0.05, "mixup_alpha": 0.0,
                       "augment": False, "seed": 0, "sam_adaptive": adaptive}
            metrics = {"final/train_err": 0.0, "final/test_err": 0.1 + 0.01 * i, "c10c/err": 0.2 + 0.01 * i,
                       "sharpness/s": sign * float(i)}
            records.append(make_record(name=f"r{adaptive}{i}", status="completed", seconds=1.0, wandb_id=None,
                                       hparams=hparams, config={}, metrics=metrics))
    rows = {(r["model"], r["target"]): (r["tau"], r["n"]) for r in correlations(records) if r["subgroup"] == "all"}
    assert rows[("resnet18", "test_err")] == (1.0, 4)
    assert rows[("resnet18_asam", "test_err")] == (-1.0, 4)
