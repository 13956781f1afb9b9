"""The run entry point end to end: results.json, W&B offline files, validation, resume and divergence."""

import csv
import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, compose_config, subprocess_env, tiny_run_overrides
from wandb_offline import offline_runs, read_offline_run

import lit_sharp.training as training_module
from lit_sharp.errors import ConfigError
from lit_sharp.results import read_results
from lit_sharp.train import run, run_dir_of


def no_measurements():
    return ["~callbacks.sharpness", "~callbacks.corruption"]


def test_run_writes_the_record_and_the_wandb_offline_run(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *no_measurements())
    record = run(cfg)
    run_dir = run_dir_of(cfg)
    assert run_dir == tmp_path / "quickstart" / "resnet18_lr0.05_rho0.05_mix0.5_aug1_s0"
    on_disk = read_results(run_dir)
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["run"]["status"] == "completed"
    assert on_disk["hparams"] == {"model": "resnet18", "lr": 0.05, "sam_rho": 0.05, "mixup_alpha": 0.5,
                                  "augment": True, "seed": 0, "sam_adaptive": False}
    assert on_disk["config"]["model.width"] == 4 and on_disk["config"]["trainer.max_epochs"] == 1
    for key in ("final/train_err", "final/test_err"):
        assert 0.0 <= on_disk["metrics"][key] <= 1.0
    (wandb_run,) = offline_runs(run_dir)
    assert wandb_run.name.endswith(on_disk["run"]["wandb_id"])
    logged = read_offline_run(wandb_run)
    assert logged["summary"]["final/test_err"] == on_disk["metrics"]["final/test_err"]
    assert logged["summary"]["run/status"] == "completed"
    assert logged["group"] == "quickstart" and "augment=true,mixup=true" in logged["tags"]
    assert {"train/loss_step", "train/err_step"} <= logged["history_keys"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # The same configuration again finds its finished folder and trains nothing.
    assert run(cfg) == on_disk
    assert len(offline_runs(run_dir)) == 1


def test_csv_logger_is_the_no_wandb_alternative(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *no_measurements(), "logger=csv",
                         "trainer.max_steps=3", "trainer.log_every_n_steps=1")
    run(cfg)
    run_dir = run_dir_of(cfg)
    text = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss_step" in text and "final/test_err" in text
    assert not (run_dir / "wandb").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.name=vgg", "model.name"),
        ("module.lr=-0.1", "module.lr"),
        ("module.warmup_fraction=1.5", "module.warmup_fraction"),
        ("module.sam_rho=-1", "module.sam_rho"),
        ("module.mixup_alpha=-0.5", "module.mixup_alpha"),
        ("trainer.precision=16-mixed", "trainer.precision"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.randaugment=autoaugment", "data.randaugment"),
        ("logger.mode=sometimes", "logger.mode"),
        ("name=a/b", "name"),
        ("trainer.checkpoint_every_minutes=0", "trainer.checkpoint_every_minutes"),
    ],
)
def test_bad_config_values_are_refused_before_training(synthetic_root, tmp_path, override, key):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), override)
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert info.value.key == key
    assert key in str(info.value)
    assert not (tmp_path / "quickstart").exists()


def test_half_precision_refusal_says_why(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "trainer.precision=16-mixed")
    with pytest.raises(ConfigError, match="GradScaler"):
        run(cfg)


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=quickstart", f"paths.root={tmp_path}", "module.lr=-1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert result.returncode == 2
    assert "error: config module.lr=-1" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_is_one_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", f"paths.root={tmp_path}", f"paths.data={tmp_path / 'no_data'}",
         "callbacks=none", "logger=none"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "no_data" / "cifar-10-batches-py") in result.stderr
    assert "data.download=true" in result.stderr



def test_interrupted_run_resumes_to_the_same_model(synthetic_root, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    overrides = [*no_measurements(), "logger=none", "trainer.max_epochs=2", "data.batch_size=64"]
    whole = compose_config(*tiny_run_overrides(synthetic_root, tmp_path / "whole"), *overrides)
    run(whole)

    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 4:
                raise KeyError("simulated crash")

    cut = compose_config(*tiny_run_overrides(synthetic_root, tmp_path / "cut"), *overrides)
    build = training_module.build_named_callbacks
    monkeypatch.setattr(training_module, "build_named_callbacks", lambda cfg: {**build(cfg), "crash": Crash()})
    with pytest.raises(KeyError):
        run(cut)
    assert read_results(run_dir_of(cut))["run"]["status"] == "failed"
    assert "simulated crash" in read_results(run_dir_of(cut))["run"]["error"]
    monkeypatch.setattr(training_module, "build_named_callbacks", build)
    run(cut)  # relaunch: resumes from the end-of-epoch-0 checkpoint

    a = torch.load(run_dir_of(whole) / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run_dir_of(cut) / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 20
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    momentum_a = [s["momentum_buffer"] for s in a["optimizer_states"][0]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    assert read_results(run_dir_of(cut))["metrics"] == read_results(run_dir_of(whole))["metrics"]
    # The checkpoints carry the run's wall time so far (see test_run_clock_adds_the_time_of_earlier_processes).
    (clock_state,) = [v for k, v in b["callbacks"].items() if k.startswith("RunClock")]
    assert 0 < clock_state["seconds"] <= read_results(run_dir_of(cut))["run"]["seconds"]


def test_run_clock_adds_the_time_of_earlier_processes():
    from lit_sharp.callbacks.run_clock import RunClock

    first = RunClock()
    time.sleep(0.05)
    saved = first.state_dict()
    assert saved["seconds"] >= 0.05
    resumed = RunClock()
    resumed.load_state_dict({"seconds": 3600.0})
    assert 3600.0 <= resumed.seconds < 3601.0
    assert resumed.state_dict()["seconds"] >= 3600.0


def test_nan_loss_ends_the_run_as_diverged(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *no_measurements(), "module.lr=1e30",
                         "module.warmup_fraction=0", "module.sam_rho=0", "module.mixup_alpha=0", "data.augment=false")
    record = run(cfg)
    assert record["run"]["status"] == "diverged"
    assert "loss became" in record["run"]["error"]
    on_disk = read_results(run_dir_of(cfg))
    assert on_disk["run"]["status"] == "diverged" and on_disk["metrics"] == {}
    (wandb_run,) = offline_runs(run_dir_of(cfg))
    assert read_offline_run(wandb_run)["summary"]["run/status"] == "diverged"
    # Deterministic divergence is final: a relaunch does not train it again.
    assert run(cfg)["run"] == on_disk["run"]


def test_a_different_recipe_is_refused_in_a_finished_runs_folder(synthetic_root, tmp_path):
    overrides = [*tiny_run_overrides(synthetic_root, tmp_path), *no_measurements(), "logger=none", "trainer.max_steps=2"]
    run(compose_config(*overrides))
    identity = json.loads((run_dir_of(compose_config(*overrides)) / "run_config.json").read_text())
    assert identity["trainer.max_steps"] == 2 and identity["model.width"] == 4 and "paths.root" not in identity
    assert identity["data.randaugment"] == "paper"  # which RandAugment is part of the recipe
    with pytest.raises(ConfigError, match=r"trainer.max_steps: 2 -> 3.*another name="):
        run(compose_config(*overrides, "trainer.max_steps=3"))
    # Speed-only settings may change between launches.
    assert run(compose_config(*overrides, "module.check_finite_every=5"))["run"]["status"] == "completed"
    # A variant under another name is its own run.
    assert run(compose_config(*overrides, "trainer.max_steps=3", "name=shorter"))["run"]["status"] == "completed"


def test_validation_curve_summary_and_flat_config_in_wandb(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *no_measurements(), "trainer.max_epochs=2")
    record = run(cfg)
    (wandb_run,) = offline_runs(run_dir_of(cfg))
    logged = read_offline_run(wandb_run)
    curve = [row for row in logged["history"] if "val/err" in row]
    assert [row["epoch"] for row in curve] == [0, 1]  # the quickstart validates every epoch
    assert all(0 <= row["val/err"] <= 1 and row["val/loss"] > 0 for row in curve)
    # The last validation and FinalErrors see the same weights and test set through different loops.
    assert curve[-1]["val/err"] == pytest.approx(record["metrics"]["final/test_err"], abs=1e-12)
    # Plotted against the epoch, best and last value kept in the summary.
    definition = logged["metrics"]["val/err"]
    assert definition["step_metric"] == "epoch" and definition["summary"].min and definition["summary"].last
    summary = logged["summary"]
    assert summary["val/err"]["min"] == min(row["val/err"] for row in curve)
    assert summary["val/err"]["last"] == curve[-1]["val/err"]
    assert summary["final/test_err"] == record["metrics"]["final/test_err"]
    # The config once, as results.json's flat dotted keys (no second copy of the module's arguments).
    config = logged["config"]
    for key in ("module.lr", "module.sam_rho", "module.mixup_alpha", "data.augment"):
        assert config[key] == record["config"][key], key
    assert config["subgroup"] == "augment=true,mixup=true"
    assert "lr" not in config and "hparams" not in config
    assert logged["job_type"] == "train" and wandb_run.name.endswith(record["run"]["wandb_id"])


def test_console_of_a_run_has_no_warnings_and_ends_with_a_summary(synthetic_root, tmp_path):
    overrides = tiny_run_overrides(synthetic_root, tmp_path / "runs", "~callbacks.sharpness")
    # W&B not silenced here: its own warnings (such as the deprecated `anonymous` setting) must not appear either.
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=subprocess_env(WANDB_SILENT="false"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    noise = [line for line in output.splitlines()
             if any(word in line.lower() for word in ("warn", "deprecat", "💡 tip"))]
    assert noise == []
    run_dir = tmp_path / "runs" / "quickstart" / "resnet18_lr0.05_rho0.05_mix0.5_aug1_s0"
    record = read_results(run_dir)
    metrics = record["metrics"]
    assert f"run {run_dir.name}: completed in {record['run']['seconds']:.1f} s" in output
    assert f"  folder     {run_dir}" in output
    assert (f"  error      train {metrics['final/train_err']:.4g}   test {metrics['final/test_err']:.4g}   "
            f"CIFAR-10-C {metrics['c10c/err']:.4g}") in output
    (wandb_run,) = offline_runs(run_dir)
    assert f"  W&B        offline; upload with: wandb sync {wandb_run}" in output


def test_a_scheduled_sharpness_measurement_draws_its_curve_and_the_run_measures_the_end_once(synthetic_root, tmp_path):
    spec = "worst_linf_adaptive_rho0.001"
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "~callbacks.corruption", "logger=csv",
                         "trainer.max_epochs=2", f"callbacks.sharpness.specs=[{spec}]",
                         "callbacks.sharpness.every_n_epochs=1")
    record = run(cfg)
    assert record["run"]["status"] == "completed"
    with open(run_dir_of(cfg) / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(f"sharpness/{spec}")]
    # One measurement per epoch (each logs its cost), and no second one of the same final weights after fit: the
    # run's final record reuses the last epoch's numbers.
    assert [float(row["epoch"]) for row in rows if row["sharpness_cost/seconds"]] == [0, 1]
    assert float(rows[-1][f"sharpness/{spec}"]) == pytest.approx(record["metrics"][f"sharpness/{spec}"], rel=1e-12)
    assert float(rows[0][f"sharpness/{spec}"]) != float(rows[-1][f"sharpness/{spec}"])
