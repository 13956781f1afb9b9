"""Per-image training augmentation of the paper, reproducible from ``(seed, epoch, index)`` alone.

``augment=true`` is RandAugment with 2 ops at magnitude 14, then a random 32x32 crop of the image padded by 4 pixels,
then a horizontal flip (the order of the released code); ``augment=false`` is no augmentation at all. Two RandAugments
are offered (``data.randaugment``): ``paper`` (default), :class:`PaperRandAugment`, the policy of the paper's released
code (16 ops, docs/protocol.md section 2), far stronger than ``torchvision``, torchvision's ``RandAugment(2, 14)``.

Both draw from the global torch RNG. To make a run resumable bit for bit, every image's draws
come from a seed derived from ``(seed, epoch, index)`` inside ``torch.random.fork_rng``, so neither the worker layout
nor an interruption changes which augmentation an image gets, and the caller's RNG is left as it was.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision import transforms

from lit_sharp.constants import RANDAUGMENTS
from lit_sharp.data.position import ResumableEpochs
from lit_sharp.normalization import normalize
from lit_sharp.seeding import AUGMENT_STREAM, SHUFFLE_STREAM, derived_seed


#: The fill of the released code's cutout square (RGB).
CUTOUT_FILL = (125, 123, 114)
#: Magnitudes are on the released code's scale: an op's value is ``magnitude / MAX_MAGNITUDE * (max - min) + min``.
MAX_MAGNITUDE = 30


# The released code's ops on PIL images. Geometric ops use PIL's defaults: nearest neighbour, black fill. Each takes
# the op's value, already signed where the op is signed.
def shear_x(image: Image.Image, shear: float) -> Image.Image:
    """Output pixel ``(x, y)`` samples input ``(x + shear * y, y)``."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, shear, 0, 0, 1, 0))


def shear_y(image: Image.Image, shear: float) -> Image.Image:
    """Output pixel ``(x, y)`` samples input ``(x, y + shear * x)``."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, shear, 1, 0))


def translate_x(image: Image.Image, pixels: float) -> Image.Image:
    """Output pixel ``(x, y)`` samples input ``(x + pixels, y)``: a shift by a number of pixels, not a fraction."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, pixels, 0, 1, 0))


def translate_y(image: Image.Image, pixels: float) -> Image.Image:
    """Output pixel ``(x, y)`` samples input ``(x, y + pixels)``."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, pixels))


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Counter-clockwise rotation about the image centre."""
    return image.rotate(degrees)


def posterize(image: Image.Image, bits: float) -> Image.Image:
    """Keep the ``max(1, int(bits))`` high bits of every channel (``int`` truncates: 1.87 keeps 1 bit)."""
    return ImageOps.posterize(image, max(1, int(bits)))


def solarize(image: Image.Image, threshold: float) -> Image.Image:
    """Invert (``255 - v``) every channel value ``v >= threshold``."""
    return ImageOps.solarize(image, threshold)


def solarize_add(image: Image.Image, addition: float) -> Image.Image:
    """Add ``addition``, clip to 255 and truncate (``min(int(v + addition), 255)``), then solarize at 128."""
    shifted = np.clip(np.asarray(image, dtype=np.float64) + addition, 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(shifted), 128)


def cutout(image: Image.Image, size: float) -> Image.Image:
    """Paint a square of side about ``size`` with :data:`CUTOUT_FILL`, its centre drawn at random.

    As in the released code: the centre is ``numpy.random.uniform(w)``, i.e. ``uniform(low=w, high=1)``, which lies in
    ``(1, w]`` rather than ``[0, w)``; the corner is ``x0 = int(max(0, cx - size / 2))``, the far corner
    ``min(w, x0 + size)``, and PIL truncates both and paints inclusively (``int(size) + 1`` pixels unless clipped).
    """
    width, height = image.size
    centre_x = width + (1.0 - width) * float(torch.rand(()))
    centre_y = height + (1.0 - height) * float(torch.rand(()))
    x0 = int(max(0.0, centre_x - size / 2.0))
    y0 = int(max(0.0, centre_y - size / 2.0))
    painted = image.copy()
    ImageDraw.Draw(painted).rectangle((x0, y0, min(width, x0 + size), min(height, y0 + size)), CUTOUT_FILL)
    return painted


#: ``name: (op, min, max, signed)`` in the released code's order; a signed op's value is negated with probability 1/2.
PAPER_OPS = {
    "AutoContrast": (lambda image, _: ImageOps.autocontrast(image), 0.0, 1.0, False),
    "Equalize": (lambda image, _: ImageOps.equalize(image), 0.0, 1.0, False),
    "Invert": (lambda image, _: ImageOps.invert(image), 0.0, 1.0, False),
    "Rotate": (rotate, 0.0, 30.0, True),
    "Posterize": (posterize, 0.0, 4.0, False),
    "Solarize": (solarize, 0.0, 256.0, False),
    "SolarizeAdd": (solarize_add, 0.0, 110.0, False),
    "Color": (lambda image, factor: ImageEnhance.Color(image).enhance(factor), 0.1, 1.9, False),
    "Contrast": (lambda image, factor: ImageEnhance.Contrast(image).enhance(factor), 0.1, 1.9, False),
    "Brightness": (lambda image, factor: ImageEnhance.Brightness(image).enhance(factor), 0.1, 1.9, False),
    "Sharpness": (lambda image, factor: ImageEnhance.Sharpness(image).enhance(factor), 0.1, 1.9, False),
    "ShearX": (shear_x, 0.0, 0.3, True),
    "ShearY": (shear_y, 0.0, 0.3, True),
    "Cutout": (cutout, 0.0, 40.0, False),
    "TranslateX": (translate_x, 0.0, 100.0, True),
    "TranslateY": (translate_y, 0.0, 100.0, True),
}


def paper_op_value(name: str, magnitude: int) -> float:
    """The released code's unsigned value of op ``name`` at ``magnitude``: ``magnitude / 30 * (max - min) + min``.

    At magnitude 14: rotate 14 degrees, posterize 1.87 (1 bit), solarize 119.5, solarize-add 51.3, enhance factors 0.94,
    shear 0.14, cutout 18.7 pixels, translate 46.7 pixels.
    """
    _, low, high, _ = PAPER_OPS[name]
    return float(magnitude) / MAX_MAGNITUDE * float(high - low) + low


class PaperRandAugment:
    """The RandAugment of the paper's released code (after the EfficientNet/UDA policy), on PIL images.

    Per image, ``num_ops`` ops are drawn uniformly with replacement from the 16 of :data:`PAPER_OPS` and applied in
    order at :func:`paper_op_value`; rotate, shears and translations are negated with probability 1/2. Every draw comes
    from the global torch RNG, like torchvision's transforms, so ``torch.manual_seed`` makes it reproducible.

    Args:
        num_ops: ops per image (2 in the paper).
        magnitude: in ``[0, 30]`` (14 in the paper).

    Raises:
        ValueError: ``num_ops < 0`` or a magnitude outside ``[0, 30]``.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 14) -> None:
        if not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"magnitude must be in [0, {MAX_MAGNITUDE}], got {magnitude!r}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.names = tuple(PAPER_OPS)

    def __call__(self, image: Image.Image) -> Image.Image:
        for k in torch.randint(len(self.names), (self.num_ops,)).tolist():
            name = self.names[k]
            op, _, _, signed = PAPER_OPS[name]
            value = paper_op_value(name, self.magnitude)
            if signed and float(torch.rand(())) < 0.5:
                value = -value
            image = op(image, value)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude})"


def paper_augmentation(num_ops: int = 2, magnitude: int = 14, randaugment: str = "paper") -> transforms.Compose:
    """RandAugment (``paper`` or ``torchvision``), then crop 32 padded by 4, then horizontal flip (PIL in and out)."""
    if randaugment not in RANDAUGMENTS:
        raise ValueError(f"randaugment must be one of {RANDAUGMENTS}, got {randaugment!r}")
    policy = PaperRandAugment(num_ops, magnitude) if randaugment == "paper" \
        else transforms.RandAugment(num_ops=num_ops, magnitude=magnitude)
    return transforms.Compose([policy, transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])


def to_normalized_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(..., 32, 32, 3)`` HWC images -> float32 ``(..., 3, 32, 32)``, normalized by
    :func:`lit_sharp.normalization.normalize`."""
    return normalize(torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3))


class AugmentedImages(torch.utils.data.Dataset):
    """Training images with the paper's augmentation, indexed by ``(epoch, index)`` pairs from :class:`EpochSampler`.

    Args:
        images: uint8 ``(N, 32, 32, 3)``.
        labels: int64 ``(N,)``.
        augment: apply :func:`paper_augmentation`; otherwise images are only normalized.
        seed: the run's seed, from which every image's augmentation draws are derived.
        randaugment: ``paper`` or ``torchvision`` (:func:`paper_augmentation`).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, augment: bool, seed: int,
                 randaugment: str = "paper") -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = paper_augmentation(randaugment=randaugment) if augment else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image = self.images[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(AUGMENT_STREAM, self.seed, epoch, index))
                image = np.array(self.transform(Image.fromarray(image)))
        return to_normalized_tensor(image), self.labels[index]


class EpochSampler(ResumableEpochs, torch.utils.data.Sampler):
    """Yields ``(epoch, index)``: a permutation of the data set seeded by ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch (as for ``DistributedSampler``), so a run resumed at
    epoch ``e`` sees exactly the order (and, through :class:`AugmentedImages`, the augmentations) of an uninterrupted run;
    one resumed mid-epoch starts at the index :meth:`resume_at` gives (:mod:`lit_sharp.data.position`).
    """

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(SHUFFLE_STREAM, self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return ((self.epoch, index) for index in order[self.iteration_start():])
