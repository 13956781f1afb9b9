"""Tests for the device pipeline (lit_sharp.data.device_augment, device_crop_flip, device_loader and
torchvision_randaugment) on CPU tensors: every RandAugment op against torchvision's own op image by image, crops and
flips against torchvision's pad/crop/hflip, normalization against the CPU path, the draws' distributions, the loader's
order and determinism, a real Lightning fit, and the absence of host-synchronising ops."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms import functional as tvf
from torchvision.transforms.autoaugment import _apply_op

from lit_sharp.data.augment import to_normalized_tensor
from lit_sharp.data.device_augment import apply_ops, rand_augment
from lit_sharp.data.device_crop_flip import crop_flip, random_crop_flip
from lit_sharp.data.device_loader import DeviceTrainLoader
from lit_sharp.data.torchvision_randaugment import OP_NAMES, SIGNED_OPS, op_magnitude
from lit_sharp.normalization import normalize
from lit_sharp.seeding import AUGMENT_STREAM, derived_seed

aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def random_images(batch: int, height: int = 32, width: int = 32, seed: int = 0, low: int = 0, high: int = 256):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, 3, height, width), dtype=torch.uint8, generator=generator)


def images_with_edge_cases(batch: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """Random images plus the cases where ops branch: constant, a 3-value range, one saturated channel."""
    images = random_images(batch, height, width)
    images[0] = 7
    images[1] = random_images(1, height, width, seed=1, low=100, high=103)[0]
    images[2, 0] = 255
    return images


def torchvision_op(images: torch.Tensor, op_name: str, magnitude: float) -> torch.Tensor:
    """torchvision's RandAugment op (nearest, fill None) applied to each image on its own."""
    return torch.stack([_apply_op(image, op_name, magnitude, InterpolationMode.NEAREST, None) for image in images])


def signed_magnitude(op_name: str, negate: bool, magnitude: int, bins: int, size: tuple[int, int]) -> float:
    """The magnitude torchvision's RandAugment.forward passes to the op (its own code path, step by step)."""
    values, signed = RandAugment()._augmentation_space(bins, size)[op_name]
    value = float(values[magnitude].item()) if values.ndim > 0 else 0.0
    return -value if negate and signed else value


class HostSyncDetector(TorchDispatchMode):
    """Records the ops that would make the host wait for a CUDA device, read off the ops dispatched on CPU tensors.

    On CUDA the host waits on: a device value read back (``.item()``, ``bool(t)``: ``_local_scalar_dense``); an op
    whose output size depends on values (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
    ``bincount``, ``repeat_interleave``); a copy between devices; and a tensor built from host data for the device
    (``torch.tensor(data, device=...)``, dispatched as ``lift_fresh``), since a pageable host-to-device copy
    synchronises the stream. One exception is modelled: ``t[bool_mask] = python_scalar`` keeps the scalar on the
    host and ATen lowers it to ``masked_fill_`` (``canDispatchToMaskedFill``), which does not synchronise.
    """

    SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.bincount.default, aten.equal.default, aten.is_nonzero.default, aten._unique2.default,
               aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
               aten.allclose.default}

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self._host_values: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.SYNCING:
            self.events.append(str(func))
        elif func is aten.lift_fresh.default:
            self._host_values[id(out)] = out
        elif func is aten.index.Tensor and _has_bool_index(args[1]):
            self.events.append("boolean-mask read")
        elif func in (aten.index_put_.default, aten.index_put.default) and _has_bool_index(args[1]):
            value = args[2]
            if id(value) in self._host_values and value.numel() == 1:
                del self._host_values[id(value)]  # lowered to masked_fill_ with a host scalar
            else:
                self.events.append("boolean-mask write")
        elif func in (aten._to_copy.default, aten.copy_.default):
            source, target = (args[0], out) if func is aten._to_copy.default else (args[1], args[0])
            if source.device != target.device:
                self.events.append(f"copy {source.device} -> {target.device}")
        return out

    @property
    def syncs(self) -> list[str]:
        """Every synchronising event, counting host data that became a device tensor."""
        return self.events + [f"host data to device {tuple(t.shape)}" for t in self._host_values.values()]


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


# ---------------------------------------------------------------------------------------------
# RandAugment ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins, magnitude", [(31, 0), (31, 14), (31, 30), (11, 4)])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_magnitudes_are_torchvisions(bins, magnitude, size):
    space = RandAugment()._augmentation_space(bins, size)
    assert set(space) == set(OP_NAMES) and list(space) == list(OP_NAMES)
    assert {name for name, (_, signed) in space.items() if signed} == SIGNED_OPS
    for name, (values, _) in space.items():
        expected = float(values[magnitude].item()) if values.ndim > 0 else 0.0
        assert op_magnitude(name, magnitude, bins, size) == expected, name


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_each_op_and_sign_equals_torchvisions_op_image_by_image(op_name, negate):
    images = images_with_edge_cases(24)
    ops = torch.full((24,), OP_NAMES.index(op_name))
    out = apply_ops(images, ops, torch.full((24,), negate), policy="torchvision")
    expected = torchvision_op(images, op_name, signed_magnitude(op_name, negate, 14, 31, (32, 32)))
    assert torch.equal(out, expected)


def test_mixed_assignment_on_non_square_images_equals_torchvision_per_image():
    # Every image its own (op, sign), a magnitude other than the paper's, and H != W (TranslateX uses the width).
    images = images_with_edge_cases(56, height=24, width=40)
    generator = torch.Generator().manual_seed(3)
    ops = torch.arange(56) % len(OP_NAMES)
    negate = torch.randint(2, (56,), generator=generator).bool()
    out = apply_ops(images, ops, negate, policy="torchvision", magnitude=27, num_magnitude_bins=31)
    for i in range(56):
        name = OP_NAMES[int(ops[i])]
        expected = _apply_op(images[i], name, signed_magnitude(name, bool(negate[i]), 27, 31, (24, 40)),
                             InterpolationMode.NEAREST, None)
        assert torch.equal(out[i], expected), (i, name, bool(negate[i]))


def test_rand_augment_draws_ops_uniformly_and_signs_with_probability_one_half():
    # Which (op, sign) each image got is read off the output: with mid-range noise images every variant gives a
    # different image, so exactly one variant matches.
    batch = 1400
    images = random_images(batch, low=20, high=236)
    out = rand_augment(images, torch.Generator().manual_seed(0), num_ops=1, policy="torchvision")
    variants = [(name, negate) for name in OP_NAMES for negate in ((False, True) if name in SIGNED_OPS else (False,))]
    outputs = [torchvision_op_batched(images, name, signed_magnitude(name, negate, 14, 31, (32, 32)))
               for name, negate in variants]
    matches = torch.stack([(out == output).flatten(1).all(1) for output in outputs], dim=1)  # (B, variants)
    assert torch.equal(matches.sum(1), torch.ones(batch, dtype=torch.long))
    chosen = [variants[int(k)] for k in matches.long().argmax(1)]
    op_counts = np.array([sum(name == op for name, _ in chosen) for op in OP_NAMES])
    assert stats.chisquare(op_counts).pvalue > 1e-4, op_counts
    signs = [negate for name, negate in chosen if name in SIGNED_OPS]
    assert stats.binomtest(sum(signs), len(signs), 0.5).pvalue > 1e-4


def torchvision_op_batched(images: torch.Tensor, op_name: str, magnitude: float) -> torch.Tensor:
    # torchvision's op on the whole batch at once; each image is treated alone (the per-image test above shows it).
    return _apply_op(images, op_name, magnitude, InterpolationMode.NEAREST, None)


def test_rand_augment_is_deterministic_per_generator_seed_and_composes_num_ops():
    images = random_images(64)
    first = rand_augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, rand_augment(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, rand_augment(images, torch.Generator().manual_seed(6)))
    assert torch.equal(rand_augment(images, torch.Generator(), num_ops=0), images)
    # Two ops = the same draws replayed as two single-op passes.
    generator = torch.Generator().manual_seed(5)
    twice = rand_augment(rand_augment(images, generator, num_ops=1), generator, num_ops=1)
    assert torch.equal(first, twice)


# ---------------------------------------------------------------------------------------------
# Crop, flip, normalization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, padding", [(32, 32, 4), (24, 40, 3)])
def test_crop_flip_equals_torchvisions_pad_crop_and_hflip(height, width, padding):
    images = random_images(40, height, width)
    generator = torch.Generator().manual_seed(1)
    top = torch.randint(2 * padding + 1, (40,), generator=generator)
    left = torch.randint(2 * padding + 1, (40,), generator=generator)
    flip = torch.rand(40, generator=generator) < 0.5
    out = crop_flip(images, top, left, flip, padding)
    for i in range(40):
        expected = tvf.crop(tvf.pad(images[i], [padding]), int(top[i]), int(left[i]), height, width)
        assert torch.equal(out[i], tvf.hflip(expected) if flip[i] else expected), i


def test_random_crop_flip_draws_every_offset_and_flips_half_the_images():
    # Each output is matched against all (2p+1)^2 x 2 crops that torchvision could produce: noise images make the
    # match unique, and the matched parameters give the draws' distributions.
    batch, padding = 900, 4
    images = random_images(batch, low=1)
    out = random_crop_flip(images, torch.Generator().manual_seed(2), padding=padding)
    padded = tvf.pad(images, [padding])
    found = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = tvf.crop(padded, top, left, 32, 32)
            for flip, candidate in ((False, crop), (True, tvf.hflip(crop))):
                hit = (out == candidate).flatten(1).all(1)
                found += [(int(i), top, left, flip) for i in torch.nonzero(hit).flatten()]
    assert sorted(i for i, *_ in found) == list(range(batch))
    tops, lefts, flips = (np.array([f[k] for f in found]) for k in (1, 2, 3))
    for offsets in (tops, lefts):
        counts = np.bincount(offsets, minlength=2 * padding + 1)
        assert len(counts) == 2 * padding + 1 and stats.chisquare(counts).pvalue > 1e-4, counts
    assert stats.binomtest(int(flips.sum()), batch, 0.5).pvalue > 1e-4


def test_normalize_equals_the_cpu_paths_normalization():
    images_hwc = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    images = torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()
    out = normalize(images)
    assert out.dtype == torch.float32
    assert torch.equal(out, to_normalized_tensor(images_hwc))


@pytest.mark.parametrize("call, message", [
    (lambda: rand_augment(random_images(2).float(), torch.Generator()), "uint8"),
    (lambda: rand_augment(random_images(2)[:, :1], torch.Generator()), r"\(B, 3, H, W\)"),
    (lambda: rand_augment(random_images(2), torch.Generator(), magnitude=31), "magnitude"),
    (lambda: rand_augment(random_images(2), torch.Generator(), num_ops=-1), "num_ops"),
    (lambda: rand_augment(random_images(2), torch.Generator(), num_magnitude_bins=1), "num_magnitude_bins"),
    (lambda: rand_augment(random_images(2), 0), "torch.Generator"),
    (lambda: apply_ops(random_images(2), torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.bool)), "ops"),
    (lambda: apply_ops(random_images(2), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool)), "ops"),
    (lambda: random_crop_flip(random_images(2), torch.Generator(), padding=-1), "padding"),
    (lambda: crop_flip(random_images(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                       torch.zeros(2)), "flip"),
    (lambda: normalize(random_images(2).float()), "uint8"),
    (lambda: op_magnitude("Invert", 14, 31, (32, 32)), "op_name"),
])
def test_bad_arguments_raise_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# Host synchronisation
# ---------------------------------------------------------------------------------------------


def test_sync_detector_flags_torchvisions_syncing_kernels_and_spares_masked_fill():
    images = random_images(4)
    for call in (lambda: images.sum().item(), lambda: images[images > 3], lambda: torch.tensor([1.0, 2.0]),
                 lambda: tvf.affine(images, angle=0.0, translate=[3, 0], scale=1.0, shear=[0.0, 0.0]),
                 lambda: tvf.adjust_sharpness(images, 1.4), lambda: tvf.equalize(images)):
        with HostSyncDetector() as detector:
            call()
        assert detector.syncs, call
    with HostSyncDetector() as detector:
        tvf.autocontrast(images)  # `minimum[eq_idxs] = 0`: a masked fill with a host scalar
    assert detector.syncs == []


def test_augmentation_and_loader_steps_have_no_host_sync():
    images = random_images(32)
    generator = torch.Generator().manual_seed(0)
    rand_augment(images, generator)  # builds the cached pixel maps and kernels once
    normalize(images)
    with HostSyncDetector() as detector:
        normalize(random_crop_flip(rand_augment(images, generator), generator))
    assert detector.syncs == []

    images_hwc = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    loader = DeviceTrainLoader(images_hwc, np.arange(40) % 10, batch_size=16, augment=True, seed=0, device="cpu")
    with HostSyncDetector() as detector:
        batches = iter(loader)
        next(batches)
        next(batches)
    assert detector.syncs == []


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------


def small_set(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n)


def test_batches_cover_the_epochs_permutation_exactly_once():
    images, labels = small_set(50)  # label i = index i, so the labels show which images came
    loader = DeviceTrainLoader(images, labels, batch_size=16, augment=False, seed=3, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    order = torch.cat([y for _, y in batches])
    assert torch.equal(order, loader.sampler.permutation())
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (len(y), 3, 32, 32)
        assert torch.equal(x, to_normalized_tensor(images[y.numpy()]))

    dropped = DeviceTrainLoader(images, labels, batch_size=16, augment=False, seed=3, device="cpu", drop_last=True)
    assert len(dropped) == 3 and [len(y) for _, y in dropped] == [16, 16, 16]


def test_same_seed_and_epoch_replay_the_same_batches_and_epochs_differ():
    images, labels = small_set(40)

    def epoch_batches(loader, epoch):
        loader.set_epoch(epoch)
        return list(loader)

    loader = DeviceTrainLoader(images, labels, batch_size=16, augment=True, seed=7, device="cpu")
    again = DeviceTrainLoader(images, labels, batch_size=16, augment=True, seed=7, device="cpu")
    epoch0, epoch1 = epoch_batches(loader, 0), epoch_batches(loader, 1)
    for first, second in zip(epoch0, epoch_batches(again, 0)):
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for first, second in zip(epoch0, epoch_batches(loader, 0)):
        assert torch.equal(first[0], second[0])
    assert not torch.equal(torch.cat([y for _, y in epoch0]), torch.cat([y for _, y in epoch1]))
    other_seed = epoch_batches(DeviceTrainLoader(images, labels, batch_size=16, augment=True, seed=8, device="cpu"), 0)
    assert not torch.equal(epoch0[0][0], other_seed[0][0])


def test_augmented_batches_are_rand_augment_then_crop_flip_then_normalize():
    # The paper's order, drawn from one generator seeded by (AUGMENT_STREAM, seed, epoch).
    images, labels = small_set(40)
    loader = DeviceTrainLoader(images, labels, batch_size=16, augment=True, seed=4, device="cpu")
    loader.set_epoch(2)
    generator = torch.Generator().manual_seed(derived_seed(AUGMENT_STREAM, 4, 2))
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    for x, y in loader:
        expected = normalize(random_crop_flip(rand_augment(chw[y].contiguous(), generator), generator))
        assert torch.equal(x, expected)


def test_an_iteration_reads_the_epoch_at_its_first_batch_and_channels_last_is_honoured():
    # As a DataLoader reads its sampler: a resuming Lightning calls iter() first, then set_epoch(resumed epoch).
    images, labels = small_set(32)
    loader = DeviceTrainLoader(images, labels, batch_size=8, augment=True, seed=0, device="cpu", channels_last=True)
    loader.set_epoch(5)
    reference = [y for _, y in loader]
    loader.set_epoch(0)
    batches = iter(loader)
    loader.set_epoch(5)
    replayed = [(x, y) for x, y in batches]
    assert all(torch.equal(a, b) for a, b in zip(reference, (y for _, y in replayed)))
    loader.set_epoch(0)
    assert not torch.equal(torch.cat(reference), torch.cat([y for _, y in loader]))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in replayed)


@pytest.mark.parametrize("kwargs, message", [
    ({"images": np.zeros((4, 32, 32, 3), dtype=np.float32)}, "images"),
    ({"images": np.zeros((4, 3, 32, 32), dtype=np.uint8)}, "images"),
    ({"labels": np.arange(3)}, "labels"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"batch_size": 8, "drop_last": True}, "drop_last"),
])
def test_loader_rejects_bad_arguments_naming_them(kwargs, message):
    arguments = {"images": np.zeros((4, 32, 32, 3), dtype=np.uint8), "labels": np.arange(4), "batch_size": 2,
                 "augment": True, "seed": 0, "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=message):
        DeviceTrainLoader(**arguments)


@pytest.mark.parametrize("epoch", [-1, 1.5, None])
def test_set_epoch_rejects_what_is_not_an_epoch(epoch):
    loader = DeviceTrainLoader(*small_set(4), batch_size=2, augment=False, seed=0, device="cpu")
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(epoch)


class _TinyClassifier(pl.LightningModule):
    def __init__(self, loader: DeviceTrainLoader) -> None:
        super().__init__()
        self.loader = loader
        self.layer = torch.nn.Linear(3 * 32 * 32, len(loader.images))  # labels are image indices here
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(y.clone())
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return self.loader


def test_lightning_trains_on_it_and_sets_the_epoch():
    images, labels = small_set(16)
    loader = DeviceTrainLoader(images, labels, batch_size=8, augment=True, seed=0, device="cpu")
    module = _TinyClassifier(loader)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert trainer.global_step == 3
    assert loader.sampler.epoch == 1  # two batches an epoch: the third step is epoch 1's first
    loader.set_epoch(0)
    expected = [y for _, y in loader]
    loader.set_epoch(1)
    expected.append(next(iter(loader))[1])
    assert len(module.seen) == 3 and all(torch.equal(a, b) for a, b in zip(module.seen, expected))
