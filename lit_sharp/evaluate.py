"""Measure an existing checkpoint without retraining: ``python train.py mode=eval ckpt_path=PATH``.

The paper's released code evaluates trained models at many radii after the fact; this does the same with the
configured end-of-training measures (final errors, sharpness specs, CIFAR-10-C error). A checkpoint inside a run
folder (``<run dir>/checkpoints/*.ckpt``) is rebuilt with that run's model config, and the numbers are merged into
the run's ``results.json`` and its W&B run (resumed by id, so the new numbers land beside the old ones). Any other
file, a Lightning checkpoint, a plain ``state_dict`` or a checkpoint of the paper's released code (see
:func:`lit_sharp.checkpoints.load_weights`), is rebuilt with the model of the config and recorded in ``<paths.root>/<name>/eval-<file name>/``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lit_sharp.assembly import build_datamodule, build_model, build_named_callbacks
from lit_sharp.checkpoints import load_weights
from lit_sharp.config import to_plain
from lit_sharp.errors import ConfigError, UserError
from lit_sharp.locks import LockBusy
from lit_sharp.measurements import is_measurement
from lit_sharp.results import RESULTS_FILE, json_metrics, make_record, read_results, write_results
from lit_sharp.run_folder import hparams_of, run_lock, source_run_dir
from lit_sharp.tracking import build_loggers, finish_wandb, run_tags

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Measure ``cfg.ckpt_path`` with every configured measurement and record the numbers.

    A checkpoint of a run folder is measured under that run's lock, so it cannot race a training launch of the run.

    Returns:
        The updated ``results.json`` record.

    Raises:
        ConfigError: the checkpoint is missing, unreadable, or does not fit the model.
        UserError: another process is training or evaluating the run.
    """
    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    run_dir = source_run_dir(ckpt)
    if run_dir is None:
        return _evaluate(cfg, ckpt, None)
    try:
        with run_lock(cfg, run_dir):
            return _evaluate(cfg, ckpt, run_dir)
    except LockBusy as busy:
        raise UserError(f"{run_dir} is being trained or evaluated by another process ({busy}); "
                        "evaluate it when that process has ended") from None


def _evaluate(cfg: DictConfig, ckpt: Path, run_dir: Path | None) -> dict[str, Any]:
    weights = load_weights(ckpt)
    previous = read_results(run_dir) if run_dir is not None and (run_dir / RESULTS_FILE).is_file() else None
    model_cfg = recorded_model_config(previous) if previous is not None else cfg.model
    if run_dir is None:
        run_dir = Path(cfg.paths.root).expanduser().resolve() / cfg.name / f"eval-{ckpt.stem}"
        run_dir.mkdir(parents=True, exist_ok=True)
    hparams = previous["hparams"] if previous is not None else hparams_of(cfg)

    model = build_model(model_cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ConfigError("ckpt_path", str(ckpt), f"does not fit model {model_cfg.name}: {exc}. "
                          "Pass the model it was trained with (e.g. model=simplevit or model.width=...)") from None
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    datamodule = build_datamodule(cfg)

    started = time.monotonic()
    metrics: dict[str, float] = {}
    for callback in build_named_callbacks(cfg).values():
        if is_measurement(callback):
            metrics.update(callback.measure(model, datamodule, progress=True))
    seconds = time.monotonic() - started

    loggers = build_loggers(cfg, run_dir, run_dir.name, tags=run_tags(hparams, cfg), job_type="eval")
    for each in loggers:
        each.log_metrics(metrics)
        each.save()
    wandb_id = finish_wandb(loggers, metrics)
    record = _merged_record(previous, run_dir.name, hparams, to_plain(cfg), metrics, seconds, wandb_id)
    record["run"]["evaluated"] = {"ckpt_path": str(ckpt), "seconds": seconds}
    write_results(run_dir, record)
    log.info("evaluated %s in %.1f s -> %s", ckpt, seconds, run_dir / RESULTS_FILE)
    return record


def recorded_model_config(record: dict[str, Any]) -> DictConfig:
    """The model config a run recorded in its ``results.json`` (to rebuild the network its checkpoint fits)."""
    flat = {key.removeprefix("model."): value for key, value in record.get("config", {}).items() if key.startswith("model.")}
    if "name" not in flat or "_target_" not in flat:
        raise ConfigError("ckpt_path", record["run"]["name"], "its results.json records no model config")
    if flat["name"] == "simplevit":
        # Runs recorded before model.variant existed trained the SimpleViT of the installed vit-pytorch (1.x).
        flat.setdefault("variant", "vit_pytorch_latest")
    return OmegaConf.create(flat)


def _merged_record(previous: dict[str, Any] | None, name: str, hparams: dict[str, Any], config: dict[str, Any],
                   metrics: dict[str, float], seconds: float, wandb_id: str | None) -> dict[str, Any]:
    if previous is None:
        return make_record(name=name, status="completed", seconds=seconds, wandb_id=wandb_id, hparams=hparams,
                           config=config, metrics=metrics)
    merged = dict(previous)
    merged["metrics"] = {**previous["metrics"], **json_metrics(metrics)}
    merged["run"] = {**previous["run"], "wandb_id": wandb_id or previous["run"].get("wandb_id")}
    return merged
