import numpy as np
import pytest
import torch
from timm.data import Mixup

from lit_sharp.mixup import mix_batch, mixup_lambda
from lit_sharp.schedule import warmup_linear_lr


def test_schedule_values_at_start_peak_and_end():
    total, peak = 1000, 0.2
    assert warmup_linear_lr(0, total, peak) == 0.0
    assert warmup_linear_lr(200, total, peak) == pytest.approx(0.1)  # half-way up the 400-step warm-up
    assert warmup_linear_lr(400, total, peak) == pytest.approx(peak)  # 40% of training
    assert warmup_linear_lr(700, total, peak) == pytest.approx(0.1)  # half-way down
    assert warmup_linear_lr(999, total, peak) == pytest.approx(peak / 600)
    assert warmup_linear_lr(1000, total, peak) == 0.0


def test_schedule_edge_fractions_and_errors():
    assert warmup_linear_lr(0, 10, 1.0, warmup_fraction=0.0) == 1.0
    assert warmup_linear_lr(5, 10, 1.0, warmup_fraction=1.0) == 0.5
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_linear_lr(0, 10, 1.0, warmup_fraction=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_linear_lr(0, 0, 1.0)


def test_mixup_matches_timm_for_the_same_lambda():
    x = torch.randn(8, 3, 4, 4)
    y = torch.randint(0, 10, (8,))
    timm_mixup = Mixup(mixup_alpha=0.5, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10, mode="batch")
    np.random.seed(3)
    np.random.rand()  # timm first draws whether to mix at all (mix_prob), then lambda
    lam = float(np.random.beta(0.5, 0.5))
    np.random.seed(3)
    timm_x, timm_t = timm_mixup(x.clone(), y.clone())
    ours_x, ours_t = mix_batch(x, y, lam, 10)
    torch.testing.assert_close(ours_x, timm_x)
    torch.testing.assert_close(ours_t, timm_t)


def test_mixup_targets_sum_to_one_and_lambda_is_reproducible():
    y = torch.randint(0, 10, (16,))
    lam = mixup_lambda(0.5, seed=1, step=7)
    _, targets = mix_batch(torch.randn(16, 2), y, lam, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))
    assert lam == mixup_lambda(0.5, seed=1, step=7)
    assert lam != mixup_lambda(0.5, seed=1, step=8)
    assert mixup_lambda(0.0, seed=1, step=7) == 1.0
    draws = [mixup_lambda(0.5, seed=0, step=s) for s in range(4000)]
    assert np.mean(draws) == pytest.approx(0.5, abs=0.02)  # Beta(0.5, 0.5): mean 1/2, variance 1/8
    assert np.var(draws) == pytest.approx(0.125, abs=0.01)
