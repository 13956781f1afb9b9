"""Hydra launchers that account for every job of a grid, whatever happens to it.

Hydra's joblib and submitit launchers stop at the first job that dies without returning: loky, joblib's process
pool, breaks and kills every worker when one of them is killed (the OS's out-of-memory killer, a signal), and the
submitit launcher waits on its jobs in order and raises for the first one that left no result (an out-of-memory
kill, ``scancel``, a node failure, the last pre-emption after ``max_num_timeout`` requeues). Either way the other runs'
outcomes are never collected and :class:`lit_sharp.cli.GridReport` never runs.

These subclasses keep going: the joblib one runs each job in a forked child of its worker, so that a killed job
leaves its worker (and the pool) alive; the submitit ones wait on every job and turn each one that left no result into
an ``outcome.json`` naming its run and why. The grid then ends with the same summary line as for any other failure,
and relaunching the same command finishes what is missing. ``hydra/launcher=local``, ``slurm`` and ``slurm_local``
select them (through ``hydra_plugins.lit_sharp_launchers``, where Hydra looks for launchers).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_joblib_launcher import _core as joblib_core
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as _JoblibLauncher
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_sharp.outcomes import OUTCOME_FILE, run_name_of, write_outcome

log = logging.getLogger(__name__)


def register() -> None:
    """Make Hydra know the launchers of ``hydra_plugins.lit_sharp_launchers`` even where its scan of the
    ``hydra_plugins`` folders cannot list them (an editable install from another folder)."""
    from hydra.core.plugins import Plugins

    import hydra_plugins.lit_sharp_launchers as plugins

    for launcher in (plugins.JoblibLauncher, plugins.SlurmLauncher, plugins.LocalLauncher):
        Plugins.instance().register(launcher)


def record_dead_job(hydra_context: HydraContext, config: DictConfig, overrides: Sequence[str], job_num: int,
                    why: str) -> JobReturn:
    """Write the ``outcome.json`` of a job that died without writing one (``failed``, with ``why``).

    The job's folder and its run's folder come from the job's own config, composed as the launcher composes it.
    """
    setup_globals()  # Hydra's resolvers (now, ...), which a pool worker has not registered itself
    sweep_cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_cfg):
        sweep_cfg.hydra.job.num = job_num
    job_dir = Path(str(sweep_cfg.hydra.sweep.dir)) / str(sweep_cfg.hydra.sweep.subdir)
    if not (job_dir / OUTCOME_FILE).is_file():
        log.error("job #%d (%s) %s", job_num, " ".join(filter_overrides(overrides)), why)
        write_outcome(job_dir, "failed", why, run_name_of(sweep_cfg), list(overrides))
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)


def exit_reason(wait_status: int) -> str:
    """Why a job's process ended, from its ``os.waitpid`` status, in words."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        name = signal.Signals(-code).name
        cause = " (out of memory, or killed from outside)" if -code == signal.SIGKILL else ""
        return f"its process was killed by {name}{cause} before the run finished"
    return f"its process exited with code {code} before the run finished"


class JoblibLauncher(_JoblibLauncher):
    """Hydra's joblib launcher (a loky process pool), each job in a forked child of its worker: see the module."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        joblib_cfg = dict(self.joblib, backend="loky")  # the plugin's rule: threads cannot run Hydra jobs
        joblib_core.process_joblib_cfg(joblib_cfg)
        log.info("Joblib.Parallel(%s) is launching %d jobs, each in a process of its own; sweep output dir: %s",
                 ",".join(f"{k}={v}" for k, v in joblib_cfg.items()), len(job_overrides), sweep_dir)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        singleton_state = Singleton.get_state()
        return joblib_core.Parallel(**joblib_cfg)(
            joblib_core.delayed(run_contained)(initial_job_idx + idx, overrides, self.hydra_context, self.config,
                                               self.task_function, singleton_state)
            for idx, overrides in enumerate(job_overrides))


def run_contained(idx: int, overrides: Sequence[str], hydra_context: HydraContext, config: DictConfig,
                  task_function: TaskFunction, singleton_state: dict[Any, Any]) -> JobReturn:
    """Run one Hydra job in a forked child and wait for it; a child that dies gets its outcome written here.

    The worker stays small (the job's model, data and CUDA context live in the child), so the out-of-memory killer
    picks the child, and the pool never sees a worker die.
    """
    pid = os.fork()
    if pid == 0:  # the child: run the job, then leave without the worker's exit handlers
        code = 1
        try:
            joblib_core.execute_job(idx, overrides, hydra_context, config, task_function, singleton_state)
            code = 0
        except BaseException:  # noqa: BLE001 - whatever ends the job, the child must exit here
            traceback.print_exc()
        finally:
            _close_child()
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    if wait_status == 0:
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    return record_dead_job(hydra_context, config, overrides, idx, exit_reason(wait_status))


def _close_child() -> None:
    # os._exit skips interpreter shutdown: stop W&B's service and flush the logs by hand.
    if "wandb" in sys.modules:
        try:
            sys.modules["wandb"].teardown()
        except Exception:  # noqa: BLE001 - the job is over; nothing left to save
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


class _AccountedSubmitit:
    """Waits on every job of a submitit launch; a job that left no result gets an outcome (see the module)."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: DictConfig | None
    hydra_context: HydraContext | None

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from submitit.core.utils import FailedJobError, UncompletedJobError

        assert self.config is not None and self.hydra_context is not None
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)
        nums = [initial_job_idx + idx for idx in range(len(job_overrides))]
        for num, overrides in zip(nums, job_overrides):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(nums), nums,
                                  [f"job_id_for_{num}" for num in nums], [state] * len(nums))
        returns = []
        for num, overrides, job in zip(nums, job_overrides, jobs):
            try:
                returns.append(job.results()[0])
            except (UncompletedJobError, FailedJobError) as exc:
                returns.append(record_dead_job(self.hydra_context, self.config, overrides, num,
                                               _job_death(job, exc, submitit)))
        return returns

    def _executor(self) -> Any:
        """The submitit executor of this launcher's parameters, named as submitit names them: the keys every
        executor knows as they are, the others prefixed with the executor's name."""
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in shared else f"{self._EXECUTOR}_{key}": value
                                      for key, value in params.items()})
        return executor


def _job_death(job: Any, exc: Exception, submitit: Any) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, submitit.core.utils.UncompletedJobError):
        return f"its job {job.job_id} ended without a result (state {job.state}); its log: {job.paths.stderr}"
    return f"its job {job.job_id} failed: {first}; its log: {job.paths.stderr}"


class SlurmLauncher(_AccountedSubmitit, submitit_launcher.SlurmLauncher):
    """Hydra's submitit SLURM launcher that collects every job's outcome (see the module)."""


class LocalLauncher(_AccountedSubmitit, submitit_launcher.LocalLauncher):
    """Hydra's submitit local launcher that collects every job's outcome (see the module)."""
