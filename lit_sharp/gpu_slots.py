"""Sharing the visible GPUs among concurrent runs: ``runs_per_gpu`` slots per GPU, one lock per slot.

A process-pool launcher starts runs without telling them which GPU to use; each run takes the first free slot
(a lock that dies with its process, so a killed run frees its slot) and trains on that slot's GPU. Slot locks are
named by the GPU's UUID, which is the same for every process that sees that GPU whatever ``CUDA_VISIBLE_DEVICES``
says: under SLURM with cgroup-isolated GPUs every job sees its GPU as device 0, and index-named locks would make jobs
on different GPUs of one node wait for each other. A job to which SLURM assigned its own GPUs and which runs one run
(the submitit SLURM launcher) needs no slot at all.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lit_sharp.locks import LockBusy, default_lock_dir, hold

log = logging.getLogger(__name__)

#: Variables through which SLURM tells a job which GPUs it was given.
SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


def scheduler_owns_gpus(env: Mapping[str, str]) -> bool:
    """Whether the scheduler already gave this process GPUs of its own, so no slot is needed.

    True for a SLURM job with SLURM-assigned GPUs that runs a single run (the submitit SLURM launcher sets
    ``SUBMITIT_EXECUTOR=slurm``). A process pool inside one SLURM allocation still shares that allocation's GPUs
    through slots.
    """
    return bool(env.get("SLURM_JOB_ID")) and any(env.get(name) for name in SLURM_GPU_VARIABLES) \
        and env.get("SUBMITIT_EXECUTOR") == "slurm"


def gpu_uuids(n_visible: int) -> list[str]:
    """The UUIDs of the visible GPUs in CUDA's order (``torch.cuda.get_device_properties(i).uuid``)."""
    import torch

    uuids = []
    for index in range(n_visible):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        uuids.append(str(uuid) if uuid is not None else _uuid_from_nvidia_smi(index))
    return uuids


def _uuid_from_nvidia_smi(index: int) -> str:
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    if physical.startswith(("GPU-", "MIG-")):
        return physical
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader", "-i", physical],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    # Last resort: unique on this host, which is where a slot's users are.
    return f"{socket.gethostname()}-gpu{physical}"


def slot_lock_names(uuids: list[str], runs_per_gpu: int) -> list[tuple[int, str]]:
    """``(GPU index, lock file name)`` of every slot, each GPU's first slot before any second one.

    Raises:
        ValueError: no GPU or ``runs_per_gpu < 1``.
    """
    if not uuids or runs_per_gpu < 1:
        raise ValueError(f"need n_gpus >= 1 and runs_per_gpu >= 1, got {len(uuids)} and {runs_per_gpu}")
    return [(gpu, f"{uuid}-slot{slot}.lock") for slot in range(runs_per_gpu) for gpu, uuid in enumerate(uuids)]


@contextmanager
def gpu_slot(uuids: list[str], runs_per_gpu: int, *, lock_dir: Path | None = None, lock_mode: str = "auto",
             poll_seconds: float = 5.0) -> Iterator[int]:
    """Hold one of ``len(uuids) * runs_per_gpu`` slots for the duration of the block; yields the GPU index to use.

    Slots are tried GPU by GPU, filling each GPU's first slot before any second one, so runs spread over the GPUs.
    When all are taken, it waits (logging once) until one frees.

    Args:
        uuids: the visible GPUs' UUIDs (:func:`gpu_uuids`), in CUDA's order.
        runs_per_gpu: slots per GPU.
        lock_dir: where the slot locks live (default :func:`~lit_sharp.locks.default_lock_dir`).
        lock_mode: see :func:`lit_sharp.locks.hold`.
        poll_seconds: how often a waiting run retries.

    Raises:
        ValueError: no GPU or ``runs_per_gpu < 1``.
    """
    slots = slot_lock_names(uuids, runs_per_gpu)
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for gpu, name in slots:
            with ExitStack() as held:
                try:
                    held.enter_context(hold(lock_dir / name, mode=lock_mode))
                except LockBusy:
                    continue
                yield gpu
                return
        if not waited:
            log.info("all %d GPU slots are busy; waiting for one to free", len(slots))
            waited = True
        time.sleep(poll_seconds)


@contextmanager
def gpu_for_run(n_visible: int, runs_per_gpu: int, *, lock_dir: Path | None = None,
                lock_mode: str = "auto") -> Iterator[int | None]:
    """The GPU index a one-device run takes on this machine, held for the block.

    Args:
        n_visible: the number of visible CUDA devices (0 without CUDA).
        runs_per_gpu, lock_dir, lock_mode: as for :func:`gpu_slot`.

    Yields:
        None without a GPU, or where a scheduler gave the job GPUs of its own (the job uses its first one); else the
        index of a free slot's GPU, so that the runs of a grid launched side by side spread over the GPUs.
    """
    if n_visible == 0 or scheduler_owns_gpus(os.environ):
        yield None
        return
    with gpu_slot(gpu_uuids(n_visible), runs_per_gpu, lock_dir=lock_dir, lock_mode=lock_mode) as gpu:
        yield gpu
