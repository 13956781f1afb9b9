"""The pretrained-zoo bench (``bench/bench_zoo.py``) at a tiny size: its timed work is the work it names, its ratios
are plausible, and its GPU-hours projection is the hand-counted sum of passes."""

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_zoo  # noqa: E402

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
N_ITERS, N_BATCHES = 4, 2


@pytest.fixture(scope="module")
def result(one_thread):
    return bench_zoo.measure(device="cpu", model_kwargs=TINY_VIT, n_batches=N_BATCHES, batch_size=8,
                             n_iters=N_ITERS, repeats=3, decode_batches=0)


def test_sharpness_and_its_floor_make_the_same_passes(result):
    # Random start, per batch: a forward at delta = 0, a forward+backward at the start, n_iters - 1 steps with a
    # gradient, and the last step's forward alone.
    expected = (N_BATCHES * (N_ITERS + 2), N_BATCHES * N_ITERS)
    assert result["passes"]["sharpness"] == expected
    assert result["passes"]["floor"] == expected


def test_the_error_pass_and_the_bare_loop_classify_the_same_batches(result):
    batches = result["setting"]["eval_batches"]
    assert result["passes"]["error_pass"] == result["passes"]["bare_forward"] == (batches, 0)


def test_ratios_are_within_plausible_bands(result):
    # Wide bands: a shared CPU is noisy and this model is tiny; a ratio outside them means one side did other work.
    assert 0.5 < result["zoo_sharpness_vs_floor"] < 3.0
    assert 0.3 < result["zoo_error_pass_vs_bare"] < 2.0
    for key in ("zoo_sharpness_vs_floor", "zoo_error_pass_vs_bare"):
        spread = result["spread"][key]
        assert spread["min"] <= result[key] <= spread["max"]


def test_decoding_reads_the_written_jpegs_with_the_models_transform(tmp_path):
    folder = bench_zoo.write_jpeg_folder(tmp_path, size=(40, 30))
    assert len(list(folder.glob("*/*.JPEG"))) == 1000
    config = dict(input_size=(3, 16, 16), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert bench_zoo.decoded_img_s_per_worker(folder, config, batch_size=4, batches=2) > 0


def test_model_seconds_count_the_presets_passes_by_hand():
    f, fb = 1.0, 10.0  # seconds per batch of 256: forward, forward+backward
    # imagenet_augreg: 6 worst-case specs (20 steps, random start: 20 fb + 2 f per batch) and 6 average-case specs
    # (100 draws: 101 f per batch), on 8 batches; errors: 176,963 evaluation images + 10,000 training images.
    row = bench_zoo.model_seconds("augreg_in1k", f, fb)
    assert row["sharpness_s"] == pytest.approx(8 * (6 * (20 * fb + 2 * f) + 6 * 101 * f))
    assert row["errors_s"] == pytest.approx((50_000 + 10_000 + 50_889 + 30_000 + 7_500 + 18_574 + 10_000) / 256 * f)
    assert row["total_s"] == pytest.approx(row["sharpness_s"] + row["errors_s"])


def test_gpu_projection_times_both_architectures_without_tf32_and_restores_it(monkeypatch, one_thread):
    timed = []
    pass_seconds = bench_zoo.pass_seconds

    def recording(model, *args, **kwargs):
        timed.append((type(model).__name__, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return pass_seconds(model, *args, **kwargs)

    monkeypatch.setattr(bench_zoo, "pass_seconds", recording)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        projection = bench_zoo.gpu_projection("cpu", repeats=1, batch_size=2,
                                              model_kwargs={"img_size": 32, "depth": 1})
        restored = torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    # clip_b32 is the soups' classifier around the CLIP tower, vit_b16 timm's ViT.
    assert timed == [("NormalizedFeatureClassifier", False, False), ("VisionTransformer", False, False)]
    assert restored is True
    assert projection["zoos"]["clip_soups"]["models"] == 72
    for zoo, row in projection["zoos"].items():
        times = projection["passes"][bench_zoo.ZOO_ARCHITECTURE[zoo]]
        assert 0 < times["forward"] and 0 < times["forward_backward"]
        assert row["gpu_hours"] == pytest.approx(row["models"] * row["total_s"] / 3600)
