"""The paper's training stream resident on the accelerator: shuffling, RandAugment, crop, flip and normalisation as a
fixed, short sequence of batched tensor ops.

The whole uint8 training set lives on the device (CIFAR-10: 150 MB) and every batch is sliced, augmented and
normalized there, with no worker processes and no host synchronisation: every random draw is a tensor op on a device
generator, and nothing reads a device value back to the host. The augmentation is that of
:mod:`lit_sharp.data.augment` (RandAugment with 2 ops at magnitude 14, ``paper`` or ``torchvision`` policy, then a
32x32 crop of the image padded by 4 pixels, then a horizontal flip) in distribution, not draw for draw: each image
draws its own ops, signs, cutout corner, offsets and flip, but from a device stream seeded by ``(seed, epoch)``
instead of the CPU path's per-image seeds. Every op equals its CPU counterpart bit for bit: the ``paper`` policy the
PIL ops of :data:`lit_sharp.data.augment.PAPER_OPS`, the ``torchvision`` policy torchvision's tensor ops (which differ
from torchvision's PIL ops, the CPU path's, by 1 grey level in some pixels for Color, Contrast and Sharpness, and in a
few pixels along edges for Rotate).

How a batch is augmented in a fixed number of ops (:class:`BatchRandAugment`; 109 ATen ops for a 128-image batch
with ``paper``, 107 with ``torchvision``, however many ops the policy has and whatever was drawn):

- All draws at once: one uniform tensor gives every image's op, sign and cutout corner for both op slots (the corner
  as the released code's ``int(max(0, c - size / 2))``, ``c`` uniform on ``(1, W]``), one ``randint`` its crop.
- Every op is one of three kinds, and every image goes through all three in each slot, the ops it did not draw
  acting as identities (so a slot is the same op sequence for every image, and op 1 is applied before op 2):

  1. A pixel map (one ``gather``). Geometric ops at a fixed magnitude have one map per (op, sign), computed once
     by running the op's own implementation (PIL's, or torchvision's tensor kernel) on an image whose pixels hold
     their index: exact, as nearest sampling copies source pixels. The cutout is a map too, one per corner, into an
     extra source pixel of the cutout colour (black for the geometric fill). Each image gathers its slot's map;
     other ops gather the identity.
  2. A lookup table per image and channel (one ``gather`` on a concatenation of all tables, each image offset to its
     own): the fixed tables (Invert, Posterize, Solarize, SolarizeAdd), AutoContrast (tabulated once for every
     (min, max) pair: 16 MB of uint8) and Equalize (PIL's formula on per-image histograms from one ``scatter_add``).
  3. A blend ``deg + f (x - deg)`` (PIL) or ``f x + (1 - f) deg`` (torchvision) with a per-image factor (1 for
     images that drew no enhance op): ``deg`` is 0 (Brightness), the mean grey (Contrast), the grey image (Color;
     a 16 MB table of the grey of every 24-bit colour, with the library's own rounding) or the smoothed image
     (Sharpness; PIL's 3x3 filter, border kept).
- Crop and flip are one more map per (top, left, flip) triple; normalisation is a 256-entry table per channel,
  applied before the crop (the padding takes the normalised black).

Exactness is by construction: every value is computed with the same integer or IEEE float arithmetic as the library
(tables are filled by the library's formula). The smoothing convolution sums integers below 2^24 (exact in float32,
and under TF32, whose 10-bit mantissa holds 8-bit pixels and the weights 1 and 5) and rounds with a margin of 1/26
from any tie. The tests hold every op of both policies equal to PIL or torchvision image by image, and count the ops
dispatched.

NVIDIA DALI (``nvidia-dali-cuda130``) was evaluated and not taken. Its ``nvidia.dali.auto_aug.rand_augment`` draws
ops per sample on the GPU, but its suite is its own, neither the released code's nor torchvision's: translation up to
100/224 of the image instead of 150/331 and as a real-valued shift (torchvision truncates to whole pixels), solarize
thresholds on ``linspace(256, 0)`` instead of ``linspace(255, 0)``, equalize following OpenCV's formula rather than
PIL's, sharpness filtering the 1-pixel border that PIL and torchvision leave as is, and by default fill 128 with linear
interpolation. It runs only inside a DALI pipeline (``@pipeline_def(enable_conditionals=True)``, HWC images, its own
iterator, and random state that is the pipeline's, advanced batch by batch, rather than derived from
``(seed, epoch)`` as this project's resumable runs need), and only on GPU-resident samples, so it cannot be tested
against PIL on the CPU. With the op sets differing, speed was not the deciding question and was not measured.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from lit_sharp.data.augment import CUTOUT_FILL, PAPER_OPS, RANDAUGMENTS, paper_op_value
from lit_sharp.normalization import mean_std, normalize
from lit_sharp.seeding import AUGMENT_STREAM, SHUFFLE_STREAM, derived_seed

#: torchvision's RandAugment ops, in the order of ``RandAugment._augmentation_space`` (an op's index is its position).
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
#: torchvision's ops whose magnitude is negated with probability 1/2.
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                        "Brightness", "Color", "Contrast", "Sharpness"})
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
#: The released code's ops (:data:`lit_sharp.data.augment.PAPER_OPS`), in its order.
PAPER_OP_NAMES = tuple(PAPER_OPS)
#: ``policy: its op names``: an op's index in a policy is its position here.
POLICY_OPS = {"paper": PAPER_OP_NAMES, "torchvision": OP_NAMES}

PAPER_NUM_OPS, PAPER_MAGNITUDE, NUM_MAGNITUDE_BINS = 2, 14, 31
_NEAREST = InterpolationMode.NEAREST
#: Extra source pixels after the ``H * W`` image pixels of every gather: black, then the cutout colour.
_BLACK, _CUTOUT = 0, 1
#: Rows of a draw: op, sign, cutout corner row, cutout corner column.
_DRAWS = 4


# ---------------------------------------------------------------------------------------------
# torchvision's magnitudes and geometric ops (the maps of its policy are computed with its own kernels)
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


_TV_GEOMETRIC: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "ShearX": _tv_shear_x, "ShearY": _tv_shear_y, "TranslateX": _tv_translate_x, "TranslateY": _tv_translate_y,
    "Rotate": _tv_rotate,
}


# ---------------------------------------------------------------------------------------------
# The ops of a policy as tables: pixel maps, lookup tables, blends
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Variant:
    """One (op, sign) of a policy, in the terms of the batched pass (see the module docstring).

    ``map``: source pixel of every output pixel (``H * W`` = black, ``H * W + 1`` = the cutout colour), or None for
    the identity; ``cutout``: the op is the cutout (its map depends on the drawn corner); ``lut``: ``"autocontrast"``,
    ``"equalize"`` or a fixed ``(256,)`` table (None: identity); ``degenerate``: the image an enhance op blends with
    (``zero``, ``mean``, ``grey``, ``smooth``); ``factor``: the blend weight of the image.
    """

    map: np.ndarray | None = None
    cutout: bool = False
    lut: object = None
    degenerate: str = "zero"
    factor: float = 1.0


def _pil_map(op: Callable, value: float, height: int, width: int) -> np.ndarray:
    # PIL's own transform on an image whose pixels hold their index + 1 (0 = fill): nearest sampling copies source
    # pixels, so this is the exact pixel map of the op, whatever rounding PIL's fixed-point arithmetic does.
    index = np.arange(1, height * width + 1, dtype=np.int32).reshape(height, width)
    moved = np.asarray(op(Image.fromarray(index, mode="I"), value), dtype=np.int64).reshape(-1) - 1
    return np.where(moved < 0, height * width + _BLACK, moved)


def _tv_map(op_name: str, value: float, height: int, width: int) -> np.ndarray:
    # torchvision's tensor kernel on an index image, for the same reason as _pil_map.
    index = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    moved = _TV_GEOMETRIC[op_name](index, value).view(-1).round().long().numpy() - 1
    return np.where(moved < 0, height * width + _BLACK, moved)


def _paper_variants(magnitude: int, height: int, width: int) -> list[tuple[_Variant, _Variant]]:
    """The released code's 16 ops (:data:`PAPER_OP_NAMES` order), each as (positive, negated) variants."""
    geometric = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
    solarize = {"Invert": lambda v, _: 255 - v, "Solarize": lambda v, t: np.where(v < t, v, 255 - v)}
    variants = []
    for name in PAPER_OP_NAMES:
        op, _, _, signed = PAPER_OPS[name]
        value = paper_op_value(name, magnitude)
        values = np.arange(256)
        pair = []
        for signed_value in (value, -value) if signed else (value, value):
            if name in geometric:
                variant = _Variant(map=_pil_map(op, signed_value, height, width))
            elif name == "Cutout":
                variant = _Variant(cutout=True)
            elif name in ("AutoContrast", "Equalize"):
                variant = _Variant(lut=name.lower())
            elif name in solarize:
                variant = _Variant(lut=solarize[name](values, signed_value))
            elif name == "Posterize":
                variant = _Variant(lut=values & ~(2 ** (8 - max(1, int(signed_value))) - 1))
            elif name == "SolarizeAdd":
                shifted = np.clip(values + signed_value, 0, 255).astype(np.uint8).astype(np.int64)
                variant = _Variant(lut=np.where(shifted < 128, shifted, 255 - shifted))
            else:  # Color, Contrast, Brightness, Sharpness: PIL's ImageEnhance blends
                degenerate = {"Color": "grey", "Contrast": "mean", "Brightness": "zero", "Sharpness": "smooth"}[name]
                variant = _Variant(degenerate=degenerate, factor=signed_value)
            pair.append(variant)
        variants.append(tuple(pair))
    return variants


def _tv_variants(magnitude: int, bins: int, height: int, width: int) -> list[tuple[_Variant, _Variant]]:
    """torchvision's 14 ops (:data:`OP_NAMES` order), each as (positive, negated) variants."""
    variants = []
    values = np.arange(256)
    for name in OP_NAMES:
        value = op_magnitude(name, magnitude, bins, (height, width))
        pair = []
        for signed_value in (value, -value) if name in SIGNED_OPS else (value, value):
            if name in GEOMETRIC_OPS:
                variant = _Variant(map=_tv_map(name, signed_value, height, width))
            elif name in ("AutoContrast", "Equalize"):
                variant = _Variant(lut=name.lower())
            elif name == "Posterize":
                variant = _Variant(lut=values & -int(2 ** (8 - int(signed_value))))
            elif name == "Solarize":
                variant = _Variant(lut=np.where(values >= signed_value, 255 - values, values))
            elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
                degenerate = {"Color": "grey", "Contrast": "mean", "Brightness": "zero", "Sharpness": "smooth"}[name]
                variant = _Variant(degenerate=degenerate, factor=1.0 + signed_value)
            else:  # Identity
                variant = _Variant()
            pair.append(variant)
        variants.append(tuple(pair))
    return variants


def _pil_autocontrast_table() -> torch.Tensor:
    # ImageOps.autocontrast's table depends on a channel's (min, max) only: lut[v] = int(v * s + (-lo * s)) clipped,
    # s = 255 / (hi - lo), in double precision as PIL computes it; identity where hi <= lo.
    lo = torch.arange(256, dtype=torch.float64).view(256, 1, 1)
    hi = torch.arange(256, dtype=torch.float64).view(1, 256, 1)
    v = torch.arange(256, dtype=torch.float64).view(1, 1, 256)
    spread = hi - lo
    scale = torch.where(spread > 0, torch.full((), 255.0, dtype=torch.float64) / spread.clamp_min(1.0), 1.0)
    offset = torch.where(spread > 0, -lo * scale, 0.0)
    return (v * scale + offset).trunc_().clamp_(0, 255).to(torch.uint8)


def _tv_autocontrast_table() -> torch.Tensor:
    # torchvision's tensor autocontrast with the same float32 ops: scale = bound / (max - min) (reciprocal, times
    # 255), ((v - min) * scale).clamp(0, 255) truncated; identity where max == min.
    lo = torch.arange(256.0).view(256, 1, 1)
    hi = torch.arange(256.0).view(1, 256, 1)
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 256)
    scale = 255.0 / (hi - lo)
    flat = ~torch.isfinite(scale)
    scale = torch.where(flat, torch.ones(()), scale)
    lo = torch.where(flat, torch.zeros(()), lo)
    return ((v - lo) * scale).clamp(0, 255).to(torch.uint8)


def _pil_grey_table() -> torch.Tensor:
    # PIL's RGB -> L conversion, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, for every 24-bit colour
    # (index R * 2^16 + G * 2^8 + B).
    channel = torch.arange(256, dtype=torch.int32)
    red_green = (channel.view(256, 1) * 19595 + channel.view(1, 256) * 38470).view(-1, 1)
    return ((red_green + (channel.view(1, 256) * 7471 + 32768)) >> 16).to(torch.uint8).view(-1)


def _tv_grey_table() -> torch.Tensor:
    # torchvision's rgb_to_grayscale on uint8, (0.2989 R + 0.587 G) + 0.114 B in float32 truncated, for every colour.
    channel = torch.arange(256, dtype=torch.uint8)
    red_green = (0.2989 * channel.view(256, 1) + 0.587 * channel.view(1, 256)).view(-1, 1)
    return (red_green + 0.114 * channel.view(1, 256)).to(torch.uint8).view(-1)


@functools.lru_cache(maxsize=4)
def _autocontrast_table(policy: str, device: torch.device) -> torch.Tensor:
    return (_pil_autocontrast_table() if policy == "paper" else _tv_autocontrast_table()).to(device)


@functools.lru_cache(maxsize=4)
def _grey_table(policy: str, device: torch.device) -> torch.Tensor:
    return (_pil_grey_table() if policy == "paper" else _tv_grey_table()).to(device)


class BatchRandAugment:
    """RandAugment (``paper`` or ``torchvision``), crop-and-flip and normalisation of uint8 batches in a fixed number
    of tensor ops, with no host synchronisation (see the module docstring for the method).

    Every table is built here, once, for one image size, magnitude and device; calls then copy nothing from the host.

    Args:
        policy: ``paper`` (the released code's RandAugment, :class:`lit_sharp.data.augment.PaperRandAugment`) or
            ``torchvision`` (torchvision's ``RandAugment`` tensor ops).
        height, width: image size.
        device: where the tables live and batches are processed.
        num_ops: ops per image (2 in the paper).
        magnitude: 0..30 (14 in the paper).
        num_magnitude_bins: torchvision's number of bins (31); ignored by ``paper``.
        padding: the crop's zero border (4 in the paper).

    Raises:
        ValueError: an unknown policy, ``num_ops < 0``, a bad magnitude or padding.
    """

    def __init__(self, policy: str, height: int, width: int, device: torch.device | str, *,
                 num_ops: int = PAPER_NUM_OPS, magnitude: int = PAPER_MAGNITUDE,
                 num_magnitude_bins: int = NUM_MAGNITUDE_BINS, padding: int = 4) -> None:
        if policy not in RANDAUGMENTS:
            raise ValueError(f"policy must be one of {RANDAUGMENTS}, got {policy!r}")
        if not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
        _check_magnitude(magnitude, num_magnitude_bins)
        _check_padding(padding)
        self.policy, self.height, self.width = policy, height, width
        self.device = torch.device(device)
        self.num_ops, self.padding = num_ops, padding
        pixels = height * width
        self.pixels = pixels
        variants = _paper_variants(magnitude, height, width) if policy == "paper" \
            else _tv_variants(magnitude, num_magnitude_bins, height, width)
        self.num_op_kinds = len(variants)
        self._build_maps(variants, magnitude)
        self._build_luts(variants)
        self._build_blends(variants)
        self._build_crop_flip()
        dev = self.device
        fill = torch.tensor([[0, c] for c in CUTOUT_FILL], dtype=torch.int64)
        self._fill = fill.view(1, 3, 2).to(dev)
        self._fill_uint8 = self._fill.to(torch.uint8)
        self._ones = torch.ones((), dtype=torch.int64, device=dev)
        self._arange = torch.arange(256, device=dev).view(1, 1, 256)
        self._grey_weights = torch.tensor([1 << 16, 1 << 8, 1], device=dev).view(1, 3, 1)
        border = torch.ones(height, width, dtype=torch.bool)
        border[1:-1, 1:-1] = False
        self._border = border.view(1, 1, pixels).to(dev)
        self._smooth_weight = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]).expand(3, 1, 3, 3) \
            .contiguous().to(dev)
        # 6.5, not 6: floor((S + 6.5) / 13) = round(S / 13) exactly, and stays so under any small error of the
        # convolution's algorithm (S / 13 is never within 1/26 of a half).
        self._smooth_bias = torch.full((3,), 6.5, device=dev)
        self._autocontrast = _autocontrast_table(policy, dev)
        self._grey = _grey_table(policy, dev)
        # Every value of every channel normalised once, by the one normalize (so equal bit for bit to the CPU path):
        # the batched pass then normalises with a lookup inside the crop's gather (crop_flip_normalize), instead of
        # calling normalize on the batch, three more elementwise ops over every image.
        values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(1, 3, 256)
        normalized = normalize(values, channels_dim=-2)
        self._normalized = normalized.to(dev)
        self._normalized_fill = normalized[..., :1].expand(1, 3, 2).contiguous().to(dev)
        self._zero = torch.zeros((), dtype=torch.int64, device=dev)
        self._expanded: dict[int, dict[str, torch.Tensor]] = {}

    def _constants(self, batch: int) -> dict[str, torch.Tensor]:
        # The per-image constants broadcast to a batch size, made once per size: every expand is a dispatched op.
        if batch not in self._expanded:
            self._expanded[batch] = {
                "fill": self._fill.expand(batch, 3, 2), "fill_uint8": self._fill_uint8.expand(batch, 3, 2),
                "ones": self._ones.expand(batch, 3, self.pixels),
                "fixed_luts": self._fixed_luts.expand(batch, 3, -1),
                "normalized": self._normalized.expand(batch, 3, 256),
                "normalized_fill": self._normalized_fill.expand(batch, 3, 2),
            }
        return self._expanded[batch]

    # -- tables --------------------------------------------------------------------------------

    def _build_maps(self, variants, magnitude: int) -> None:
        height, width, pixels = self.height, self.width, self.pixels
        identity = np.arange(pixels)
        maps = [identity]
        corners = (1, 1)
        cutout_rows = None
        if self.policy == "paper":
            size = paper_op_value("Cutout", magnitude)
            # The corner is int(max(0, c - size / 2)) with the centre c in (1, W]: 0 .. int(W - size / 2).
            corners = (int(max(0.0, height - size / 2)) + 1, int(max(0.0, width - size / 2)) + 1)
            self._corner_scale = (1.0 - height, 1.0 - width)
            self._corner_shift = (height - size / 2.0, width - size / 2.0)
            cutout_rows = len(maps)
            maps += [_cutout_map(y0, x0, size, height, width) for y0 in range(corners[0]) for x0 in range(corners[1])]
        else:
            self._corner_scale = self._corner_shift = (0.0, 0.0)
        rows = np.zeros((len(variants), 2, corners[0], corners[1]), dtype=np.int64)
        for k, pair in enumerate(variants):
            for sign, variant in enumerate(pair):
                if variant.cutout:
                    rows[k, sign] = cutout_rows + np.arange(corners[0] * corners[1]).reshape(corners)
                elif variant.map is not None:
                    rows[k, sign] = len(maps)
                    maps.append(variant.map)
        self._corners = corners
        self._maps = torch.from_numpy(np.stack(maps)).view(len(maps), 1, pixels).expand(-1, 3, -1).contiguous() \
            .to(self.device)
        self._map_rows = torch.from_numpy(rows).to(self.device)
        scale = [self.num_op_kinds, 2.0, *self._corner_scale]
        shift = [0.0, 0.0, *self._corner_shift]
        high = [self.num_op_kinds - 1, 1, corners[0] - 1, corners[1] - 1]
        self._draw_scale = torch.tensor(scale).view(1, _DRAWS, 1, 1, 1).to(self.device)
        self._draw_shift = torch.tensor(shift).view(1, _DRAWS, 1, 1, 1).to(self.device)
        self._draw_high = torch.tensor(high, dtype=torch.float32).view(1, _DRAWS, 1, 1, 1).to(self.device)
        self._draw_low = torch.zeros((), device=self.device)

    def _build_luts(self, variants) -> None:
        # One table per image: [autocontrast | equalize | fixed tables...]; an op picks its block by an offset.
        fixed = [np.arange(256)]
        offsets = np.zeros((len(variants), 2), dtype=np.int64)
        for k, pair in enumerate(variants):
            for sign, variant in enumerate(pair):
                if isinstance(variant.lut, str):
                    offsets[k, sign] = 0 if variant.lut == "autocontrast" else 256
                elif variant.lut is not None:
                    offsets[k, sign] = 256 * (2 + len(fixed))
                    fixed.append(np.asarray(variant.lut, dtype=np.int64))
                else:
                    offsets[k, sign] = 512
        self._fixed_luts = torch.from_numpy(np.concatenate(fixed)).view(1, 1, -1).to(self.device)
        self._lut_offsets = torch.from_numpy(offsets).to(self.device)

    def _build_blends(self, variants) -> None:
        # masks[m, op, sign]: the op blends with the smoothed image (m = 0), the grey one (1), the mean grey (2).
        kinds = ("smooth", "grey", "mean")
        masks = torch.zeros(len(kinds), len(variants), 2, dtype=torch.bool)
        weights = torch.zeros(2, len(variants), 2, dtype=torch.float32)
        for k, pair in enumerate(variants):
            for sign, variant in enumerate(pair):
                for m, kind in enumerate(kinds):
                    masks[m, k, sign] = variant.degenerate == kind
                # PIL: deg + f (x - deg); torchvision: f x + (1 - f) deg, (1 - f) from the double as torchvision does.
                weights[0, k, sign] = variant.factor
                weights[1, k, sign] = 1.0 - variant.factor
        self._blend_masks = masks.to(self.device)
        self._blend_weights = weights.to(self.device)
        self._three = torch.arange(len(kinds), device=self.device).view(len(kinds), 1, 1, 1, 1)
        self._two = torch.arange(2, device=self.device).view(2, 1, 1, 1, 1)

    def _build_crop_flip(self) -> None:
        height, width, padding = self.height, self.width, self.padding
        side = 2 * padding + 1
        maps = []
        for top in range(side):
            for left in range(side):
                for flip in (False, True):
                    rows = np.arange(height)[:, None] + top - padding
                    cols = np.arange(width)[None, :] + left - padding
                    cols = cols[:, ::-1] if flip else cols
                    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
                    maps.append(np.where(inside, rows * width + cols, height * width + _BLACK).reshape(-1))
        self.num_crops = len(maps)
        self._crops = torch.from_numpy(np.stack(maps)).view(len(maps), 1, -1).expand(-1, 3, -1).contiguous() \
            .to(self.device)

    # -- the batched pass ------------------------------------------------------------------------

    def extend(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> uint8 ``(B, 3, H * W + 2)``: the pixels, then black and the cutout colour.

        The loader stores its data set in this form once, which saves the first op slot a concatenation.
        """
        _check_images(images)
        batch = images.shape[0]
        return torch.cat((images.reshape(batch, 3, -1), self._constants(batch)["fill_uint8"]), 2)

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Every image's ops for all slots: ``(op, sign, corner_row, corner_col)``, each int64 ``(num_ops, B, 1, 1)``.

        One uniform draw per quantity: op uniform over the policy's ops (with replacement), sign 1 (negate) with
        probability 1/2, and the cutout corner as the released code's ``int(max(0, c - size / 2))`` with the centre
        ``c`` uniform on ``(1, W]`` (unused by ``torchvision``).
        """
        u = torch.rand((self.num_ops, _DRAWS, batch, 1, 1), generator=generator, device=self.device)
        drawn = torch.clamp(u * self._draw_scale + self._draw_shift, self._draw_low, self._draw_high).long()
        return drawn.unbind(1)

    def rand_augment(self, images: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """RandAugment of ``extend``-ed images with the given draws; int64 ``(B, 3, H * W)`` values in ``[0, 255]``."""
        op, sign, corner_row, corner_col = draws
        batch = images.shape[0]
        slots = self.num_ops
        if slots == 0:
            return images.narrow(2, 0, self.pixels).long()
        map_rows = self._map_rows[op, sign, corner_row, corner_col].view(-1)
        maps = self._maps.index_select(0, map_rows).view(slots, batch, 3, self.pixels).unbind(0)
        offsets = self._lut_offsets[op, sign].unbind(0)
        masks = self._blend_masks[self._three, op, sign].view(-1, batch, 1, 1).unbind(0)
        weights = self._blend_weights[self._two, op, sign].view(-1, batch, 1, 1).unbind(0)
        x = images.gather(2, maps[0]).long()
        for s in range(slots):
            if s > 0:
                x = torch.cat((x, self._constants(batch)["fill"]), 2).gather(2, maps[s])
            x = self._colour(x, offsets[s], masks[s::slots], weights[s::slots])
        return x

    def _colour(self, x: torch.Tensor, offset: torch.Tensor, masks, weights) -> torch.Tensor:
        # Every image goes through every step; an image that did not draw a step's op gets its identity there.
        batch = x.shape[0]
        low, high = torch.aminmax(x, dim=2)
        autocontrast = self._autocontrast[low, high]  # (B, 3, 256)
        histogram = torch.zeros((batch, 3, 256), dtype=torch.int64, device=x.device)
        histogram.scatter_add_(2, x, self._constants(batch)["ones"])
        # PIL's equalize: step = (pixels - count of the top value) // 255; lut = (cum_before + step // 2) // step.
        step = (self.pixels - histogram.gather(2, high.unsqueeze(2))) // 255
        equalize = (histogram.cumsum(2) - histogram + step // 2) // step.clamp_min(1)
        equalize = torch.where(step > 0, equalize.clamp_max(255), self._arange)
        luts = torch.cat((autocontrast, equalize, self._constants(batch)["fixed_luts"]), 2)
        x = luts.gather(2, x + offset)
        return self._blend(x, masks, weights)

    def _blend(self, x: torch.Tensor, masks, weights) -> torch.Tensor:
        smooth_mask, grey_mask, mean_mask = masks
        batch = x.shape[0]
        grey = self._grey.take((x * self._grey_weights).sum(1, keepdim=True))  # (B, 1, HW)
        values = x.float()
        blurred = nnf.conv2d(values.view(batch, 3, self.height, self.width), self._smooth_weight, self._smooth_bias,
                             padding=1, groups=3)
        smooth = torch.where(self._border, values, blurred.view(batch, 3, self.pixels).floor_divide_(13.0))
        if self.policy == "paper":
            # ImageStat's mean of the L image rounded as int(mean + 0.5); PIL's blend in float32, truncated.
            total = grey.sum(2, keepdim=True)
            mean = (total + self.pixels // 2) // self.pixels if self.pixels % 2 == 0 \
                else (total * 2 + self.pixels) // (2 * self.pixels)
            degenerate = torch.where(smooth_mask, smooth,
                                     torch.where(grey_mask, grey, torch.where(mean_mask, mean, self._zero)))
            out = (values - degenerate) * weights[0] + degenerate
        else:
            mean = grey.float().mean(2, keepdim=True)
            degenerate = torch.where(smooth_mask, smooth,
                                     torch.where(grey_mask, grey, torch.where(mean_mask, mean, self._zero)))
            out = values * weights[0] + degenerate * weights[1]
        return out.clamp_(0.0, 255.0).long()

    def crop_flip_normalize(self, x: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """Normalise int64 ``(B, 3, H * W)`` values, then crop-and-flip image ``i`` by map ``crops[i]``.

        Crop map ``k = (top * (2p + 1) + left) * 2 + flip`` (:func:`crop_flip`); normalising first is the same as
        after, with the zero padding normalised as the CPU path normalises black. Returns float32 ``(B, 3, H, W)``.
        """
        batch = x.shape[0]
        constants = self._constants(batch)
        values = torch.cat((constants["normalized"].gather(2, x), constants["normalized_fill"]), 2)
        return values.gather(2, self._crops.index_select(0, crops)).view(batch, 3, self.height, self.width)

    def draw_crops(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """int64 ``(B,)`` crop-and-flip maps, uniform over the ``(2p + 1)^2 * 2`` (top, left, flip) triples."""
        return torch.randint(self.num_crops, (batch,), generator=generator, device=self.device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The paper's augmentation of ``extend``-ed uint8 images: RandAugment, crop and flip, normalisation.

        Returns float32 ``(B, 3, H, W)``.
        """
        batch = images.shape[0]
        x = self.rand_augment(images, self.draw(batch, generator))
        return self.crop_flip_normalize(x, self.draw_crops(batch, generator))


def _cutout_map(y0: int, x0: int, size: float, height: int, width: int) -> np.ndarray:
    # The released code's rectangle drawn by PIL itself (its rounding of the float corner), as a pixel map.
    marker = Image.new("L", (width, height), 0)
    ImageDraw.Draw(marker).rectangle((x0, y0, min(width, x0 + size), min(height, y0 + size)), 1)
    painted = np.asarray(marker, dtype=bool).reshape(-1)
    return np.where(painted, height * width + _CUTOUT, np.arange(height * width))


@functools.lru_cache(maxsize=16)
def batch_rand_augment(policy: str, height: int, width: int, device: torch.device, num_ops: int = PAPER_NUM_OPS,
                       magnitude: int = PAPER_MAGNITUDE, num_magnitude_bins: int = NUM_MAGNITUDE_BINS,
                       padding: int = 4) -> BatchRandAugment:
    """A cached :class:`BatchRandAugment` (its tables take a moment to build)."""
    return BatchRandAugment(policy, height, width, device, num_ops=num_ops, magnitude=magnitude,
                            num_magnitude_bins=num_magnitude_bins, padding=padding)


# ---------------------------------------------------------------------------------------------
# Functional forms (one op per image given; RandAugment alone; crop and flip alone)
# ---------------------------------------------------------------------------------------------


def apply_ops(
    images: torch.Tensor,
    ops: torch.Tensor,
    negate: torch.Tensor,
    *,
    policy: str = "paper",
    magnitude: int = PAPER_MAGNITUDE,
    num_magnitude_bins: int = NUM_MAGNITUDE_BINS,
    corner: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One op per image: image ``i`` gets op ``POLICY_OPS[policy][ops[i]]``, negated where ``negate[i]`` (signed ops).

    ``torchvision``: equal to torchvision's ``RandAugment`` op (nearest, fill 0) on each image at magnitude
    ``-m if negate[i] else m``, ``m = op_magnitude(...)``. ``paper``: the released code's op (:data:`PAPER_OPS`) at
    :func:`lit_sharp.data.augment.paper_op_value`, the cutout's corner being ``corner = (rows, cols)`` (default 0).

    Args:
        images: uint8 ``(B, 3, H, W)``.
        ops: int64 ``(B,)`` op indices (not checked: that would read them back to the host).
        negate: bool ``(B,)``; ignored for unsigned ops.
        policy: ``paper`` or ``torchvision``.
        magnitude: the magnitude (bin).
        num_magnitude_bins: torchvision's number of bins.
        corner: int64 ``(B,)`` cutout corner rows and columns.

    Returns:
        uint8 ``(B, 3, H, W)`` on the images' device.

    Raises:
        ValueError: bad image tensor, ``ops``/``negate`` of the wrong dtype, shape or device, or a bad bin.
    """
    _check_images(images)
    _check_per_image("ops", ops, torch.long, images)
    _check_per_image("negate", negate, torch.bool, images)
    batch, _, height, width = images.shape
    augment = batch_rand_augment(policy, height, width, images.device, 1, magnitude, num_magnitude_bins)
    rows, cols = corner if corner is not None else (torch.zeros_like(ops), torch.zeros_like(ops))
    draws = tuple(t.view(1, batch, 1, 1) for t in (ops, negate.long(), rows, cols))
    out = augment.rand_augment(augment.extend(images), draws)
    return out.to(torch.uint8).view(batch, 3, height, width)


def rand_augment(
    images: torch.Tensor,
    generator: torch.Generator,
    num_ops: int = PAPER_NUM_OPS,
    magnitude: int = PAPER_MAGNITUDE,
    num_magnitude_bins: int = NUM_MAGNITUDE_BINS,
    *,
    policy: str = "paper",
) -> torch.Tensor:
    """RandAugment (``paper`` or ``torchvision``) on a batch, every image with its own draws.

    RandAugment (Cubuk et al. 2020): ``num_ops`` times, each image draws one of the policy's ops uniformly and, for a
    signed op, a sign with probability 1/2, and the op is applied at the fixed magnitude
    (:meth:`BatchRandAugment.draw`).

    Args:
        images: uint8 ``(B, 3, H, W)``.
        generator: the source of every draw; it must live on the images' device.
        num_ops: ops applied in sequence (2 in the paper).
        magnitude: the magnitude (14 in the paper).
        num_magnitude_bins: torchvision's number of bins (31).
        policy: ``paper`` or ``torchvision``.

    Returns:
        uint8 ``(B, 3, H, W)`` on the images' device.

    Raises:
        ValueError: bad image tensor, a generator on another device, ``num_ops < 0``, a bad bin or policy.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
        >>> rand_augment(images, g).shape
        torch.Size([8, 3, 32, 32])
    """
    _check_images(images)
    _check_generator(generator, images.device)
    if not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
    _check_magnitude(magnitude, num_magnitude_bins)
    batch, _, height, width = images.shape
    augment = batch_rand_augment(policy, height, width, images.device, num_ops, magnitude, num_magnitude_bins)
    out = augment.rand_augment(augment.extend(images), augment.draw(batch, generator))
    return out.to(torch.uint8).view(batch, 3, height, width)


# ---------------------------------------------------------------------------------------------
# Crop and flip
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

    One uniform integer per image picks ``k`` among the ``(2p + 1)^2 * 2`` (top, left, flip) triples,
    ``k = (top * (2p + 1) + left) * 2 + flip``: offsets uniform on ``[0, 2p]``, a flip with probability 1/2, the same
    draw as the loader's (:meth:`BatchRandAugment.draw_crops`).

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
    side = 2 * padding + 1
    k = torch.randint(side * side * 2, (images.shape[0],), generator=generator, device=images.device)
    return crop_flip(images, k // (2 * side), (k // 2) % side, k % 2 == 1, padding)


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
    ``augment``, RandAugment (``randaugment`` policy, 2 ops, magnitude 14), then crop and flip (padding 4), the
    paper's order, then normalisation, all in one :class:`BatchRandAugment` pass whose draws come from one device
    generator seeded by ``derived_seed(AUGMENT_STREAM, seed, epoch)``; equal to :func:`rand_augment`, then
    :func:`random_crop_flip` with that generator, then :func:`lit_sharp.normalization.normalize`; without
    ``augment``, :func:`~lit_sharp.normalization.normalize` alone. The same ``(seed, epoch)`` gives the same batches.
    Lightning accepts it as a train dataloader (any iterable with ``__len__``) and calls ``sampler.set_epoch`` every
    epoch.

    Args:
        images: uint8 ``(N, H, W, 3)`` training images (moved to ``device`` once, as uint8 ``(N, 3, H, W)``).
        labels: ``(N,)`` integer class labels.
        batch_size: images per batch.
        augment: apply RandAugment, crop and flip.
        randaugment: ``paper`` (the released code's policy) or ``torchvision``.
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
        randaugment: str = "paper",
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
        if randaugment not in RANDAUGMENTS:
            raise ValueError(f"randaugment must be one of {RANDAUGMENTS}, got {randaugment!r}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.channels_last = bool(channels_last)
        self.randaugment = randaugment
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        self.sampler = DevicePermutationSampler(len(images), seed=self.seed, device=self.device)
        mean_std(self.images.device)  # made now, so that the first unaugmented batch copies nothing from the host
        self.augmentation = None
        if self.augment:
            # Tables built now, so that the first batch, like every other, copies nothing from the host; the data
            # set is kept with the two fill pixels appended (BatchRandAugment.extend).
            height, width = self.images.shape[-2:]
            self.augmentation = batch_rand_augment(randaugment, height, width, self.device)
            self.images = self.augmentation.extend(self.images)

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
            x = normalize(images) if generator is None else self.augmentation(images, generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, index)


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
