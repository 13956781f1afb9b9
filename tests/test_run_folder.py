"""A run's folder: its name, its identity and the checkpoint-to-folder mapping (no training here)."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from lit_sharp.errors import ConfigError
from lit_sharp.run_folder import IDENTITY_FILE, claim_identity, identity_of, run_dir_of, run_name, source_run_dir
from lit_sharp.tracking import WANDB_ID_FILE


def test_the_run_name_spells_the_grid_hyperparameters():
    hparams = {"model": "resnet18", "lr": 0.1, "sam_rho": 0.05, "mixup_alpha": 0.5, "augment": True, "seed": 3}
    assert run_name(hparams) == "resnet18_lr0.1_rho0.05_mix0.5_aug1_s3"
    assert run_name({**hparams, "sam_adaptive": True}) == "resnet18_lr0.1_rho0.05_mix0.5_aug1_s3_asam"
    assert run_name({**hparams, "lr": 1e-4, "augment": False}, sam_adaptive=False) == \
        "resnet18_lr0.0001_rho0.05_mix0.5_aug0_s3"


def test_the_run_folder_lies_under_root_and_name(tmp_path):
    cfg = compose_config("experiment=quickstart", f"paths.root={tmp_path}", "module.lr=0.2", "seed=7")
    assert run_dir_of(cfg) == tmp_path.resolve() / "quickstart" / "resnet18_lr0.2_rho0.05_mix0.5_aug1_s7"


def test_a_folder_accepts_its_own_config_and_speed_settings_but_refuses_another_recipe(tmp_path):
    base = ["experiment=quickstart", f"paths.root={tmp_path}"]
    cfg = compose_config(*base)
    claim_identity(cfg, tmp_path)
    written = json.loads((tmp_path / IDENTITY_FILE).read_text())
    assert written == json.loads(json.dumps(identity_of(cfg), default=str))
    assert written["trainer.max_epochs"] == cfg.trainer.max_epochs and "module.lr" in written
    assert not any(key.startswith(("logger.", "paths.", "data.num_workers")) for key in written)

    claim_identity(compose_config(*base), tmp_path)  # a relaunch
    claim_identity(compose_config(*base, "module.compile=true", "data.num_workers=0"), tmp_path)  # speed only
    with pytest.raises(ConfigError, match=r"trainer.max_epochs: 2 -> 1"):
        claim_identity(compose_config(*base, "trainer.max_epochs=1"), tmp_path)


def test_a_checkpoint_maps_to_its_run_folder_only_inside_a_run(tmp_path):
    run_dir = tmp_path / "grid" / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert source_run_dir(ckpt) is None  # no results.json and no W&B id: not a lit_sharp run
    (run_dir / WANDB_ID_FILE).write_text("abc\n")
    assert source_run_dir(ckpt) == run_dir
    assert source_run_dir(tmp_path / "elsewhere" / "last.ckpt") is None
