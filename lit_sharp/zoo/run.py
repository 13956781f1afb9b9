"""Measuring one pretrained model of a zoo (``mode=zoo``): ``python train.py experiment=zoo_augreg_in1k zoo.model=NAME``.

A zoo run lives in the same house as a CIFAR-10 run: its folder ``<paths.root>/<name>/<zoo.model>`` holds
``results.json``, ``run_config.json`` (the ``zoo.*`` keys that decide the numbers) and ``.lock``; a relaunch skips a
measured model; a W&B run per model goes to the zoo's group (``logger.group``, the experiment's name). The record's
``hparams`` are the model's own training hyperparameters from the zoo's metadata, with ``zoo`` and ``model``; its
``metrics`` are ``<set>/err`` for every evaluation set present under ``zoo.data``, ``final/train_err`` on the fixed
training-error subset and ``sharpness/<spec name>`` (with ``sharpness_err_increase/<spec name>``) for the specs of
``zoo.sharpness_preset`` on the fixed sharpness batches (docs/protocol.md, the ImageNet protocol).

The measurements are long (the paper's 12 specs on 2,048 images take GPU-hours for a ViT-B), so each one is recorded
when it is done: until all are in, ``results.json`` says ``failed`` with the measurement under way (or the error of
the one that failed) and the numbers so far, and a relaunch measures only what is missing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_sharp.callbacks.sharpness import ERR_INCREASE_PREFIX, VALUE_PREFIX
from lit_sharp.config import lock_dir, lock_mode, to_plain
from lit_sharp.console import run_summary
from lit_sharp.errors import ConfigError
from lit_sharp.evaluation import classification_error
from lit_sharp.gpu_slots import gpu_for_run
from lit_sharp.results import ResultsError, flatten, make_record, read_results, write_results
from lit_sharp.run_folder import in_run_folder
from lit_sharp.sharpness import PRESETS, SharpnessSpec, preset, sharpness
from lit_sharp.tracking import build_loggers, finish_wandb, wandb_location
from lit_sharp.zoo.eval_sets import EVAL_SETS, evaluation_errors
from lit_sharp.zoo.sources import ZOOS, load_zoo_model
from lit_sharp.zoo.train_subsets import sharpness_batches, train_error_subset

log = logging.getLogger(__name__)

#: The config keys that decide a zoo run's numbers (its identity in ``run_config.json``) ...
IDENTITY_PREFIXES = ("zoo.",)
#: ... except these, which say where the files are or how fast to read them.
SPEED_ONLY_KEYS = ("zoo.root", "zoo.data", "zoo.train_folder", "zoo.batch_size", "zoo.num_workers")
#: The measurement of every evaluation set present, recorded as one step.
EVAL_SETS_STEP = "eval_sets"
TRAIN_ERR = "final/train_err"
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_.=+-]+")


def measure_zoo_model(cfg: DictConfig) -> dict[str, Any]:
    """Measure the model ``cfg.zoo.model`` of ``cfg.zoo.name`` unless its run folder already holds its numbers.

    Returns:
        The run's ``results.json`` record; ``{"run": {"name": ..., "status": "running", "error": "held by
        host:pid"}}`` when another process holds the run folder's lock.

    Raises:
        UserError: a bad ``zoo.*`` key, a missing or corrupt model file, an evaluation folder without its classes
            (also written into the run's ``results.json`` when the run folder exists).
    """
    check_zoo_config(cfg)
    run_dir = zoo_run_dir(cfg)

    def work() -> dict[str, Any]:
        with _device_for(cfg) as device:
            return _measure(cfg, run_dir, device)

    return in_run_folder(cfg, run_dir, work, doing="measuring", prefixes=IDENTITY_PREFIXES,
                         speed_only=SPEED_ONLY_KEYS, hparams=_named(cfg))


def zoo_run_dir(cfg: DictConfig) -> Path:
    """``<paths.root>/<name>/<zoo.model>``: one folder per model, in the folder of the zoo's experiment."""
    return Path(cfg.paths.root).expanduser().resolve() / cfg.name / str(cfg.zoo.model)


def check_zoo_config(cfg: DictConfig) -> None:
    """Refuse ``zoo.*`` values that cannot give a measurement, before any file is read.

    Raises:
        ConfigError: naming the key, its value and what is allowed.
    """
    zoo = cfg.get("zoo")
    if zoo is None:
        raise ConfigError("zoo", None, "mode=zoo needs a zoo: use experiment=zoo_augreg_in1k, zoo_augreg_in21k, "
                          "zoo_clip_soups or zoo_timm")
    if zoo.name not in ZOOS:
        raise ConfigError("zoo.name", zoo.name, f"must be one of {', '.join(ZOOS)}")
    if not zoo.get("model"):
        names = ("any timm name with pretrained weights, e.g. zoo.model=resnet50.a1_in1k" if zoo.name == "timm" else
                 f"`python -m lit_sharp.zoo list {zoo.name} --root {zoo.root}` prints the zoo's model names")
        raise ConfigError("zoo.model", zoo.get("model"), f"name the model to measure: {names}; the whole zoo: "
                          "zoo.model=<name>,<name>,... with -m (README, 'Pretrained zoos')")
    if not isinstance(zoo.model, str) or not _FOLDER_NAME.fullmatch(zoo.model):
        raise ConfigError("zoo.model", zoo.model, "must be a model name of letters, digits, '_', '-', '.', '+', '='")
    if zoo.sharpness_preset not in PRESETS:
        raise ConfigError("zoo.sharpness_preset", zoo.sharpness_preset, f"must be one of {', '.join(PRESETS)}")
    unknown = sorted(set(zoo.sets or ()) - set(EVAL_SETS))
    if unknown:
        raise ConfigError("zoo.sets", list(zoo.sets), f"unknown sets {unknown}; known: {', '.join(EVAL_SETS)}")
    for key in ("train_error_images", "sharpness_batches", "sharpness_batch_size", "batch_size", "num_workers"):
        _integer(zoo, key, low=0 if key == "num_workers" else 1)
    for key in ("sharpness_n_iters", "sharpness_n_samples"):  # null keeps the preset's own
        if zoo.get(key) is not None:
            _integer(zoo, key, low=1)


def _integer(zoo: DictConfig, key: str, low: int) -> None:
    value = zoo.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"zoo.{key}", value, f"must be an integer >= {low}")


def zoo_specs(cfg: DictConfig) -> list[SharpnessSpec]:
    """The specs of ``zoo.sharpness_preset``, with ``zoo.sharpness_n_iters`` / ``_n_samples`` when set."""
    return preset(cfg.zoo.sharpness_preset, n_iters=cfg.zoo.sharpness_n_iters, n_samples=cfg.zoo.sharpness_n_samples)


def _named(cfg: DictConfig) -> dict[str, Any]:
    return {"zoo": str(cfg.zoo.name), "model": str(cfg.zoo.model)}


@dataclass
class _Progress:
    """What a zoo run has measured so far; written into ``results.json`` after every step."""

    cfg: DictConfig
    run_dir: Path
    hparams: dict[str, Any]
    loggers: list[Logger]
    started: float = field(default_factory=time.monotonic)
    metrics: dict[str, float] = field(default_factory=dict)
    measured: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    earlier_seconds: float = 0.0

    def record(self, status: str, error: str | None = None, *, measuring: str | None = None,
               final: bool = False) -> dict[str, Any]:
        """Write the record; ``final`` also closes the W&B run with the same numbers and prints the summary."""
        seconds = self.earlier_seconds + time.monotonic() - self.started
        wandb_id, where = None, None
        if final:
            where = wandb_location(self.loggers)
            try:
                wandb_id = finish_wandb(self.loggers, {"run/status": status, "run/seconds": seconds, **self.metrics},
                                        exit_code=0 if status == "completed" else 1)
            except Exception as exc:
                if status != "completed":
                    raise
                # The numbers are safe in results.json; the run stays retryable until W&B has them too.
                status, error = "failed", f"W&B could not record the summary: {type(exc).__name__}: {exc}"
        record = make_record(name=self.run_dir.name, status=status, seconds=seconds, wandb_id=wandb_id,
                             hparams=self.hparams, config=to_plain(self.cfg), metrics=self.metrics, error=error)
        record["run"].update(measured=list(self.measured), skipped=list(self.skipped))
        if measuring is not None:
            record["run"]["measurement"] = measuring
        write_results(self.run_dir, record)
        if final:
            log.info("%s", run_summary(record, self.run_dir, where, self.skipped))
        return record


@contextmanager
def _device_for(cfg: DictConfig) -> Iterator[torch.device]:
    """The CPU without CUDA; else the run's GPU (:func:`lit_sharp.gpu_slots.gpu_for_run`), so that a grid launched
    with several jobs at once spreads over the visible GPUs as training runs do."""
    if not torch.cuda.is_available():
        yield torch.device("cpu")
        return
    with gpu_for_run(torch.cuda.device_count(), int(cfg.resources.runs_per_gpu), lock_dir=lock_dir(cfg),
                     lock_mode=lock_mode(cfg)) as gpu:
        yield torch.device("cuda", gpu or 0)


def _measure(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
    zoo = cfg.zoo
    log.info("%s: loading model %s of zoo %s from %s", run_dir.name, zoo.model, zoo.name, zoo.root)
    model_kwargs = OmegaConf.to_container(zoo.model_kwargs, resolve=True) if zoo.model_kwargs else None
    model, own_hparams, data_config = load_zoo_model(zoo.name, zoo.model, zoo.root, model_kwargs)
    model.to(device)
    hparams = {**own_hparams, **_named(cfg)}
    loggers = build_loggers(cfg, run_dir, run_dir.name, tags=[str(zoo.name), str(cfg.name)], job_type="zoo")
    for logger in loggers:
        logger.log_hyperparams({**flatten(to_plain(cfg)), **flatten(hparams, prefix="hparams.")})
    progress = _Progress(cfg, run_dir, hparams, loggers)
    _keep_earlier(progress)
    steps = list(_steps(cfg, model, data_config))
    for index, (key, measure) in enumerate(steps, start=1):
        if key in progress.measured:
            continue
        log.info("%s: measuring %s (%d of %d)", run_dir.name, key, index, len(steps))
        progress.record("failed", f"stopped while measuring {key}", measuring=key)
        started = time.monotonic()
        try:
            metrics, skipped = measure()
        except Exception as exc:
            progress.record("failed", f"measurement {key} failed: {type(exc).__name__}: {exc}", measuring=key,
                            final=True)
            exc.recorded = True  # type: ignore[attr-defined] - the record names the measurement; keep it
            raise
        progress.metrics.update(metrics)
        progress.skipped += skipped
        progress.measured.append(key)
        for logger in loggers:
            logger.log_metrics(metrics)
        shown = ", ".join(f"{name} = {value:.4g}" for name, value in metrics.items()) or "; ".join(skipped)
        log.info("%s: %s in %.1f s: %s", run_dir.name, key, time.monotonic() - started, shown)
    return progress.record("completed", final=True)


def _keep_earlier(progress: _Progress) -> None:
    """Take over the steps an earlier launch recorded (same identity: ``claim_identity`` has checked)."""
    try:
        earlier = read_results(progress.run_dir)
    except ResultsError:
        return
    progress.measured = list(earlier["run"].get("measured", []))
    progress.skipped = list(earlier["run"].get("skipped", []))
    progress.metrics = {key: value for key, value in earlier["metrics"].items() if value is not None}
    progress.earlier_seconds = float(earlier["run"].get("seconds", 0.0))
    if progress.measured:
        log.info("%s: keeping the recorded measurements %s", progress.run_dir.name, ", ".join(progress.measured))


Step = Callable[[], tuple[dict[str, float], list[str]]]


def _steps(cfg: DictConfig, model: nn.Module, data_config: dict[str, Any]) -> Iterator[tuple[str, Step]]:
    """``(key, measure)`` of every measurement, cheapest first; ``measure()`` returns ``(metrics, skipped lines)``."""
    zoo = cfg.zoo
    train_folder = Path(zoo.data) / zoo.train_folder

    def eval_sets() -> tuple[dict[str, float], list[str]]:
        results = evaluation_errors(model, zoo.data, data_config=data_config, sets=list(zoo.sets or EVAL_SETS),
                                    folders=dict(zoo.folders or {}), batch_size=zoo.batch_size,
                                    num_workers=zoo.num_workers)
        return results.metrics, results.skipped

    yield EVAL_SETS_STEP, eval_sets
    if not train_folder.is_dir():
        yield TRAIN_ERR, lambda: ({}, [f"{TRAIN_ERR} and sharpness: skipped, no training folder {train_folder}"])
        return

    def train_err() -> tuple[dict[str, float], list[str]]:
        subset = train_error_subset(train_folder, data_config, size=zoo.train_error_images)
        loader = DataLoader(subset, batch_size=zoo.batch_size, num_workers=zoo.num_workers)
        return {TRAIN_ERR: classification_error(model, loader)}, []

    yield TRAIN_ERR, train_err
    batches: list[tuple[Tensor, Tensor]] = []
    for spec in zoo_specs(cfg):
        yield VALUE_PREFIX + spec.name, lambda spec=spec: _sharpness(model, spec, batches, train_folder, data_config,
                                                                     zoo)


def _sharpness(model: nn.Module, spec: SharpnessSpec, batches: list[tuple[Tensor, Tensor]], train_folder: Path,
               data_config: dict[str, Any], zoo: DictConfig) -> tuple[dict[str, float], list[str]]:
    if not batches:  # decoded once, on the model's device, for every spec of the run
        device = next(model.parameters()).device
        batches += [(x.to(device), y.to(device)) for x, y in sharpness_batches(
            train_folder, data_config, n_batches=zoo.sharpness_batches, batch_size=zoo.sharpness_batch_size,
            num_workers=zoo.num_workers)]
    result = sharpness(model, batches, spec)
    return {VALUE_PREFIX + spec.name: result.value, ERR_INCREASE_PREFIX + spec.name: result.err_increase}, []
