"""Sharing the visible GPUs among concurrent runs: ``runs_per_gpu`` slots per GPU, one file lock per slot.

A process-pool launcher starts runs without telling them which GPU to use; each run takes the first free slot
(a lock that dies with its process, so a killed run frees its slot) and trains on that slot's GPU. The locks live in
the machine's temporary folder and are named by the physical GPU id, so runs of several launches on one machine
share the same slots while SLURM jobs on other nodes do not see them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def physical_gpu_ids(n_visible: int) -> list[str]:
    """Names of the visible GPUs as the machine knows them (``CUDA_VISIBLE_DEVICES`` order), for lock names."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        if len(ids) >= n_visible:
            return ids[:n_visible]
    return [str(i) for i in range(n_visible)]


@contextmanager
def gpu_slot(n_gpus: int, runs_per_gpu: int, *, lock_dir: Path | None = None,
             poll_seconds: float = 5.0) -> Iterator[int]:
    """Hold one of ``n_gpus * runs_per_gpu`` slots for the duration of the block; yields the GPU index to use.

    Slots are tried GPU by GPU, filling each GPU's first slot before any second one, so runs spread over the GPUs.
    When all are taken, it waits (logging once) until one frees.

    Raises:
        ValueError: ``n_gpus < 1`` or ``runs_per_gpu < 1``.
    """
    if n_gpus < 1 or runs_per_gpu < 1:
        raise ValueError(f"need n_gpus >= 1 and runs_per_gpu >= 1, got {n_gpus} and {runs_per_gpu}")
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"lit_sharp_gpu_slots_{os.getuid()}"
    lock_dir.mkdir(parents=True, exist_ok=True)
    ids = physical_gpu_ids(n_gpus)
    slots = [(slot, gpu) for slot in range(runs_per_gpu) for gpu in range(n_gpus)]
    waited = False
    while True:
        for slot, gpu in slots:
            lock = FileLock(str(lock_dir / f"gpu{ids[gpu]}-slot{slot}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield gpu
            finally:
                lock.release()
            return
        if not waited:
            log.info("all %d GPU slots are busy; waiting for one to free", len(slots))
            waited = True
        time.sleep(poll_seconds)
