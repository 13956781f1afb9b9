"""Checkpoints at the current step when a job is told to stop, and every few minutes, so that an interruption costs
seconds of training, not an epoch.

Clusters warn a job before they end it: SLURM sends ``SIGTERM`` on pre-emption (then ``SIGKILL`` after its grace
time) and the ``--signal`` of the job before its time limit (submitit asks for ``USR2``, Lightning's SLURM support
for ``USR1``). On any of these the run saves ``last.ckpt`` at the end of the step under way and then requeues itself
through submitit (its own ``USR2`` handler, which resubmits the job) or, elsewhere, exits with status ``128 + signal``:
never as a finished run. The checkpoint holds the mid-epoch position of the data order
(:mod:`lit_sharp.data.position`), so the relaunch repeats no step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger(__name__)

#: SIGTERM (pre-emption), SIGUSR1 (Lightning's SLURM requeue signal) and SIGUSR2 (submitit's time-limit signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(SystemExit):
    """The run saved a checkpoint and stops on ``signum``; the exit status is ``128 + signum``, as if killed by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class Preemption(Callback):
    """Save ``checkpoint`` at the current step on a stop signal, then requeue or exit; and every ``every_minutes``.

    The signal handlers are installed when training starts (after Lightning's own, which would end the run with exit
    status 0 at the next batch) and removed when it ends. A signal only sets a flag; the checkpoint is written at the
    end of the training step under way, where the state is consistent (a signal during the end-of-epoch validation
    pass is served after the next step). The save is collective under DDP, so all ranks must get the signal (SLURM
    signals every task of a job).

    Args:
        checkpoint: the file to save (the run's ``last.ckpt``).
        every_minutes: also save every this many minutes of training (counted from the last save); None never.

    Example::

        Trainer(callbacks=[Preemption(run_dir / "checkpoints" / "last.ckpt", every_minutes=30)])
    """

    def __init__(self, checkpoint: Path, every_minutes: float | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.every_seconds = None if every_minutes is None else 60.0 * float(every_minutes)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._installed = False
        self._last_save = time.monotonic()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save = time.monotonic()
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: nothing can be caught here
                return
            self._installed = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.received is not None:
            self._stop(trainer)
        if self.every_seconds is not None and time.monotonic() - self._last_save >= self.every_seconds:
            trainer.save_checkpoint(self.checkpoint)
            log.info("saved %s at step %d (every %g minutes)", self.checkpoint, trainer.global_step,
                     self.every_seconds / 60)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        if self.received is not None:  # the signal came after the last step: the finished state is saved
            self._stop(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._last_save = time.monotonic()  # any save (end of epoch included) restarts the clock

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # nothing else here: a handler interrupts the main thread anywhere, logging included

    def _stop(self, trainer: pl.Trainer) -> None:
        """Save the checkpoint, then hand over to submitit's requeue or exit with ``128 + signal``."""
        signum = self.received
        assert signum is not None
        self._restore()
        trainer.save_checkpoint(self.checkpoint)
        log.warning("saved %s at step %d on %s", self.checkpoint, trainer.global_step, signal.Signals(signum).name)
        requeue = self._previous.get(_submitit_signal())
        if os.environ.get("SUBMITIT_EXECUTOR") and callable(requeue):
            requeue(signum, None)  # submitit resubmits the job and exits; the relaunch resumes from the checkpoint
        elif signum == signal.SIGUSR1 and os.environ.get("SLURM_JOB_ID"):
            _scontrol_requeue()
        raise Preempted(signum)

    def _restore(self) -> None:
        """Hand the signals back to their earlier handlers (kept: ``_stop`` calls submitit's)."""
        if self._installed:
            for signum, handler in self._previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
            self._installed = False


def _submitit_signal() -> int:
    """The signal submitit requeues on (``SUBMITIT_PREEMPT_SIGNAL``, default ``USR2``)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return int(getattr(signal, f"SIG{name}", signal.SIGUSR2))


def _scontrol_requeue() -> None:
    """Requeue this SLURM job (a job started without submitit, whose script asked for ``--signal=USR1``)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not requeue SLURM job %s (%s); relaunch it to resume", job, exc)
        return
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (%s); relaunch it to resume", job, done.stderr.strip())
