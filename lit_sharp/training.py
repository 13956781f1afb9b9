"""Training one run: fit (or resume) a model, measure it, and write ``results.json``.

A completed (or diverged) run is skipped, a run with a checkpoint resumes from it, and a failed run is trained
again; one process at a time holds a run folder (:func:`lit_sharp.run_folder.run_lock`). A stop signal saves a
checkpoint at the current step and ends the process with a non-zero status (:mod:`lit_sharp.callbacks.preemption`); a
checkpoint that does not read back whole is moved aside and the run resumes from the one before
(:func:`lit_sharp.run_folder.resume_checkpoint`).

A run is ``completed`` only with all its numbers: after training, every measurement (:mod:`lit_sharp.measurements`)
whose results are not yet recorded is measured, so a relaunch after a crash during the measurements loads the
finished checkpoint and measures, without training again. Until every measurement is in, ``results.json`` says
``failed`` with the measurement that failed (or was under way when the process died) and its error, and a relaunch
finishes the job.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lit_sharp.assembly import build_datamodule, build_model, build_named_callbacks, build_trainer
from lit_sharp.callbacks.metric_logging import log_final_metrics
from lit_sharp.callbacks.preemption import Preempted
from lit_sharp.callbacks.run_clock import ATTEMPTS_FILE, RunClock
from lit_sharp.config import lock_dir, lock_mode, to_plain
from lit_sharp.console import run_summary
from lit_sharp.errors import UserError
from lit_sharp.gpu_slots import gpu_for_run
from lit_sharp.measurements import MeasurementChecks, measured_at, split_measures
from lit_sharp.module import Diverged
from lit_sharp.results import ResultsError, make_record, read_results, write_results
from lit_sharp.run_folder import hparams_of, in_run_folder, resume_checkpoint, run_dir_of
from lit_sharp.tracking import build_loggers, finish_wandb, log_config, run_tags, wandb_location

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and measure the run ``cfg`` describes (a validated, resolved config) unless it is already finished.

    Returns:
        The run's ``results.json`` record. When another process holds the run folder's lock (two launches of one
        grid), nothing is trained and the record is ``{"run": {"name": ..., "status": "running", "error": "held by
        host:pid"}}``.

    Raises:
        UserError: a bad config or missing data (also written into the run's ``results.json``).
    """
    run_dir = run_dir_of(cfg)

    def work() -> dict[str, Any]:
        with _gpu_for(cfg) as devices:
            return _fit_and_measure(cfg, run_dir, devices)

    return in_run_folder(cfg, run_dir, work, doing="training")


@contextmanager
def _gpu_for(cfg: DictConfig) -> Iterator[list[int] | None]:
    """A GPU slot (see :mod:`lit_sharp.gpu_slots`) for a one-device run on a CUDA machine; else the config decides."""
    wants_gpu = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and cfg.trainer.devices in (1, "1")
    n_visible = torch.cuda.device_count() if wants_gpu and torch.cuda.is_available() else 0
    with gpu_for_run(n_visible, int(cfg.resources.runs_per_gpu), lock_dir=lock_dir(cfg),
                     lock_mode=lock_mode(cfg)) as gpu:
        yield None if gpu is None else [gpu]


def _fit_and_measure(cfg: DictConfig, run_dir: Path, devices: list[int] | None) -> dict[str, Any]:
    hparams = hparams_of(cfg)
    name = run_dir.name
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    last, recovered = resume_checkpoint(run_dir)
    # A resumed run takes its weights from the checkpoint: initialised once, when the run started.
    model = build_model(cfg.model, init_seed=None if last is not None else int(cfg.seed))
    module = hydra.utils.instantiate(cfg.module, model=model)
    measures, callbacks = split_measures(build_named_callbacks(cfg))
    loggers = build_loggers(cfg, run_dir, name, tags=run_tags(hparams, cfg))
    log_config(loggers, cfg, hparams)
    clock = RunClock(run_dir / ATTEMPTS_FILE)
    checks = MeasurementChecks(list(measures.values()))
    trainer = build_trainer(cfg, run_dir, loggers, [clock, checks, *callbacks], devices)
    if last is not None:
        log.info("resuming %s from %s", name, last)
    status, error = "completed", None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last is not None else None)
        module.check_finite()  # also a run whose training had already ended before this launch
    except SIGTERMException:
        # Lightning ends fit with exit status 0 on a SIGTERM that Preemption did not serve (before training began);
        # an interrupted run must never look finished to its scheduler.
        raise Preempted(signal.SIGTERM) from None
    except Diverged as exc:
        status, error = "diverged", str(exc)
    except UserError:
        finish_wandb(loggers, {"run/status": "failed"}, exit_code=1)
        raise
    except Exception as exc:
        _record(cfg, run_dir, loggers, "failed", clock.record(), {}, f"{type(exc).__name__}: {exc}")
        raise
    if status == "completed" and trainer.state.status.value != "finished":
        raise RuntimeError(f"training of {name} ended in state {trainer.state.status.value}; no results written")
    if status == "diverged":
        return _record(cfg, run_dir, loggers, status, clock.record(), {}, error, recovered=recovered)
    metrics, measured = _measure(cfg, run_dir, trainer, module, datamodule, measures, loggers, clock,
                                 reuse=checks.steps_trained == 0 and recovered is None)
    return _record(cfg, run_dir, loggers, "completed", clock.record(), metrics, None, measured=measured,
                   recovered=recovered)


def _measure(cfg: DictConfig, run_dir: Path, trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any,
             measures: dict[str, Callback], loggers: list[Logger], clock: RunClock,
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
        _record(cfg, run_dir, [], "failed", clock.record(), metrics, f"stopped while measuring {key}",
                measured=measured, measuring=key, announce=False)
        try:
            results = (measured_at(callback, trainer.global_step)
                       or callback.measure(module, datamodule, progress=trainer.is_global_zero))
        except Exception as exc:
            error = f"measurement {key} failed: {type(exc).__name__}: {exc}"
            _record(cfg, run_dir, loggers, "failed", clock.record(), metrics, error, measured=measured, measuring=key)
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


def _record(cfg: DictConfig, run_dir: Path, loggers: list[Logger], status: str, seconds: float,
            metrics: dict[str, float], error: str | None, *, measured: list[str] | None = None,
            measuring: str | None = None, announce: bool = True, recovered: str | None = None) -> dict[str, Any]:
    """Write the run's record; with ``loggers``, also close its W&B run with the same numbers.

    ``announce=False`` marks a progress record (true if the process dies now; the run goes on): no console summary.
    ``recovered`` says which unreadable checkpoint this launch moved aside (``run.recovered``).
    """
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
    record = make_record(name=run_dir.name, status=status, seconds=seconds, wandb_id=wandb_id, hparams=hparams_of(cfg),
                         config=to_plain(cfg), metrics=metrics, error=error)
    if measured is not None:
        record["run"]["measured"] = list(measured)
    if measuring is not None:
        record["run"]["measurement"] = measuring
    if recovered is not None:
        record["run"]["recovered"] = recovered
    write_results(run_dir, record)
    if announce:
        log.info("%s", run_summary(record, run_dir, where))
    else:
        log.debug("%s: recorded as %s (%s)", run_dir.name, status, error)
    return record
