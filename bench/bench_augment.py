"""Launch count of the device augmentation: ATen ops dispatched to augment one 128-image batch.

On a GPU each dispatched op is at least one kernel launch (or a view), so the count bounds the launch overhead of the
device pipeline, whatever the device. It is counted on the CPU with a ``TorchDispatchMode`` that sees every op (views,
allocations and random draws included); the larger of the two policies is reported.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lit_sharp.data.device_augment import batch_rand_augment

BATCH = 128


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        return func(*args, **(kwargs or {}))


def ops_per_batch(policy: str, device: str = "cpu") -> int:
    """ATen ops dispatched by RandAugment + crop + flip + normalisation of one batch of ``BATCH`` images."""
    augment = batch_rand_augment(policy, 32, 32, torch.device(device))
    generator = torch.Generator(device=device).manual_seed(0)
    images = augment.extend(torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, device=device))
    augment(images, generator)  # the first call of a batch size makes its broadcast constants
    with _Count() as counter:
        augment(images, generator)
    return counter.total


def measure() -> dict[str, int]:
    """``device_aug_ops``: the larger count of the ``paper`` and ``torchvision`` policies (target <= 120)."""
    counts = {policy: ops_per_batch(policy) for policy in ("paper", "torchvision")}
    return {"device_aug_ops": max(counts.values()), **{f"device_aug_ops_{k}": v for k, v in counts.items()}}
