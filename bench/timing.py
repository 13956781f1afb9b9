"""Wall-clock timing of one call, synchronising CUDA around it so queued kernels are counted."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def seconds(function: Callable[[], object], device: torch.device) -> float:
    """Seconds that ``function()`` takes, with the device's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
