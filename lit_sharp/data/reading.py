"""Reading CIFAR-10 from ``cifar-10-batches-py`` with torchvision, with errors that name the folder or the file.

torchvision's ``CIFAR10`` checks the md5 of every batch file against the official release before it reads anything.
Files written by :mod:`lit_sharp.data.synthetic` can never pass that check, so a folder the project itself marked as
synthetic is read by the same code path with the checksum relaxed; real data keeps torchvision's check untouched.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from lit_sharp.data.synthetic import is_synthetic
from lit_sharp.errors import DataError

DOWNLOAD_HINT = "set data.download=true on a machine that is online, or place the extracted `cifar-10-batches-py` folder there"


class _SyntheticCIFAR10(CIFAR10):
    """torchvision's reader minus the md5 check, for folders marked as written by ``lit_sharp.data.synthetic``."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root, self.base_folder)
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as handle:
            self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def load_cifar10(root: Path | str, *, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of CIFAR-10 as arrays.

    Args:
        root: the folder that holds (or receives) ``cifar-10-batches-py``.
        train: the 50,000 training images, else the 10,000 test images.
        download: fetch the official archive first if it is not there (needs internet).

    Returns:
        ``(images, labels)``: uint8 ``(N, 32, 32, 3)`` in dataset order and int64 ``(N,)``.

    Raises:
        DataError: the folder is missing, a file is absent, truncated or corrupt, or the download failed.
    """
    root = Path(root).expanduser()
    synthetic = is_synthetic(root)
    reader = _SyntheticCIFAR10 if synthetic else CIFAR10
    try:
        dataset = reader(str(root), train=train, download=download and not synthetic)
    except RuntimeError as exc:
        if "not found or corrupted" not in str(exc):
            raise
        raise DataError(_explain_missing_or_corrupt(root)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError) as exc:
        # Reached only for synthetic folders (real ones fail the md5 check first): name the broken batch file.
        raise DataError(_explain_unreadable(root, train, exc)) from None
    except OSError as exc:
        raise DataError(f"CIFAR-10 could not be downloaded into {root}: {exc}. Otherwise {DOWNLOAD_HINT}.") from None
    images = np.ascontiguousarray(dataset.data)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return images, labels


def _explain_missing_or_corrupt(root: Path) -> str:
    folder = root / CIFAR10.base_folder
    if not folder.is_dir():
        return f"CIFAR-10 not found: no folder {folder}. To fix: {DOWNLOAD_HINT}."
    for name, md5 in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]:
        path = folder / name
        if not path.is_file():
            return f"CIFAR-10 is incomplete: {path} is missing. To fix: {DOWNLOAD_HINT}."
        if not check_integrity(str(path), md5):
            return (
                f"CIFAR-10 file {path} is corrupt or truncated (its md5 differs from the official release). "
                f"To fix: delete it and {DOWNLOAD_HINT}."
            )
    return f"CIFAR-10 in {folder} could not be read. To fix: {DOWNLOAD_HINT}."


def _explain_unreadable(root: Path, train: bool, exc: Exception) -> str:
    folder = root / CIFAR10.base_folder
    names = [name for name, _ in (CIFAR10.train_list if train else CIFAR10.test_list)] + [CIFAR10.meta["filename"]]
    for name in names:
        try:
            with open(folder / name, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            if name != CIFAR10.meta["filename"]:
                np.asarray(entry["data"]).reshape(-1, 3, 32, 32)
        except Exception as file_exc:  # noqa: BLE001 - any failure here is the answer we are looking for
            return (
                f"CIFAR-10 file {folder / name} is truncated or corrupt ({type(file_exc).__name__}: {file_exc}). "
                f"To fix: rewrite the synthetic data with `python -m lit_sharp.data.synthetic {root}` after deleting "
                f"{folder}, or {DOWNLOAD_HINT}."
            )
    return f"CIFAR-10 in {folder} could not be read ({type(exc).__name__}: {exc})."
