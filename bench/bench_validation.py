"""What the per-epoch test-error curve (``val/err``, ``val/loss``) costs, as a share of training time.

The paper's proportions: an epoch trains on 50,000 images (SAM: two forward and two backward passes per image),
validation classifies the 10,000 test images (one forward pass, no gradients). Both are timed here through the
real ``Trainer`` and ``ClassifierModule`` on a synthetic set at the same 5:1 proportion, and in the same process:

- ``per_image_ratio``: seconds per validation image / seconds per training image (medians over epochs);
- ``overhead_every_epoch``: ``per_image_ratio * 10,000 / 50,000``, the extra time of validating after every epoch;
- ``overhead_every_<k>``: the same for ``trainer.check_val_every_n_epoch=k``;
- ``fit_ratio``: the measured fit time with validation every epoch / without (the check of the estimate).

Run as ``python bench/bench_validation.py [--width 16] [--epochs 4]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_sharp.data import CIFAR10DataModule
from lit_sharp.data.synthetic import write_synthetic
from lit_sharp.models import preact_resnet18
from lit_sharp.module import ClassifierModule

PAPER_TRAIN, PAPER_TEST = 50_000, 10_000
EVERY = (1, 2, 3, 5, 10)


class _Timer(pl.Callback):
    """Seconds of every training epoch (validation excluded) and of every validation run."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []
        self._val_seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._val_seconds = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._val_seconds = time.perf_counter() - self._val_start
        self.val.append(self._val_seconds)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning validates after the last batch and before this hook: take its time out.
        self.train.append(time.perf_counter() - self._start - self._val_seconds)


def _fit(datamodule: CIFAR10DataModule, width: int, epochs: int, sam_rho: float, validate: bool) -> tuple[_Timer, float]:
    torch.manual_seed(0)
    module = ClassifierModule(preact_resnet18(width=width), lr=0.05, sam_rho=sam_rho)
    timer = _Timer()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
                         check_val_every_n_epoch=1)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return timer, time.perf_counter() - start


def measure(root: Path, *, width: int, epochs: int, n_train: int, sam_rho: float) -> dict[str, float]:
    """Per-image costs and the overhead of validation at the paper's proportions (see the module docstring)."""
    n_test = n_train * PAPER_TEST // PAPER_TRAIN
    datamodule = CIFAR10DataModule(root, batch_size=128, eval_batch_size=500, pipeline="workers")
    plain_timer, plain_seconds = _fit(datamodule, width, epochs, sam_rho, validate=False)
    timer, seconds = _fit(datamodule, width, epochs, sam_rho, validate=True)
    # The first epoch pays for set-up and warm-up.
    train_per_image = statistics.median(plain_timer.train[1:] + timer.train[1:]) / n_train
    val_per_image = statistics.median(timer.val[1:]) / n_test
    ratio = val_per_image / train_per_image
    every_epoch = ratio * PAPER_TEST / PAPER_TRAIN
    return {"per_image_ratio": ratio, "fit_ratio": seconds / plain_seconds,
            **{f"overhead_every_{k}": every_epoch / k for k in EVERY}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="PreAct ResNet-18 width (the paper's is 64)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=1280, help="training images (test images: a fifth)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_synthetic(root, seed=0, n_train=args.n_train, n_test=args.n_train // 5, n_corrupt=10)
        for name, rho in (("sam", 0.05), ("sgd", 0.0)):
            result = measure(root, width=args.width, epochs=args.epochs, n_train=args.n_train, sam_rho=rho)
            print(f"{name}: " + " ".join(f"{key}={value:.4f}" for key, value in result.items()), flush=True)


if __name__ == "__main__":
    main()
