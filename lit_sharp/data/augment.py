"""Per-image training augmentation of the paper, reproducible from ``(seed, epoch, index)`` alone.

``augment=true`` is torchvision's ``RandAugment(num_ops=2, magnitude=14)``, then a random 32x32 crop of the image padded
by 4 pixels, then a horizontal flip (the order of the released code); ``augment=false`` is no augmentation at all.

torchvision's transforms draw from the global torch RNG. To make a run resumable bit for bit, every image's draws
come from a seed derived from ``(seed, epoch, index)`` inside ``torch.random.fork_rng``, so neither the worker layout
nor an interruption changes which augmentation an image gets, and the caller's RNG is left as it was.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from lit_sharp.constants import CIFAR10_MEAN, CIFAR10_STD
from lit_sharp.seeding import AUGMENT_STREAM, SHUFFLE_STREAM, derived_seed


def paper_augmentation(num_ops: int = 2, magnitude: int = 14) -> transforms.Compose:
    """RandAugment, then crop 32 with padding 4, then horizontal flip (PIL image in, PIL image out)."""
    return transforms.Compose(
        [
            transforms.RandAugment(num_ops=num_ops, magnitude=magnitude),
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
        ]
    )


def to_normalized_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(..., 32, 32, 3)`` HWC images -> float32 ``(..., 3, 32, 32)`` normalized with the CIFAR-10 constants."""
    x = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class AugmentedImages(torch.utils.data.Dataset):
    """Training images with the paper's augmentation, indexed by ``(epoch, index)`` pairs from :class:`EpochSampler`.

    Args:
        images: uint8 ``(N, 32, 32, 3)``.
        labels: int64 ``(N,)``.
        augment: apply :func:`paper_augmentation`; otherwise images are only normalized.
        seed: the run's seed, from which every image's augmentation draws are derived.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, augment: bool, seed: int) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = paper_augmentation() if augment else None
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


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)``: a permutation of the data set seeded by ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch (as for ``DistributedSampler``), so a run resumed at
    epoch ``e`` sees exactly the order (and, through :class:`AugmentedImages`, the augmentations) of an uninterrupted run.
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
        return ((self.epoch, index) for index in order)
