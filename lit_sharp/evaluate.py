"""Measure an existing checkpoint without retraining: ``python train.py mode=eval ckpt_path=PATH``.

The paper's released code evaluates trained models at many radii after the fact; this does the same with the
configured end-of-training measures (final errors, sharpness specs, CIFAR-10-C error). A checkpoint inside a run
folder (``<run dir>/checkpoints/*.ckpt``) is rebuilt with that run's model config, and the numbers are merged into
the run's ``results.json`` and its W&B run (resumed by id, so the new numbers land beside the old ones). Any other
file, a Lightning checkpoint, a plain ``state_dict`` or a checkpoint of the paper's released code (see
:func:`load_weights`), is rebuilt with the model of the config and recorded in ``<paths.root>/<name>/eval-<file name>/``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lit_sharp.errors import ConfigError
from lit_sharp.models.convert import is_old_layout, old_layout_error
from lit_sharp.results import RESULTS_FILE, json_metrics, make_record, read_results, write_results
from lit_sharp.tracking import build_loggers, finish_wandb

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Measure ``cfg.ckpt_path`` with every configured measure and record the numbers.

    Returns:
        The updated ``results.json`` record.

    Raises:
        ConfigError: the checkpoint is missing, unreadable, or does not fit the model.
    """
    from lit_sharp.train import _plain, _tags, build_callbacks, build_model, hparams_of

    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    weights = load_weights(ckpt)
    run_dir = source_run_dir(ckpt)
    previous = read_results(run_dir) if run_dir is not None and (run_dir / RESULTS_FILE).is_file() else None
    model_cfg = _recorded_model_config(previous) if previous is not None else cfg.model
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
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")  # writes synthetic data or downloads when asked

    started = time.monotonic()
    metrics: dict[str, float] = {}
    for callback in build_callbacks(cfg):
        if callable(getattr(callback, "measure", None)):
            metrics.update(callback.measure(model, datamodule, progress=True))
    seconds = time.monotonic() - started

    loggers = build_loggers(cfg, run_dir, run_dir.name, tags=_tags(hparams, cfg), job_type="eval")
    for each in loggers:
        each.log_metrics(metrics)
        each.save()
    wandb_id = finish_wandb(loggers, metrics)
    record = _merged_record(previous, run_dir.name, hparams, _plain(cfg), metrics, seconds, wandb_id)
    record["run"]["evaluated"] = {"ckpt_path": str(ckpt), "seconds": seconds}
    write_results(run_dir, record)
    log.info("evaluated %s in %.1f s -> %s", ckpt, seconds, run_dir / RESULTS_FILE)
    return record


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` from any of the checkpoint files the study meets.

    Accepted: a Lightning checkpoint (``state_dict`` entry, ``model.`` prefix removed), a plain ``state_dict``, and
    the dictionaries of the paper's released code (``{"last": state_dict, "best": ...}``; like its
    ``eval_sharpness.py``, the ``last`` weights are taken). Files are read with ``weights_only=True``: a checkpoint
    from elsewhere can hold only tensors and plain containers, never code to run.

    Raises:
        ConfigError: the file is missing, unreadable, or holds no ``state_dict``.
        UserError: a ResNet checkpoint of lit_sharp's earlier key layout (the message says how to convert it).
    """
    if not path.is_file():
        raise ConfigError("ckpt_path", str(path), "no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a checkpoint torch can read safely
        raise ConfigError("ckpt_path", str(path), f"cannot be read as a checkpoint with weights_only=True "
                          f"({type(exc).__name__}: {exc})") from None
    state = _state_dict_in(loaded)
    if state is None:
        raise ConfigError("ckpt_path", str(path), "holds neither a Lightning checkpoint, a state_dict of tensors, "
                          "nor a {'last': state_dict} dictionary of the paper's code")
    if state and all(key.startswith("model.") for key in state):
        state = {key.removeprefix("model."): value for key, value in state.items()}
    if is_old_layout(state):
        raise old_layout_error(path)
    return dict(state)


def _state_dict_in(loaded: Any) -> Mapping[str, torch.Tensor] | None:
    """The tensors of a loaded checkpoint: its Lightning ``state_dict``, its ``last`` entry, or the file itself."""
    if not isinstance(loaded, Mapping):
        return None
    for key in ("state_dict", "last"):
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    return loaded if all(isinstance(value, torch.Tensor) for value in loaded.values()) else None


def source_run_dir(ckpt: Path) -> Path | None:
    """The run folder ``ckpt`` was written in (``<run dir>/checkpoints/<file>`` of a lit_sharp run), else None."""
    run_dir = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and ((run_dir / RESULTS_FILE).is_file() or (run_dir / "wandb_id.txt").is_file()):
        return run_dir
    return None


def _recorded_model_config(record: dict[str, Any]) -> DictConfig:
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
