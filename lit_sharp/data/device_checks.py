"""Argument checks of the device pipeline's functions, each raising one ``ValueError`` that names the argument.

Shared by :mod:`lit_sharp.data.torchvision_randaugment`, :mod:`lit_sharp.data.device_augment` and
:mod:`lit_sharp.data.device_crop_flip`. None of them reads a device value back to the host: they look at types, dtypes,
shapes and devices only.
"""

from __future__ import annotations

import torch


def check_images(images: torch.Tensor) -> None:
    """Raise unless ``images`` is a uint8 ``(B, 3, H, W)`` tensor."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else ""
        raise ValueError(f"images must be a uint8 tensor of shape (B, 3, H, W), got {dtype} {shape}")


def check_generator(generator: torch.Generator, device: torch.device) -> None:
    """Raise unless ``generator`` is a ``torch.Generator`` on ``device``."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type or (device.index is not None and generator.device.index != device.index):
        raise ValueError(f"generator is on {generator.device} but the images are on {device}: "
                         f"create it with torch.Generator(device={str(device)!r})")


def check_per_image(name: str, tensor: torch.Tensor, dtype: torch.dtype, images: torch.Tensor) -> None:
    """Raise unless ``tensor`` (argument ``name``) is a ``dtype`` ``(B,)`` tensor on the images' device."""
    batch = images.shape[0]
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.shape != (batch,) \
            or tensor.device != images.device:
        got = f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}" if isinstance(tensor, torch.Tensor) \
            else type(tensor).__name__
        raise ValueError(f"{name} must be a {dtype} tensor of shape ({batch},) on {images.device}, got {got}")


def check_magnitude(magnitude: int, num_magnitude_bins: int) -> None:
    """Raise unless ``num_magnitude_bins >= 2`` and ``magnitude`` is a bin in ``[0, num_magnitude_bins)``."""
    if not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
        raise ValueError(f"num_magnitude_bins must be an integer >= 2, got {num_magnitude_bins!r}")
    if not isinstance(magnitude, int) or not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(f"magnitude must be an integer bin in [0, {num_magnitude_bins}), got {magnitude!r}")


def check_padding(padding: int) -> None:
    """Raise unless ``padding`` is an integer >= 0."""
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")

