"""CIFAR-10-C error of any classifier (Hendrycks and Dietterich, ICLR 2019), as docs/protocol.md section 4 defines it.

On disk, ``ROOT/CIFAR-10-C/`` holds ``<corruption>.npy`` (uint8, ``(5n, 32, 32, 3)``; rows ``[(s-1)n, s*n)`` are
severity ``s``; n = 10,000 in the release) and ``labels.npy`` (``(5n,)``). Two protocols:

- ``"paper"``: severity 5, the first 1,000 images of each of the 15 standard corruptions, one error rate over the
  15,000 images. The paper's released code loads these 15,000 (RobustBench's ``load_cifar10c`` with
  ``n_examples=15000, severity=5``), shuffles them and evaluates the first 10,000: the same quantity, estimated
  with more noise, not the exact same subset.
- ``"full"``: every standard corruption at every severity on all images; the mean error and each cell's error.

The four extra files of the release (``EXTRA_CORRUPTIONS``) are never read. Files are memory-mapped and read a
batch at a time, so at most one batch of one file is in memory (a full file is 150 MB).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lit_sharp.constants import CORRUPTIONS, NUM_CLASSES, SEVERITIES
from lit_sharp.errors import DataError
from lit_sharp.eval_mode import evaluation_mode
from lit_sharp.evaluation import ClassificationError
from lit_sharp.normalization import normalize

__all__ = [
    "CIFAR10C_FOLDER",
    "PROTOCOLS",
    "CorruptionDataError",
    "check_cifar10c",
    "corruption_error",
]

CIFAR10C_FOLDER = "CIFAR-10-C"
PROTOCOLS = ("paper", "full")
PAPER_SEVERITY = 5
PAPER_IMAGES_PER_CORRUPTION = 1000
IMAGE_SHAPE = (32, 32, 3)
ZENODO_URL = "https://zenodo.org/records/2535967"


class CorruptionDataError(DataError, ValueError):
    """A CIFAR-10-C folder or file that is missing, unreadable or not shaped like the release.

    Attributes:
        path: the folder or file at fault.
        why: what is wrong with it.
    """

    def __init__(self, path: Path | str, why: str, root: Path | str) -> None:
        self.path = Path(path)
        self.why = why
        super().__init__(
            f"{self.path}: {why}. Download CIFAR-10-C.tar from {ZENODO_URL} and unpack it into {root} "
            f"(tar -xf CIFAR-10-C.tar -C {root}), or write a small synthetic stand-in with "
            f"`python -m lit_sharp.data.synthetic {root}`"
        )


def check_cifar10c(root: str | os.PathLike[str]) -> int:
    """Check that ``root/CIFAR-10-C/`` is complete and shaped like the release, reading only file headers.

    Every standard corruption file and ``labels.npy`` is checked before anything is computed, so a bad file fails
    at once rather than after minutes of evaluation. The extra corruption files are not looked at.

    Args:
        root: the data root that holds ``CIFAR-10-C/``.

    Returns:
        ``n``, the number of images per severity (``len(labels) / 5``).

    Raises:
        CorruptionDataError: the folder or a file is missing; a file is truncated or not a ``.npy`` array; a
            corruption file is not uint8 ``(5n, 32, 32, 3)``; the labels are not ``5n`` integers in ``[0, 10)``.
    """
    return len(_checked_labels(Path(root))) // len(SEVERITIES)


def corruption_error(
    model: nn.Module,
    root: str | os.PathLike[str],
    *,
    protocol: str = "paper",
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Classification error of ``model`` on CIFAR-10-C.

    Images are scaled to [0, 1] and normalized with the training statistics, ``(x / 255 - mean) / std`` with
    ``CIFAR10_MEAN``/``CIFAR10_STD``, and classified in evaluation mode without gradients; the prediction is the
    arg-max of the logits. An error is ``wrong / images``; with equal-sized cells the mean over cells equals the
    error over all the images pooled.

    Args:
        model: any module mapping normalized ``(B, 3, 32, 32)`` images to ``(B, classes)`` logits.
        root: the data root that holds ``CIFAR-10-C/``.
        protocol: ``"paper"`` (severity 5, the first 1,000 images of each standard corruption, or all if fewer) or
            ``"full"`` (every standard corruption, severity and image).
        batch_size: images per forward pass.
        device: where the images are sent; the model must already be there. Default: the device of the model's
            first parameter or buffer (the CPU for a model with neither).

    Returns:
        ``{"c10c/err": e}``; for ``"full"`` also ``"c10c/<corruption>/s<k>"`` for every standard corruption and
        severity. Errors are fractions in [0, 1].

    Raises:
        ValueError: an unknown ``protocol``, a ``batch_size`` below 1, or logits that are not ``(B, classes)``.
        CorruptionDataError: as :func:`check_cifar10c`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    root = Path(root)
    labels = _checked_labels(root)
    n = len(labels) // len(SEVERITIES)
    folder = root / CIFAR10C_FOLDER
    device = torch.device(device) if device is not None else _device_of(model)
    to_input = functools.partial(_model_input, device=device, dtype=_floating_dtype_of(model))

    wrong: dict[tuple[str, int], int] = {}
    counted: dict[tuple[str, int], int] = {}
    with evaluation_mode(model), torch.no_grad():
        for corruption in CORRUPTIONS:
            images = _open_images(folder / f"{corruption}.npy", len(labels), root)
            for severity, rows in _cells(protocol, n):
                wrong[corruption, severity] = _count_wrong(model, images, labels, rows, batch_size, to_input)
                counted[corruption, severity] = len(rows)
            del images  # drop the mapping before the next file is opened

    results = {"c10c/err": sum(wrong.values()) / sum(counted.values())}
    if protocol == "full":
        results.update({f"c10c/{c}/s{s}": wrong[c, s] / counted[c, s] for c, s in wrong})
    return results


# ----------------------------------------------------------------------------------------------------------------
# Files


def _checked_labels(root: Path) -> np.ndarray:
    """All the checks of :func:`check_cifar10c`; returns the labels, int64 (5n,)."""
    folder = root / CIFAR10C_FOLDER
    if not folder.is_dir():
        raise CorruptionDataError(folder, "folder not found", root)
    labels = _read_labels(folder / "labels.npy", root)
    for corruption in CORRUPTIONS:
        _open_images(folder / f"{corruption}.npy", len(labels), root)
    return labels


def _load_npy(path: Path, root: Path) -> np.ndarray:
    """Memory-map ``path``; every way it can fail becomes a :class:`CorruptionDataError` naming the file."""
    if not path.is_file():
        raise CorruptionDataError(path, "file not found", root)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as error:
        # numpy's own words ("mmap length is greater than file size", or an offer to unpickle) hide what happened;
        # they stay in the exception chain
        raise CorruptionDataError(path, "is truncated or is not a .npy array (numpy cannot map it)", root) from error
    except OSError as error:
        raise CorruptionDataError(path, f"cannot be read ({error.strerror or error})", root) from error
    if not isinstance(array, np.ndarray):  # a zip archive loads as NpzFile
        getattr(array, "close", lambda: None)()
        raise CorruptionDataError(path, "is an .npz archive, not a .npy array", root)
    return array


def _read_labels(path: Path, root: Path) -> np.ndarray:
    labels = _load_npy(path, root)
    n_severities = len(SEVERITIES)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptionDataError(
            path, f"labels must be a 1-D integer array, found {labels.dtype} of shape {labels.shape}", root
        )
    if len(labels) == 0 or len(labels) % n_severities:
        raise CorruptionDataError(
            path, f"holds {len(labels)} labels; it must hold {n_severities}n, n labels per severity", root
        )
    labels = np.asarray(labels, dtype=np.int64)  # 5n labels: small enough to read whole
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise CorruptionDataError(
            path, f"labels must lie in [0, {NUM_CLASSES}), found [{labels.min()}, {labels.max()}]", root
        )
    return labels


def _open_images(path: Path, n_labels: int, root: Path) -> np.ndarray:
    images = _load_npy(path, root)
    expected = (n_labels, *IMAGE_SHAPE)
    if images.dtype != np.uint8 or images.shape != expected:
        raise CorruptionDataError(
            path,
            f"found {images.dtype} of shape {images.shape}; expected uint8 of shape {expected}, one image per "
            f"entry of labels.npy ({n_labels} labels)",
            root,
        )
    return images


def _cells(protocol: str, n: int) -> list[tuple[int, range]]:
    """The (severity, rows) pairs a protocol evaluates in every corruption file."""
    if protocol == "paper":
        start = (PAPER_SEVERITY - 1) * n
        return [(PAPER_SEVERITY, range(start, start + min(PAPER_IMAGES_PER_CORRUPTION, n)))]
    return [(s, range((s - 1) * n, s * n)) for s in SEVERITIES]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _model_input(images: np.ndarray, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``(B, 32, 32, 3)`` images -> normalized ``(B, 3, 32, 32)``, bitwise as torchvision's ``ToTensor`` then
    ``Normalize`` compute them (float32 ``x / 255``, then ``(x - mean) / std``), in the model's dtype."""
    # copied out of the read-only memory map; the uint8 batch crosses to the device, a quarter of its float32 bytes
    batch = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device)
    # elementwise work in the contiguous HWC layout, then one transposing copy: faster than the other order
    return normalize(batch, channels_dim=-1).permute(0, 3, 1, 2).contiguous().to(dtype)


def _count_wrong(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    rows: range,
    batch_size: int,
    to_input: Callable[[np.ndarray], torch.Tensor],
) -> int:
    metric = None
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        logits = model(to_input(images[start:stop]))
        if logits.ndim != 2 or logits.shape[0] != stop - start:
            raise ValueError(
                f"the model must return logits of shape (batch, classes); for a batch of {stop - start} images it "
                f"returned shape {tuple(logits.shape)}"
            )
        if metric is None:
            metric = ClassificationError().to(logits.device)
        metric.update(logits, torch.from_numpy(labels[start:stop]).to(logits.device))
    wrong, _ = metric.counts()  # one device sync per cell, not per batch
    return wrong


def _device_of(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _floating_dtype_of(model: nn.Module) -> torch.dtype:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
