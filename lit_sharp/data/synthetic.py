"""Small CIFAR-10 and CIFAR-10-C look-alikes, written in the on-disk formats of the real releases.

No machine that builds or tests this project reaches the internet (docs/protocol.md section 6), so the real loaders
are exercised on data written here:

- ``ROOT/cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``,
  pickled like the official Python release (Krizhevsky 2009), so ``torchvision.datasets.CIFAR10`` parses them
  with its own code (only its md5 check can never pass);
- ``ROOT/CIFAR-10-C/``: ``<corruption>.npy`` (uint8, ``(5n, 32, 32, 3)``, rows ``[(s-1)n, s*n)`` hold severity
  ``s``) and ``labels.npy`` (uint8, ``(5n,)``), as in Hendrycks and Dietterich (ICLR 2019);
- ``ROOT/LIT_SHARP_SYNTHETIC.json``: the marker, written last, so its presence means the folder is complete.

The images carry class structure a small network learns within an epoch or two: every class has a smooth colour
template (waves and a disc, drawn from the seed); an image is its class template shifted by up to 4 pixels, with
contrast and brightness jitter and pixel noise. The CIFAR-10-C images are the first ``n`` test images under
perturbations whose strength grows with the severity; they resemble the real corruptions only loosely.
The same seed gives byte-identical files.

Command line::

    python -m lit_sharp.data.synthetic ROOT [--seed S] [--n-train N] [--n-test N] [--n-corrupt N] [--extra-corruptions]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from filelock import FileLock

from lit_sharp.constants import CORRUPTIONS, EXTRA_CORRUPTIONS, NUM_CLASSES, SEVERITIES

__all__ = [
    "CIFAR10_LABEL_NAMES",
    "SYNTHETIC_MARKER",
    "ensure_synthetic",
    "is_synthetic",
    "write_synthetic",
]

SYNTHETIC_MARKER = "LIT_SHARP_SYNTHETIC.json"
FORMAT_VERSION = 1
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10C_FOLDER = "CIFAR-10-C"
CIFAR10_LABEL_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
N_TRAIN_BATCHES = 5
IMAGE_SIZE = 32
SHIFT = 4  # pixels each way a template may move, as far as the usual pad-4 random crop moves an image
_LOCK_FILE = ".synthetic.lock"
# Present while a write is under way: it tells a half-written folder of ours from a folder of someone else's data.
_IN_PROGRESS_FILE = ".synthetic.incomplete"

_STREAM_TEMPLATES, _STREAM_TRAIN, _STREAM_TEST = 0, 1, 2

Images = np.ndarray  # float64 (N, 32, 32, 3), values on the 0..255 scale


# ----------------------------------------------------------------------------------------------------------------
# Public API


def is_synthetic(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds a complete data set written by this module.

    Args:
        root: the data root (the folder that holds ``cifar-10-batches-py``).

    Returns:
        True when the marker ``ROOT/LIT_SHARP_SYNTHETIC.json`` exists; it is written last, after every data file.
    """
    return (Path(root) / SYNTHETIC_MARKER).is_file()


def write_synthetic(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 2560,
    n_test: int = 512,
    n_corrupt: int = 200,
    extra_corruptions: bool = False,
) -> Path:
    """Write a synthetic CIFAR-10 and CIFAR-10-C under ``root``, replacing an earlier synthetic one.

    Args:
        root: the data root; created if missing.
        seed: the seed every image is drawn from (non-negative); the same seed gives byte-identical files.
        n_train: training images, split over the five ``data_batch_*`` files.
        n_test: test images in ``test_batch``.
        n_corrupt: images per severity in each CIFAR-10-C file: the first ``n_corrupt`` test images, corrupted.
        extra_corruptions: also write the four files outside the standard mean (``EXTRA_CORRUPTIONS``).

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: a bad size or seed, or ``root`` holds CIFAR data this module did not write (it is never
            overwritten).
    """
    settings = _settings(seed, n_train, n_test, n_corrupt, extra_corruptions)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / _LOCK_FILE)):
        _write_unlocked(root, settings)
    return root


def ensure_synthetic(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 2560,
    n_test: int = 512,
    n_corrupt: int = 200,
    extra_corruptions: bool = False,
) -> Path:
    """Write the synthetic data set under ``root`` unless it is already there; safe to call from many processes.

    A file lock on ``ROOT/.synthetic.lock`` serializes writers and the marker is checked again inside it, so
    when a grid starts several runs at once exactly one of them writes and the others wait and read.

    Args:
        root: the data root; created if missing.
        seed, n_train, n_test, n_corrupt, extra_corruptions: as in :func:`write_synthetic`.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: a bad size or seed; ``root`` already holds synthetic data written with other settings; or
            ``root`` holds CIFAR data this module did not write.
    """
    settings = _settings(seed, n_train, n_test, n_corrupt, extra_corruptions)
    root = Path(root)
    if is_synthetic(root):
        _check_same_settings(root, settings)
        return root
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / _LOCK_FILE)):
        if is_synthetic(root):
            _check_same_settings(root, settings)
        else:
            _write_unlocked(root, settings)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Settings and the marker


def _settings(seed: int, n_train: int, n_test: int, n_corrupt: int, extra_corruptions: bool) -> dict[str, Any]:
    for name, value, least in (("seed", seed, 0), ("n_train", n_train, N_TRAIN_BATCHES), ("n_test", n_test, 1),
                               ("n_corrupt", n_corrupt, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if n_corrupt > n_test:
        raise ValueError(
            f"n_corrupt ({n_corrupt}) must not exceed n_test ({n_test}): CIFAR-10-C images are corrupted test images"
        )
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "n_corrupt": int(n_corrupt),
        "extra_corruptions": bool(extra_corruptions),
    }


def _check_same_settings(root: Path, settings: dict[str, Any]) -> None:
    marker = root / SYNTHETIC_MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{marker} is unreadable ({error}); delete {root} and write the data again") from error
    different = {
        key: (recorded.get(key), value)
        for key, value in settings.items()
        # extra files on disk are harmless to a caller who does not ask for them
        if recorded.get(key) != value and not (key == "extra_corruptions" and recorded.get(key) is True)
    }
    if different:
        listed = ", ".join(f"{key}={old!r} (asked for {new!r})" for key, (old, new) in different.items())
        raise ValueError(
            f"{root} already holds synthetic data written with {listed}; "
            "delete the folder or choose another root to get data with the new settings"
        )


def _refuse_foreign_data(root: Path) -> None:
    if is_synthetic(root) or (root / _IN_PROGRESS_FILE).exists():
        return
    for folder in (root / CIFAR10_FOLDER, root / CIFAR10C_FOLDER):
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(
                f"{folder} holds data that lit_sharp.data.synthetic did not write (no {SYNTHETIC_MARKER} in {root}); "
                "it is never overwritten: choose another root for synthetic data"
            )


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _write_unlocked(root: Path, settings: dict[str, Any]) -> None:
    _refuse_foreign_data(root)
    (root / _IN_PROGRESS_FILE).touch()
    (root / SYNTHETIC_MARKER).unlink(missing_ok=True)  # from here on the folder reads as incomplete

    seed = settings["seed"]
    templates = _class_templates(_rng(seed, _STREAM_TEMPLATES))  # (10, 40, 40, 3)
    train_images, train_labels = _clean_images(templates, settings["n_train"], _rng(seed, _STREAM_TRAIN))
    test_images, test_labels = _clean_images(templates, settings["n_test"], _rng(seed, _STREAM_TEST))
    _write_cifar10(root / CIFAR10_FOLDER, train_images, train_labels, test_images, test_labels)

    n_corrupt = settings["n_corrupt"]
    names = CORRUPTIONS + (EXTRA_CORRUPTIONS if settings["extra_corruptions"] else ())
    _write_cifar10c(root / CIFAR10C_FOLDER, test_images[:n_corrupt], test_labels[:n_corrupt], names, seed)

    _write_atomic(root / SYNTHETIC_MARKER, lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True).encode()))
    (root / _IN_PROGRESS_FILE).unlink(missing_ok=True)


def _write_cifar10(
    folder: Path, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    batches = np.array_split(np.arange(len(train_labels)), N_TRAIN_BATCHES)
    for number, rows in enumerate(batches, start=1):
        batch = _cifar_batch(f"training batch {number} of {N_TRAIN_BATCHES}", train_images[rows], train_labels[rows],
                             first_index=int(rows[0]))
        _write_atomic(folder / f"data_batch_{number}", lambda f, batch=batch: _Python2Pickler(f, 2).dump(batch))
    test = _cifar_batch("testing batch 1 of 1", test_images, test_labels, first_index=0)
    _write_atomic(folder / "test_batch", lambda f: _Python2Pickler(f, 2).dump(test))
    meta = {"num_cases_per_batch": len(batches[0]), "label_names": list(CIFAR10_LABEL_NAMES),
            "num_vis": 3 * IMAGE_SIZE * IMAGE_SIZE}
    _write_atomic(folder / "batches.meta", lambda f: _Python2Pickler(f, 2).dump(meta))


def _cifar_batch(batch_label: str, images: np.ndarray, labels: np.ndarray, first_index: int) -> dict[str, Any]:
    """One batch dict as in the release: ``data`` is uint8 (N, 3072), each row the R, G, B planes in row-major order."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))  # (N, H, W, C) -> (N, C*H*W)
    filenames = [f"synthetic_{CIFAR10_LABEL_NAMES[label]}_s_{first_index + i:06d}.png"
                 for i, label in enumerate(labels)]
    return {"batch_label": batch_label, "labels": [int(label) for label in labels], "data": data,
            "filenames": filenames}


def _write_cifar10c(folder: Path, images: np.ndarray, labels: np.ndarray, names: Sequence[str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    clean = images.astype(np.float64)
    for name in names:
        perturb = _PERTURBATIONS[name]
        by_severity = [_to_uint8(perturb(clean, severity, _rng(seed, _stream_of(name), severity)))
                       for severity in SEVERITIES]
        stacked = np.concatenate(by_severity)  # (5n, 32, 32, 3): severity s in rows [(s-1)n, s*n)
        _write_atomic(folder / f"{name}.npy", lambda f, stacked=stacked: np.save(f, stacked))
    all_labels = np.tile(labels.astype(np.uint8), len(SEVERITIES))  # the release repeats the test labels per severity
    _write_atomic(folder / "labels.npy", lambda f: np.save(f, all_labels))


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file and ``os.replace``, so a reader sees the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as handle:  # unlike mkstemp's 0600, honours the umask
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _Python2Pickler(pickle._Pickler):
    """Pickles ``str`` and ``bytes`` as Python 2 byte strings and numpy globals under ``numpy.core``.

    The official batches were written by Python 2's cPickle: their keys and strings are byte strings, which
    ``pickle.load(f, encoding="latin1")`` (torchvision) reads as ``str`` and ``encoding="bytes"`` (the loader on the
    CIFAR web page) as ``bytes`` (``b"data"``). Python 3's picklers can only write ``str`` as unicode, which the
    second kind of reader never sees as ``b"data"``; the C pickler's ``reducer_override`` is not consulted for
    ``str``/``bytes``, so this extends the pure-Python pickler. Naming ``numpy.core`` rather than numpy 2's
    ``numpy._core`` keeps the files loadable under numpy 1 as well, like the release.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes((len(data),)) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_python2_string
    dispatch[bytes] = save_python2_string

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", None) or ""
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core"):]
            self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
            self.memoize(obj)
            return
        super().save_global(obj, name)


# ----------------------------------------------------------------------------------------------------------------
# Clean images


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _stream_of(corruption: str) -> int:
    return 1000 + zlib.crc32(corruption.encode())  # stable across runs and independent of the list's order


def _class_templates(rng: np.random.Generator) -> np.ndarray:
    """One smooth colour pattern per class, ``SHIFT`` pixels larger than an image on every side.

    Returns:
        float64 (NUM_CLASSES, 40, 40, 3) on the 0..255 scale: a base colour, three plane waves per channel, one disc.
    """
    size = IMAGE_SIZE + 2 * SHIFT
    yy, xx = np.mgrid[0:size, 0:size] / size  # (size, size) each, in [0, 1)
    templates = np.empty((NUM_CLASSES, size, size, 3))
    for k in range(NUM_CLASSES):
        pattern = np.broadcast_to(rng.uniform(60, 196, size=3), (size, size, 3)).copy()
        for _ in range(3):
            fy, fx = rng.integers(-2, 3, size=2)
            fx = fx if (fy, fx) != (0, 0) else 1
            wave = np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))  # (size, size)
            pattern += wave[..., None] * rng.uniform(-45, 45, size=3)
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, size=2)
        disc = (np.hypot(yy * size - cy, xx * size - cx) < rng.uniform(5, 9))[..., None]
        pattern = np.where(disc, pattern + rng.uniform(-70, 70, size=3), pattern)
        templates[k] = pattern
    return templates


def _clean_images(templates: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` balanced, shuffled labelled images from the class templates.

    Returns:
        images uint8 (n, 32, 32, 3) and labels int64 (n,).
    """
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    offsets = rng.integers(0, 2 * SHIFT + 1, size=(n, 2))  # top-left corner of the 32x32 window in the template
    rows = offsets[:, 0, None] + np.arange(IMAGE_SIZE)  # (n, 32)
    cols = offsets[:, 1, None] + np.arange(IMAGE_SIZE)  # (n, 32)
    images = templates[labels[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, 32, 32, 3)
    contrast = rng.uniform(0.75, 1.25, size=(n, 1, 1, 1))
    brightness = rng.normal(0, 15, size=(n, 1, 1, 1))
    images = (images - 128) * contrast + 128 + brightness + rng.normal(0, 20, size=images.shape)
    return _to_uint8(images), labels


def _to_uint8(images: Images) -> np.ndarray:
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Perturbations for CIFAR-10-C: each maps (images, severity 1..5, rng) to images on the 0..255 scale.
# The per-severity constants grow with the severity, as in Hendrycks and Dietterich's make_cifar_c.py.


def _gray(images: Images) -> Images:
    return images.mean(axis=3, keepdims=True)


def _shift_mean(images: Images, axis: int, offsets: range) -> Images:
    """Mean of copies shifted along ``axis`` by each offset, edges repeated (a 1-D filter with equal taps)."""
    pad = max(abs(o) for o in offsets)
    widths = [(0, 0)] * images.ndim
    widths[axis] = (pad, pad)
    padded = np.pad(images, widths, mode="edge")
    length = images.shape[axis]
    return sum(np.take(padded, np.arange(pad + o, pad + o + length), axis=axis) for o in offsets) / len(offsets)


def _blur(images: Images, sigma: float) -> Images:
    """Separable Gaussian blur with edge padding; ``sigma`` in pixels."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (1, 2):
        widths = [(0, 0)] * 4
        widths[axis] = (radius, radius)
        padded = np.pad(images, widths, mode="edge")
        images = sum(w * np.take(padded, np.arange(i, i + IMAGE_SIZE), axis=axis) for i, w in enumerate(taps))
    return images


def _smooth_field(rng: np.random.Generator, n: int, channels: int = 1, cells: int = 4) -> Images:
    """Smooth random field in [0, 1] per image: a ``cells`` x ``cells`` grid of uniforms, upsampled and blurred."""
    grid = rng.uniform(size=(n, cells, cells, channels))
    field = np.repeat(np.repeat(grid, IMAGE_SIZE // cells, axis=1), IMAGE_SIZE // cells, axis=2)
    return _blur(field, sigma=IMAGE_SIZE / cells / 2)


def _remap(images: Images, rows: np.ndarray, cols: np.ndarray) -> Images:
    """Nearest-neighbour resampling: output pixel (i, j) of image k is input pixel (rows[k, i, j], cols[k, i, j])."""
    rows = np.clip(np.rint(rows), 0, IMAGE_SIZE - 1).astype(np.intp)
    cols = np.clip(np.rint(cols), 0, IMAGE_SIZE - 1).astype(np.intp)
    return images[np.arange(len(images))[:, None, None], rows, cols]


def _zoom(images: Images, factor: float) -> Images:
    centre = (IMAGE_SIZE - 1) / 2
    source = (np.arange(IMAGE_SIZE) - centre) / factor + centre
    rows = np.broadcast_to(source[None, :, None], (len(images), IMAGE_SIZE, IMAGE_SIZE))
    cols = np.broadcast_to(source[None, None, :], (len(images), IMAGE_SIZE, IMAGE_SIZE))
    return _remap(images, rows, cols)


def _gaussian_noise(images: Images, severity: int, rng: np.random.Generator) -> Images:
    sigma = (10, 15, 22, 30, 40)[severity - 1]
    return images + rng.normal(0, sigma, size=images.shape)


def _shot_noise(images: Images, severity: int, rng: np.random.Generator) -> Images:
    photons = (60, 25, 12, 6, 3)[severity - 1]  # photon count at full intensity: fewer is noisier
    return rng.poisson(images / 255 * photons) / photons * 255


def _impulse_noise(images: Images, severity: int, rng: np.random.Generator) -> Images:
    fraction = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    hit = rng.uniform(size=images.shape) < fraction
    salt = rng.uniform(size=images.shape) < 0.5
    return np.where(hit, np.where(salt, 255.0, 0.0), images)


def _speckle_noise(images: Images, severity: int, rng: np.random.Generator) -> Images:
    sigma = (0.06, 0.1, 0.12, 0.16, 0.2)[severity - 1]
    return images * (1 + rng.normal(0, sigma, size=images.shape))


def _defocus_blur(images: Images, severity: int, rng: np.random.Generator) -> Images:
    return _blur(images, sigma=(0.5, 0.75, 1.0, 1.4, 1.9)[severity - 1])


def _gaussian_blur(images: Images, severity: int, rng: np.random.Generator) -> Images:
    return _blur(images, sigma=(0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1])


def _glass_blur(images: Images, severity: int, rng: np.random.Generator) -> Images:
    sigma = (0.5, 0.6, 0.75, 0.9, 1.05)[severity - 1]
    jitter = rng.integers(-1, 2, size=(2, *images.shape[:3]))  # each pixel swapped with a random neighbour
    base = np.arange(IMAGE_SIZE)
    shuffled = _remap(_blur(images, sigma), base[None, :, None] + jitter[0], base[None, None, :] + jitter[1])
    return _blur(shuffled, sigma)


def _motion_blur(images: Images, severity: int, rng: np.random.Generator) -> Images:
    half = (1, 2, 3, 4, 5)[severity - 1]
    return _shift_mean(images, axis=2, offsets=range(-half, half + 1))


def _zoom_blur(images: Images, severity: int, rng: np.random.Generator) -> Images:
    largest = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
    factors = np.arange(1.0, largest + 1e-9, 0.02)
    return sum(_zoom(images, f) for f in factors) / len(factors)


def _snow(images: Images, severity: int, rng: np.random.Generator) -> Images:
    whiten, density = ((0.05, 0.02), (0.1, 0.04), (0.15, 0.06), (0.2, 0.08), (0.25, 0.1))[severity - 1]
    flakes = (rng.uniform(size=(*images.shape[:3], 1)) < density) * 255.0
    streaks = _shift_mean(flakes, axis=1, offsets=range(-1, 2)) * 1.5  # short vertical streaks
    return np.maximum(images * (1 - whiten) + whiten * 230, streaks)


def _frost(images: Images, severity: int, rng: np.random.Generator) -> Images:
    weight = (0.2, 0.3, 0.4, 0.5, 0.6)[severity - 1]
    ice = 170 + 60 * _smooth_field(rng, len(images), cells=8) + rng.normal(0, 12, size=(*images.shape[:3], 1))
    return (1 - weight) * images + weight * ice * np.array([0.9, 0.95, 1.0])  # bluish white


def _fog(images: Images, severity: int, rng: np.random.Generator) -> Images:
    weight = (0.15, 0.25, 0.35, 0.45, 0.55)[severity - 1]
    haze = 255 * _smooth_field(rng, len(images), cells=4)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return mean + (images - mean) * (1 - weight) + weight * (haze - 128) * 0.5 + weight * 40


def _spatter(images: Images, severity: int, rng: np.random.Generator) -> Images:
    threshold = (0.68, 0.64, 0.6, 0.56, 0.52)[severity - 1]  # a lower threshold covers more of the image
    mud = _smooth_field(rng, len(images), cells=8) > threshold
    return np.where(mud, 0.4 * images + 0.6 * np.array([90.0, 70.0, 50.0]), images)


def _brightness(images: Images, severity: int, rng: np.random.Generator) -> Images:
    return images + 255 * (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]


def _contrast(images: Images, severity: int, rng: np.random.Generator) -> Images:
    keep = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return mean + (images - mean) * keep


def _saturate(images: Images, severity: int, rng: np.random.Generator) -> Images:
    gain = (1.5, 2.0, 3.0, 5.0, 8.0)[severity - 1]
    gray = _gray(images)
    return gray + (images - gray) * gain


def _elastic_transform(images: Images, severity: int, rng: np.random.Generator) -> Images:
    reach = (1.0, 1.5, 2.0, 2.5, 3.0)[severity - 1]  # largest displacement in pixels
    field = reach * (2 * _smooth_field(rng, len(images), channels=2, cells=4) - 1)  # (n, 32, 32, 2)
    base = np.arange(IMAGE_SIZE)
    return _remap(images, base[None, :, None] + field[..., 0], base[None, None, :] + field[..., 1])


def _pixelate(images: Images, severity: int, rng: np.random.Generator) -> Images:
    small = round(IMAGE_SIZE * (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1])
    down = (np.arange(small) * IMAGE_SIZE / small).astype(np.intp)
    up = (np.arange(IMAGE_SIZE) * small / IMAGE_SIZE).astype(np.intp)
    return images[:, down][:, :, down][:, up][:, :, up]


def _dct_matrix(size: int = 8) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` transforms ``x`` along its first axis."""
    k, n = np.mgrid[0:size, 0:size]
    matrix = np.sqrt(2 / size) * np.cos(np.pi * (2 * n + 1) * k / (2 * size))
    matrix[0] /= np.sqrt(2)
    return matrix


def _jpeg_compression(images: Images, severity: int, rng: np.random.Generator) -> Images:
    step = (6, 10, 14, 20, 30)[severity - 1]
    dct = _dct_matrix()
    table = step * (1 + np.add.outer(np.arange(8), np.arange(8)))  # coarser steps at higher frequencies, as in JPEG
    n = len(images)
    blocks = images.reshape(n, 4, 8, 4, 8, 3) - 128  # (n, block row, y, block col, x, channel)
    coefficients = np.einsum("uy,vx,nbycxk->nbucvk", dct, dct, blocks)
    quantized = np.rint(coefficients / table[None, None, :, None, :, None]) * table[None, None, :, None, :, None]
    restored = np.einsum("uy,vx,nbucvk->nbycxk", dct, dct, quantized)
    return restored.reshape(images.shape) + 128


_PERTURBATIONS: dict[str, Callable[[Images, int, np.random.Generator], Images]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "saturate": _saturate,
}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: write the synthetic data set and say where and how large."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_sharp.data.synthetic",
        description=(
            "Write a small synthetic CIFAR-10 (cifar-10-batches-py pickles) and CIFAR-10-C (CIFAR-10-C/*.npy) in the "
            "on-disk formats of the real releases, for runs and tests without internet access. Images have learnable "
            "class structure; the same seed gives byte-identical files."
        ),
    )
    parser.add_argument("root", type=Path, help="data root; cifar-10-batches-py/ and CIFAR-10-C/ are written inside")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image (default: 0)")
    parser.add_argument("--n-train", type=int, default=2560, help="training images over 5 batch files (default: 2560)")
    parser.add_argument("--n-test", type=int, default=512, help="test images (default: 512)")
    parser.add_argument("--n-corrupt", type=int, default=200,
                        help="CIFAR-10-C images per severity, the first test images corrupted (default: 200)")
    parser.add_argument("--extra-corruptions", action="store_true",
                        help="also write speckle_noise, gaussian_blur, spatter and saturate")
    args = parser.parse_args(argv)
    try:
        root = write_synthetic(args.root, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                               n_corrupt=args.n_corrupt, extra_corruptions=args.extra_corruptions)
    except ValueError as error:
        parser.error(str(error))
    n_files = len(CORRUPTIONS) + (len(EXTRA_CORRUPTIONS) if args.extra_corruptions else 0)
    print(f"wrote synthetic CIFAR-10 to {root / CIFAR10_FOLDER}: {args.n_train} training and {args.n_test} test images")
    print(f"wrote synthetic CIFAR-10-C to {root / CIFAR10C_FOLDER}: "
          f"{n_files} corruptions x {len(SEVERITIES)} severities x {args.n_corrupt} images")


if __name__ == "__main__":
    main()
