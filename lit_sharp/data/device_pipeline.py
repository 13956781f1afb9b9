"""The paper's training stream resident on the accelerator: shuffling, RandAugment, crop and flip as batched tensor ops.

The whole uint8 training set lives on the device (CIFAR-10: 150 MB) and every batch is sliced, augmented and
normalized there, with no worker processes and no host synchronisation: every random draw is a tensor op on a device
generator, and nothing reads a device value back to the host. The augmentation is that of
:mod:`lit_sharp.data.augment` (torchvision's ``RandAugment(num_ops=2, magnitude=14)``, then a 32x32 crop of the image
padded by 4 pixels, then a horizontal flip) in distribution, not draw for draw: each image draws its own ops, signs,
offsets and flip, but from a device stream seeded by ``(seed, epoch)`` instead of the CPU path's per-image seeds.
The ops are torchvision's tensor kernels, not its PIL ones; the two differ by 1 grey level in some pixels for Color,
Contrast and Sharpness, and in a few pixels along edges for Rotate.

How RandAugment is batched. Per image and op slot, the op is drawn uniformly among torchvision's 14 and the sign of a
signed op with probability 1/2, at torchvision's magnitude for the bin (``RandAugment._augmentation_space``). Then:

- The five geometric ops (ShearX/Y, TranslateX/Y, Rotate; nearest interpolation, fill 0) have one fixed parameter per
  (op, sign), so each is a fixed pixel permutation with holes. The permutation is computed once by running
  torchvision's own ``affine``/``rotate`` on an image whose pixels hold their own index, and applied to every image
  with one ``gather`` that picks each image's (op, sign) map. This is exact (nearest sampling copies source pixels)
  and avoids torchvision's tensor ``affine``, which copies its matrix from the host to the device on every call
  (``torch.tensor(matrix, device=...)``: a blocking copy).
- The twelve photometric variants (eight ops, four of them signed) are cheap on 32x32 images, so each is applied to
  the whole batch and selected per image with ``torch.where``: about 12x the arithmetic of applying each op only to
  the images that drew it, but no grouping by boolean index, which needs ``nonzero`` and so a host sync per group
  (46 per batch); the number of kernel launches is about the same either way. torchvision's functional ops are used
  as they are except two whose tensor kernels synchronise: ``adjust_sharpness`` (its blur kernel is built with an
  element assignment, a blocking copy) is restated here with a cached kernel and the same arithmetic, and
  ``equalize`` is torchvision's batched v2 kernel (the v1 kernel loops over images and reads each histogram's step
  back to the host).

The tests check every (op, sign) against torchvision's ``RandAugment`` op, image by image, bit for bit.

NVIDIA DALI (``nvidia-dali-cuda130``) was evaluated and not taken. Its ``nvidia.dali.auto_aug.rand_augment`` draws
ops per sample on the GPU, but its suite is its own, not torchvision's: translation up to 100/224 of the image
instead of 150/331 and as a real-valued shift (torchvision truncates to whole pixels), solarize thresholds on
``linspace(256, 0)`` instead of ``linspace(255, 0)``, equalize following OpenCV's formula rather than PIL's, sharpness
filtering the 1-pixel border that PIL and torchvision leave as is, and by default fill 128 with linear interpolation.
It runs only inside a DALI pipeline (``@pipeline_def(enable_conditionals=True)``, HWC images, its own iterator, and
random state that is the pipeline's, advanced batch by batch, rather than derived from ``(seed, epoch)`` as this
project's resumable runs need), and only on GPU-resident samples, so it cannot be tested against torchvision on the
CPU. With the op sets differing, speed was not the deciding question and was not measured.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf
from torchvision.transforms.v2 import functional as tvf2

from lit_sharp.constants import CIFAR10_MEAN, CIFAR10_STD
from lit_sharp.seeding import AUGMENT_STREAM, SHUFFLE_STREAM, derived_seed

#: torchvision's RandAugment ops, in the order of ``RandAugment._augmentation_space`` (an op's index is its position).
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
#: Ops whose magnitude is negated with probability 1/2.
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                        "Brightness", "Color", "Contrast", "Sharpness"})
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

PAPER_NUM_OPS, PAPER_MAGNITUDE, NUM_MAGNITUDE_BINS = 2, 14, 31
_NEAREST = InterpolationMode.NEAREST


# ---------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------


# Cached: a bin's magnitude is a constant, and every look-up would otherwise build eleven small tensors.
@functools.lru_cache(maxsize=None)
def op_magnitude(op_name: str, magnitude: int, num_magnitude_bins: int, image_size: tuple[int, int]) -> float:
    """torchvision's unsigned magnitude of ``op_name`` at bin ``magnitude``, as ``RandAugment`` computes it.

    Same float32 ``linspace`` values as ``RandAugment._augmentation_space``: shear 0..0.3, translate
    0..150/331 of the width (X) or height (Y) in pixels, rotate 0..30 degrees, brightness/color/contrast/sharpness
    0..0.9 (the factor is ``1 + magnitude``), posterize ``8 - round(bin / ((bins - 1) / 4))`` bits, solarize
    threshold 255..0; Identity, AutoContrast and Equalize have none (0.0). Restated here because torchvision keeps
    the table in a private method; the tests hold the two equal.

    Args:
        op_name: one of :data:`OP_NAMES`.
        magnitude: the bin, in ``[0, num_magnitude_bins)``.
        num_magnitude_bins: number of bins (31 in torchvision and the paper).
        image_size: ``(height, width)``.

    Returns:
        The magnitude as a Python float (posterize: the number of bits kept).

    Raises:
        ValueError: unknown ``op_name`` or a bin outside ``[0, num_magnitude_bins)``.
    """
    _check_magnitude(magnitude, num_magnitude_bins)
    height, width = image_size
    bins = num_magnitude_bins
    values = {
        "ShearX": torch.linspace(0.0, 0.3, bins),
        "ShearY": torch.linspace(0.0, 0.3, bins),
        "TranslateX": torch.linspace(0.0, 150.0 / 331.0 * width, bins),
        "TranslateY": torch.linspace(0.0, 150.0 / 331.0 * height, bins),
        "Rotate": torch.linspace(0.0, 30.0, bins),
        "Brightness": torch.linspace(0.0, 0.9, bins),
        "Color": torch.linspace(0.0, 0.9, bins),
        "Contrast": torch.linspace(0.0, 0.9, bins),
        "Sharpness": torch.linspace(0.0, 0.9, bins),
        "Posterize": 8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int(),
        "Solarize": torch.linspace(255.0, 0.0, bins),
    }
    if op_name not in OP_NAMES:
        raise ValueError(f"op_name must be one of {OP_NAMES}, got {op_name!r}")
    return float(values[op_name][magnitude].item()) if op_name in values else 0.0


def apply_ops(
    images: torch.Tensor,
    ops: torch.Tensor,
    negate: torch.Tensor,
    *,
    magnitude: int = PAPER_MAGNITUDE,
    num_magnitude_bins: int = NUM_MAGNITUDE_BINS,
) -> torch.Tensor:
    """One RandAugment op per image: image ``i`` gets op ``OP_NAMES[ops[i]]``, negated where ``negate[i]`` (signed ops).

    The result equals torchvision's ``RandAugment`` op (nearest interpolation, fill 0) applied to each image on its
    own with magnitude ``-m if negate[i] else m``, ``m = op_magnitude(...)``; see the module docstring for how the
    batch is processed without host synchronisation.

    Args:
        images: uint8 ``(B, 3, H, W)``.
        ops: int64 ``(B,)`` op indices in ``[0, 14)`` (not checked: that would read them back to the host).
        negate: bool ``(B,)``; ignored for unsigned ops.
        magnitude: the magnitude bin.
        num_magnitude_bins: number of bins.

    Returns:
        uint8 ``(B, 3, H, W)`` on the images' device.

    Raises:
        ValueError: bad image tensor, ``ops``/``negate`` of the wrong dtype, shape or device, or a bad bin.
    """
    _check_images(images)
    _check_magnitude(magnitude, num_magnitude_bins)
    batch = images.shape[0]
    _check_per_image("ops", ops, torch.long, images)
    _check_per_image("negate", negate, torch.bool, images)
    height, width = images.shape[-2:]
    # Images that drew a non-geometric op get the identity map here, then their op's result below.
    out = _apply_geometric(images, ops, negate, magnitude, num_magnitude_bins)
    for op_index, op_name in enumerate(OP_NAMES):
        if op_name in GEOMETRIC_OPS or op_name == "Identity":
            continue
        value = op_magnitude(op_name, magnitude, num_magnitude_bins, (height, width))
        for sign in (1.0, -1.0) if op_name in SIGNED_OPS else (1.0,):
            selected = ops == op_index
            if op_name in SIGNED_OPS:
                selected = selected & (negate if sign < 0 else ~negate)
            result = _PHOTOMETRIC[op_name](images, sign * value)
            out = torch.where(selected.view(batch, 1, 1, 1), result, out)
    return out


def rand_augment(
    images: torch.Tensor,
    generator: torch.Generator,
    num_ops: int = PAPER_NUM_OPS,
    magnitude: int = PAPER_MAGNITUDE,
    num_magnitude_bins: int = NUM_MAGNITUDE_BINS,
) -> torch.Tensor:
    """torchvision's ``RandAugment(num_ops, magnitude, num_magnitude_bins)`` on a batch, every image with its own draws.

    RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a reduced search
    space"): ``num_ops`` times, each image draws one of the 14 ops of :data:`OP_NAMES` uniformly and, for a signed op,
    a sign with probability 1/2, and the op is applied at the fixed magnitude bin (:func:`apply_ops`).

    Args:
        images: uint8 ``(B, 3, H, W)``.
        generator: the source of every draw; it must live on the images' device.
        num_ops: ops applied in sequence (2 in the paper).
        magnitude: the magnitude bin (14 in the paper).
        num_magnitude_bins: number of bins (31).

    Returns:
        uint8 ``(B, 3, H, W)`` on the images' device.

    Raises:
        ValueError: bad image tensor, a generator on another device, ``num_ops < 0`` or a bad bin.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
        >>> rand_augment(images, g).shape
        torch.Size([8, 3, 32, 32])
    """
    _check_images(images)
    _check_generator(generator, images.device)
    _check_magnitude(magnitude, num_magnitude_bins)
    if not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
    batch = images.shape[0]
    for _ in range(num_ops):
        ops = torch.randint(len(OP_NAMES), (batch,), generator=generator, device=images.device)
        negate = torch.randint(2, (batch,), generator=generator, device=images.device).bool()
        images = apply_ops(images, ops, negate, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins)
    return images


def _apply_geometric(
    images: torch.Tensor, ops: torch.Tensor, negate: torch.Tensor, magnitude: int, num_magnitude_bins: int
) -> torch.Tensor:
    batch, channels, height, width = images.shape
    maps = _geometric_maps(height, width, magnitude, num_magnitude_bins, images.device)  # (14, 2, H*W)
    source = maps[ops, negate.long()]  # (B, H*W): 1 + source pixel, 0 for fill
    # Pixel 0 of the padded rows is the fill value, so a map entry of 0 reads zero.
    padded = nnf.pad(images.reshape(batch, channels, height * width), (1, 0))  # (B, C, 1 + H*W)
    moved = padded.gather(2, source.unsqueeze(1).expand(batch, channels, height * width))
    return moved.view(batch, channels, height, width)


@functools.lru_cache(maxsize=None)
def _geometric_maps(
    height: int, width: int, magnitude: int, num_magnitude_bins: int, device: torch.device
) -> torch.Tensor:
    """int64 ``(14, 2, H*W)``: for each (op, negate), ``1 +`` the source pixel of every output pixel, 0 where filled.

    Built by applying torchvision's op to a float image holding ``1 + pixel index``: nearest sampling copies source
    values, so the output is the op's pixel map. Ops that do not move pixels get the identity map.
    """
    index_image = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    maps = index_image.view(1, 1, -1).repeat(len(OP_NAMES), 2, 1)
    for op_index, op_name in enumerate(OP_NAMES):
        if op_name not in GEOMETRIC_OPS:
            continue
        value = op_magnitude(op_name, magnitude, num_magnitude_bins, (height, width))
        for negate in (0, 1):
            maps[op_index, negate] = _GEOMETRIC[op_name](index_image, -value if negate else value).view(-1)
    return maps.round().long().to(device)


# torchvision's RandAugment op calls (torchvision.transforms.autoaugment._apply_op), with nearest interpolation and
# fill None, which grid sampling makes 0.
def _shear_x(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(magnitude)), 0.0],
                      interpolation=_NEAREST, fill=None, center=[0, 0])


def _shear_y(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(magnitude))],
                      interpolation=_NEAREST, fill=None, center=[0, 0])


def _translate_x(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                      interpolation=_NEAREST, fill=None)


def _translate_y(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                      interpolation=_NEAREST, fill=None)


def _rotate(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.rotate(images, magnitude, interpolation=_NEAREST, fill=None)


def _adjust_sharpness(images: torch.Tensor, factor: float) -> torch.Tensor:
    # torchvision's tensor kernel with a cached blur kernel: torchvision builds its kernel with `kernel[1, 1] = 5.0`,
    # a blocking host-to-device copy on every call. Same arithmetic: blur the interior, round, blend.
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    kernel = _sharpness_kernel(images.shape[-3], images.device)
    blurred = nnf.conv2d(images.float(), kernel, groups=images.shape[-3]).round_().to(images.dtype)
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = blurred
    return (factor * images + (1.0 - factor) * degenerate).clamp(0, 255).to(images.dtype)


@functools.lru_cache(maxsize=None)
def _sharpness_kernel(channels: int, device: torch.device) -> torch.Tensor:
    """PIL's smoothing filter ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` as a depthwise ``(C, 1, 3, 3)`` kernel."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    return kernel.expand(channels, 1, 3, 3).contiguous().to(device)


_GEOMETRIC: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "ShearX": _shear_x, "ShearY": _shear_y, "TranslateX": _translate_x, "TranslateY": _translate_y, "Rotate": _rotate,
}
_PHOTOMETRIC: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "Brightness": lambda images, m: tvf.adjust_brightness(images, 1.0 + m),
    "Color": lambda images, m: tvf.adjust_saturation(images, 1.0 + m),
    "Contrast": lambda images, m: tvf.adjust_contrast(images, 1.0 + m),
    "Sharpness": lambda images, m: _adjust_sharpness(images, 1.0 + m),
    "Posterize": lambda images, m: tvf.posterize(images, int(m)),
    "Solarize": lambda images, m: tvf.solarize(images, m),
    "AutoContrast": lambda images, m: tvf.autocontrast(images),
    "Equalize": lambda images, m: tvf2.equalize(images),
}


# ---------------------------------------------------------------------------------------------
# Crop, flip, normalization
# ---------------------------------------------------------------------------------------------


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
    _check_padding(padding)
    batch, channels, height, width = images.shape
    _check_per_image("top", top, torch.long, images)
    _check_per_image("left", left, torch.long, images)
    _check_per_image("flip", flip, torch.bool, images)
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

    Offsets are uniform on ``[0, 2 * padding]`` for rows and columns, a flip has probability 1/2 (:func:`crop_flip`).

    Args:
        images: ``(B, C, H, W)``.
        generator: the source of the draws; it must live on the images' device.
        padding: zero border, in pixels (4 in the paper).

    Returns:
        ``(B, C, H, W)``, same dtype and device.

    Raises:
        ValueError: a generator on another device or ``padding < 0``.
    """
    _check_generator(generator, images.device)
    _check_padding(padding)
    batch = images.shape[0]
    top = torch.randint(2 * padding + 1, (batch,), generator=generator, device=images.device)
    left = torch.randint(2 * padding + 1, (batch,), generator=generator, device=images.device)
    flip = torch.rand(batch, generator=generator, device=images.device) < 0.5
    return crop_flip(images, top, left, flip, padding)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` with the CIFAR-10 constants, per channel.

    The same arithmetic as :func:`lit_sharp.data.augment.to_normalized_tensor`, so the two agree bit for bit.

    Args:
        images: uint8 ``(B, 3, H, W)``.

    Returns:
        float32 ``(B, 3, H, W)`` on the images' device.

    Raises:
        ValueError: not a uint8 ``(B, 3, H, W)`` tensor.
    """
    _check_images(images)
    mean, std = _normalization_constants(images.device)
    return images.float().div_(255.0).sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them from Python floats on every batch would be a host-to-device copy each time.
    return (torch.tensor(CIFAR10_MEAN).view(3, 1, 1).to(device), torch.tensor(CIFAR10_STD).view(3, 1, 1).to(device))


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


class DevicePermutationSampler(torch.utils.data.Sampler[int]):
    """The epoch's order of the data: a permutation drawn on ``device``, seeded by ``(SHUFFLE_STREAM, seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every training epoch on a train loader's ``sampler``, so a run
    resumed at epoch ``e`` sees the order of an uninterrupted run.

    Args:
        num_samples: size of the data set.
        seed: the run's seed (>= 0).
        device: where the permutation is drawn and kept.
    """

    def __init__(self, num_samples: int, *, seed: int, device: torch.device) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`permutation` returns.

        Raises:
            ValueError: ``epoch`` is not an integer >= 0.
        """
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def permutation(self) -> torch.Tensor:
        """int64 ``(num_samples,)`` on ``device``: this epoch's order."""
        generator = torch.Generator(device=self.device).manual_seed(derived_seed(SHUFFLE_STREAM, self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator, device=self.device)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        # For code that wants indices on the host; the loader itself slices the device tensor.
        return iter(self.permutation().tolist())


class DeviceTrainLoader:
    """The paper's training stream with the data set, the shuffling and the augmentation all on ``device``.

    Each epoch: the permutation of :class:`DevicePermutationSampler`, sliced into batches on the device; with
    ``augment``, :func:`rand_augment` (2 ops, magnitude 14), then :func:`random_crop_flip` (padding 4), the paper's
    order, all drawn from one device generator seeded by ``derived_seed(AUGMENT_STREAM, seed, epoch)``; then
    :func:`normalize`. The same ``(seed, epoch)`` gives the same batches. Lightning accepts it as a train dataloader
    (any iterable with ``__len__``) and calls ``sampler.set_epoch`` every epoch.

    Args:
        images: uint8 ``(N, H, W, 3)`` training images (moved to ``device`` once, as uint8 ``(N, 3, H, W)``).
        labels: ``(N,)`` integer class labels.
        batch_size: images per batch.
        augment: apply RandAugment, crop and flip.
        seed: the run's seed (>= 0), from which the order and the augmentation draws are derived.
        device: where the data live and every batch is made.
        drop_last: drop the last incomplete batch.
        channels_last: yield images in ``torch.channels_last`` memory format.

    Raises:
        ValueError: images not uint8 ``(N, H, W, 3)``, labels not of length N, ``batch_size < 1``, a negative or
            non-integer seed, or ``drop_last`` with fewer images than one batch.

    Example::

        >>> images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
        >>> loader = DeviceTrainLoader(images, np.arange(10) % 10, batch_size=4, augment=True, seed=0, device="cpu")
        >>> [tuple(x.shape) for x, _ in loader]
        [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        augment: bool,
        seed: int,
        device: torch.device | str,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"images must be a non-empty uint8 array of shape (N, H, W, 3), "
                             f"got {images.dtype} {images.shape}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if drop_last and len(images) < batch_size:
            raise ValueError(f"drop_last=True with batch_size={batch_size} > {len(images)} images leaves no batch; "
                             "lower batch_size or set drop_last=False")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.sampler = DevicePermutationSampler(len(images), seed=self.seed, device=self.device)
        self._build_constants()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration replays (same as ``sampler.set_epoch``)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        num_images = len(self.images)
        return num_images // self.batch_size if self.drop_last else math.ceil(num_images / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The epoch is read at the first next(), as a DataLoader reads its sampler: on resume, Lightning creates the
        # iterator before it calls set_epoch with the resumed epoch (FitLoop.setup_data, then on_advance_start).
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.sampler.permutation()
        generator = None
        if self.augment:
            seed = derived_seed(AUGMENT_STREAM, self.seed, self.sampler.epoch)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images.index_select(0, index)
            if generator is not None:
                images = random_crop_flip(rand_augment(images, generator), generator)
            x = normalize(images)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, index)

    def _build_constants(self) -> None:
        # Built here so that the first batch, like every other, copies nothing from the host.
        height, width = self.images.shape[-2:]
        _normalization_constants(self.device)
        if self.augment:
            _geometric_maps(height, width, PAPER_MAGNITUDE, NUM_MAGNITUDE_BINS, self.device)
            _sharpness_kernel(3, self.device)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else ""
        raise ValueError(f"images must be a uint8 tensor of shape (B, 3, H, W), got {dtype} {shape}")


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type or (device.index is not None and generator.device.index != device.index):
        raise ValueError(f"generator is on {generator.device} but the images are on {device}: "
                         f"create it with torch.Generator(device={str(device)!r})")


def _check_per_image(name: str, tensor: torch.Tensor, dtype: torch.dtype, images: torch.Tensor) -> None:
    batch = images.shape[0]
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.shape != (batch,) \
            or tensor.device != images.device:
        got = f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}" if isinstance(tensor, torch.Tensor) \
            else type(tensor).__name__
        raise ValueError(f"{name} must be a {dtype} tensor of shape ({batch},) on {images.device}, got {got}")


def _check_magnitude(magnitude: int, num_magnitude_bins: int) -> None:
    if not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
        raise ValueError(f"num_magnitude_bins must be an integer >= 2, got {num_magnitude_bins!r}")
    if not isinstance(magnitude, int) or not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(f"magnitude must be an integer bin in [0, {num_magnitude_bins}), got {magnitude!r}")


def _check_padding(padding: int) -> None:
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
