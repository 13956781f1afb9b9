"""The paper's training stream resident on the accelerator: shuffling, RandAugment, crop, flip and normalisation as a
fixed, short sequence of batched tensor ops.

The whole uint8 training set lives on the device (CIFAR-10: 150 MB) and every batch is sliced, augmented and
normalized there, with no worker processes and no host synchronisation: every random draw is a tensor op on a device
generator, and nothing reads a device value back to the host. The augmentation is that of
:mod:`lit_sharp.data.augment` (RandAugment with 2 ops at magnitude 14, ``paper`` or ``torchvision`` policy, then a
32x32 crop of the image padded by 4 pixels, then a horizontal flip) in distribution, not draw for draw: each image
draws its own ops, signs, cutout corner, offsets and flip, but from a device stream seeded by ``(seed, epoch)``
instead of the CPU path's per-image seeds.

The augmentation itself, and how it matches its CPU counterpart op for op, is :mod:`lit_sharp.data.device_augment`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lit_sharp.data.augment import RANDAUGMENTS
from lit_sharp.data.device_augment import batch_rand_augment
from lit_sharp.data.position import ResumableEpochs, resume_point
from lit_sharp.normalization import mean_std, normalize
from lit_sharp.seeding import AUGMENT_STREAM, SHUFFLE_STREAM, derived_seed


class DevicePermutationSampler(ResumableEpochs, torch.utils.data.Sampler[int]):
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
    paper's order, then normalisation, all in one :class:`~lit_sharp.data.device_augment.BatchRandAugment` pass
    whose draws come from one device generator seeded by ``derived_seed(AUGMENT_STREAM, seed, epoch)``; equal to
    :func:`~lit_sharp.data.device_augment.rand_augment`, then
    :func:`~lit_sharp.data.device_crop_flip.random_crop_flip` with that generator, then
    :func:`lit_sharp.normalization.normalize`; without ``augment``, :func:`~lit_sharp.normalization.normalize` alone.
    The same ``(seed, epoch)`` gives the same batches. Lightning accepts it as a train dataloader (any iterable with
    ``__len__``) and calls ``sampler.set_epoch`` every epoch.

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
        self._handed_out = 0
        self._generator: torch.Generator | None = None
        self._resumed_rng: torch.Tensor | None = None
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

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands (:mod:`lit_sharp.data.position`), with the augmentation generator's state."""
        state: dict[str, Any] = {"epoch": self.sampler.epoch, "batches": self._handed_out}
        if self._generator is not None:
            state["augment_rng"] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the batch after the last one handed out when ``state`` was taken, with the augmentation draws
        an uninterrupted epoch would make from there."""
        epoch, skip = resume_point(state, len(self))
        self.sampler.set_epoch(epoch)
        self.sampler.resume_at(epoch, skip * self.batch_size)
        self._resumed_rng = state.get("augment_rng") if skip else None
        self._handed_out = skip

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.sampler.permutation()
        first = self.sampler.iteration_start()
        self._handed_out = first // self.batch_size
        self._generator = generator = None
        if self.augment:
            seed = derived_seed(AUGMENT_STREAM, self.seed, self.sampler.epoch)
            self._generator = generator = torch.Generator(device=self.device).manual_seed(seed)
            if first and self._resumed_rng is not None:
                generator.set_state(self._resumed_rng)
        self._resumed_rng = None
        for start in range(first, len(self) * self.batch_size, self.batch_size):
            self._handed_out += 1
            index = order[start:start + self.batch_size]
            images = self.images.index_select(0, index)
            x = normalize(images) if generator is None else self.augmentation(images, generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, index)
