"""Interruptions with real processes and signals: a stop signal checkpoints the current step and the relaunch repeats
none; checkpoint saves killed midway leave nothing that blocks a run; unreadable files are recovered from."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config, subprocess_env, tiny_run_overrides

from lit_sharp.checkpoint_io import checkpoint_defect, previous_of
from lit_sharp.data.augment import AugmentedImages, EpochSampler
from lit_sharp.data.device_loader import DeviceTrainLoader
from lit_sharp.data.position import ResumableDataLoader
from lit_sharp.errors import UserError
from lit_sharp.results import run_status
from lit_sharp.run_folder import IDENTITY_FILE, claim_identity, identity_of, last_checkpoint, resume_checkpoint
from lit_sharp.train import run, run_dir_of

TESTS = Path(__file__).resolve().parent
#: 640 synthetic images in batches of 64: 10 steps per epoch, 20 in all (SAM, mixup and RandAugment on).
RUN = ["~callbacks.sharpness", "~callbacks.corruption", "logger=none", "trainer.max_epochs=2", "data.batch_size=64"]
STEPS_PER_EPOCH = 10
STOP_STEP = 13  # 3 steps into the second epoch


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory):
    """The run trained without interruption: its folder and its final checkpoint."""
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path_factory.mktemp("whole")), *RUN)
    run(cfg)
    run_dir = run_dir_of(cfg)
    return run_dir, torch.load(last_checkpoint(run_dir), weights_only=False)


def assert_same_training(a, b):
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    momentum = [[s["momentum_buffer"] for s in c["optimizer_states"][0]["state"].values()] for c in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*momentum))


@pytest.mark.timeout(1200)  # two trainings and a child process: a few minutes on a shared 2-core machine
def test_sigterm_checkpoints_the_current_step_and_the_relaunch_repeats_no_step(uninterrupted, synthetic_root,
                                                                                tmp_path):
    overrides = [*tiny_run_overrides(synthetic_root, tmp_path / "runs"), *RUN]
    marker = tmp_path / "reached"
    stall = ["+callbacks.stall._target_=stall_at_step.StallAtStep", f"+callbacks.stall.step={STOP_STEP}",
             f"+callbacks.stall.marker={marker}"]
    # As many threads as this process: a CPU reduction over another number of threads rounds differently.
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                         OMP_NUM_THREADS=str(torch.get_num_threads()))
    console = tmp_path / "console.txt"  # a file, not a pipe that nobody reads until the end and that could fill
    with console.open("w") as sink:
        process = subprocess.Popen([sys.executable, "train.py", *overrides, *stall], cwd=REPO, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 900
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), console.read_text()[-3000:]
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=300)
    output = console.read_text()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]  # never 0: the run is not finished
    run_dir = run_dir_of(compose_config(*overrides))
    assert run_status(run_dir) is None  # no record claims the run finished
    assert f"saved {last_checkpoint(run_dir)} at step {STOP_STEP} on SIGTERM" in output
    saved = torch.load(last_checkpoint(run_dir), weights_only=False)
    trained_before_the_signal = int(marker.read_text())
    repeated = trained_before_the_signal - saved["global_step"]
    repeated_with_epoch_checkpoints_only = trained_before_the_signal % STEPS_PER_EPOCH
    print(f"steps repeated after SIGTERM at step {trained_before_the_signal}: {repeated} "
          f"(with end-of-epoch checkpoints only: {repeated_with_epoch_checkpoints_only})")
    assert (repeated, repeated_with_epoch_checkpoints_only) == (0, STOP_STEP - STEPS_PER_EPOCH)

    record = run(compose_config(*overrides))  # the relaunch continues mid-epoch, data order and mixup included
    assert record["run"]["status"] == "completed"
    whole_dir, whole = uninterrupted
    assert_same_training(whole, torch.load(last_checkpoint(run_dir), weights_only=False))
    assert record["metrics"] == json.loads((whole_dir / "results.json").read_text())["metrics"]


def _loader_batches(loader, count=None):
    batches = []
    for batch in loader:
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    return batches


def _workers_loader(images, labels):
    dataset = AugmentedImages(images, labels, augment=True, seed=3)
    return ResumableDataLoader(dataset, batch_size=4, sampler=EpochSampler(len(dataset), seed=3))


def _device_loader(images, labels):
    return DeviceTrainLoader(images, labels, batch_size=4, augment=True, seed=3, device="cpu")


@pytest.mark.parametrize("make", [_workers_loader, _device_loader], ids=["workers", "device"])
def test_a_loader_resumed_mid_epoch_hands_out_the_rest_of_the_uninterrupted_epoch(make):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (18, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 18)
    whole = make(images, labels)
    whole.sampler.set_epoch(1)
    expected = _loader_batches(whole)  # 5 batches, the last of 2 images
    cut = make(images, labels)
    cut.sampler.set_epoch(1)
    _loader_batches(cut, 2)
    state = cut.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 2)
    resumed = make(images, labels)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # as Lightning does, after loading the state and before the first batch
    rest = _loader_batches(resumed)
    assert len(rest) == 3 and resumed.state_dict()["batches"] == 5
    for (x, y), (x_ref, y_ref) in zip(rest, expected[2:]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    after_the_epoch = make(images, labels)  # a state taken at the end of an epoch resumes at the next one
    after_the_epoch.load_state_dict(resumed.state_dict())
    assert after_the_epoch.sampler.epoch == 2 and len(_loader_batches(after_the_epoch)) == 5


SAVER = """
import sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lit_sharp.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO() if sys.argv[2] == "atomic" else TorchCheckpointIO()
state = {"w": torch.zeros(8_000_000)}
for step in range(10_000):
    state["step"] = step
    state["w"].fill_(step)
    io.save_checkpoint(state, sys.argv[1])
    print(step, flush=True)
"""


def kill_while_saving(path: Path, writer: str, delay: float) -> None:
    """Start a process saving 32 MB checkpoints to ``path`` back to back with ``$TMPDIR`` on another file system,
    and SIGKILL it ``delay`` seconds after its first save, in the middle of a later one."""
    env = subprocess_env(TMPDIR="/dev/shm", OMP_NUM_THREADS="1")
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path), writer], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() != ""
    time.sleep(delay)
    saver.kill()
    saver.wait(timeout=60)


@pytest.mark.skipif(os.stat("/dev/shm").st_dev == os.stat(REPO).st_dev, reason="needs /dev/shm on another file system")
def test_sigkill_during_checkpoint_saves_leaves_no_blocking_file(tmp_path):
    run_dir = tmp_path / "run"
    last = last_checkpoint(run_dir)
    last.parent.mkdir(parents=True)
    for delay in (0.0, 0.05, 0.15, 0.3):
        kill_while_saving(last, "atomic", delay)
        assert checkpoint_defect(last) is None
        assert not previous_of(last).exists() or checkpoint_defect(previous_of(last)) is None
        loaded = torch.load(last, weights_only=True)
        assert bool((loaded["w"] == loaded["step"]).all())
        assert resume_checkpoint(run_dir) == (last, None)
        assert sorted(p.name for p in last.parent.iterdir()) in (["last.ckpt"], ["last.ckpt", "last.previous.ckpt"])


def test_an_unreadable_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(uninterrupted, synthetic_root,
                                                                                          tmp_path, caplog):
    whole_dir, whole = uninterrupted
    run_dir = tmp_path / whole_dir.relative_to(whole_dir.parents[1])
    shutil.copytree(whole_dir, run_dir, ignore=shutil.ignore_patterns(".lock*"))
    (run_dir / "results.json").unlink()  # as if killed after its last checkpoint
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *RUN)
    assert run_dir_of(cfg) == run_dir
    last = last_checkpoint(run_dir)
    intact = last.read_bytes()

    # A truncated run_config.json of a run with a checkpoint: one clear error naming the file, nothing trained.
    identity = (run_dir / IDENTITY_FILE).read_text()
    (run_dir / IDENTITY_FILE).write_text(identity[: len(identity) // 2])
    with pytest.raises(UserError, match=f"{run_dir / IDENTITY_FILE} cannot be read"):
        run(cfg)
    assert last.read_bytes() == intact
    (run_dir / IDENTITY_FILE).write_text(identity)

    last.write_bytes(intact[: len(intact) // 2])
    with caplog.at_level(logging.INFO):
        record = run(cfg)
    (aside,) = last.parent.glob("last.ckpt.unreadable-*")
    assert aside.stat().st_size == len(intact) // 2  # moved, not deleted
    assert record["run"]["status"] == "completed"
    assert record["run"]["recovered"].startswith("last.ckpt was unreadable (BadZipFile")
    assert record["run"]["recovered"].endswith("resumed from last.previous.ckpt")
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"run {run_dir.name}:")]
    assert sum("  recovered  last.ckpt was unreadable" in line for line in summaries[-1].splitlines()) == 1
    assert_same_training(whole, torch.load(last, weights_only=False))  # trained the last epoch again, identically


def test_a_truncated_run_config_without_checkpoint_is_rewritten(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *RUN)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / IDENTITY_FILE).write_text('{"model.name": "res')
    claim_identity(cfg, run_dir)
    assert json.loads((run_dir / IDENTITY_FILE).read_text()) == json.loads(json.dumps(identity_of(cfg), default=str))
    claim_identity(cfg, run_dir)  # and is accepted as the run's own afterwards


def test_a_checkpoint_is_saved_every_checkpoint_every_minutes(synthetic_root, tmp_path, caplog):
    # Every step is "later than" a millionth of a minute: a save after each of the 3 steps, at its step.
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *RUN, "trainer.max_steps=3",
                         "trainer.checkpoint_every_minutes=1e-6")
    with caplog.at_level(logging.INFO, logger="lit_sharp.callbacks.preemption"):
        run(cfg)
    saved = [r.getMessage() for r in caplog.records if r.name == "lit_sharp.callbacks.preemption"]
    last = last_checkpoint(run_dir_of(cfg))
    assert saved == [f"saved {last} at step {step} (every 1e-06 minutes)" for step in (1, 2, 3)]
