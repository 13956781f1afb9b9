"""One run of the study: train (or resume) a model, measure it, and write ``results.json``.

``run(cfg)`` is what ``train.py`` calls and what tests call directly. A run folder is
``<paths.root>/<name>/<run name>``, the run name derived from the hyperparameters, so launching the same
configuration again finds its own folder: a completed (or diverged) run is skipped, a run with a checkpoint
resumes from it, and a failed run is trained again.

A run is ``completed`` only with all its numbers: after training, every configured measurement (a callback with a
``measure()`` method) whose results are not yet recorded is measured, so a relaunch after a crash during the
measurements loads the finished checkpoint and measures, without training again. Until every measurement is in,
``results.json`` says ``failed`` with the measurement that failed (or was under way when the process died) and its
error, and a relaunch finishes the job.
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
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lit_sharp.callbacks._logging import log_final_metrics
from lit_sharp.callbacks.run_clock import RunClock
from lit_sharp.config import resolve_auto, validate
from lit_sharp.console import quiet_library_noise, run_summary
from lit_sharp.errors import ConfigError, UserError
from lit_sharp.gpu_slots import gpu_slot, gpu_uuids, scheduler_owns_gpus
from lit_sharp.locks import LockBusy, default_lock_dir, hold
from lit_sharp.module import Diverged
from lit_sharp.progress import LoggedStepProgressBar
from lit_sharp.results import (ResultsError, flatten, make_record, read_results, run_status, subgroup_of,
                               write_results)
from lit_sharp.tracking import build_loggers, finish_wandb, wandb_location

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_config.json"
#: Config keys that change what a run computes; two launches into one run folder must agree on them.
IDENTITY_PREFIXES = ("model.", "module.", "data.augment", "data.randaugment", "data.batch_size", "data.synthetic",
                     "data.clean_train_size", "data.sharpness_size", "data.sharpness_batch_size", "data.drop_last", "trainer.max_epochs",
                     "trainer.max_steps", "trainer.precision", "seed")
#: ... except these, which change speed only.
SPEED_ONLY_KEYS = ("module.check_finite_every", "module.channels_last", "module.compile")
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FINAL_STATUSES = ("completed", "diverged")
RUN_LOCK = ".lock"
DOWNLOAD_LOCK = ".download.lock"


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters a grid varies, in the ``results.json`` layout."""
    return {
        "model": str(cfg.model.name),
        "lr": float(cfg.module.lr),
        "sam_rho": float(cfg.module.sam_rho),
        "mixup_alpha": float(cfg.module.mixup_alpha),
        "augment": bool(cfg.data.augment),
        "seed": int(cfg.seed),
        "sam_adaptive": bool(cfg.module.sam_adaptive),
    }


def run_name(hparams: dict[str, Any], sam_adaptive: bool | None = None) -> str:
    """A folder name that is a function of the hyperparameters, e.g. ``resnet18_lr0.1_rho0.05_mix0.5_aug1_s0``."""
    name = (
        f"{hparams['model']}_lr{hparams['lr']:g}_rho{hparams['sam_rho']:g}"
        f"_mix{hparams['mixup_alpha']:g}_aug{int(hparams['augment'])}_s{hparams['seed']}"
    )
    adaptive = hparams.get("sam_adaptive", False) if sam_adaptive is None else sam_adaptive
    return name + ("_asam" if adaptive else "")


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
        return _evaluate_locked(cfg)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with hold(run_dir / RUN_LOCK, mode=lock_mode(cfg)):
            try:
                _claim_identity(cfg, run_dir)
                if run_status(run_dir) in FINAL_STATUSES:
                    log.info("skipping %s: already %s", run_dir, run_status(run_dir))
                    return read_results(run_dir)
                with _gpu_for(cfg) as devices:
                    return _train(cfg, run_dir, devices)
            except UserError as exc:
                _record_refusal(cfg, run_dir, exc)
                raise
    except LockBusy as busy:
        log.warning("skipping %s: another process is training it (%s)", run_dir, busy)
        return {"run": {"name": run_dir.name, "status": "running"}}


def lock_mode(cfg: DictConfig) -> str:
    """``resources.lock_mode``: ``auto`` (flock, or owner files where the file system has none), ``flock`` or ``file``."""
    return str((cfg.get("resources") or {}).get("lock_mode") or "auto")


def lock_dir(cfg: DictConfig) -> Path:
    """``resources.lock_dir``, the folder of the GPU slot locks (default: a per-user folder of this machine)."""
    folder = (cfg.get("resources") or {}).get("lock_dir")
    return Path(folder).expanduser() if folder else default_lock_dir()


def _evaluate_locked(cfg: DictConfig) -> dict[str, Any]:
    """``mode=eval`` under the lock of the run it writes into, so it cannot race a training launch of that run."""
    from lit_sharp.evaluate import source_run_dir, evaluate

    run_dir = source_run_dir(Path(cfg.ckpt_path).expanduser().resolve()) if cfg.get("ckpt_path") else None
    if run_dir is None:
        return evaluate(cfg)
    try:
        with hold(run_dir / RUN_LOCK, mode=lock_mode(cfg)):
            return evaluate(cfg)
    except LockBusy as busy:
        raise UserError(f"{run_dir} is being trained or evaluated by another process ({busy}); "
                        "evaluate it when that process has ended") from None


def _record_refusal(cfg: DictConfig, run_dir: Path, exc: UserError) -> None:
    """Write why a run was refused into its ``results.json``, unless the folder holds a finished run (kept as is)."""
    if run_status(run_dir) in FINAL_STATUSES or getattr(exc, "recorded", False):
        return
    record = make_record(name=run_dir.name, status="failed", seconds=0.0, wandb_id=None, hparams=hparams_of(cfg),
                         config=_plain(cfg), metrics={}, error=f"refused: {exc}")
    record["run"]["refused"] = True
    write_results(run_dir, record)


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
    if scheduler_owns_gpus(os.environ):
        yield None  # the job's own GPUs: Lightning takes the first
        return
    with gpu_slot(gpu_uuids(torch.cuda.device_count()), int(cfg.resources.runs_per_gpu), lock_dir=lock_dir(cfg),
                  lock_mode=lock_mode(cfg)) as gpu:
        yield [gpu]


@contextmanager
def _download_lock(cfg: DictConfig) -> Iterator[None]:
    """With ``data.download=true``, one download at a time into a data folder (the lock lies beside the data)."""
    if not cfg.data.get("download"):
        yield
        return
    root = Path(cfg.data.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with hold(root / DOWNLOAD_LOCK, mode=lock_mode(cfg), wait=None,
              on_wait=f"waiting for another run's download into {root} ({root / DOWNLOAD_LOCK})"):
        yield


def _train(cfg: DictConfig, run_dir: Path, devices: list[int] | None) -> dict[str, Any]:
    hparams = hparams_of(cfg)
    name = run_dir.name
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    # Missing data fails here, before a W&B run exists (setup writes synthetic data or downloads when asked);
    # Lightning's own calls then find the arrays loaded.
    with _download_lock(cfg):
        datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.module, model=build_model(cfg.model))
    measures, callbacks = _split_measures(build_named_callbacks(cfg))
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
    checks = _MeasurementChecks(list(measures.values()))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[clock, *progress, checks, *callbacks, _checkpointing(run_dir)],
        default_root_dir=str(run_dir), **trainer_kwargs,
    )
    last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if last.is_file():
        log.info("resuming %s from %s", name, last)
    status, error = "completed", None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        module.check_finite()  # also a run whose training had already ended before this launch
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
    if status == "diverged":
        return _record(cfg, run_dir, loggers, hparams, status, clock.seconds, {}, error)
    metrics, measured = _measure(cfg, run_dir, trainer, module, datamodule, measures, loggers, hparams, clock,
                                 reuse=checks.steps_trained == 0)
    return _record(cfg, run_dir, loggers, hparams, "completed", clock.seconds, metrics, None, measured=measured)


class _MeasurementChecks(Callback):
    """Runs the measurement callbacks' ``setup`` checks at the start of fitting (a bad path fails before training),
    and counts the steps this process trained (none when the checkpoint says training had ended)."""

    def __init__(self, measures: list[Callback]) -> None:
        self.measures = measures
        self.steps_trained = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for measure in self.measures:
            measure.setup(trainer, pl_module, stage)

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps_trained += 1


def _measure(cfg: DictConfig, run_dir: Path, trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any,
             measures: dict[str, Callback], loggers: list, hparams: dict[str, Any], clock: RunClock,
             reuse: bool) -> tuple[dict[str, float], list[str]]:
    """Measure the trained model with every measurement not yet recorded; record progress in ``results.json``.

    Before each measurement the record says ``failed`` with that measurement under way, so a process killed while
    measuring leaves a true, retryable record; a measurement that raises leaves its error. Numbers recorded by an
    earlier process for the same final checkpoint (``reuse``) are kept, not measured again.

    Raises:
        Exception: the first measurement that fails, after recording it.
    """
    metrics: dict[str, float] = {}
    measured: list[str] = []
    previous = _previous_record(run_dir) if reuse else None
    if previous is not None:
        measured = [key for key in previous["run"].get("measured", []) if key in measures]
        metrics = {key: value for key, value in previous["metrics"].items() if value is not None}
        if measured:
            log.info("%s: keeping the recorded measurements %s", run_dir.name, ", ".join(measured))
    # Lightning hands the model back on the CPU after fit; measure where it trained.
    module.to(trainer.strategy.root_device)
    for key, callback in measures.items():
        if key in measured:
            continue
        _record(cfg, run_dir, [], hparams, "failed", clock.seconds, metrics,
                f"stopped while measuring {key}", measured=measured, measuring=key, announce=False)
        try:
            results = (_measured_at(callback, trainer.global_step)
                       or callback.measure(module, datamodule, progress=trainer.is_global_zero))
        except Exception as exc:
            error = f"measurement {key} failed: {type(exc).__name__}: {exc}"
            _record(cfg, run_dir, loggers, hparams, "failed", clock.seconds, metrics, error, measured=measured,
                    measuring=key)
            exc.recorded = True  # type: ignore[attr-defined] - the record names the measurement; keep it
            raise
        metrics.update(results)
        measured.append(key)
        try:
            log_final_metrics(trainer, results)
        except Exception as exc:  # noqa: BLE001 - the W&B summary gets every number when the run is recorded
            log.warning("%s: logging %s failed (%s: %s); the numbers go into the final record", run_dir.name, key,
                        type(exc).__name__, exc)
    return metrics, measured


def _previous_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_results(run_dir)
    except ResultsError:
        return None


def _record(cfg: DictConfig, run_dir: Path, loggers: list, hparams: dict[str, Any], status: str, seconds: float,
            metrics: dict[str, float], error: str | None, *, measured: list[str] | None = None,
            measuring: str | None = None, announce: bool = True) -> dict[str, Any]:
    summary = {"run/status": status, "run/seconds": seconds, **metrics}
    where = wandb_location(loggers)
    try:
        wandb_id = finish_wandb(loggers, summary, exit_code=0 if status != "failed" else 1)
    except Exception as exc:
        if status != "completed":
            raise
        # The numbers are safe in results.json; the run stays retryable until W&B has them too.
        status, error = "failed", f"W&B could not record the summary: {type(exc).__name__}: {exc}"
        wandb_id = None
    record = make_record(name=run_dir.name, status=status, seconds=seconds, wandb_id=wandb_id, hparams=hparams,
                         config=_plain(cfg), metrics=metrics, error=error)
    if measured is not None:
        record["run"]["measured"] = list(measured)
    if measuring is not None:
        record["run"]["measurement"] = measuring
    write_results(run_dir, record)
    if announce:
        log.info("%s", run_summary(record, run_dir, where))
    else:  # a progress record, true if the process dies now; the run goes on
        log.debug("%s: recorded as %s (%s)", run_dir.name, status, error)
    return record


def build_model(model_cfg: DictConfig) -> nn.Module:
    """Instantiate the model config (its ``name`` key identifies the architecture and is not passed on)."""
    kwargs = {key: value for key, value in model_cfg.items() if key != "name"}
    return hydra.utils.instantiate(kwargs)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The configured end-of-training callbacks (see :func:`build_named_callbacks`)."""
    return list(build_named_callbacks(cfg).values())


def _split_measures(named: dict[str, Callback]) -> tuple[dict[str, Callback], list[Callback]]:
    """Measurements (callbacks with ``measure()``), which the run calls after ``fit``, and the Trainer's callbacks.

    A measurement on a schedule (``every_n_epochs``/``every_n_steps``) also joins the Trainer, for its curve during
    training, but leaves its final measurement to the run.
    """
    measures = {key: cb for key, cb in named.items() if callable(getattr(cb, "measure", None))}
    in_trainer = [cb for key, cb in named.items() if key not in measures]
    for callback in measures.values():
        if getattr(callback, "every_n_epochs", None) or getattr(callback, "every_n_steps", None):
            callback.measure_at_end = False
            in_trainer.append(callback)
    return measures, in_trainer


def _measured_at(callback: Callback, step: int) -> dict[str, float] | None:
    """The results of a scheduled measurement already taken of the final weights (the last step), if any."""
    history = getattr(callback, "history", None)
    if history and history[-1].get("step") == step and getattr(callback, "results", None):
        return dict(callback.results)
    return None


def build_named_callbacks(cfg: DictConfig) -> dict[str, Callback]:
    """The configured end-of-training callbacks (a ``null`` entry disables one).

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


def collect_results(callbacks: list[Callback]) -> dict[str, float]:
    """Merge the ``results`` of every callback that has them (final errors, sharpness, corruption error)."""
    metrics: dict[str, float] = {}
    for callback in callbacks:
        metrics.update(getattr(callback, "results", None) or {})
    return metrics


def _tags(hparams: dict[str, Any], cfg: DictConfig) -> list[str]:
    return [hparams["model"], subgroup_of(hparams), f"sam_rho={hparams['sam_rho']:g}", f"lr={hparams['lr']:g}", cfg.name]


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _checkpointing(run_dir: Path) -> ModelCheckpoint:
    # One file, overwritten at the end of every epoch (and so at the end of training): enough to resume, no pile-up.
    return ModelCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), filename="last", save_last=False,
                           save_top_k=1, monitor=None, every_n_epochs=1, save_on_train_epoch_end=True,
                           enable_version_counter=False)
