"""A run's folder, ``<paths.root>/<name>/<run name>``: its name, its identity, its lock and its status.

The run name is a function of the hyperparameters a grid varies, so launching the same configuration again finds
its own folder. The folder holds ``results.json`` (:mod:`lit_sharp.results`), ``run_config.json`` (the identity: the
config keys that decide what the run computes), ``checkpoints/last.ckpt`` (and
``last.previous.ckpt``, the one it replaced), the W&B files and ``.lock``, which one
process at a time holds while it trains or evaluates the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lit_sharp.atomic_files import write_json
from lit_sharp.checkpoint_io import checkpoint_defect, previous_of
from lit_sharp.config import lock_mode, to_plain
from lit_sharp.errors import ConfigError, UserError
from lit_sharp.locks import ORPHAN_WAIT_SECONDS, LockBusy, hold
from lit_sharp.results import RESULTS_FILE, flatten, make_record, read_results, run_status, write_results
from lit_sharp.tracking import WANDB_ID_FILE

IDENTITY_FILE = "run_config.json"
#: Config keys that change what a run computes; two launches into one run folder must agree on them.
IDENTITY_PREFIXES = ("model.", "module.", "data.augment", "data.randaugment", "data.batch_size", "data.synthetic",
                     "data.clean_train_size", "data.sharpness_size", "data.sharpness_batch_size", "data.drop_last",
                     "trainer.max_epochs", "trainer.max_steps", "trainer.precision", "seed")
#: ... except these, which change speed only.
SPEED_ONLY_KEYS = ("module.check_finite_every", "module.channels_last", "module.compile")
#: Identity keys added after runs were recorded without them, with the value those runs used.
RECORDED_BEFORE = {"model.init": "torch"}
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FINAL_STATUSES = ("completed", "diverged")
RUN_LOCK = ".lock"

log = logging.getLogger(__name__)


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


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a run resumes from (written at the end of every epoch, on a pre-emption signal and every
    ``trainer.checkpoint_every_minutes``)."""
    return run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT


def resume_checkpoint(run_dir: Path) -> tuple[Path | None, str | None]:
    """The newest readable checkpoint of the run, and a one-line note when an unreadable one was moved aside.

    ``last.ckpt`` is tried first, then the one it replaced (:func:`lit_sharp.checkpoint_io.previous_of`). A file
    that does not read back whole (:func:`~lit_sharp.checkpoint_io.checkpoint_defect`) is renamed
    ``<name>.unreadable-<time>``, never deleted, so that it cannot block the run again and can still be inspected.
    Temporary files of a save that was killed midway are removed.

    Returns:
        ``(checkpoint or None to train from scratch, note or None when nothing was moved)``.
    """
    last = last_checkpoint(run_dir)
    for partial in last.parent.glob(".*.tmp"):  # a writer killed mid-save (the run lock is ours: none is writing)
        partial.unlink(missing_ok=True)
    moved = []
    for path in (last, previous_of(last)):
        if not path.is_file():
            continue
        defect = checkpoint_defect(path)
        if defect is None:
            return path, (f"{'; '.join(moved)}; resumed from {path.name}" if moved else None)
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        moved.append(f"{path.name} was unreadable ({defect}) and was moved to {aside.name}")
        log.warning("%s: %s", run_dir.name, moved[-1])
    return None, (f"{'; '.join(moved)}; trained from scratch" if moved else None)


def source_run_dir(ckpt: Path) -> Path | None:
    """The run folder ``ckpt`` was written in (``<run dir>/checkpoints/<file>`` of a lit_sharp run), else None."""
    run_dir = ckpt.parent.parent
    if ckpt.parent.name == CHECKPOINT_DIR and ((run_dir / RESULTS_FILE).is_file() or (run_dir / WANDB_ID_FILE).is_file()):
        return run_dir
    return None


@contextmanager
def run_lock(cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock (see :func:`lit_sharp.locks.hold`); :class:`~lit_sharp.locks.LockBusy` if taken."""
    with hold(run_dir / RUN_LOCK, mode=lock_mode(cfg), orphan_wait=ORPHAN_WAIT_SECONDS):
        yield


def in_run_folder(cfg: DictConfig, run_dir: Path, work: Callable[[], dict[str, Any]], *, doing: str,
                  prefixes: tuple[str, ...] = IDENTITY_PREFIXES, speed_only: tuple[str, ...] = SPEED_ONLY_KEYS,
                  hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    """Do the work of the run in ``run_dir`` under the folder's rules: hold its lock, claim its identity, skip it
    when finished, record a refusal.

    Args:
        cfg: the run's config.
        run_dir: the run folder (created when missing).
        work: returns the run's record; called only for a run that is not finished yet.
        doing: what ``work`` does, for the log line when another process holds the lock (``training``).
        prefixes, speed_only: the identity's keys, see :func:`identity_of`.
        hparams: the record's ``hparams`` of a refusal (default: :func:`hparams_of`).

    Returns:
        ``work()``'s record; the recorded one of a finished run; ``{"run": {"name", "status": "running", "error":
        "held by host:pid"}}`` when another process holds the lock.

    Raises:
        UserError: a bad config or missing data (also written into the run's ``results.json``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(cfg, run_dir):
            try:
                claim_identity(cfg, run_dir, prefixes, speed_only)
                if is_finished(run_dir):
                    log.info("skipping %s: already %s", run_dir, run_status(run_dir))
                    return read_results(run_dir)
                return work()
            except UserError as exc:
                record_refusal(cfg, run_dir, exc, hparams=hparams)
                raise
    except LockBusy as busy:
        log.warning("skipping %s: another process is %s it (%s)", run_dir, doing, busy)
        return {"run": {"name": run_dir.name, "status": "running", "error": f"held by {busy.holder}"}}


def identity_of(cfg: DictConfig, prefixes: tuple[str, ...] = IDENTITY_PREFIXES,
                speed_only: tuple[str, ...] = SPEED_ONLY_KEYS) -> dict[str, Any]:
    """The config keys that decide what a run computes (``prefixes``, default :data:`IDENTITY_PREFIXES`, less
    ``speed_only``), flat."""
    flat = flatten(to_plain(cfg))
    return {key: flat[key] for key in sorted(flat) if key.startswith(prefixes) and key not in speed_only}


def claim_identity(cfg: DictConfig, run_dir: Path, prefixes: tuple[str, ...] = IDENTITY_PREFIXES,
                   speed_only: tuple[str, ...] = SPEED_ONLY_KEYS) -> None:
    """Record the run's identity on first launch; refuse a later launch into the folder with another config.

    The folder name carries only the grid's hyperparameters, so without this a run with, say, fewer epochs would
    resume or skip a finished run of the full recipe. ``prefixes`` and ``speed_only`` say which keys are the
    identity (see :func:`identity_of`; a zoo run has its own).

    Raises:
        ConfigError: the folder holds a run of another configuration.
    """
    path = run_dir / IDENTITY_FILE
    mine = identity_of(cfg, prefixes, speed_only)
    if not path.is_file():
        write_json(path, mine, indent=2, default=str)
        return
    try:
        theirs = json.loads(path.read_text())
        if not isinstance(theirs, dict):
            raise ValueError("top level is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        _recover_identity(path, mine, run_dir, exc)
        return
    # Only keys of this identity: a zoo run's identity has no model.* keys to fill in.
    theirs = {**{key: value for key, value in RECORDED_BEFORE.items() if key in mine}, **theirs}
    changed = [f"{key}: {theirs.get(key)!r} -> {mine.get(key)!r}" for key in sorted(set(mine) | set(theirs))
               if json.dumps(mine.get(key), default=str) != json.dumps(theirs.get(key), default=str)]
    if changed:
        raise ConfigError("name", cfg.name, f"{run_dir} holds a run of another configuration ({'; '.join(changed)}); "
                          "choose another name=... for this variant, or delete that folder")


def _recover_identity(path: Path, mine: dict[str, Any], run_dir: Path, exc: Exception) -> None:
    """An unreadable identity file: rewritten from the config while the run has no checkpoint (nothing it
    describes exists yet); otherwise the checkpoint's configuration is unknown, so the run is refused.

    Raises:
        UserError: naming the file, when the run has a checkpoint.
    """
    last = last_checkpoint(run_dir)
    checkpoints = [p for p in (last, previous_of(last)) if p.is_file()]
    if checkpoints:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {exc}), and {checkpoints[0]} was trained with "
                        "the configuration it recorded; restore the file (it lists the identity keys of "
                        "lit_sharp.run_folder.identity_of), or delete the run folder to train the run again")
    log.warning("%s could not be read (%s: %s); rewritten from this launch's config (the run has no checkpoint yet)",
                path, type(exc).__name__, exc)
    write_json(path, mine, indent=2, default=str)


def is_finished(run_dir: Path) -> bool:
    """Whether the folder holds a run that a relaunch skips (completed or diverged)."""
    return run_status(run_dir) in FINAL_STATUSES


def record_refusal(cfg: DictConfig, run_dir: Path, exc: UserError, hparams: dict[str, Any] | None = None) -> None:
    """Write why a run was refused into its ``results.json``, unless the folder holds a finished run (kept as is)
    or the error was already recorded (``exc.recorded``). ``hparams`` default to :func:`hparams_of`."""
    if is_finished(run_dir) or getattr(exc, "recorded", False):
        return
    hparams = hparams_of(cfg) if hparams is None else hparams
    record = make_record(name=run_dir.name, status="failed", seconds=0.0, wandb_id=None, hparams=hparams,
                         config=to_plain(cfg), metrics={}, error=f"refused: {exc}")
    record["run"]["refused"] = True
    write_results(run_dir, record)
