"""Tests for lit_sharp.data.synthetic: the files read back through torchvision's own CIFAR-10 code and plain numpy,
determinism, class structure, and a safe first write when several processes ask at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

# torch and torchvision are imported inside the tests that use them: the processes spawned by the concurrency test
# import this module, and stay light that way.
from lit_sharp.constants import CORRUPTIONS, EXTRA_CORRUPTIONS, NUM_CLASSES
from lit_sharp.data.synthetic import (
    CIFAR10_LABEL_NAMES,
    SYNTHETIC_MARKER,
    ensure_synthetic,
    is_synthetic,
    main,
    write_synthetic,
)

SMALL = {"n_train": 100, "n_test": 40, "n_corrupt": 20}
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _torchvision_cifar10(root: Path, train: bool):
    """torchvision's CIFAR10 reading code, minus the md5 checks that files written here can never pass."""
    from torchvision.datasets import CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        meta = {**CIFAR10.meta, "md5": None}  # _load_meta checks the meta file's md5 on its own

        def _check_integrity(self) -> bool:
            return True

    return UncheckedCIFAR10(str(root), train=train)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    return {name: (os.stat(root / name).st_ino, os.stat(root / name).st_mtime_ns) for name in _files(root)}


def _ensure_and_report(root: str, start: multiprocessing.synchronize.Event, queue: multiprocessing.Queue) -> None:
    start.wait(timeout=60)
    ensure_synthetic(root, n_train=500, n_test=100, n_corrupt=50)
    marker = os.stat(Path(root) / SYNTHETIC_MARKER)
    queue.put((marker.st_ino, marker.st_mtime_ns))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), seed=3, extra_corruptions=True, **SMALL)


# ---------------------------------------------------------------------------------------------
# The CIFAR-10 format
# ---------------------------------------------------------------------------------------------


def test_torchvision_reads_the_batches(small_root: Path) -> None:
    train = _torchvision_cifar10(small_root, train=True)
    test = _torchvision_cifar10(small_root, train=False)

    assert len(train) == SMALL["n_train"] and len(test) == SMALL["n_test"]
    assert train.data.shape == (SMALL["n_train"], 32, 32, 3) and train.data.dtype == np.uint8
    assert test.data.shape == (SMALL["n_test"], 32, 32, 3)
    assert train.classes == list(CIFAR10_LABEL_NAMES)
    assert train.class_to_idx["airplane"] == 0 and train.class_to_idx["truck"] == 9
    # balanced classes, labels plain ints as torchvision hands them to a DataLoader
    assert np.bincount(train.targets, minlength=NUM_CLASSES).tolist() == [SMALL["n_train"] // NUM_CLASSES] * 10
    assert np.bincount(test.targets, minlength=NUM_CLASSES).tolist() == [SMALL["n_test"] // NUM_CLASSES] * 10
    image, label = train[7]
    assert image.size == (32, 32) and image.mode == "RGB" and isinstance(label, int)


def test_batches_are_pickled_like_the_python2_release(small_root: Path) -> None:
    folder = small_root / "cifar-10-batches-py"
    with open(folder / "data_batch_2", "rb") as handle:
        as_bytes = pickle.load(handle, encoding="bytes")  # the loader printed on the CIFAR-10 web page
    assert set(as_bytes) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert as_bytes[b"batch_label"] == b"training batch 2 of 5"
    assert as_bytes[b"data"].shape == (SMALL["n_train"] // 5, 3072) and as_bytes[b"data"].dtype == np.uint8
    assert all(isinstance(label, int) for label in as_bytes[b"labels"])
    assert all(name.endswith(b".png") for name in as_bytes[b"filenames"])

    with open(folder / "batches.meta", "rb") as handle:
        meta = pickle.load(handle, encoding="latin1")
    assert meta == {"label_names": list(CIFAR10_LABEL_NAMES), "num_cases_per_batch": SMALL["n_train"] // 5,
                    "num_vis": 3072}
    with open(folder / "test_batch", "rb") as handle:
        assert pickle.load(handle, encoding="latin1")["batch_label"] == "testing batch 1 of 1"


def test_training_batches_split_the_training_set_in_order(small_root: Path) -> None:
    train = _torchvision_cifar10(small_root, train=True)
    folder = small_root / "cifar-10-batches-py"
    stacked = []
    for name in TRAIN_FILES:
        with open(folder / name, "rb") as handle:
            stacked.append(pickle.load(handle, encoding="latin1")["data"])
    # the release's row layout: 1024 red, then green, then blue values, each plane row-major
    np.testing.assert_array_equal(np.concatenate(stacked).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), train.data)


# ---------------------------------------------------------------------------------------------
# The CIFAR-10-C format
# ---------------------------------------------------------------------------------------------


def test_cifar10c_files_have_the_release_layout(small_root: Path) -> None:
    folder = small_root / "CIFAR-10-C"
    n = SMALL["n_corrupt"]
    assert {p.name for p in folder.glob("*.npy")} == {f"{c}.npy" for c in (*CORRUPTIONS, *EXTRA_CORRUPTIONS)} | {
        "labels.npy"}
    for corruption in (*CORRUPTIONS, *EXTRA_CORRUPTIONS):
        images = np.load(folder / f"{corruption}.npy")
        assert images.shape == (5 * n, 32, 32, 3) and images.dtype == np.uint8, corruption
    labels = np.load(folder / "labels.npy")
    assert labels.shape == (5 * n,) and labels.dtype == np.uint8
    test_labels = np.array(_torchvision_cifar10(small_root, train=False).targets)
    np.testing.assert_array_equal(labels, np.tile(test_labels[:n], 5))


def test_cifar10c_images_are_the_first_test_images_corrupted(small_root: Path) -> None:
    clean = _torchvision_cifar10(small_root, train=False).data[: SMALL["n_corrupt"]].astype(float)
    noisy = np.load(small_root / "CIFAR-10-C" / "gaussian_noise.npy")[: SMALL["n_corrupt"]].astype(float)
    matched = np.abs(noisy - clean).mean()
    shifted = np.abs(noisy - np.roll(clean, 1, axis=0)).mean()
    # severity 1 adds noise of std 10 (mean absolute value 8): a matched pair differs by that, a mismatched pair by
    # the difference between two images
    assert matched < 10 < 2 * matched < shifted


def test_corruption_strength_grows_with_severity(small_root: Path) -> None:
    n = SMALL["n_corrupt"]
    clean = _torchvision_cifar10(small_root, train=False).data[:n].astype(float)

    def detail(images: np.ndarray) -> float:  # mean absolute difference of horizontal neighbours
        return float(np.abs(np.diff(images, axis=2)).mean())

    for corruption in (*CORRUPTIONS, *EXTRA_CORRUPTIONS):
        images = np.load(small_root / "CIFAR-10-C" / f"{corruption}.npy").astype(float)
        by_severity = [images[(s - 1) * n: s * n] for s in range(1, 6)]
        change = [float(np.abs(x - clean).mean()) for x in by_severity]
        details = [detail(x) for x in by_severity]
        assert change[0] > 1.0, corruption
        # noise, weather and colour corruptions move further from the clean image; blurs and pixelation mostly
        # remove the pixel noise, so their strength shows as lost detail instead
        moves_away = all(a < b for a, b in zip(change, change[1:]))
        loses_detail = all(a > b for a, b in zip(details, details[1:])) and details[0] < detail(clean)
        assert moves_away or loses_detail, (corruption, change, details)


def test_extra_corruptions_are_written_only_on_request(tmp_path: Path) -> None:
    write_synthetic(tmp_path, **SMALL)
    names = {p.stem for p in (tmp_path / "CIFAR-10-C").glob("*.npy")}
    assert names == set(CORRUPTIONS) | {"labels"}


# ---------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_different_ones(tmp_path: Path) -> None:
    first = _files(write_synthetic(tmp_path / "a", seed=5, **SMALL))
    again = _files(write_synthetic(tmp_path / "b", seed=5, **SMALL))
    other = _files(write_synthetic(tmp_path / "c", seed=6, **SMALL))

    assert first == again
    assert set(first) == set(other)
    data_files = [name for name in first if name != SYNTHETIC_MARKER and not name.endswith("batches.meta")]
    assert len(data_files) == 6 + 16
    differing = [name for name in data_files if first[name] != other[name]]
    assert differing == data_files


def test_a_small_cnn_learns_the_classes(tmp_path: Path) -> None:
    import torch
    from torch import nn

    root = write_synthetic(tmp_path, seed=1, n_train=500, n_test=200, n_corrupt=10)
    train = _torchvision_cifar10(root, train=True)
    test = _torchvision_cifar10(root, train=False)

    def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
        return x, torch.tensor(dataset.targets)

    x_train, y_train = tensors(train)
    x_test, y_test = tensors(test)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # epochs
        for rows in torch.randperm(len(x_train), generator=generator).split(50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1


# ---------------------------------------------------------------------------------------------
# ensure_synthetic, the marker and safety
# ---------------------------------------------------------------------------------------------


def test_ensure_synthetic_writes_once(tmp_path: Path) -> None:
    assert not is_synthetic(tmp_path)
    ensure_synthetic(tmp_path, seed=2, **SMALL)
    assert is_synthetic(tmp_path)
    marker = json.loads((tmp_path / SYNTHETIC_MARKER).read_text())
    assert marker == {"format_version": 1, "seed": 2, "extra_corruptions": False, **SMALL}
    written = _stats(tmp_path)

    assert ensure_synthetic(tmp_path, seed=2, **SMALL) == tmp_path
    assert _stats(tmp_path) == written


def test_ensure_synthetic_refuses_other_settings(tmp_path: Path) -> None:
    ensure_synthetic(tmp_path, seed=2, **SMALL)
    with pytest.raises(ValueError, match=r"seed=2 \(asked for 4\)"):
        ensure_synthetic(tmp_path, seed=4, **SMALL)
    with pytest.raises(ValueError, match=r"n_test=40 \(asked for 50\)"):
        ensure_synthetic(tmp_path, seed=2, **{**SMALL, "n_test": 50})


def test_extra_files_on_disk_satisfy_a_request_without_them(small_root: Path) -> None:
    written = _stats(small_root)
    ensure_synthetic(small_root, seed=3, **SMALL)
    assert _stats(small_root) == written


def test_an_interrupted_write_is_redone(tmp_path: Path) -> None:
    reference = _files(write_synthetic(tmp_path / "reference", **SMALL))
    root = tmp_path / "interrupted"
    write_synthetic(root, **SMALL)
    # what a crash mid-write leaves: the in-progress flag, a damaged file, no marker
    (root / SYNTHETIC_MARKER).unlink()
    (root / ".synthetic.incomplete").touch()
    (root / "CIFAR-10-C" / "fog.npy").write_bytes(b"half")

    ensure_synthetic(root, **SMALL)
    assert is_synthetic(root)
    assert _files(root) == reference


def test_foreign_data_is_never_overwritten(tmp_path: Path) -> None:
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.parent.mkdir()
    batch.write_bytes(b"the real release")
    with pytest.raises(ValueError, match="cifar-10-batches-py holds data that lit_sharp.data.synthetic did not"):
        ensure_synthetic(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="choose another root"):
        write_synthetic(tmp_path, **SMALL)
    assert batch.read_bytes() == b"the real release"
    assert not is_synthetic(tmp_path)


def test_concurrent_first_use_writes_once(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    context = multiprocessing.get_context("spawn")
    start, queue = context.Event(), context.Queue()
    workers = [context.Process(target=_ensure_and_report, args=(str(root), start, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    reports = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    final = os.stat(root / SYNTHETIC_MARKER)
    assert reports == [(final.st_ino, final.st_mtime_ns)] * 2  # both saw the one marker that is still there
    reference = _files(write_synthetic(tmp_path / "reference", n_train=500, n_test=100, n_corrupt=50))
    assert _files(root) == reference
    assert not list(root.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_corrupt": 50, "n_test": 40}, r"n_corrupt \(50\) must not exceed n_test \(40\)"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"n_train": 4}, r"n_train must be an integer >= 5, got 4"),
        ({"n_test": 2.5}, r"n_test must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic(tmp_path, **{**SMALL, **arguments})
    with pytest.raises(ValueError, match=message):
        ensure_synthetic(tmp_path, **{**SMALL, **arguments})


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path), "--seed", "9", "--n-train", "50", "--n-test", "20", "--n-corrupt", "10",
          "--extra-corruptions"])
    out = capsys.readouterr().out
    assert str(tmp_path / "cifar-10-batches-py") in out and "50 training and 20 test images" in out
    assert "19 corruptions x 5 severities x 10 images" in out
    assert json.loads((tmp_path / SYNTHETIC_MARKER).read_text())["seed"] == 9

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "bad"), "--n-test", "5", "--n-corrupt", "10"])
    assert exit_info.value.code == 2
    assert "n_corrupt (10) must not exceed n_test (5)" in capsys.readouterr().err
