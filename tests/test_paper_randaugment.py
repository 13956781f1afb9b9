"""The released code's RandAugment: its PIL ops against pixel arithmetic written from each op's definition (the
geometric ops against PIL's affine transform with explicit resampling and fill), the batched device pass against the
PIL ops, the draws' distributions, and the device pass's fixed op count and absence of host synchronisation."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from lit_sharp.data.augment import (
    CUTOUT_FILL,
    PAPER_OPS,
    AugmentedImages,
    PaperRandAugment,
    paper_augmentation,
    paper_op_value,
)
from lit_sharp.data.device_augment import (
    PAPER_OP_NAMES,
    POLICY_OPS,
    BatchRandAugment,
    apply_ops,
    batch_rand_augment,
    rand_augment,
)
from lit_sharp.data.device_loader import DeviceTrainLoader

CPU = torch.device("cpu")
SIGNED = [name for name in PAPER_OP_NAMES if PAPER_OPS[name][3]]


pytestmark = pytest.mark.usefixtures("one_thread")


def noise_images(batch: int, height: int = 32, width: int = 32, seed: int = 0, low: int = 0, high: int = 256):
    """uint8 (B, 3, H, W) noise plus the cases where ops branch: a constant image, a 3-value one, a full channel."""
    images = torch.randint(low, high, (batch, 3, height, width), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    images[0] = 7
    images[1] = torch.randint(100, 103, (3, height, width), generator=torch.Generator().manual_seed(seed + 1))
    images[2, 0] = 255
    return images


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def cutout_at(image: Image.Image, x0: int, y0: int, size: float) -> Image.Image:
    """The released code's cutout once its corner is known."""
    width, height = image.size
    painted = image.copy()
    ImageDraw.Draw(painted).rectangle((x0, y0, min(width, x0 + size), min(height, y0 + size)), CUTOUT_FILL)
    return painted


def pil_op(image: Image.Image, name: str, negate: bool, magnitude: int = 14, corner=(0, 0)) -> Image.Image:
    """The CPU policy's op ``name`` with a given sign (and cutout corner (row, col))."""
    op, _, _, signed = PAPER_OPS[name]
    value = paper_op_value(name, magnitude)
    if name == "Cutout":
        return cutout_at(image, corner[1], corner[0], value)
    return op(image, -value if signed and negate else value)


# ---------------------------------------------------------------------------------------------
# The PIL ops against their definitions
# ---------------------------------------------------------------------------------------------


def test_values_at_magnitude_14_are_the_released_codes():
    # m / 30 * (max - min) + min, computed by hand.
    expected = {"Rotate": 14.0, "Posterize": 28 / 15, "Solarize": 256 * 14 / 30, "SolarizeAdd": 110 * 14 / 30,
                "Color": 0.94, "Contrast": 0.94, "Brightness": 0.94, "Sharpness": 0.94, "ShearX": 0.14,
                "ShearY": 0.14, "Cutout": 40 * 14 / 30, "TranslateX": 100 * 14 / 30, "TranslateY": 100 * 14 / 30}
    for name, value in expected.items():
        assert paper_op_value(name, 14) == pytest.approx(value, abs=1e-12), name
    assert len(PAPER_OPS) == 16 and set(SIGNED) == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


# Pixel arithmetic written from each op's definition (Pillow's documented formulas, with the integer and
# single-precision rounding its C code applies); none of it calls the PIL function under test.


def _luminance(array: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L: L = R * 299/1000 + G * 587/1000 + B * 114/1000, in 16-bit fixed point (the weights
    19595, 38470, 7471 sum to 65536), rounded to nearest with halves up."""
    array = array.astype(np.int64)
    return (array[..., 0] * 19595 + array[..., 1] * 38470 + array[..., 2] * 7471 + 0x8000) >> 16


def _blend(degenerate: np.ndarray, array: np.ndarray, factor: float) -> np.ndarray:
    """ImageEnhance's ``Image.blend(degenerate, image, factor)``: ``deg + factor * (x - deg)``, which Pillow computes
    in single precision (its factor is a C float) and truncates, clipping to [0, 255] when it extrapolates
    (factor > 1). Computed in float64, up to one (degenerate, pixel) pair in 120 would land on the other side of an
    integer at some magnitudes' factors."""
    difference = (array.astype(np.int64) - degenerate.astype(np.int64)).astype(np.float32)
    blended = degenerate.astype(np.float32) + np.float32(factor) * difference
    return np.clip(np.trunc(blended), 0, 255).astype(np.uint8)


def _smooth(array: np.ndarray) -> np.ndarray:
    """ImageFilter.SMOOTH: the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 rounded to nearest, the one-pixel
    border kept as it is. ``S / 13 + 1/2 = (2 S + 13) / 26`` is never within 1/26 of an integer, so Pillow's float
    sum and this integer division cannot round differently."""
    x = array.astype(np.int64)
    height, width = x.shape[:2]
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
    total = sum(kernel[i, j] * x[i:i + height - 2, j:j + width - 2] for i in range(3) for j in range(3))
    smoothed = x.copy()
    smoothed[1:-1, 1:-1] = (2 * total + 13) // 26
    return smoothed


def _degenerate(name: str, array: np.ndarray) -> np.ndarray:
    """The image each ImageEnhance op blends with: black, the grey image, the mean grey, the smoothed image."""
    if name == "Brightness":
        return np.zeros_like(array)
    if name == "Color":
        return np.repeat(_luminance(array)[..., None], 3, axis=2)
    if name == "Contrast":
        # ImageStat's mean of the L image, rounded as int(mean + 0.5).
        return np.full_like(array, int(_luminance(array).mean() + 0.5))
    return _smooth(array)


def _autocontrast(array: np.ndarray) -> np.ndarray:
    """ImageOps.autocontrast (cutoff 0): each channel mapped linearly from [min, max] onto [0, 255], truncated;
    a constant channel is left as it is."""
    out = array.astype(np.int64)
    for channel in np.moveaxis(out, -1, 0):
        low, high = channel.min(), channel.max()
        if high > low:
            channel[...] = (channel - low) * 255 // (high - low)
    return out


def _autocontrast_slack(array: np.ndarray) -> np.ndarray:
    """Where PIL's autocontrast may give one level less than :func:`_autocontrast`: Pillow evaluates
    ``v * s + (-low * s)`` with ``s = 255 / (high - low)`` in double precision and truncates, so where
    ``(v - low) * 255 / (high - low)`` is a whole number the double can fall just below it."""
    array = array.astype(np.int64)
    low, high = array.min(axis=(0, 1)), array.max(axis=(0, 1))
    return ((high > low) & ((array - low) * 255 % np.maximum(high - low, 1) == 0)).astype(np.int64)


def _equalize(array: np.ndarray) -> np.ndarray:
    """ImageOps.equalize, per channel: ``step = (pixels - count of the top value) // 255``; value ``v`` becomes
    ``(step // 2 + number of pixels below v) // step``, at most 255; identity when ``step`` is 0 or the channel
    is constant."""
    out = array.astype(np.int64)
    for channel in np.moveaxis(out, -1, 0):
        counts = np.bincount(channel.ravel(), minlength=256)
        step = (channel.size - counts[channel.max()]) // 255
        if step:
            below = np.cumsum(counts) - counts
            channel[...] = np.minimum((step // 2 + below[channel]) // step, 255)
    return out


def _pixel_definition(name: str, array: np.ndarray, value: float) -> np.ndarray:
    """Op ``name`` at ``value`` on an (H, W, 3) uint8 array, from its definition."""
    array = array.astype(np.int64)
    if name == "Invert":
        return 255 - array
    if name == "Posterize":
        bits = max(1, int(value))
        return array & (0xFF << (8 - bits)) & 0xFF
    if name == "Solarize":
        return np.where(array < value, array, 255 - array)
    if name == "SolarizeAdd":
        shifted = np.minimum(np.floor(array + value), 255).astype(np.int64)
        return np.where(shifted < 128, shifted, 255 - shifted)
    if name == "AutoContrast":
        return _autocontrast(array)
    if name == "Equalize":
        return _equalize(array)
    return _blend(_degenerate(name, array), array, value)


PIXEL_OPS = ["AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
             "Brightness", "Sharpness"]


def _equals_definition(name: str, image: Image.Image, out: Image.Image, value: float) -> bool:
    """Whether ``out`` is op ``name`` at ``value`` applied to ``image``: PIL's affine transform with explicit
    nearest-neighbour resampling and black fill for the geometric ops, pixel arithmetic for the others (exact,
    up to AutoContrast's double rounding, :func:`_autocontrast_slack`)."""
    out = np.asarray(out).astype(np.int64)
    nearest, black = Image.Resampling.NEAREST, (0, 0, 0)
    affine = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
              "TranslateX": (1, 0, value, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, value)}
    if name in affine:
        expected = image.transform(image.size, Image.Transform.AFFINE, affine[name], resample=nearest,
                                   fillcolor=black)
        return np.array_equal(out, np.asarray(expected))
    if name == "Rotate":
        return np.array_equal(out, np.asarray(image.rotate(value, resample=nearest, expand=False, fillcolor=black)))
    array = np.asarray(image)
    shortfall = _pixel_definition(name, array, value) - out
    slack = _autocontrast_slack(array) if name == "AutoContrast" else 0
    return bool(((shortfall >= 0) & (shortfall <= slack)).all())


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("name", [name for name in PAPER_OP_NAMES if name != "Cutout"])
def test_each_pil_op_equals_its_definition(name, negate):
    value = paper_op_value(name, 14)
    value = -value if negate and PAPER_OPS[name][3] else value
    for image in noise_images(6):
        image = to_pil(image)
        assert _equals_definition(name, image, pil_op(image, name, negate), value)


@pytest.mark.parametrize("magnitude", [0, 27, 30])
def test_pixel_ops_equal_their_definitions_at_other_magnitudes_and_sizes(magnitude):
    # Factors 0.1, 1.72 and 1.9 (PIL extrapolates and clips), posterize 1, 3 and 4 bits, solarize at 0, 230.4
    # and 256; the 8x12 images have fewer than 255 pixels below their top value, equalize's identity branch.
    images = [*noise_images(6, height=24, width=40, seed=7), *noise_images(4, height=8, width=12, seed=8)]
    for name in PIXEL_OPS:
        value = paper_op_value(name, magnitude)
        for image in map(to_pil, images):
            assert _equals_definition(name, image, pil_op(image, name, False, magnitude), value), name


def test_the_pixel_definitions_are_not_vacuous():
    # Every op changes mid-range noise (full-range noise would be a fixed point of AutoContrast), each its own way.
    array = noise_images(4, low=20, high=236)[3].permute(1, 2, 0).numpy()
    outputs = {name: _pixel_definition(name, array, paper_op_value(name, 14)) for name in PIXEL_OPS}
    assert all(not np.array_equal(out, array) for out in outputs.values())
    assert len({out.tobytes() for out in outputs.values()}) == len(PIXEL_OPS)


def test_translations_move_the_whole_image_out_of_the_frame_and_rotate_keeps_the_centre():
    image = to_pil(noise_images(4, low=1)[3])
    for name in ("TranslateX", "TranslateY"):
        for negate in (False, True):
            assert not np.asarray(pil_op(image, name, negate)).any()
    rotated = np.asarray(pil_op(image, "Rotate", False))
    assert np.array_equal(rotated[16, 16], np.asarray(image)[16, 16]) and not rotated[0, 0].any()


def test_cutout_paints_a_square_of_19_pixels_at_the_released_codes_random_centre():
    # numpy.random.uniform(32) is uniform(low=32, high=1): the centre lies in (1, 32]; the corner is
    # int(max(0, c - 9.33)) and PIL paints 19 pixels from it (int(18.67) + 1), clipped by the image.
    image = to_pil(noise_images(4, low=0, high=100)[3])
    size = paper_op_value("Cutout", 14)
    corners = []
    for seed in range(300):
        torch.manual_seed(seed)
        u = torch.rand(2)
        torch.manual_seed(seed)
        out = np.asarray(PAPER_OPS["Cutout"][0](image, size)).astype(np.int64)
        x0, y0 = int(max(0.0, 32 - 31 * float(u[0]) - size / 2)), int(max(0.0, 32 - 31 * float(u[1]) - size / 2))
        expected = np.asarray(image).astype(np.int64).copy()
        expected[y0:y0 + 19, x0:x0 + 19] = CUTOUT_FILL
        assert np.array_equal(out, expected), seed
        corners.append(x0)
    corners = np.array(corners)
    # P(x0 = 0) = P(c < 10.33) = 9.33 / 31; corners 1..21 each 1 / 31; 22 with 0.67 / 31.
    assert corners.max() <= 22
    assert abs((corners == 0).mean() - (size / 2 - 0) / 31) < 4 * np.sqrt(0.3 * 0.7 / 300)


# ---------------------------------------------------------------------------------------------
# The device pass against the PIL ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("name", [name for name in PAPER_OP_NAMES if name != "Cutout"])
def test_each_device_op_equals_the_pil_op_bit_for_bit(name, negate):
    images = noise_images(16)
    out = apply_ops(images, torch.full((16,), PAPER_OP_NAMES.index(name)), torch.full((16,), negate), policy="paper")
    for i, image in enumerate(images):
        assert torch.equal(out[i], from_pil(pil_op(to_pil(image), name, negate))), i


def test_device_cutout_equals_pils_rectangle_at_every_corner():
    size = paper_op_value("Cutout", 14)
    last = int(32 - size / 2)  # 22
    rows, cols = torch.meshgrid(torch.arange(last + 1), torch.arange(last + 1), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    images = noise_images(len(rows))
    ops = torch.full((len(rows),), PAPER_OP_NAMES.index("Cutout"))
    out = apply_ops(images, ops, torch.zeros(len(rows), dtype=torch.bool), policy="paper", corner=(rows, cols))
    for i in range(len(rows)):
        expected = pil_op(to_pil(images[i]), "Cutout", False, corner=(int(rows[i]), int(cols[i])))
        assert torch.equal(out[i], from_pil(expected)), (int(rows[i]), int(cols[i]))


def test_mixed_ops_at_another_magnitude_on_non_square_images_equal_pil():
    # Magnitude 27: factors 1.72 (PIL's extrapolating blend, clipped), posterize 3 bits, shear 0.27, rotate 27.
    batch = 64
    images = noise_images(batch, height=24, width=40, seed=3)
    generator = torch.Generator().manual_seed(3)
    ops = torch.arange(batch) % len(PAPER_OP_NAMES)
    negate = torch.randint(2, (batch,), generator=generator).bool()
    rows, cols = torch.randint(0, 5, (batch,), generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    out = apply_ops(images, ops, negate, policy="paper", magnitude=27, corner=(rows, cols))
    for i in range(batch):
        name = PAPER_OP_NAMES[int(ops[i])]
        expected = pil_op(to_pil(images[i]), name, bool(negate[i]), 27, (int(rows[i]), int(cols[i])))
        assert torch.equal(out[i], from_pil(expected)), (i, name)


@pytest.mark.parametrize("policy", ["paper", "torchvision"])
def test_two_slots_equal_the_pil_ops_applied_in_the_drawn_order(policy):
    # The second op sees the first one's output, fill included (e.g. a translation then an inversion is white).
    augment = batch_rand_augment(policy, 32, 32, CPU)
    images = noise_images(96, seed=5)
    draws = augment.draw(96, torch.Generator().manual_seed(11))
    out = augment.rand_augment(augment.extend(images), draws).to(torch.uint8).view(96, 3, 32, 32)
    op, sign, row, col = (t.view(2, 96) for t in draws)
    if policy == "paper":
        for i in range(96):
            image = to_pil(images[i])
            for s in range(2):
                corner = (int(row[s, i]), int(col[s, i]))
                image = pil_op(image, PAPER_OP_NAMES[op[s, i]], bool(sign[s, i]), corner=corner)
            assert torch.equal(out[i], from_pil(image)), i
    else:
        once = apply_ops(images, op[0].clone(), sign[0].bool(), policy="torchvision")
        twice = apply_ops(once, op[1].clone(), sign[1].bool(), policy="torchvision")
        assert torch.equal(out, twice)


def test_the_loader_trains_on_the_chosen_policy():
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    for policy in ("paper", "torchvision"):
        loader = DeviceTrainLoader(images, np.arange(40), batch_size=16, augment=True, seed=4, device="cpu",
                                   randaugment=policy)
        assert loader.augmentation.policy == policy
    with pytest.raises(ValueError, match="randaugment"):
        DeviceTrainLoader(images, np.arange(40), batch_size=16, augment=True, seed=4, device="cpu", randaugment="x")


def test_the_datamodule_hands_the_policy_to_both_pipelines(synthetic_root):
    from lit_sharp.data import CIFAR10DataModule

    for policy in ("paper", "torchvision"):
        device = CIFAR10DataModule(synthetic_root, augment=True, randaugment=policy, pipeline="device")
        assert device.train_dataloader().augmentation.policy == policy
        workers = CIFAR10DataModule(synthetic_root, augment=True, randaugment=policy, pipeline="workers")
        first = workers.train_dataloader().dataset.transform.transforms[0]
        assert isinstance(first, PaperRandAugment) == (policy == "paper")
    with pytest.raises(ValueError, match="randaugment"):
        CIFAR10DataModule(synthetic_root, randaugment="torchvision-v2")


def test_the_cpu_path_uses_the_chosen_policy():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert isinstance(AugmentedImages(images, np.arange(2), augment=True, seed=0).transform.transforms[0],
                      PaperRandAugment)
    tv = AugmentedImages(images, np.arange(2), augment=True, seed=0, randaugment="torchvision").transform
    assert type(tv.transforms[0]).__name__ == "RandAugment"
    with pytest.raises(ValueError, match="randaugment"):
        paper_augmentation(randaugment="autoaugment")


# ---------------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------------

#: A translation (2 of 16 ops) empties the frame; a cutout after it paints a square on the black image.
BLANK_SHARE = 1 - (14 / 16) ** 2 - (2 / 16) * (1 / 16)


def _blank_share(images: np.ndarray) -> float:
    flat = images.reshape(len(images), -1)
    return float((flat == flat[:, :1]).all(1).mean())


def test_cpu_policy_blanks_the_share_of_images_the_protocol_says():
    n = 1500
    rng = np.random.default_rng(1)
    policy = PaperRandAugment()
    torch.manual_seed(0)
    out = np.stack([np.asarray(policy(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))))
                    for _ in range(n)])
    assert abs(_blank_share(out) - BLANK_SHARE) < 4 * np.sqrt(BLANK_SHARE * (1 - BLANK_SHARE) / n)
    assert 70 < out.mean() < 95  # the protocol's measurement: about 82 (127.5 before)


def test_device_policy_blanks_the_share_of_images_the_protocol_says():
    n = 2048
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = rand_augment(images, torch.Generator().manual_seed(0), policy="paper").numpy()
    assert abs(_blank_share(out) - BLANK_SHARE) < 4 * np.sqrt(BLANK_SHARE * (1 - BLANK_SHARE) / n)
    assert 70 < out.mean() < 95


def _which_variant(image: Image.Image, out: np.ndarray) -> set[tuple[str, bool]]:
    matches = set()
    for name in PAPER_OP_NAMES:
        if name == "Cutout":
            changed = (out != np.asarray(image)).any(2)
            if changed.any() and (out[changed] == CUTOUT_FILL).all():
                matches.add((name, False))
            continue
        for negate in (False, True) if PAPER_OPS[name][3] else (False,):
            if np.array_equal(np.asarray(pil_op(image, name, negate)), out):
                matches.add((name, negate))
    return matches


def test_cpu_policy_draws_ops_uniformly_and_signs_with_probability_one_half():
    # Which op each image got is read off the output (mid-range noise: every op changes the image its own way; the
    # four translations all give black, so they count as one class of probability 2/16).
    n = 800
    rng = np.random.default_rng(4)
    policy = PaperRandAugment(num_ops=1)
    torch.manual_seed(1)
    counts = collections.Counter()
    signs = []
    for _ in range(n):
        image = Image.fromarray(rng.integers(20, 236, (32, 32, 3), dtype=np.uint8))
        matches = _which_variant(image, np.asarray(policy(image)))
        names = {name for name, _ in matches}
        if names <= {"TranslateX", "TranslateY"} and names:
            counts["Translate"] += 1
            continue
        assert len(matches) == 1, matches
        (name, negate), = matches
        counts[name] += 1
        if name in SIGNED:
            signs.append(negate)
    classes = [name for name in PAPER_OP_NAMES if not name.startswith("Translate")] + ["Translate"]
    for name in classes:
        p = (2 if name == "Translate" else 1) / 16
        assert abs(counts[name] - n * p) < 4 * np.sqrt(n * p * (1 - p)), (name, counts)
    assert stats.binomtest(sum(signs), len(signs), 0.5).pvalue > 1e-4


@pytest.mark.parametrize("policy", ["paper", "torchvision"])
def test_device_draws_ops_uniformly_signs_with_one_half_and_corners_as_the_released_code(policy):
    n = 20000
    augment = batch_rand_augment(policy, 32, 32, CPU)
    op, sign, row, col = (t.flatten().numpy() for t in augment.draw(n, torch.Generator().manual_seed(5)))
    ops = len(POLICY_OPS[policy])
    counts = np.bincount(op, minlength=ops)
    p = 1 / ops
    assert len(counts) == ops and (np.abs(counts - 2 * n * p) < 4 * np.sqrt(2 * n * p * (1 - p))).all(), counts
    assert abs(sign.mean() - 0.5) < 4 * np.sqrt(0.25 / (2 * n))
    if policy == "paper":
        size = paper_op_value("Cutout", 14)
        # Corner k = int(max(0, c - size / 2)), c uniform on (1, 32]: P(0) = (size / 2) / 31, P(1..21) = 1 / 31,
        # P(22) = (32 - size / 2 - 22) / 31.
        expected = np.array([size / 2 / 31] + [1 / 31] * 21 + [(32 - size / 2 - 22) / 31])
        for corners in (row, col):
            freq = np.bincount(corners, minlength=23)
            assert len(freq) == 23
            assert (np.abs(freq - 2 * n * expected) < 4 * np.sqrt(2 * n * expected * (1 - expected))).all(), freq
    else:
        assert not row.any() and not col.any()


# ---------------------------------------------------------------------------------------------
# Launch count and host synchronisation
# ---------------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched (views, allocations and random draws included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(augment: BatchRandAugment, batch: int, seed: int) -> int:
    images = augment.extend(noise_images(batch, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    augment(images, generator)  # per-batch-size constants are made on the first call
    with OpCounter() as counter:
        augment(images, generator)
    return counter.total


def test_a_batch_is_augmented_in_at_most_120_ops_whatever_the_policy_and_draws():
    counts = {}
    for policy in ("paper", "torchvision"):
        augment = batch_rand_augment(policy, 32, 32, CPU)
        counts[policy] = count_ops(augment, 128, seed=0)
        assert counts[policy] <= 120, (policy, counts)
        # The same fixed sequence for any draws and batch size: nothing loops over ops, images or groups.
        assert count_ops(augment, 128, seed=1) == counts[policy]
        assert count_ops(augment, 37, seed=2) == counts[policy]
    # 16 ops or 14: the policy's size lives in its tables, not in the number of ops dispatched.
    assert abs(counts["paper"] - counts["torchvision"]) <= 4, counts


class HostReads(TorchDispatchMode):
    """The ops that read a tensor's values on the host, or size outputs by them (a device sync on CUDA)."""

    READING = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default",
               "aten.nonzero.default", "aten.masked_select.default", "aten.item.default", "aten.bincount.default",
               "aten.unique_dim.default", "aten._unique2.default", "aten.allclose.default", "aten.lift_fresh.default"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.READING or (str(func) == "aten.index.Tensor"
                                          and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.reads.append(str(func))
        if str(func) in ("aten._to_copy.default", "aten.copy_.default"):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len({t.device for t in tensors} | {kwargs.get("device", tensors[0].device) or tensors[0].device}) > 1:
                self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", ["paper", "torchvision"])
def test_the_device_pass_reads_nothing_back_on_the_host(policy):
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    loader = DeviceTrainLoader(images, np.arange(40), batch_size=16, augment=True, seed=0, device="cpu",
                               randaugment=policy)
    with HostReads() as detector:
        batches = iter(loader)
        next(batches)
        next(batches)
    assert detector.reads == []
    with HostReads() as detector:
        torch.tensor([1.0]).sum().item()
    assert detector.reads  # the detector does see host reads
