"""Tests of ``lit_sharp.callbacks.sharpness.AdaptiveSharpness`` in a real Trainer, with LightningModules foreign to lit_sharp."""

from __future__ import annotations

import doctest
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_sharp.callbacks.sharpness as callback_module
from lit_sharp.callbacks.sharpness import SECONDS_KEY, AdaptiveSharpness
from lit_sharp.sharpness import SharpnessSpec, preset, sharpness

N_EXAMPLES, BATCH_SIZE = 40, 16
WORST = SharpnessSpec("worst", "linf", 0.01, n_iters=3)
AVERAGE = SharpnessSpec("average", "l2", 0.1, adaptive=False, n_samples=3)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: a real Logger, so the callback goes through Lightning's logging path."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class TinyClassifier(pl.LightningModule):
    """Not lit_sharp's module: a conv net with BatchNorm or an MLP with LayerNorm."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        if norm == "batch":
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))  # fmt: skip
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=generator), torch.randint(0, 5, (n,), generator=generator))


def _trainer(callbacks: list[pl.Callback], logger: Logger | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=logger or False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip


def _manual_batches(dataset: TensorDataset, n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = dataset.tensors
    return [(x[i : min(i + size, n)], y[i : min(i + size, n)]) for i in range(0, n, size)]


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_logs_what_sharpness_gives_on_the_trained_module(norm: str) -> None:
    torch.manual_seed(0)
    module, dataset, logger = TinyClassifier(norm), _data(), MemoryLogger()
    loader = DataLoader(dataset, batch_size=12)  # re-batched into 16, 16, 8
    first = AdaptiveSharpness([WORST, AVERAGE], dataloader=loader, n_examples=N_EXAMPLES, batch_size=BATCH_SIZE)
    second = AdaptiveSharpness([WORST.name], dataloader=loader, n_examples=N_EXAMPLES, batch_size=BATCH_SIZE // 2)
    assert first.state_key != second.state_key
    _trainer([first, second], logger).fit(module, DataLoader(dataset, batch_size=16, shuffle=True))

    logged = {key: value for metrics, _ in logger.logged for key, value in metrics.items()}
    batches = _manual_batches(dataset, N_EXAMPLES, BATCH_SIZE)
    for spec in (WORST, AVERAGE):
        expected = sharpness(module, batches, spec)
        assert first.results[f"sharpness/{spec.name}"] == pytest.approx(expected.value, rel=1e-6)
        assert first.results[f"sharpness_err_increase/{spec.name}"] == pytest.approx(expected.err_increase, abs=1e-9)
    assert set(first.results) == {f"{prefix}/{spec.name}" for prefix in ("sharpness", "sharpness_err_increase")
                                  for spec in (WORST, AVERAGE)}  # fmt: skip
    measured = {key: value for key, value in logged.items() if key.startswith(("sharpness/", "sharpness_err_increase/"))}
    assert measured == pytest.approx(first.results | second.results)
    for metrics, step in logger.logged:  # one call per callback, at the last step, with the epoch and the cost
        assert step == 3 and metrics["epoch"] == module.current_epoch and metrics[SECONDS_KEY] > 0
    assert len(logger.logged) == 2 and [len(first.history), len(second.history)] == [1, 1]
    # The second instance works on its own batches of 8 and, built from a name, runs the default 20 iterations.
    by_name = SharpnessSpec.from_name(WORST.name)
    expected = sharpness(module, _manual_batches(dataset, N_EXAMPLES, BATCH_SIZE // 2), by_name)
    assert second.results[f"sharpness/{WORST.name}"] == pytest.approx(expected.value, rel=1e-6)
    assert first.results[f"sharpness/{WORST.name}"] > 0


class SharpnessDataModule(pl.LightningDataModule):
    def __init__(self, dataset: TensorDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=16)

    def sharpness_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=7)


def test_falls_back_to_the_datamodule_and_uses_only_the_first_examples() -> None:
    torch.manual_seed(0)
    module, dataset = TinyClassifier("batch"), _data(50)
    callback = AdaptiveSharpness([AVERAGE], n_examples=30, batch_size=8)  # 7-example batches re-cut to 8, 8, 8, 6
    _trainer([callback]).fit(module, datamodule=SharpnessDataModule(dataset))
    expected = sharpness(module, _manual_batches(dataset, 30, 8), AVERAGE)
    assert callback.results[f"sharpness/{AVERAGE.name}"] == pytest.approx(expected.value, rel=1e-6)


def test_without_data_it_fails_before_training() -> None:
    module = TinyClassifier("layer")
    callback = AdaptiveSharpness([WORST])
    with pytest.raises(MisconfigurationException, match="dataloader=.*sharpness_dataloader"):
        _trainer([callback]).fit(module, DataLoader(_data(), batch_size=16))
    assert module.global_step == 0 and callback.results == {}


def test_warns_when_the_dataloader_holds_fewer_examples_than_asked() -> None:
    module, dataset = TinyClassifier("layer"), _data(20)
    callback = AdaptiveSharpness([AVERAGE], dataloader=DataLoader(dataset, batch_size=8), n_examples=64, batch_size=8)
    with pytest.warns(UserWarning, match="20 examples"):
        _trainer([callback]).fit(module, DataLoader(dataset, batch_size=8))
    expected = sharpness(module, _manual_batches(dataset, 20, 8), AVERAGE)
    assert callback.results[f"sharpness/{AVERAGE.name}"] == pytest.approx(expected.value, rel=1e-6)


def test_specs_accept_presets_names_and_objects() -> None:
    assert AdaptiveSharpness("paper_simplevit").specs == preset("paper_simplevit")
    assert AdaptiveSharpness(["paper_resnet18"]).specs == preset("paper_resnet18")
    names = ["worst_linf_adaptive_ln_rho0.002", "sharpness/average_l2_standard_rho0.1"]
    assert AdaptiveSharpness(names).specs == [SharpnessSpec.from_name(name) for name in names]
    assert AdaptiveSharpness(WORST).specs == [WORST]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(specs="paper_resnet50"), "paper_resnet18.*paper_simplevit"),
        (dict(specs=["worst_linf_adaptive_rho0"]), "rho"),
        (dict(specs=["worst_l3_adaptive_rho0.1"]), "norm"),
        (dict(specs=["typical_linf_adaptive_rho0.1"]), "kind"),
        (dict(specs=[]), "empty"),
        (dict(specs=[WORST, WORST.name]), "more than once"),
        (dict(specs=[3]), "entries"),
        (dict(specs=[WORST], n_examples=0), "n_examples"),
        (dict(specs=[WORST], batch_size=0), "batch_size"),
        (dict(specs=[WORST], dataloader=5), "dataloader"),
        (dict(specs=[WORST], every_n_epochs=0), "every_n_epochs must be an integer >= 1 or None, got 0"),
        (dict(specs=[WORST], every_n_steps=True), "every_n_steps must be an integer >= 1 or None, got True"),
        (dict(specs=[WORST], every_n_steps=2.0), "every_n_steps .* got 2.0"),
    ],
)
def test_bad_arguments_raise_in_init_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveSharpness(**kwargs)


@pytest.mark.parametrize("name", ["loss_fn", "batch_transform", "forward_fn"])
def test_hooks_that_are_not_callable_raise_in_init_naming_them(name: str) -> None:
    with pytest.raises(TypeError, match=f"{name} must be callable or None, got 'mse'"):
        AdaptiveSharpness([WORST], **{name: "mse"})


def test_n_iters_below_one_is_rejected_when_the_spec_is_built() -> None:
    with pytest.raises(ValueError, match="n_iters"):
        AdaptiveSharpness([SharpnessSpec("worst", "linf", 0.01, n_iters=0)])


def test_docstring_example_runs() -> None:
    failures, attempted = doctest.testmod(callback_module, raise_on_error=False, verbose=False)
    assert attempted > 0 and failures == 0
