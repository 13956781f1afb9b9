"""RandAugment (``paper`` or ``torchvision`` policy), crop, flip and normalisation of uint8 batches on the device, as a
fixed, short sequence of batched tensor ops: every random draw is a tensor op on a device generator, and nothing reads
a device value back to the host.

Every op equals its CPU counterpart (:mod:`lit_sharp.data.augment`) bit for bit: the ``paper`` policy the PIL ops
of :data:`lit_sharp.data.augment.PAPER_OPS`, the ``torchvision`` policy torchvision's tensor ops (which differ from
torchvision's PIL ops, the CPU path's, by 1 grey level in some pixels for Color, Contrast and Sharpness, and in a few
pixels along edges for Rotate).

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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, ImageDraw

from lit_sharp.data.augment import CUTOUT_FILL, PAPER_OPS, RANDAUGMENTS, paper_op_value
from lit_sharp.data.device_checks import check_generator, check_images, check_magnitude, check_padding, check_per_image
from lit_sharp.data.torchvision_randaugment import GEOMETRIC_OPS, OP_NAMES, SIGNED_OPS, TV_GEOMETRIC, op_magnitude
from lit_sharp.normalization import normalize

#: The released code's ops (:data:`lit_sharp.data.augment.PAPER_OPS`), in its order.
PAPER_OP_NAMES = tuple(PAPER_OPS)
#: ``policy: its op names``: an op's index in a policy is its position here.
POLICY_OPS = {"paper": PAPER_OP_NAMES, "torchvision": OP_NAMES}

PAPER_NUM_OPS, PAPER_MAGNITUDE, NUM_MAGNITUDE_BINS = 2, 14, 31
#: Extra source pixels after the ``H * W`` image pixels of every gather: black, then the cutout colour.
_BLACK, _CUTOUT = 0, 1
#: Rows of a draw: op, sign, cutout corner row, cutout corner column.
_DRAWS = 4


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
    moved = TV_GEOMETRIC[op_name](index, value).view(-1).round().long().numpy() - 1
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
        check_magnitude(magnitude, num_magnitude_bins)
        check_padding(padding)
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
        check_images(images)
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

        Crop map ``k = (top * (2p + 1) + left) * 2 + flip`` (:func:`lit_sharp.data.device_crop_flip.crop_flip`);
        normalising first is the same as after, with the zero padding normalised as the CPU path normalises black.
        Returns float32 ``(B, 3, H, W)``.
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
# Functional forms (one op per image given; RandAugment alone)
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
    check_images(images)
    check_per_image("ops", ops, torch.long, images)
    check_per_image("negate", negate, torch.bool, images)
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
    check_images(images)
    check_generator(generator, images.device)
    if not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"num_ops must be an integer >= 0, got {num_ops!r}")
    check_magnitude(magnitude, num_magnitude_bins)
    batch, _, height, width = images.shape
    augment = batch_rand_augment(policy, height, width, images.device, num_ops, magnitude, num_magnitude_bins)
    out = augment.rand_augment(augment.extend(images), augment.draw(batch, generator))
    return out.to(torch.uint8).view(batch, 3, height, width)
