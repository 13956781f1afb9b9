"""One run of the study: train (or resume) a model, measure it, and write ``results.json``.

``run(cfg)`` is what ``train.py`` calls and what tests call directly. A run folder is
``<paths.root>/<name>/<run name>``, the run name derived from the hyperparameters, so launching the same
configuration again finds its own folder: a completed (or diverged) run is skipped, a run with a checkpoint
resumes from it, and a failed run is trained again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from filelock import FileLock, Timeout
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lit_sharp.callbacks.run_clock import RunClock
from lit_sharp.config import resolve_auto, validate
from lit_sharp.console import quiet_library_noise, run_summary
from lit_sharp.errors import ConfigError, UserError
from lit_sharp.gpu_slots import gpu_slot
from lit_sharp.module import Diverged
from lit_sharp.progress import LoggedStepProgressBar
from lit_sharp.results import flatten, make_record, read_results, run_status, write_results
from lit_sharp.tracking import build_loggers, finish_wandb, wandb_location

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_config.json"
#: Config keys that change what a run computes; two launches into one run folder must agree on them.
IDENTITY_PREFIXES = ("model.", "module.", "data.augment", "data.randaugment", "data.batch_size", "data.synthetic", "data.clean_train_size",
                     "data.sharpness_size", "data.sharpness_batch_size", "data.drop_last", "trainer.max_epochs",
                     "trainer.max_steps", "trainer.precision", "seed")
#: ... except these, which change speed only.
SPEED_ONLY_KEYS = ("module.check_finite_every", "module.channels_last", "module.compile")
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FINAL_STATUSES = ("completed", "diverged")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters a grid varies, in the ``results.json`` layout."""
    return {
        "model": str(cfg.model.name),
        "lr": float(cfg.module.lr),
        "sam_rho": float(cfg.module.sam_rho),
        "mixup_alpha": float(cfg.module.mixup_alpha),
        "augment": bool(cfg.data.augment),
        "seed": int(cfg.seed),
    }


def run_name(hparams: dict[str, Any], sam_adaptive: bool = False) -> str:
    """A folder name that is a function of the hyperparameters, e.g. ``resnet18_lr0.1_rho0.05_mix0.5_aug1_s0``."""
    name = (
        f"{hparams['model']}_lr{hparams['lr']:g}_rho{hparams['sam_rho']:g}"
        f"_mix{hparams['mixup_alpha']:g}_aug{int(hparams['augment'])}_s{hparams['seed']}"
    )
    return name + ("_asam" if sam_adaptive else "")


def run_dir_of(cfg: DictConfig) -> Path:
    """``<paths.root>/<name>/<run name>`` of the run that ``cfg`` describes."""
    return Path(cfg.paths.root).expanduser().resolve() / cfg.name / run_name(hparams_of(cfg), cfg.module.sam_adaptive)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, then train and measure one model unless its folder already holds a finished run.

    Returns:
        The run's ``results.json`` record.

        When another process holds the run folder's lock (two launches of one grid), nothing is trained and the
        returned record is ``{"run": {"name": ..., "status": "running"}}``.

    Raises:
        UserError: a bad config or missing data.
    """
    validate(cfg)
    quiet_library_noise()
    cfg = resolve_auto(cfg)
    if cfg.mode == "eval":
        from lit_sharp.evaluate import evaluate

        return evaluate(cfg)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(run_dir / ".lock"), timeout=0):
            _claim_identity(cfg, run_dir)
            if run_status(run_dir) in FINAL_STATUSES:
                log.info("skipping %s: already %s", run_dir, run_status(run_dir))
                return read_results(run_dir)
            with _gpu_for(cfg) as devices:
                return _train(cfg, run_dir, devices)
    except Timeout:
        log.warning("skipping %s: another process is training it (its .lock is held)", run_dir)
        return {"run": {"name": run_dir.name, "status": "running"}}


def identity_of(cfg: DictConfig) -> dict[str, Any]:
    """The config keys that decide what a run computes (see :data:`IDENTITY_PREFIXES`), flat."""
    flat = flatten(_plain(cfg))
    return {key: flat[key] for key in sorted(flat)
            if key.startswith(IDENTITY_PREFIXES) and key not in SPEED_ONLY_KEYS}


def _claim_identity(cfg: DictConfig, run_dir: Path) -> None:
    """Record the run's identity on first launch; refuse a later launch into the folder with another config.

    The folder name carries only the grid's hyperparameters, so without this a run with, say, fewer epochs would
    resume or skip a finished run of the full recipe.

    Raises:
        ConfigError: the folder holds a run of another configuration.
    """
    path = run_dir / IDENTITY_FILE
    mine = identity_of(cfg)
    if not path.is_file():
        path.write_text(json.dumps(mine, indent=2, default=str))
        return
    theirs = json.loads(path.read_text())
    changed = [f"{key}: {theirs.get(key)!r} -> {mine.get(key)!r}" for key in sorted(set(mine) | set(theirs))
               if json.dumps(mine.get(key), default=str) != json.dumps(theirs.get(key), default=str)]
    if changed:
        raise ConfigError("name", cfg.name, f"{run_dir} holds a run of another configuration ({'; '.join(changed)}); "
                          "choose another name=... for this variant, or delete that folder")


@contextmanager
def _gpu_for(cfg: DictConfig) -> Iterator[list[int] | None]:
    """A GPU slot (see :mod:`lit_sharp.gpu_slots`) for a one-device run on a CUDA machine; else the config decides."""
    wants_gpu = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and cfg.trainer.devices in (1, "1")
    if not (wants_gpu and torch.cuda.is_available()):
        yield None
        return
    with gpu_slot(torch.cuda.device_count(), int(cfg.resources.runs_per_gpu)) as gpu:
        yield [gpu]


def _train(cfg: DictConfig, run_dir: Path, devices: list[int] | None) -> dict[str, Any]:
    hparams = hparams_of(cfg)
    name = run_dir.name
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    # Missing data fails here, before a W&B run exists (setup writes synthetic data or downloads when asked);
    # Lightning's own calls then find the arrays loaded.
    datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.module, model=build_model(cfg.model))
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg, run_dir, name, tags=_tags(hparams, cfg))
    for logger in loggers:
        # The flat dotted keys of results.json's config (module.lr, data.augment, ...), which W&B's grouping and
        # parallel-coordinates panels take as they are.
        logger.log_hyperparams({**flatten(_plain(cfg)), "subgroup": subgroup_of(hparams)})
    trainer_kwargs: dict[str, Any] = {"devices": devices} if devices is not None else {}
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        # submitit requeues on preemption (USR2) and the run resumes from its checkpoint; Lightning must not requeue too.
        trainer_kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    clock = RunClock()
    # The bar reads the loss only when the loggers flush (a host sync); Lightning's default reads it every step.
    progress = [LoggedStepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[clock, *progress, *callbacks, _checkpointing(run_dir)],
        default_root_dir=str(run_dir), **trainer_kwargs,
    )
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if last.is_file():
        log.info("resuming %s from %s", name, last)
    status, error = "completed", None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    except Diverged as exc:
        status, error = "diverged", str(exc)
    except UserError:
        finish_wandb(loggers, {"run/status": "failed"}, exit_code=1)
        raise
    except Exception as exc:
        _record(cfg, run_dir, loggers, hparams, "failed", clock.seconds, {}, f"{type(exc).__name__}: {exc}")
        raise
    if status == "completed" and trainer.state.status.value != "finished":
        raise RuntimeError(f"training of {name} ended in state {trainer.state.status.value}; no results written")
    metrics = collect_results(callbacks) if status == "completed" else {}
    return _record(cfg, run_dir, loggers, hparams, status, clock.seconds, metrics, error)


def _record(cfg: DictConfig, run_dir: Path, loggers: list, hparams: dict[str, Any], status: str, seconds: float,
            metrics: dict[str, float], error: str | None) -> dict[str, Any]:
    summary = {"run/status": status, "run/seconds": seconds, **metrics}
    where = wandb_location(loggers)
    wandb_id = finish_wandb(loggers, summary, exit_code=0 if status != "failed" else 1)
    record = make_record(name=run_dir.name, status=status, seconds=seconds, wandb_id=wandb_id, hparams=hparams,
                         config=_plain(cfg), metrics=metrics, error=error)
    write_results(run_dir, record)
    log.info("%s", run_summary(record, run_dir, where))
    return record


def build_model(model_cfg: DictConfig) -> nn.Module:
    """Instantiate the model config (its ``name`` key identifies the architecture and is not passed on)."""
    kwargs = {key: value for key, value in model_cfg.items() if key != "name"}
    return hydra.utils.instantiate(kwargs)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The configured end-of-training callbacks (a ``null`` entry disables one).

    Raises:
        ConfigError: an entry without ``_target_``, e.g. options an experiment set for a callback that the
            chosen ``callbacks`` group does not have.
    """
    callbacks = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"callbacks.{key}", OmegaConf.to_container(node), "has no _target_; remove it with "
                              f"~callbacks.{key} or choose a callbacks group that defines it")
        callbacks.append(hydra.utils.instantiate(node))
    return callbacks


def collect_results(callbacks: list[Callback]) -> dict[str, float]:
    """Merge the ``results`` of every callback that has them (final errors, sharpness, corruption error)."""
    metrics: dict[str, float] = {}
    for callback in callbacks:
        metrics.update(getattr(callback, "results", None) or {})
    return metrics


def subgroup_of(hparams: dict[str, Any]) -> str:
    """The augment x mixup subgroup of a run, as the analysis names it."""
    return f"augment={str(hparams['augment']).lower()},mixup={str(hparams['mixup_alpha'] > 0).lower()}"


def _tags(hparams: dict[str, Any], cfg: DictConfig) -> list[str]:
    return [hparams["model"], subgroup_of(hparams), f"sam_rho={hparams['sam_rho']:g}", f"lr={hparams['lr']:g}", cfg.name]


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _checkpointing(run_dir: Path) -> ModelCheckpoint:
    # One file, overwritten at the end of every epoch (and so at the end of training): enough to resume, no pile-up.
    return ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), filename="last", save_last=False,
                           save_top_k=1, monitor=None, every_n_epochs=1, save_on_train_epoch_end=True,
                           enable_version_counter=False)
