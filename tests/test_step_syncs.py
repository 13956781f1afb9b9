"""The training step never waits for the host: host reads happen only at the NaN check and at the logger flush."""

import csv
import sys

import pytest
from conftest import REPO, compose_config, tiny_run_overrides

from lit_sharp.data.synthetic import write_synthetic
from lit_sharp.progress import SHOWN
from lit_sharp.train import run, run_dir_of

sys.path.insert(0, str(REPO / "bench"))  # the host-read counter, shared with the GPU check's CPU dry run
import host_reads  # noqa: E402

#: What the module logs every step; Lightning reads each back once when it flushes the loggers.
STEP_METRICS = ("train/loss_step", "train/err_step", "train/lr")
CHECK_FINITE_EVERY, LOG_EVERY = 3, 5


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_synthetic(root, seed=0, n_train=64, n_test=16, n_corrupt=4)
    return root


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
def test_steady_state_steps_read_the_host_only_for_the_nan_check_and_the_log_flush(small_root, tmp_path, sam_rho):
    # Device pipeline, mixup (quickstart: alpha 0.5), SGD or SAM, CSV logging and the progress bar at their defaults.
    # Augmentation is off to keep the test quick on a CPU; the device augmentation's own tests cover it.
    overrides = [o for o in tiny_run_overrides(small_root, tmp_path) if "enable_progress_bar" not in o]
    cfg = compose_config(*overrides, "data.pipeline=device", "data.augment=false", "data.batch_size=8",
                         "+model.blocks_per_stage=1", "trainer.max_epochs=2", f"module.sam_rho={sam_rho}",
                         f"module.check_finite_every={CHECK_FINITE_EVERY}", f"trainer.log_every_n_steps={LOG_EVERY}",
                         "logger=csv", "~callbacks.sharpness", "~callbacks.corruption", "~callbacks.final_errors",
                         "+callbacks.host_reads._target_=host_reads.StepHostReads",
                         # No validation: its DataLoader draws its base seed with a CPU .item() as the loop starts
                         # (before any validation hook can stop the count); that is no device sync, and not the step.
                         "trainer.check_val_every_n_epoch=1000")
    assert cfg.trainer.enable_progress_bar and cfg.module.mixup_alpha > 0
    assert run(cfg)["run"]["status"] == "completed"

    steps = 2 * 64 // 8
    counts = {step: sum(host_reads.LAST.get(step, {}).values()) for step in range(1, steps)}  # step 0 warms up
    # The NaN check reads every CHECK_FINITE_EVERY steps and at the last step, so no NaN of the last steps is missed.
    allowed = {step: int((step + 1) % CHECK_FINITE_EVERY == 0 or step == steps - 1)
               + int((step + 1) % LOG_EVERY == 0) * (len(STEP_METRICS) + len(SHOWN)) for step in counts}
    too_many = {step: dict(host_reads.LAST[step]) for step in counts if counts[step] > allowed[step]}
    assert not too_many, f"host reads beyond the NaN check and the log flush: {too_many}"
    # The counter does see the reads that are due (otherwise the assertion above would prove nothing).
    assert counts[CHECK_FINITE_EVERY - 1] == 1 and counts[LOG_EVERY - 1] == len(STEP_METRICS) + len(SHOWN)
    with open(run_dir_of(cfg) / "csv" / "metrics.csv") as file:
        assert set(STEP_METRICS) <= set(next(csv.reader(file)))
