"""The objects of a run, built from its config: model, data, callbacks, checkpointing and the Trainer.

Training (:mod:`lit_sharp.training`) and evaluation (:mod:`lit_sharp.evaluate`) build what they need here, so a
config key means the same thing to both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lit_sharp.config import lock_mode
from lit_sharp.errors import ConfigError
from lit_sharp.locks import hold
from lit_sharp.models.init import initialise
from lit_sharp.progress import LoggedStepProgressBar
from lit_sharp.run_folder import CHECKPOINT_DIR
from lit_sharp.seeding import INIT_STREAM, derived_seed

DOWNLOAD_LOCK = ".download.lock"


#: Keys of the model config that describe the run, not the constructor's arguments.
MODEL_META_KEYS = ("name", "init")


def build_model(model_cfg: DictConfig, *, init_seed: int | None = None) -> nn.Module:
    """Instantiate the model config (``name`` and ``init`` are not passed on to the constructor).

    Args:
        init_seed: for a model trained from scratch, the run's seed: the weights are then initialised as
            ``model.init`` says (:func:`lit_sharp.models.init.initialise`), from a generator of their own seeded by
            it, so the initialisation moves no other random stream. None (a resumed or evaluated model, whose
            weights come from a checkpoint) keeps the constructors' weights.
    """
    kwargs = {key: value for key, value in model_cfg.items() if key not in MODEL_META_KEYS}
    model = hydra.utils.instantiate(kwargs)
    if init_seed is not None:
        generator = torch.Generator().manual_seed(derived_seed(INIT_STREAM, init_seed))
        initialise(model, str(model_cfg.init), generator)
    return model


def build_named_callbacks(cfg: DictConfig) -> dict[str, Callback]:
    """The configured callbacks by their key in ``cfg.callbacks`` (a ``null`` entry disables one).

    Raises:
        ConfigError: an entry without ``_target_``, e.g. options an experiment set for a callback that the
            chosen ``callbacks`` group does not have.
    """
    callbacks: dict[str, Callback] = {}
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"callbacks.{key}", OmegaConf.to_container(node), "has no _target_; remove it with "
                              f"~callbacks.{key} or choose a callbacks group that defines it")
        callbacks[str(key)] = hydra.utils.instantiate(node)
    return callbacks


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The configured DataModule, set up for fitting (synthetic data written, or downloaded when asked).

    Missing data fails here, before a W&B run exists; Lightning's own calls then find the arrays loaded.
    """
    datamodule = hydra.utils.instantiate(cfg.data)
    with download_lock(cfg):
        datamodule.setup("fit")
    return datamodule


@contextmanager
def download_lock(cfg: DictConfig) -> Iterator[None]:
    """With ``data.download=true``, one download at a time into a data folder (the lock lies beside the data)."""
    if not cfg.data.get("download"):
        yield
        return
    root = Path(cfg.data.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with hold(root / DOWNLOAD_LOCK, mode=lock_mode(cfg), wait=None,
              on_wait=f"waiting for another run's download into {root} ({root / DOWNLOAD_LOCK})"):
        yield


def build_trainer(cfg: DictConfig, run_dir: Path, loggers: list[Logger], callbacks: list[Callback],
                  devices: list[int] | None) -> pl.Trainer:
    """The configured Trainer of a run, with its checkpointing, its progress bar and ``callbacks``.

    Args:
        devices: the GPUs to train on, or None to leave ``trainer.devices`` as configured.
    """
    kwargs: dict[str, Any] = {"devices": devices} if devices is not None else {}
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        # submitit requeues on preemption (USR2) and the run resumes from its checkpoint; Lightning must not requeue too.
        kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    # The bar reads the loss only when the loggers flush (a host sync); Lightning's default reads it every step.
    progress = [LoggedStepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    return hydra.utils.instantiate(cfg.trainer, logger=loggers or False,
                                   callbacks=[*progress, *callbacks, checkpointing(run_dir)],
                                   default_root_dir=str(run_dir), **kwargs)


def checkpointing(run_dir: Path) -> ModelCheckpoint:
    """One file, ``checkpoints/last.ckpt``, overwritten at the end of every epoch: enough to resume, no pile-up."""
    return ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), filename="last", save_last=False,
                           save_top_k=1, monitor=None, every_n_epochs=1, save_on_train_epoch_end=True,
                           enable_version_counter=False)
