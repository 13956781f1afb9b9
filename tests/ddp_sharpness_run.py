"""Train a small classifier on two CPU processes (DDP, gloo) with ``AdaptiveSharpness`` measuring every epoch.

Run as ``python tests/ddp_sharpness_run.py <out dir>``: each rank writes ``rank<r>.json`` (its ``results`` and
``history``), rank 0 also the final weights (``final.pt``). Lightning's ``ddp`` strategy starts the second process
by running this script again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_sharp.callbacks import AdaptiveSharpness
from lit_sharp.sharpness import SharpnessSpec

SPECS = [SharpnessSpec("worst", "linf", 0.01, n_iters=3), SharpnessSpec("average", "l2", 0.1, n_samples=3)]
N_EXAMPLES, BATCH_SIZE = 24, 8


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=generator), torch.randint(0, 5, (n,), generator=generator))


def sharpness_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = dataset(N_EXAMPLES, seed=1).tensors
    return list(zip(x.split(BATCH_SIZE), y.split(BATCH_SIZE)))


def main(out: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callback = AdaptiveSharpness(SPECS, dataloader=DataLoader(dataset(N_EXAMPLES, seed=1), batch_size=BATCH_SIZE),
                                 n_examples=N_EXAMPLES, batch_size=BATCH_SIZE, every_n_epochs=1)  # fmt: skip
    module = Classifier()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(dataset(32, seed=0), batch_size=8))
    record = {"results": callback.results, "history": callback.history}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    if trainer.is_global_zero:
        torch.save(module.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
