"""Tests for lit_sharp.corruptions and lit_sharp.callbacks.corruption.

The numbers are pinned on CIFAR-10-C folders whose answers are known: each image's pixels spell its label and
whether a probe model should get it wrong, so every error rate is a count the test makes itself.
"""

from __future__ import annotations

import csv
import doctest
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_sharp.callbacks.corruption
from lit_sharp.callbacks.corruption import CorruptionError
from lit_sharp.constants import CORRUPTIONS, EXTRA_CORRUPTIONS, NUM_CLASSES
from lit_sharp.corruptions import CorruptionDataError, check_cifar10c, corruption_error
from lit_sharp.data.synthetic import write_synthetic

# The training normalization of the paper's released code, written out rather than imported: the probe undoes it.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
N = 12  # images per severity in the small folders
LABEL_BASE, LABEL_STEP = 7, 20  # channel 0 of every pixel: LABEL_BASE + LABEL_STEP * label
WRONG, RIGHT = 200, 40  # channel 1: whether the probe is to answer wrongly
BACKGROUND, MARK = 90, 160  # channel 2: BACKGROUND everywhere but pixel (row 0, column 1), which catches transposes


# ---------------------------------------------------------------------------------------------
# A folder with known answers and a probe that reads them
# ---------------------------------------------------------------------------------------------


def _encode(labels: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (LABEL_BASE + LABEL_STEP * labels)[:, None, None]
    images[..., 1] = np.where(wrong, WRONG, RIGHT)[:, None, None]
    images[..., 2] = BACKGROUND
    images[:, 0, 1, 2] = MARK
    return images


def _write_known_folder(
    root: Path, n: int = N, seed: int = 0, adjust: Callable[[np.ndarray], None] | None = None
) -> dict[str, np.ndarray]:
    """Write ``root/CIFAR-10-C`` for ``n`` images per severity; return corruption -> which of its 5n rows are wrong.

    ``adjust`` may change each corruption's wrong-row mask in place before the file is written.
    """
    rng = np.random.default_rng(seed)
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    labels = np.tile(rng.integers(0, NUM_CLASSES, size=n), 5)
    wrong = {}
    for index, corruption in enumerate(CORRUPTIONS):
        rates = np.repeat(np.linspace(0.05, 0.6, 5) * (index + 1) / len(CORRUPTIONS), n)  # (5n,), grows by severity
        wrong[corruption] = rng.uniform(size=5 * n) < rates
        if adjust is not None:
            adjust(wrong[corruption])
        np.save(folder / f"{corruption}.npy", _encode(labels, wrong[corruption]))
    np.save(folder / "labels.npy", labels.astype(np.uint8))
    return wrong


class Probe(nn.Module):
    """Undoes the normalization, reads each image's label and flag from its pixels, answers accordingly."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the probe a device and a dtype
        self.head = nn.Identity()
        self.calls = 0
        self.seen: set[tuple[bool, bool, torch.dtype]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen.add((self.training, torch.is_grad_enabled(), x.dtype))
        mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
        pixels = torch.round((x * std + mean) * 255)  # (B, 3, 32, 32)
        marks = torch.full_like(pixels[:, 2], BACKGROUND)
        marks[:, 0, 1] = MARK
        assert torch.equal(pixels[:, 2], marks), "channel order or orientation scrambled on the way in"
        label = ((pixels[:, 0, 0, 0] - LABEL_BASE) / LABEL_STEP).long()
        answer = torch.where(pixels[:, 1, 0, 0] == WRONG, (label + 1) % NUM_CLASSES, label)
        return self.head(F.one_hot(answer, NUM_CLASSES).to(x.dtype) * 5 + self.anchor)


def _expected_full(wrong: dict[str, np.ndarray], n: int) -> dict[str, float]:
    expected = {f"c10c/{c}/s{s}": int(rows[(s - 1) * n: s * n].sum()) / n for c, rows in wrong.items()
                for s in range(1, 6)}
    expected["c10c/err"] = int(sum(rows.sum() for rows in wrong.values())) / (len(CORRUPTIONS) * 5 * n)
    return expected


def _expected_paper(wrong: dict[str, np.ndarray], n: int) -> float:
    first = min(1000, n)
    return int(sum(rows[4 * n: 4 * n + first].sum() for rows in wrong.values())) / (len(CORRUPTIONS) * first)


@pytest.fixture
def known(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, _write_known_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [5, 500])  # 5 splits every severity of 12 images unevenly
def test_full_protocol_gives_every_cell_and_the_mean(known, batch_size: int) -> None:
    root, wrong = known
    results = corruption_error(Probe(), root, protocol="full", batch_size=batch_size)
    expected = _expected_full(wrong, N)
    assert results == expected  # exact: every value is a count divided by a count
    assert len(results) == 1 + 15 * 5
    assert len(set(results.values())) > 10  # the cells really differ, so a mix-up of cells would show


def test_paper_protocol_uses_severity_five(known) -> None:
    root, wrong = known
    results = corruption_error(Probe(), root, protocol="paper", batch_size=7)
    assert results == {"c10c/err": _expected_paper(wrong, N)}
    # against the full protocol's cells: the mean of the 15 severity-5 errors
    full = corruption_error(Probe(), root, protocol="full")
    assert results["c10c/err"] == pytest.approx(np.mean([full[f"c10c/{c}/s5"] for c in CORRUPTIONS]), abs=1e-15)


def test_paper_protocol_takes_the_first_1000_images(tmp_path: Path) -> None:
    n = 1003

    def wrong_outside_the_paper_rows(rows: np.ndarray) -> None:  # none of these may count
        rows[: 4 * n] = True
        rows[4 * n + 1000:] = True

    wrong = _write_known_folder(tmp_path, n=n, seed=1, adjust=wrong_outside_the_paper_rows)
    result = corruption_error(Probe(), tmp_path, protocol="paper")["c10c/err"]
    assert result == _expected_paper(wrong, n)
    assert result < 0.5


def test_inputs_are_normalized_bitwise_as_torchvision_does(known) -> None:
    from torchvision import transforms

    root, _ = known
    seen: list[torch.Tensor] = []

    class Recorder(Probe):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return super().forward(x)

    corruption_error(Recorder(), root, batch_size=N)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])  # the released code's
    first = np.load(root / "CIFAR-10-C" / f"{CORRUPTIONS[0]}.npy")[4 * N: 5 * N]  # the first batch: severity 5
    reference = torch.stack([transform(image) for image in first])
    assert seen[0].shape == (N, 3, 32, 32) and seen[0].is_contiguous()
    assert torch.equal(seen[0], reference)


def test_extra_corruption_files_never_count(known) -> None:
    root, wrong = known
    for corruption in EXTRA_CORRUPTIONS:
        (root / "CIFAR-10-C" / f"{corruption}.npy").write_bytes(b"garbage that would fail any check")
    assert corruption_error(Probe(), root, protocol="full") == _expected_full(wrong, N)
    assert corruption_error(Probe(), root) == {"c10c/err": _expected_paper(wrong, N)}


def test_runs_in_eval_mode_without_gradients_and_restores_the_flags(known) -> None:
    root, _ = known
    probe = Probe().train()
    probe.head.eval()  # a submodule the caller keeps in evaluation mode
    corruption_error(probe, root)
    assert probe.seen == {(False, False, torch.float32)}
    assert probe.training and not probe.head.training
    assert probe.anchor.grad is None


def test_device_and_dtype_follow_the_model(known) -> None:
    root, wrong = known
    probe = Probe().double()
    assert corruption_error(probe, root, device="cpu") == {"c10c/err": _expected_paper(wrong, N)}
    assert probe.seen == {(False, False, torch.float64)}


def test_works_on_the_synthetic_folder(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path, n_train=50, n_test=20, n_corrupt=10)
    labels = np.load(root / "CIFAR-10-C" / "labels.npy")

    class Constant(nn.Module):  # always answers class 3
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.one_hot(torch.full((len(x),), 3), NUM_CLASSES).float()

    results = corruption_error(Constant(), root, protocol="full")
    share_not_3 = float(np.mean(labels != 3))
    assert results["c10c/err"] == pytest.approx(share_not_3, abs=1e-12)
    assert results["c10c/fog/s2"] == pytest.approx(float(np.mean(labels[10:20] != 3)), abs=1e-12)
    assert check_cifar10c(root) == 10


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, array)


def _write_npz(path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, images=np.zeros((5 * N, 32, 32, 3), np.uint8))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "missing file": ("frost.npy", lambda p: p.unlink(), "file not found"),
    "truncated file": ("motion_blur.npy", _truncate, "is truncated or is not a .npy array"),
    "empty file": ("snow.npy", lambda p: p.write_bytes(b""), "is truncated or is not a .npy array"),
    "not an npy": ("fog.npy", lambda p: p.write_bytes(b"<html>not found</html>"), "is truncated or is not a .npy"),
    "npz archive": ("zoom_blur.npy", _write_npz, "is an .npz archive"),
    "wrong channels": ("contrast.npy", lambda p: _save(p, np.zeros((5 * N, 32, 32, 1), np.uint8)),
                       f"found uint8 of shape ({5 * N}, 32, 32, 1); expected uint8 of shape ({5 * N}, 32, 32, 3)"),
    "too few rows": ("pixelate.npy", lambda p: _save(p, np.zeros((5 * N - 1, 32, 32, 3), np.uint8)),
                     f"expected uint8 of shape ({5 * N}, 32, 32, 3)"),
    "float images": ("brightness.npy", lambda p: _save(p, np.zeros((5 * N, 32, 32, 3), np.float32)),
                     "found float32"),
    "labels not 5n": ("labels.npy", lambda p: _save(p, np.zeros(5 * N + 1, np.uint8)),
                      f"holds {5 * N + 1} labels; it must hold 5n"),
    "labels out of range": ("labels.npy", lambda p: _save(p, np.full(5 * N, 10, np.uint8)), "must lie in [0, 10)"),
    "float labels": ("labels.npy", lambda p: _save(p, np.zeros(5 * N, np.float32)), "1-D integer array"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_named_before_anything_runs(known, case: str) -> None:
    root, _ = known
    name, damage, why = BAD_FILES[case]
    damage(root / "CIFAR-10-C" / name)
    probe = Probe()
    with pytest.raises(CorruptionDataError, match=re.escape(why)) as error:
        corruption_error(probe, root, protocol="full")
    assert error.value.path == root / "CIFAR-10-C" / name
    assert str(root / "CIFAR-10-C" / name) in str(error.value)
    assert "https://zenodo.org/records/2535967" in str(error.value)
    assert f"python -m lit_sharp.data.synthetic {root}" in str(error.value)
    assert probe.calls == 0  # checked up front, not after evaluating the good files


def test_labels_that_do_not_match_the_images(known) -> None:
    root, _ = known
    np.save(root / "CIFAR-10-C" / "labels.npy", np.zeros(5 * (N + 1), np.uint8))  # a valid 5n, but another n
    with pytest.raises(CorruptionDataError, match=f"one image per entry of labels.npy \\({5 * (N + 1)} labels\\)"):
        check_cifar10c(root)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(CorruptionDataError, match="CIFAR-10-C: folder not found") as error:
        corruption_error(Probe(), tmp_path / "data")
    assert error.value.path == tmp_path / "data" / "CIFAR-10-C"
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"protocol": "severity5"}, "protocol must be one of .*'severity5'"),
     ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
     ({"batch_size": 2.0}, "batch_size must be an integer >= 1, got 2.0")],
)
def test_bad_arguments_are_named(known, arguments: dict, message: str) -> None:
    root, _ = known
    with pytest.raises(ValueError, match=message):
        corruption_error(Probe(), root, **arguments)


def test_a_model_without_class_logits_is_refused(known) -> None:
    root, _ = known
    with pytest.raises(ValueError, match=r"logits of shape \(batch, classes\).*returned shape \(12, 3, 32, 32\)"):
        corruption_error(nn.Identity(), root, batch_size=12)


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------


class TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, NUM_CLASSES))
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), n_train=50, n_test=20, n_corrupt=10)


def _train_loader(root: Path) -> DataLoader:
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    x = torch.from_numpy(batch["data"]).view(-1, 3, 32, 32).float().div(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return DataLoader(TensorDataset(x, torch.tensor(batch["labels"])), batch_size=10)


def _trainer(callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    settings = {"max_steps": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "accelerator": "cpu", **kwargs}
    return pl.Trainer(callbacks=callbacks, **settings)


def test_callback_numbers_equal_the_function(synthetic_root: Path) -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    full = CorruptionError(synthetic_root, protocol="full", batch_size=16)
    paper = CorruptionError(synthetic_root)
    assert full.state_key != paper.state_key  # two instances coexist in one trainer and its checkpoints
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    _trainer([full, paper]).fit(model, _train_loader(synthetic_root))

    assert model.steps == 1
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())  # it did train
    assert full.results == corruption_error(model, synthetic_root, protocol="full")
    assert paper.results == corruption_error(model, synthetic_root, protocol="paper")
    assert len(full.results) == 76 and set(paper.results) == {"c10c/err"}


def test_callback_logs_to_the_loggers(synthetic_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    callback = CorruptionError(synthetic_root)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = _trainer([callback], logger=logger, log_every_n_steps=1)
    trainer.fit(TinyClassifier(), _train_loader(synthetic_root))

    with open(tmp_path / "run" / "version_0" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("c10c/err")]
    assert len(rows) == 1
    assert float(rows[0]["c10c/err"]) == pytest.approx(callback.results["c10c/err"], rel=1e-6)
    assert int(rows[0]["step"]) == trainer.global_step


def test_callback_fails_before_training_on_a_bad_root(tmp_path: Path, synthetic_root: Path) -> None:
    model = TinyClassifier()
    with pytest.raises(CorruptionDataError, match="CIFAR-10-C: folder not found"):
        _trainer([CorruptionError(tmp_path / "nowhere")]).fit(model, _train_loader(synthetic_root))
    assert model.steps == 0


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [({"protocol": "Paper"}, ValueError, "protocol must be one of .*'Paper'"),
     ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
     ({"batch_size": True}, ValueError, "batch_size must be an integer >= 1, got True"),
     ({"root": 3}, TypeError, "root must be a path .* got 3")],
)
def test_callback_validates_its_arguments(arguments: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        CorruptionError(**{"root": "data", **arguments})


def test_callback_docstring_example_runs() -> None:
    outcome = doctest.testmod(lit_sharp.callbacks.corruption, verbose=False)
    assert outcome.attempted > 0 and outcome.failed == 0
