"""Shared fixtures: offline W&B, composed configs, and one small synthetic data set per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
sys.path.insert(0, str(Path(__file__).parent))  # test utilities such as wandb_offline

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child ``python train.py``: offline W&B with a service of its own.

    W&B records its running service in ``WANDB_SERVICE`` and child processes inherit it; a child killed mid-run
    would then leave its run registered in this test process's service ("run ID is in use" on relaunch).
    """
    env = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **extra}


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python train.py <overrides>`` would run."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic CIFAR-10 + CIFAR-10-C folder shared by the session's tests (read-only for them)."""
    from lit_sharp.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, seed=0, n_train=640, n_test=256, n_corrupt=40)
    return root


def tiny_run_overrides(synthetic_root: Path, runs: Path, *extra: str) -> list[str]:
    """A quickstart-like run small enough for a unit test: a few steps of a width-4 ResNet."""
    return [
        "experiment=quickstart",
        f"paths.root={runs}",
        f"data.root={synthetic_root}",
        "data.batch_size=32",
        "data.clean_train_size=256",
        "data.sharpness_size=64",
        "data.sharpness_batch_size=32",
        "model.width=4",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tiny models and batches gain nothing from intra-op threads, and on a
    shared 2-core machine two threads wait on each other (and make a ratio's two sides wait unequally)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
