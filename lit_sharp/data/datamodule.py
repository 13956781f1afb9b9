"""CIFAR-10 as a ``LightningDataModule``: the training stream and the fixed evaluation sets of the study."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_sharp.data.augment import RANDAUGMENTS, AugmentedImages, EpochSampler, to_normalized_tensor
from lit_sharp.data.device_loader import DeviceTrainLoader
from lit_sharp.data.position import ResumableDataLoader
from lit_sharp.data.reading import load_cifar10
from lit_sharp.data.synthetic import ensure_synthetic, is_synthetic


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 with the paper's normalization and augmentation (docs/protocol.md sections 1, 2 and 4).

    Loaders:
        ``train_dataloader``: all training images in a seeded order, augmented when ``augment`` is on.
        ``clean_train_dataloader``: the first ``clean_train_size`` training images, no augmentation (clean training error).
        ``test_dataloader``: the test images (also ``val_dataloader``, evaluated every ``check_val_every_n_epoch``).
        ``sharpness_dataloader``: the first ``sharpness_size`` training images in dataset order, no augmentation,
        batches of ``sharpness_batch_size``, never shuffled: the data of every sharpness measurement.

    Args:
        root: folder holding ``cifar-10-batches-py`` (and ``CIFAR-10-C`` for the corruption error).
        download: fetch CIFAR-10 into ``root`` if it is missing (needs internet).
        synthetic: write (on first use) and read the small synthetic data set of :mod:`lit_sharp.data.synthetic` in ``root``.
        augment: RandAugment(2, 14), crop 32 with padding 4 and horizontal flip on training images.
        randaugment: which RandAugment: ``paper`` (the released code's 16-op policy, default) or ``torchvision``.
        batch_size: training batch size.
        eval_batch_size: batch size of the clean-train and test loaders.
        num_workers: DataLoader worker processes for the training loader.
        seed: seeds the data order and every image's augmentation.
        clean_train_size: images of the clean training error (10,000 in the paper).
        sharpness_size: images of the sharpness measurement (1,024 in the paper).
        sharpness_batch_size: batch size m of the sharpness measurement (128 in the paper).
        drop_last: drop the last incomplete training batch.
        pipeline: where training batches are made. ``workers``: DataLoader worker processes (PIL augmentation, per-image
            seeds); ``device``: the whole training set resident on the training device, batches sliced and augmented
            there (:mod:`lit_sharp.data.device_loader`); ``auto``: ``device`` when training on a GPU, else ``workers``.
        channels_last: with the device pipeline, hand out batches in ``channels_last`` memory format.
    """

    PIPELINES = ("auto", "workers", "device")

    def __init__(
        self,
        root: str | Path = "data",
        *,
        download: bool = False,
        synthetic: bool = False,
        augment: bool = False,
        randaugment: str = "paper",
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        seed: int = 0,
        clean_train_size: int = 10_000,
        sharpness_size: int = 1024,
        sharpness_batch_size: int = 128,
        drop_last: bool = False,
        pipeline: str = "auto",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if pipeline not in self.PIPELINES:
            raise ValueError(f"pipeline must be one of {self.PIPELINES}, got {pipeline!r}")
        if randaugment not in RANDAUGMENTS:
            raise ValueError(f"randaugment must be one of {RANDAUGMENTS}, got {randaugment!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("clean_train_size", clean_train_size), ("sharpness_size", sharpness_size),
                            ("sharpness_batch_size", sharpness_batch_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = Path(root).expanduser()
        self.download = download
        self.synthetic = synthetic
        self.augment = augment
        self.randaugment = randaugment
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.clean_train_size = clean_train_size
        self.sharpness_size = sharpness_size
        self.sharpness_batch_size = sharpness_batch_size
        self.drop_last = drop_last
        self.pipeline = pipeline
        self.channels_last = channels_last
        self._train: tuple[np.ndarray, np.ndarray] | None = None
        self._test: tuple[np.ndarray, np.ndarray] | None = None

    def prepare_data(self) -> None:
        if self.synthetic:
            self._write_synthetic_once()
        elif self.download and self._train is None:  # setup() may have downloaded and loaded it already
            load_cifar10(self.root, train=True, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.synthetic:
            self._write_synthetic_once()
        if self._train is None:
            self._train = load_cifar10(self.root, train=True, download=self.download)
        if self._test is None:
            self._test = load_cifar10(self.root, train=False, download=self.download)

    def _write_synthetic_once(self) -> None:
        # An existing synthetic folder is used whatever its size (tests write small ones).
        if not is_synthetic(self.root):
            ensure_synthetic(self.root)

    @property
    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(N, 32, 32, 3)`` training images and their labels, in dataset order."""
        if self._train is None:
            self.setup()
        return self._train

    @property
    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(N, 32, 32, 3)`` test images and their labels."""
        if self._test is None:
            self.setup()
        return self._test

    def train_dataloader(self) -> ResumableDataLoader | DeviceTrainLoader:
        images, labels = self.train_arrays
        device = self._training_device()
        if self.pipeline == "device" or (self.pipeline == "auto" and device.type == "cuda"):
            return DeviceTrainLoader(images, labels, batch_size=self.batch_size, augment=self.augment, seed=self.seed,
                                     device=device, drop_last=self.drop_last, channels_last=self.channels_last,
                                     randaugment=self.randaugment)
        dataset = AugmentedImages(images, labels, augment=self.augment, seed=self.seed, randaugment=self.randaugment)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), seed=self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=self.drop_last,
        )

    def _training_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def clean_train_dataloader(self) -> DataLoader:
        images, labels = self.train_arrays
        return _eval_loader(images[: self.clean_train_size], labels[: self.clean_train_size], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return _eval_loader(*self.test_arrays, self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        """The test set, no augmentation: the per-epoch test-error curve (``val/err``); ``final/test_err`` is separate."""
        return self.test_dataloader()

    def sharpness_dataloader(self) -> DataLoader:
        images, labels = self.train_arrays
        return _eval_loader(images[: self.sharpness_size], labels[: self.sharpness_size], self.sharpness_batch_size)


def _eval_loader(images: np.ndarray, labels: np.ndarray, batch_size: int) -> DataLoader:
    # Evaluation sets are small and never augmented: normalize once, then slice tensors in order.
    dataset = TensorDataset(to_normalized_tensor(images), torch.as_tensor(labels, dtype=torch.long))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
