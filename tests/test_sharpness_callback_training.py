"""``AdaptiveSharpness`` during training: the schedule, the logged curve, an untouched trajectory, and DDP."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lit_sharp.callbacks.sharpness import SECONDS_KEY, AdaptiveSharpness
from lit_sharp.sharpness import SharpnessSpec, sharpness
from test_sharpness_callback import MemoryLogger, TinyClassifier, _data, _manual_batches

HERE = Path(__file__).resolve().parent
WORST = SharpnessSpec("worst", "linf", 0.01, n_iters=3)
AVERAGE = SharpnessSpec("average", "l2", 0.1, n_samples=3)


def _fit_trainer(callbacks: list[pl.Callback], logger: Any = False, **settings: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=callbacks, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      **settings)  # fmt: skip


class Snapshots(pl.Callback):
    """The module's weights at every hook where a scheduled measurement may happen, keyed by global step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def _keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._keep(trainer, pl_module)


def test_measures_on_the_schedule_and_logs_each_measurement_at_its_step() -> None:
    torch.manual_seed(0)
    module, dataset, logger, snapshots = TinyClassifier("batch"), _data(64), MemoryLogger(), Snapshots()
    callback = AdaptiveSharpness([WORST, AVERAGE], dataloader=DataLoader(dataset, batch_size=16), n_examples=32,
                                 batch_size=16, every_n_epochs=2, every_n_steps=3)  # fmt: skip
    # 4 steps per epoch, 3 epochs: steps 3, 6, 9, 12 and the end of the second epoch (step 8); the end of training
    # (step 12) would repeat the last one and is not measured again.
    _fit_trainer([callback, snapshots], logger, max_epochs=3).fit(module, DataLoader(dataset, batch_size=16))

    assert [(entry["epoch"], entry["step"]) for entry in callback.history] == [(0, 3), (1, 6), (1, 8), (2, 9), (2, 12)]
    assert [step for _, step in logger.logged] == [3, 6, 8, 9, 12]
    batches = _manual_batches(dataset, 32, 16)
    for entry, (metrics, _) in zip(callback.history, logger.logged):
        model = TinyClassifier("batch")
        model.load_state_dict(snapshots.states[entry["step"]])
        for spec in (WORST, AVERAGE):
            expected = sharpness(model, batches, spec)
            assert entry[f"sharpness/{spec.name}"] == pytest.approx(expected.value, rel=1e-6)
            assert metrics[f"sharpness/{spec.name}"] == entry[f"sharpness/{spec.name}"]
            assert metrics[f"sharpness_err_increase/{spec.name}"] == pytest.approx(expected.err_increase, abs=1e-9)
        assert metrics["epoch"] == entry["epoch"] and metrics[SECONDS_KEY] == entry[SECONDS_KEY] > 0
    assert len({entry[f"sharpness/{WORST.name}"] for entry in callback.history}) == 5  # the weights moved
    assert callback.results == {key: value for key, value in callback.history[-1].items()
                                if key.startswith(("sharpness/", "sharpness_err_increase/"))}  # fmt: skip

    restored = AdaptiveSharpness([WORST, AVERAGE], every_n_epochs=2, every_n_steps=3)
    restored.load_state_dict(callback.state_dict())
    assert (restored.results, restored.history) == (callback.results, callback.history)


class NoisyImages(Dataset):
    """Draws from numpy's and Python's global generators, as augmentations do, so a stray draw shifts the data."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 4, 4, generator=generator)
        self.y = torch.randint(0, 5, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = float(np.random.uniform(-0.1, 0.1)) + random.uniform(-0.1, 0.1)
        return self.x[index] + noise, self.y[index]


class DropoutClassifier(pl.LightningModule):
    """BatchNorm (running statistics), dropout (torch's generator), momentum (optimizer state); records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))  # fmt: skip
        self.seen: list[tuple[torch.Tensor, list[bool]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append((x.clone(), [module.training for module in self.modules()]))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _train_bitwise_run(with_callback: bool) -> tuple[DropoutClassifier, pl.Trainer, tuple[Any, ...]]:
    pl.seed_everything(0, verbose=False)
    module = DropoutClassifier()
    # Shuffled and noisy both: reading it draws from torch's, numpy's and Python's generators.
    sharpness_loader = DataLoader(NoisyImages(24), batch_size=8, shuffle=True)
    callbacks = [AdaptiveSharpness([WORST, AVERAGE], dataloader=sharpness_loader, n_examples=24, batch_size=8,
                                   every_n_epochs=1, every_n_steps=2)] if with_callback else []  # fmt: skip
    trainer = _fit_trainer(callbacks, max_epochs=2)
    trainer.fit(module, DataLoader(NoisyImages(32), batch_size=8, shuffle=True))
    if with_callback:
        assert len(callbacks[0].history) == 4  # steps 2, 4 (end of epoch 0 too), 6, 8 (end of training too)
    rng = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    return module, trainer, rng


def _assert_bitwise_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_bitwise_equal(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


def test_training_is_bitwise_the_same_with_and_without_the_callback() -> None:
    plain, plain_trainer, plain_rng = _train_bitwise_run(with_callback=False)
    measured, measured_trainer, measured_rng = _train_bitwise_run(with_callback=True)
    _assert_bitwise_equal(measured.seen, plain.seen)  # the data order and noise, and every submodule's mode
    _assert_bitwise_equal(measured.state_dict(), plain.state_dict())  # weights and BatchNorm statistics
    _assert_bitwise_equal(measured_trainer.optimizers[0].state_dict(), plain_trainer.optimizers[0].state_dict())
    _assert_bitwise_equal(measured_rng, plain_rng)
    _assert_bitwise_equal([param.grad for param in measured.parameters()], [param.grad for param in plain.parameters()])


def test_two_ddp_processes_log_what_one_process_measures(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    done = subprocess.run([sys.executable, str(HERE / "ddp_sharpness_run.py"), str(tmp_path)], cwd=tmp_path,
                          env={**env, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]  # results and the whole history, bit for bit
    assert [(entry["epoch"], entry["step"]) for entry in ranks[0]["history"]] == [(0, 2), (1, 4)]

    import ddp_sharpness_run as script

    module = script.Classifier()
    module.load_state_dict(torch.load(tmp_path / "final.pt"))
    for spec in script.SPECS:
        expected = sharpness(module, script.sharpness_batches(), spec)
        # One process: the same computation; only the CPU threads (and so float reduction order) may differ.
        assert ranks[0]["results"][f"sharpness/{spec.name}"] == pytest.approx(expected.value, rel=1e-5)
        assert ranks[0]["results"][f"sharpness_err_increase/{spec.name}"] == pytest.approx(expected.err_increase,
                                                                                             abs=1e-6)  # fmt: skip
