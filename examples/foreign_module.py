"""Measure the sharpness of a LightningModule of your own while it trains.

Nothing here comes from lit_sharp but the callback: the module, the data and the Trainer are the kind any project
has. The three lines that matter are marked; the rest is an ordinary Lightning script that runs in seconds on a CPU::

    pip install lit_sharp        # or, from a checkout: pip install -e .
    python examples/foreign_module.py [log dir]

Every epoch the callback measures worst-case adaptive linf sharpness (Auto-PGD in weight space) and average-case
adaptive l2 sharpness on 256 fixed training examples, and logs them with the epoch and the global step; the
script then prints the curve that the CSV logger wrote.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_sharp.callbacks import AdaptiveSharpness  # (1) import the callback

SPECS = ["worst_linf_adaptive_rho0.002", "average_l2_adaptive_rho0.1"]


class MyClassifier(pl.LightningModule):
    """A small MLP, standing in for any classifier whose forward returns logits."""

    def __init__(self, features: int = 20, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def random_task(n: int = 512, features: int = 20, classes: int = 4) -> TensorDataset:
    """Random inputs labelled by a fixed random linear map: learnable, so the curve moves."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    labels = (x @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
    return TensorDataset(x, labels)


def main(log_dir: Path) -> Path:
    """Train for 5 epochs with the sharpness measured after each; returns the CSV file of the logged metrics."""
    pl.seed_everything(0, verbose=False)
    data = random_task()
    train = DataLoader(data, batch_size=32, shuffle=True)
    probe = DataLoader(data, batch_size=128)  # fixed examples, in order, without augmentation
    # (2) build it: which sharpness, on which examples, how often
    sharpness = AdaptiveSharpness(SPECS, dataloader=probe, n_examples=256, batch_size=128, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        callbacks=[sharpness],  # (3) hand it to the Trainer
        logger=CSVLogger(log_dir, name="foreign_module"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MyClassifier(), train)
    return Path(trainer.logger.log_dir) / "metrics.csv"


def print_curve(metrics_csv: Path) -> None:
    """The sharpness rows of the CSV the logger wrote: one per measurement."""
    with metrics_csv.open() as file:
        rows = [row for row in csv.DictReader(file) if row.get(f"sharpness/{SPECS[0]}")]
    print(f"{'epoch':>5} {'step':>5} " + " ".join(f"{spec:>30}" for spec in SPECS) + f" {'seconds':>8}")
    for row in rows:
        values = " ".join(f"{float(row[f'sharpness/{spec}']):30.6f}" for spec in SPECS)
        print(f"{int(float(row['epoch'])):5d} {int(row['step']):5d} {values} {float(row['sharpness_cost/seconds']):8.2f}")
    print(f"logged to {metrics_csv}")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="foreign_module_"))
    print_curve(main(out))
