"""A composed config: the checks run before any training starts (each refusal names the key and the value), the\n``auto`` settings made concrete, and readers of a few keys that several modules need."""

from __future__ import annotations

import copy
import math
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lit_sharp.constants import RANDAUGMENTS
from lit_sharp.errors import ConfigError
from lit_sharp.locks import default_lock_dir
from lit_sharp.models.init import INITS
from lit_sharp.models.vit import VARIANTS as SIMPLEVIT_VARIANTS


def _config_dir() -> Path:
    # An install holds the configs inside the package (pyproject.toml maps configs/ to lit_sharp/configs); a checkout,
    # imported from its folder, through PYTHONPATH or by an editable install (which points at the checkout's
    # lit_sharp/), keeps them in configs/ beside the package. Hydra needs a real directory: both are.
    package = Path(__file__).resolve().parent
    inside = package / "configs"
    return inside if (inside / "train.yaml").is_file() else package.parent / "configs"


#: The Hydra configs of the study: ``train.yaml`` and its groups (``configs/`` of the repository, ``lit_sharp/configs``
#: of an install).
CONFIG_DIR = _config_dir()
MODELS = ("resnet18", "simplevit")
MODES = ("train", "eval", "zoo")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed")
#: Steps between reads of the loss on a GPU, where every read is a host synchronisation.
GPU_CHECK_FINITE_EVERY = 25
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _launch_id() -> str:
    # Makes each launch's sweep folder its own, even for two launches in one second. Hydra hands the master config's
    # resolver cache to every job's config, so all the jobs of one launch resolve the same folder.
    return secrets.token_hex(3)


OmegaConf.register_new_resolver("lit_sharp.launch_id", _launch_id, use_cache=True, replace=True)


def validate(cfg: DictConfig) -> None:
    """Refuse a config that cannot give a meaningful run.

    Raises:
        ConfigError: naming the first bad key, its value and what is allowed.
    """
    _one_of(cfg, "mode", MODES)
    _one_of(cfg, "model.name", MODELS)
    _one_of(cfg, "model.init", INITS)
    if cfg.model.name == "simplevit":
        _one_of(cfg, "model.variant", SIMPLEVIT_VARIANTS)
    _number(cfg, "module.lr", low=0.0, low_open=True)
    _number(cfg, "module.momentum", low=0.0, high=1.0, high_open=True)
    _number(cfg, "module.weight_decay", low=0.0)
    _number(cfg, "module.warmup_fraction", low=0.0, high=1.0)
    _number(cfg, "module.sam_rho", low=0.0)
    _number(cfg, "module.mixup_alpha", low=0.0)
    _one_of(cfg, "data.randaugment", RANDAUGMENTS)
    _number(cfg, "data.batch_size", low=1)
    _number(cfg, "data.num_workers", low=0)
    _number(cfg, "seed", low=0)
    _precision(cfg)
    _duration(cfg)
    if cfg.trainer.get("checkpoint_every_minutes") is not None:
        _number(cfg, "trainer.checkpoint_every_minutes", low=0.0, low_open=True)
    _name(cfg)
    _one_of(cfg, "logger.kind", LOGGERS)
    if cfg.logger.kind == "wandb":
        _one_of(cfg, "logger.mode", WANDB_MODES)
    if cfg.mode == "eval" and not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path", cfg.get("ckpt_path"), "mode=eval needs ckpt_path=PATH (a Lightning checkpoint or a state_dict file)")


def resolve_auto(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with the GPU fast-path settings left at ``auto``/``null`` made concrete.

    On a CUDA device: ``trainer.precision`` bf16-mixed, ``module.channels_last`` and ``data.channels_last`` true,
    ``module.check_finite_every`` 25; elsewhere 32-true, false, false and 1.
    """
    cfg = copy.deepcopy(cfg)
    on_gpu = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if str(cfg.trainer.precision) == "auto":
        cfg.trainer.precision = "bf16-mixed" if on_gpu else "32-true"
    for key in ("module.channels_last", "data.channels_last"):
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, on_gpu)
    if cfg.module.get("check_finite_every") is None:
        cfg.module.check_finite_every = GPU_CHECK_FINITE_EVERY if on_gpu else 1
    return cfg


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` resolved into plain dicts and lists (what ``results.json`` and the loggers record)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def lock_mode(cfg: DictConfig) -> str:
    """``resources.lock_mode``: ``auto`` (flock, or owner files where the file system has none), ``flock`` or ``file``."""
    return str((cfg.get("resources") or {}).get("lock_mode") or "auto")


def lock_dir(cfg: DictConfig) -> Path:
    """``resources.lock_dir``, the folder of the GPU slot locks (default: a per-user folder of this machine)."""
    folder = (cfg.get("resources") or {}).get("lock_dir")
    return Path(folder).expanduser() if folder else default_lock_dir()


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            raise ConfigError(key, None, "is missing from the config")
        node = node[part]
    return node


def _one_of(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")


def _number(cfg: DictConfig, key: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, value, "must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(key, value, f"must be {'>' if low_open else '>='} {low:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(key, value, f"must be {'<' if high_open else '<='} {high:g}")


def _precision(cfg: DictConfig) -> None:
    value = str(_get(cfg, "trainer.precision"))
    if value in ("16-mixed", "16", "16-true"):
        raise ConfigError("trainer.precision", value, "float16 needs a GradScaler, which cannot serve SAM's two passes "
                          "(the ascent step would use a scaled, possibly inf gradient); use 32-true or bf16-mixed")
    if value not in PRECISIONS:
        raise ConfigError("trainer.precision", value, f"must be one of {', '.join(PRECISIONS)}")


def _duration(cfg: DictConfig) -> None:
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    if (steps is None or steps < 0) and (epochs is None or epochs < 1):
        raise ConfigError("trainer.max_epochs", epochs, "must be >= 1 (or set trainer.max_steps > 0)")
    if steps is not None and steps == 0:
        raise ConfigError("trainer.max_steps", steps, "must be > 0, or -1 to train for trainer.max_epochs")


def _name(cfg: DictConfig) -> None:
    value = _get(cfg, "name")
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.=-]+", value):
        raise ConfigError("name", value, "must be a non-empty folder name of letters, digits, '_', '-', '.', '='")
