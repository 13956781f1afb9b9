"""Experiment tracking: W&B (offline without an account, online with one switch) or CSV files.

W&B never costs a run: when an online W&B run cannot start (no network, a bad key, a server error; W&B gives up
after ``WANDB_INIT_TIMEOUT`` seconds, 90 by default) or fails at the end, the run goes on with an offline W&B run of
the same id under the run folder, and one warning gives the ``wandb sync`` command that uploads it later.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig

from lit_sharp.atomic_files import write_text
from lit_sharp.config import to_plain
from lit_sharp.results import flatten, subgroup_of

WANDB_ID_FILE = "wandb_id.txt"
log = logging.getLogger(__name__)


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
    write_text(path, run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, run_dir: Path, run_name: str, tags: list[str], job_type: str = "train") -> list[Logger]:
    """The loggers of one run as configured by ``cfg.logger`` (``kind`` in wandb, csv, none)."""
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        return [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    mode = resolve_wandb_mode(cfg.logger.mode)
    init: dict[str, Any] = dict(
        name=run_name, save_dir=str(run_dir), id=wandb_run_id(run_dir), project=cfg.logger.project,
        group=cfg.logger.group, tags=list(cfg.logger.get("tags") or []) + tags, job_type=job_type, resume="allow",
    )
    if cfg.logger.get("entity"):
        init["entity"] = cfg.logger.entity
    logger = _wandb(init, mode)
    if mode == "online":
        try:
            logger.experiment  # noqa: B018 - starts the W&B run now, so a failure is caught here
        except Exception as exc:  # noqa: BLE001 - whatever W&B raises, the run must go on
            _warn_offline(run_dir, f"W&B could not start online ({type(exc).__name__}: {exc})")
            _forget_failed_run()
            logger = _wandb(init, "offline")
    if job_type == "train":
        define_validation_metrics(logger)
    return [logger]


def run_tags(hparams: dict[str, Any], cfg: DictConfig) -> list[str]:
    """The W&B tags of a run: model, subgroup, rho, lr and the experiment or grid name, for filtering dashboards."""
    return [hparams["model"], subgroup_of(hparams), f"sam_rho={hparams['sam_rho']:g}", f"lr={hparams['lr']:g}",
            cfg.name]


def log_config(loggers: list[Logger], cfg: DictConfig, hparams: dict[str, Any]) -> None:
    """Log the whole config once, as the flat dotted keys of ``results.json`` (``module.lr``, ``data.augment``, ...),
    which W&B's grouping and parallel-coordinates panels take as they are, and the run's subgroup."""
    for logger in loggers:
        logger.log_hyperparams({**flatten(to_plain(cfg)), "subgroup": subgroup_of(hparams)})


def define_validation_metrics(logger: WandbLogger) -> None:
    """Plot ``val/*`` against the epoch and keep their best (min) and last values in the run summary.

    Lightning logs ``epoch`` with every metric dict, so the epoch is there to serve as the x-axis.
    """
    run = logger.experiment
    run.define_metric("epoch")
    # By name, not by the glob "val/*": Lightning has already defined "*" (against its global step), and a second
    # glob would not take precedence over it.
    for name in ("val/err", "val/loss"):
        run.define_metric(name, step_metric="epoch", summary="min,last")


def _wandb(init: dict[str, Any], mode: str) -> WandbLogger:
    logger = WandbLogger(mode=mode, **init)
    # Lightning passes ``anonymous`` to wandb.init even when unset, and W&B warns that the setting is deprecated.
    logger._wandb_init.pop("anonymous", None)
    logger.lit_sharp_init = dict(init)  # to restart the same W&B run offline if the online one breaks later
    return logger


def _forget_failed_run() -> None:
    # W&B's service keeps a failed run's id registered ("run ID is in use"); a fresh service forgets it.
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - a broken service is what we are getting rid of
        pass


def sync_command(run_dir: Path) -> str:
    """The command that uploads a run folder's offline W&B runs (run it where there is internet)."""
    return f"wandb sync {Path(run_dir) / 'wandb'}/offline-run-*"


def _warn_offline(run_dir: Path, why: str) -> None:
    why = " ".join(why.split())  # one line, whatever W&B's message holds
    log.warning("%s; logging offline under %s instead; upload later with: %s", why, Path(run_dir) / "wandb",
                sync_command(run_dir))


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

    If the W&B run fails here (the server went away mid-run), the summary goes into an offline W&B run of the same
    id instead (see the module docstring).

    Returns:
        The W&B run id, or None without W&B.

    Raises:
        Exception: whatever W&B raised when even the offline run cannot be written (the run must then be retried).
    """
    logger = wandb_logger(loggers)
    if logger is None:
        return None
    try:
        run = logger.experiment
        run.summary.update(summary)
        run_id = run.id
        run.finish(exit_code=exit_code)
        return run_id
    except Exception as exc:  # noqa: BLE001 - fall back to offline files below
        init = getattr(logger, "lit_sharp_init", None)
        if init is None:
            raise
        _warn_offline(Path(init["save_dir"]), f"W&B failed while closing the run ({type(exc).__name__}: {exc})")
    import wandb

    _forget_failed_run()
    run = wandb.init(mode="offline", dir=init["save_dir"], **{k: v for k, v in init.items() if k != "save_dir"})
    run.summary.update(summary)
    run.finish(exit_code=exit_code)
    return init["id"]
