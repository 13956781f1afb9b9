"""torchvision's RandAugment restated: its ops in order, which of them are signed, their magnitudes, and its calls of
the geometric ops.

The device pipeline's ``torchvision`` policy (:mod:`lit_sharp.data.device_augment`) indexes its ops by
:data:`OP_NAMES` and computes the pixel maps of the geometric ops with these calls, that is with torchvision's own
tensor kernels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from lit_sharp.data.device_checks import check_magnitude

#: torchvision's RandAugment ops, in the order of ``RandAugment._augmentation_space`` (an op's index is its position).
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
#: torchvision's ops whose magnitude is negated with probability 1/2.
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                        "Brightness", "Color", "Contrast", "Sharpness"})
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_NEAREST = InterpolationMode.NEAREST


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
    check_magnitude(magnitude, num_magnitude_bins)
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


# torchvision's RandAugment op calls (torchvision.transforms.autoaugment._apply_op), with nearest interpolation and
# fill None, which grid sampling makes 0.
def _tv_shear_x(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(magnitude)), 0.0],
                      interpolation=_NEAREST, fill=None, center=[0, 0])


def _tv_shear_y(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(magnitude))],
                      interpolation=_NEAREST, fill=None, center=[0, 0])


def _tv_translate_x(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                      interpolation=_NEAREST, fill=None)


def _tv_translate_y(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.affine(images, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                      interpolation=_NEAREST, fill=None)


def _tv_rotate(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    return tvf.rotate(images, magnitude, interpolation=_NEAREST, fill=None)


#: torchvision's geometric ops by name: ``(images, signed magnitude) -> images``.
TV_GEOMETRIC: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "ShearX": _tv_shear_x, "ShearY": _tv_shear_y, "TranslateX": _tv_translate_x, "TranslateY": _tv_translate_y,
    "Rotate": _tv_rotate,
}

