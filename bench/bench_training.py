"""Training-loop costs: our Trainer + module against a plain PyTorch loop, and the augmented DataLoader's throughput.

- ``lightning_overhead``: median time per training epoch through ``lightning.Trainer`` and ``ClassifierModule``
  divided by that of a plain loop doing the same work (same model, batches, SGD, schedule, precision). Target <= 1.05.
- ``dataloader_img_s_per_worker``: training images per second that one DataLoader worker delivers with
  ``augment=true`` (RandAugment(2, 14), crop, flip); it tells how many workers a GPU needs.

Run as ``python bench/bench_training.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lit_sharp.data import CIFAR10DataModule
from lit_sharp.data.synthetic import write_synthetic
from lit_sharp.models import preact_resnet18
from lit_sharp.module import ClassifierModule
from lit_sharp.schedule import warmup_linear_lr

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _lightning_epochs(datamodule: CIFAR10DataModule, width: int, epochs: int) -> list[float]:
    torch.manual_seed(0)
    module = ClassifierModule(preact_resnet18(width=width), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    timer = _EpochTimer()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return timer.seconds[1:]  # the first epoch pays for set-up and warm-up


def _plain_epochs(datamodule: CIFAR10DataModule, width: int, epochs: int) -> list[float]:
    torch.manual_seed(0)
    model = preact_resnet18(width=width)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loader = datamodule.train_dataloader()
    total, step, seconds = epochs * len(loader), 0, []
    model.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for x, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = warmup_linear_lr(step, total, LR)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def _throughput_per_worker(datamodule: CIFAR10DataModule, batches: int) -> float:
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    seen = sum(len(next(iterator)[1]) for _ in range(batches))
    return seen / (time.perf_counter() - start) / max(datamodule.num_workers, 1)


def measure(quick: bool = True) -> dict[str, float]:
    """Measure both figures on synthetic CIFAR-format data written to a temporary folder."""
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, n_train=1280 if quick else 5120, n_test=100, n_corrupt=10)
        plain_dm = CIFAR10DataModule(root, batch_size=128, augment=False, num_workers=0)
        plain_dm.setup()
        epochs, width = (4, 16) if quick else (6, 32)
        lightning_seconds, plain_seconds = [], []
        for _ in range(2):  # interleaved, so drifts of the machine's speed hit both sides
            plain_seconds += _plain_epochs(plain_dm, width, epochs)
            lightning_seconds += _lightning_epochs(plain_dm, width, epochs)
        augmented = CIFAR10DataModule(root, batch_size=128, augment=True, num_workers=1)
        augmented.setup()
        img_s = _throughput_per_worker(augmented, batches=6 if quick else 30)
    return {
        "lightning_overhead": statistics.median(lightning_seconds) / statistics.median(plain_seconds),
        "lightning_epoch_s": statistics.median(lightning_seconds),
        "plain_epoch_s": statistics.median(plain_seconds),
        "dataloader_img_s_per_worker": img_s,
    }


if __name__ == "__main__":
    for key, value in measure().items():
        print(f"{key}: {value:.4g}")
