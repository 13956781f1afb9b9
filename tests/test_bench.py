"""The GPU benchmark's code paths, run on the CPU at toy sizes so the script is known to work before a GPU runs it."""

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_gpu  # noqa: E402

TINY_RESNET = {"width": 4, "blocks_per_stage": 1}


def test_training_flops_of_a_linear_model_match_the_closed_form(monkeypatch):
    # A Linear(d, k) classifier: forward 2dk flops per image; backward only the weight gradient, another 2dk
    # (the input needs no gradient); bias and loss terms are not matmuls and are not counted.
    monkeypatch.setitem(bench_gpu.MODELS, "linear", lambda: torch.nn.Sequential(torch.nn.Flatten(),
                                                                                 torch.nn.Linear(3 * 32 * 32, 10)))
    flops = bench_gpu.train_flops_per_image("linear", device="cpu")
    d, k = 3 * 32 * 32, 10
    assert flops == pytest.approx(2 * d * k + 2 * d * k)


def test_throughput_runs_the_real_training_path():
    img_s = bench_gpu.throughput("resnet18", sam=True, precision="32-true", steps=2, warmup=1, device="cpu",
                                 n_images=512, **TINY_RESNET)
    assert img_s > 0


def test_preset_timing_covers_the_48_specs(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_gpu, "sharpness", lambda model, batches, spec: calls.append(spec.name))
    assert bench_gpu.preset_seconds("resnet18", device="cpu", n_batches=1, **TINY_RESNET) >= 0
    assert len(calls) == len(set(calls)) == 48
