"""Experiment tracking: W&B (offline without an account, online with one switch) or CSV files."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig

WANDB_ID_FILE = "wandb_id.txt"


def resolve_wandb_mode(mode: str) -> str:
    """``online`` when asked, or for ``auto`` when ``WANDB_MODE`` says so or W&B credentials exist; else ``offline``.

    Offline runs write their files under the run folder; ``wandb sync <run dir>/wandb/offline-run-*`` uploads them later.
    """
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if _has_wandb_credentials() else "offline"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B id of the run in ``run_dir``: made once, kept in a file, so a resumed run continues the same W&B run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    # W&B ids are short lowercase alphanumerics; made here so the id exists before W&B starts.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, run_dir: Path, run_name: str, tags: list[str], job_type: str = "train") -> list[Logger]:
    """The loggers of one run as configured by ``cfg.logger`` (``kind`` in wandb, csv, none)."""
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        return [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    mode = resolve_wandb_mode(cfg.logger.mode)
    extra: dict[str, Any] = {}
    if cfg.logger.get("entity"):
        extra["entity"] = cfg.logger.entity
    logger = WandbLogger(
        name=run_name,
        save_dir=str(run_dir),
        id=wandb_run_id(run_dir),
        project=cfg.logger.project,
        group=cfg.logger.group,
        tags=list(cfg.logger.get("tags") or []) + tags,
        job_type=job_type,
        mode=mode,
        resume="allow",
        **extra,
    )
    # Lightning passes ``anonymous`` to wandb.init even when unset, and W&B warns that the setting is deprecated.
    logger._wandb_init.pop("anonymous", None)
    if job_type == "train":
        define_validation_metrics(logger)
    return [logger]


def define_validation_metrics(logger: WandbLogger) -> None:
    """Plot ``val/*`` against the epoch and keep their best (min) and last values in the run summary.

    Lightning logs ``epoch`` with every metric dict, so the epoch is there to serve as the x-axis.
    """
    run = logger.experiment
    run.define_metric("epoch")
    run.define_metric("val/*", step_metric="epoch", summary="min,last")


def wandb_logger(loggers: list[Logger]) -> WandbLogger | None:
    """The W&B logger among ``loggers``, if any."""
    return next((logger for logger in loggers if isinstance(logger, WandbLogger)), None)


def wandb_location(loggers: list[Logger]) -> str | None:
    """Where the W&B run of ``loggers`` goes: its URL online, the ``wandb sync`` command that uploads it offline."""
    logger = wandb_logger(loggers)
    if logger is None:
        return None
    run = logger.experiment
    if run.settings.mode == "disabled":
        return None
    if run.offline:
        return f"offline; upload with: wandb sync {run.settings.sync_dir}"
    return run.url


def finish_wandb(loggers: list[Logger], summary: dict[str, Any], exit_code: int = 0) -> str | None:
    """Write ``summary`` into the W&B run summary and close the run (so the next run in this process is separate).

    Returns:
        The W&B run id, or None without W&B.
    """
    logger = wandb_logger(loggers)
    if logger is None:
        return None
    run = logger.experiment
    run.summary.update(summary)
    run_id = run.id
    run.finish(exit_code=exit_code)
    return run_id
