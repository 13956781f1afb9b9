"""Input normalisation with the CIFAR-10 statistics, ``(x / 255 - mean) / std`` per channel, in one place.

The CPU loader (:mod:`lit_sharp.data.augment`), the device pipeline (:mod:`lit_sharp.data.device_loader` and
:mod:`lit_sharp.data.device_augment`) and the CIFAR-10-C evaluation (:mod:`lit_sharp.corruptions`) all normalise here,
with the same float32 operations in the same order whatever the layout, so their inputs agree bit for bit. Imports
torch only.
"""

from __future__ import annotations

import functools

import torch

from lit_sharp.constants import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["mean_std", "normalize"]


def normalize(images: torch.Tensor, channels_dim: int = -3) -> torch.Tensor:
    """uint8 images -> float32 ``(x / 255 - mean) / std`` with ``CIFAR10_MEAN`` and ``CIFAR10_STD``, per channel.

    Args:
        images: uint8 with 3 channels along ``channels_dim``: ``(..., 3, H, W)`` or ``(..., H, W, 3)``.
        channels_dim: the dimension of the channels (-3 for CHW, -1 for HWC).

    Returns:
        float32, the shape of ``images``, on their device.

    Raises:
        ValueError: not a uint8 tensor with 3 channels along ``channels_dim``.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
            or not -images.ndim <= channels_dim < images.ndim or images.shape[channels_dim] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor with 3 channels along dimension {channels_dim}, got {got}")
    mean, std = mean_std(images.device, channels_dim - images.ndim if channels_dim >= 0 else channels_dim)
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def mean_std(device: torch.device | str = "cpu", channels_dim: int = -3) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``CIFAR10_MEAN`` and ``CIFAR10_STD`` on ``device``, shaped to broadcast along ``channels_dim``.

    ``(3, 1, 1)`` for ``channels_dim=-3``, ``(3, 1)`` for -2, ``(3,)`` for -1. Made once per device and layout and
    shared (do not modify them in place): building them from Python floats at every batch would copy them from the
    host each time.

    Raises:
        ValueError: ``channels_dim`` is not a negative integer.
    """
    if isinstance(channels_dim, bool) or not isinstance(channels_dim, int) or channels_dim >= 0:
        raise ValueError(f"channels_dim must be a negative integer (counted from the last dimension), "
                         f"got {channels_dim!r}")
    return _mean_std(torch.device(device), channels_dim)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device, channels_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3,) + (1,) * (-channels_dim - 1)
    return tuple(torch.tensor(values, dtype=torch.float32).view(shape).to(device)
                 for values in (CIFAR10_MEAN, CIFAR10_STD))
