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


def interleaved_times(functions: dict[str, Callable[[], object]], device: torch.device,
                      repeats: int) -> dict[str, list[float]]:
    """Seconds of each function over ``repeats`` rounds, after one warm-up call each.

    Interleaving keeps a slow spell of a shared machine from landing on one side of a ratio only; reversing the
    order every other round keeps what ran just before (caches, thread pools) from favouring one side.
    """
    for function in functions.values():
        function()  # warm-up: allocator, kernels, lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            times[name].append(seconds(functions[name], device))
    return times
