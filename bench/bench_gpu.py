"""GPU figures of the campaign: training throughput and MFU of both paper models, the sharpness preset's time per model,
and the projected wall time of both paper grids. Needs a CUDA device; run through ``python bench/run.py``.

Throughput is measured through the real training path (Lightning ``Trainer``, ``ClassifierModule`` and the
device-resident data pipeline with augmentation) on 50,000 random CIFAR-size images held on the GPU, timing steady-state
steps between CUDA synchronisations after a warm-up. MFU is the model's training FLOPs per image (counted by
``torch.utils.flop_counter`` on one forward+backward) times images/s over the device's peak dense throughput.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lit_sharp import eval_mode
from lit_sharp.data.device_loader import DeviceTrainLoader
from lit_sharp.module import ClassifierModule
from lit_sharp.sharpness import preset, sharpness
from timing import seconds

#: Peak dense TFLOP/s by precision for the GPUs the campaign is sized for (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H200": {"bf16-mixed": 989.0, "32-true": 67.0}, "H100": {"bf16-mixed": 989.0, "32-true": 67.0},
               "A100": {"bf16-mixed": 312.0, "32-true": 19.5}}
TARGETS_S_200_EPOCHS = {("resnet18", False): 170, ("resnet18", True): 340, ("simplevit", False): 320, ("simplevit", True): 640}
TARGETS_PRESET_S = {"resnet18": 10, "simplevit": 20}
EPOCHS, TRAIN_IMAGES, BATCH = 200, 50_000, 128


def _preact_resnet18(**kwargs: Any) -> torch.nn.Module:
    from lit_sharp.models.preact_resnet import preact_resnet18

    return preact_resnet18(**kwargs)


def _simple_vit(**kwargs: Any) -> torch.nn.Module:
    # Imported when built: the ViT's dependencies stay out of the import path of code that does not build it.
    from lit_sharp.models.vit import simple_vit

    return simple_vit(**kwargs)


MODELS = {"resnet18": _preact_resnet18, "simplevit": _simple_vit}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer(pl.Callback):
    """Time from the start of step ``warmup`` to the end of training, with the device's queue drained at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.times.append(time.perf_counter())


def _peak(precision: str) -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((table[precision] for key, table in PEAK_TFLOPS.items() if key in name), None)


def train_flops_per_image(model_name: str, device: str = "cuda", **model_kwargs: Any) -> float:
    """Forward+backward FLOPs of one training image (one pass; SAM doubles it)."""
    model = MODELS[model_name](**model_kwargs).to(device)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(BATCH, dtype=torch.long, device=device)).backward()
    return counter.get_total_flops() / BATCH


def throughput(model_name: str, sam: bool, precision: str, *, steps: int = 200, warmup: int = 30, device: str = "cuda",
               n_images: int = TRAIN_IMAGES, **model_kwargs: Any) -> float:
    """Steady-state training images/s of the paper model (augment and mixup on) through the real training path."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_images)
    channels_last = model_name == "resnet18" and device == "cuda"
    loader = DeviceTrainLoader(images, labels, batch_size=BATCH, augment=True, seed=0, device=device, drop_last=True,
                               channels_last=channels_last)
    module = ClassifierModule(MODELS[model_name](**model_kwargs), lr=0.05, sam_rho=0.05 if sam else 0.0,
                              mixup_alpha=0.5, check_finite_every=100, channels_last=channels_last)
    timer = _StepTimer(warmup)
    trainer = pl.Trainer(accelerator="cuda" if device == "cuda" else "cpu", devices=1, precision=precision,
                         max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return steps * BATCH / (timer.times[1] - timer.times[0])


def preset_seconds(model_name: str, device: str = "cuda", n_batches: int = 8, batch_size: int = BATCH,
                   preset_kwargs: dict[str, int] | None = None, tf32: bool = False, **model_kwargs: Any) -> float:
    """Wall time of the model's paper preset (48 specs for the ResNet-18, 49 for the SimpleViT) on ``n_batches``
    batches of 128 (8: the paper's 1,024 images).

    ``preset_kwargs`` (``n_iters``, ``n_samples``) shrink the preset for a dry run; the figure uses the defaults.
    ``tf32=True`` times the preset with TF32 allowed for convolutions and matrix products instead of the IEEE float32
    that measurements use (:func:`lit_sharp.eval_mode.full_float32`): the baseline of that setting's cost.
    """
    model = MODELS[model_name](**model_kwargs).to(device)
    batches = [(torch.randn(batch_size, 3, 32, 32, device=device),
                torch.randint(0, 10, (batch_size,), device=device)) for _ in range(n_batches)]
    specs = preset(f"paper_{model_name}", **(preset_kwargs or {}))
    with mock.patch.object(eval_mode, "full_float32", _tf32_allowed) if tf32 else nullcontext():
        return seconds(lambda: [sharpness(model, batches, spec) for spec in specs], torch.device(device))


@contextmanager
def _tf32_allowed() -> Iterator[None]:
    """TF32 for cuDNN convolutions and cuBLAS matrix products (the API of the installed torch), restored after."""
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9
        nodes = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        saved = [node.fp32_precision for node in nodes]
        for node in nodes:
            node.fp32_precision = "tf32"
        try:
            yield
        finally:
            for node, value in zip(nodes, saved):
                node.fp32_precision = value
        return
    saved_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_flags


def measure() -> dict[str, Any]:
    """Every GPU figure, each beside its target; the projection assumes one run at a time per GPU."""
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "rows": []}
    grid_hours = 0.0
    for model_name in MODELS:
        flops = train_flops_per_image(model_name)
        preset_s = preset_seconds(model_name)
        n_specs = len(preset(f"paper_{model_name}"))
        results["rows"].append({"what": f"{model_name} sharpness preset ({n_specs} specs)", "value": preset_s, "unit": "s",
                                "target": TARGETS_PRESET_S[model_name]})
        results["rows"].append({"what": f"{model_name} sharpness preset ({n_specs} specs), TF32 allowed",
                                "value": preset_seconds(model_name, tf32=True), "unit": "s", "target": None})
        for sam in (False, True):
            for precision in ("32-true", "bf16-mixed"):
                img_s = throughput(model_name, sam, precision)
                run_s = EPOCHS * TRAIN_IMAGES / img_s
                peak = _peak(precision)
                mfu = img_s * flops * (2 if sam else 1) / (peak * 1e12) if peak else None
                results["rows"].append({
                    "what": f"{model_name} {'SAM' if sam else 'plain'} {precision}", "img_s": img_s, "mfu": mfu,
                    "value": run_s, "unit": "s per 200 epochs",
                    "target": TARGETS_S_200_EPOCHS[(model_name, sam)] if precision == "bf16-mixed" else None})
                if precision == "bf16-mixed":
                    runs = 68 if not sam else 136  # a third of each 204-run grid is plain SGD
                    grid_hours += runs * (run_s + preset_s) / 3600
    results["rows"].append({"what": "both paper grids", "value": grid_hours, "unit": "GPU-hours", "target": 48})
    return results
