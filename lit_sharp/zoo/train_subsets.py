"""The two fixed subsets of the ImageNet training folder: 10,000 images for the training error (the paper's
generalization gap, App. B) and 2,048 images in 8 batches of 256 for sharpness (App. C), both without augmentation.

The choice is deterministic and the same for every model: the training images in ImageFolder order (class folders
sorted, files sorted within each), permuted by ``torch.randperm`` with a generator seeded with
:data:`SUBSET_SEED`; the training-error subset is the first 10,000 of that permutation and the sharpness images are
its first 2,048, so every model of a zoo is measured on the same images.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lit_sharp.errors import DataError
from lit_sharp.zoo.eval_sets import image_dataset

#: The seed of the permutation both subsets are cut from.
SUBSET_SEED = 0
#: Images of the training-error subset (``final/train_err``).
TRAIN_ERROR_IMAGES = 10_000
#: Sharpness data: batches and batch size of the paper's ImageNet protocol (2,048 images).
SHARPNESS_BATCHES = 8
SHARPNESS_BATCH_SIZE = 256


def fixed_indices(n_images: int, size: int) -> list[int]:
    """The first ``size`` indices of the seeded permutation of ``range(n_images)`` (all of them if fewer)."""
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n_images, generator=generator)[:size].tolist()


def train_error_subset(train_folder: Path, data_config: Mapping[str, Any], size: int = TRAIN_ERROR_IMAGES) -> Subset:
    """The fixed training-error subset of the 1000-class training folder, with the model's eval transform."""
    dataset = image_dataset(Path(train_folder), data_config)
    return Subset(dataset, fixed_indices(len(dataset), size))


def sharpness_batches(
    train_folder: Path,
    data_config: Mapping[str, Any],
    *,
    n_batches: int = SHARPNESS_BATCHES,
    batch_size: int = SHARPNESS_BATCH_SIZE,
    num_workers: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """The sharpness data: ``n_batches`` batches of ``batch_size`` fixed training images, decoded once.

    Every spec of a zoo run reads the same batches, so they are decoded once and kept in memory (8 x 256 images
    at 224 x 224 take 1.2 GB in float32).

    Raises:
        DataError: the training folder holds fewer than ``n_batches * batch_size`` images.
    """
    dataset = image_dataset(Path(train_folder), data_config)
    needed = n_batches * batch_size
    if len(dataset) < needed:
        raise DataError(f"{train_folder} holds {len(dataset)} images; sharpness needs {needed}")
    subset = Subset(dataset, fixed_indices(len(dataset), needed))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    return [(x, y) for x, y in loader]
