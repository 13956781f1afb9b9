"""torchvision's ``RandomCrop(H, padding)`` then ``RandomHorizontalFlip()`` on a batch on the device: one gather,
every image with its own offsets and flip, and no host synchronisation.

The loader's batched pass (:meth:`lit_sharp.data.device_augment.BatchRandAugment.crop_flip_normalize`) crops and
flips by precomputed maps indexed the same way, with the normalisation in the same gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from lit_sharp.data.device_checks import check_generator, check_padding, check_per_image


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Image ``i``: the ``H x W`` window at ``(top[i], left[i])`` of the image zero-padded by ``padding``, mirrored
    left-right where ``flip[i]``.

    Args:
        images: ``(B, C, H, W)``, any dtype.
        top: int64 ``(B,)`` row offsets in ``[0, 2 * padding]`` (not checked: that would read them back to the host).
        left: int64 ``(B,)`` column offsets in ``[0, 2 * padding]``.
        flip: bool ``(B,)``.
        padding: zero border added on every side, in pixels.

    Returns:
        ``(B, C, H, W)``, same dtype and device.

    Raises:
        ValueError: ``padding < 0`` or offsets/flags of the wrong dtype, shape or device.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    check_padding(padding)
    batch, channels, height, width = images.shape
    check_per_image("top", top, torch.long, images)
    check_per_image("left", left, torch.long, images)
    check_per_image("flip", flip, torch.bool, images)
    padded = nnf.pad(images, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    padded_width = width + 2 * padding
    rows = top.view(batch, 1) + torch.arange(height, device=images.device)  # (B, H)
    cols = left.view(batch, 1) + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flip.view(batch, 1), cols.flip(1), cols)
    source = (rows.unsqueeze(2) * padded_width + cols.unsqueeze(1)).view(batch, 1, height * width)
    cropped = padded.reshape(batch, channels, -1).gather(2, source.expand(batch, channels, height * width))
    return cropped.view(batch, channels, height, width)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """torchvision's ``RandomCrop(H, padding)`` then ``RandomHorizontalFlip()``, every image with its own draws.

    One uniform integer per image picks ``k`` among the ``(2p + 1)^2 * 2`` (top, left, flip) triples,
    ``k = (top * (2p + 1) + left) * 2 + flip``: offsets uniform on ``[0, 2p]``, a flip with probability 1/2, the same
    draw as the loader's (:meth:`lit_sharp.data.device_augment.BatchRandAugment.draw_crops`).

    Args:
        images: ``(B, C, H, W)``.
        generator: the source of the draws; it must live on the images' device.
        padding: zero border, in pixels (4 in the paper).

    Returns:
        ``(B, C, H, W)``, same dtype and device.

    Raises:
        ValueError: a generator on another device or ``padding < 0``.
    """
    check_generator(generator, images.device)
    check_padding(padding)
    side = 2 * padding + 1
    k = torch.randint(side * side * 2, (images.shape[0],), generator=generator, device=images.device)
    return crop_flip(images, k // (2 * side), (k // 2) % side, k % 2 == 1, padding)
