"""The worst case from a uniform random start (the paper's ImageNet protocol, App. C) and the ImageNet presets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from lit_sharp.sharpness import (
    IMAGENET_HEADLINE,
    PRESETS,
    SharpnessSpec,
    preset,
    sharpness,
    uniform_start,
)


def _linear_problem() -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``L(w) = mean_b z_{b, y_b}``, linear in the weights; returns the model, the batch and the gradient ``a``."""
    torch.manual_seed(5)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    one_hot = F.one_hot(y, 3).float()
    a = torch.cat([(one_hot.T @ x / len(y)).reshape(-1), one_hot.mean(0)])  # d L / d (weight, bias)
    return model, [(x, y)], a


def _linear_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, y[:, None]).mean()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ----------------------------------------------------------------------------------------------- names and presets


def test_random_start_has_its_own_parseable_name() -> None:
    spec = SharpnessSpec("worst", "linf", 0.002, normalize_logits=True, random_start=True)
    assert spec.name == "worst_linf_adaptive_ln_rho0.002_random_start"
    assert SharpnessSpec.from_name(spec.name) == spec
    assert SharpnessSpec.from_name("worst_linf_adaptive_ln_rho0.002").random_start is False
    both = SharpnessSpec("worst", "l2", 0.5, method="steepest", random_start=True)
    assert both.name == "worst_l2_adaptive_rho0.5_steepest_random_start"
    assert SharpnessSpec.from_name(f"sharpness/{both.name}") == both
    assert SharpnessSpec("worst", "linf", 0.002).random_start is False  # the released zero start by default


@pytest.mark.parametrize("kwargs", [dict(kind="average"), dict(random_start=1), dict(random_start="yes")])
def test_random_start_is_refused_where_it_means_nothing(kwargs: dict) -> None:
    arguments = dict(kind="worst", norm="linf", rho=0.01, random_start=True) | kwargs
    with pytest.raises(ValueError, match="random_start"):
        SharpnessSpec(**arguments)


@pytest.mark.parametrize(
    ("name", "average_radii"),
    [("imagenet_augreg", ("0.05", "0.1", "0.2")), ("imagenet_clip", ("0.001", "0.002", "0.004"))],
)
def test_imagenet_presets_hold_table_1(name: str, average_radii: tuple[str, ...]) -> None:
    radii = ("0.001", "0.002", "0.004")
    worst = {f"worst_linf_adaptive{ln}_rho{rho}_random_start" for ln in ("", "_ln") for rho in radii}
    average = {f"average_linf_adaptive{ln}_rho{rho}" for ln in ("", "_ln") for rho in average_radii}
    specs = preset(name)
    assert {spec.name for spec in specs} == worst | average and len(specs) == 12
    assert {spec.n_samples for spec in specs if spec.kind == "average"} == {100}  # App. C: 100 draws per batch
    assert {spec.n_iters for spec in specs if spec.kind == "worst"} == {20}
    assert IMAGENET_HEADLINE in PRESETS[name] and IMAGENET_HEADLINE.name == "worst_linf_adaptive_rho0.002_random_start"
    assert {spec.n_samples for spec in preset(name, n_samples=5) if spec.kind == "average"} == {5}
    assert {spec.n_samples for spec in preset("paper_resnet18") if spec.kind == "average"} == {20}


# ----------------------------------------------------------------------------------------------- the start point


def test_linf_start_is_uniform_in_the_box() -> None:
    spec = SharpnessSpec("worst", "linf", 0.3, random_start=True)
    u = uniform_start(spec, None, torch.zeros(20_000), torch.Generator().manual_seed(1))
    assert u.abs().max() <= 0.3
    assert stats.kstest(u.numpy(), stats.uniform(loc=-0.3, scale=0.6).cdf).pvalue > 1e-3


def test_l2_start_is_uniform_in_the_ball_of_the_movable_coordinates() -> None:
    # Uniform in a ball of dimension m: (||u|| / rho)^m ~ U(0, 1) and u / ||u|| uniform on the sphere.
    rho, generator = 0.5, torch.Generator().manual_seed(2)
    scale = torch.tensor([0.0, 2.0, 0.0, 1.0, 3.0])  # 3 movable coordinates
    spec = SharpnessSpec("worst", "l2", rho, random_start=True)
    draws = torch.stack([uniform_start(spec, scale, torch.zeros(5), generator) for _ in range(2000)])
    assert torch.all(draws[:, scale == 0] == 0)
    radii = draws.norm(dim=1)
    assert radii.max() <= rho * (1 + 1e-6)
    assert stats.kstest(((radii / rho) ** 3).numpy(), "uniform").pvalue > 1e-3
    assert draws[:, scale > 0].mean(0).abs().max() < 0.03  # no preferred direction
    standard = torch.stack([uniform_start(spec, None, torch.zeros(2), generator) for _ in range(2000)])
    assert stats.kstest(((standard.norm(dim=1) / rho) ** 2).numpy(), "uniform").pvalue > 1e-3


# ----------------------------------------------------------------------------------------------- the search


def test_one_step_from_the_random_start_matches_the_hand_computation() -> None:
    # Linear loss a . delta: the start u0 (drawn again here from the same seed) is worth a . (c u0); one Auto-PGD
    # step goes to 0.75 * clamp(u0 + 2 rho sign(a)) + 0.25 * u0 = 0.75 rho sign(a) + 0.25 u0; delta = 0 is worth 0.
    model, batches, a = _linear_problem()
    c = _flat(model).abs()
    spec = SharpnessSpec("worst", "linf", 0.1, n_iters=1, random_start=True)
    u0 = uniform_start(spec, c, c, torch.Generator().manual_seed(11))
    start_value = (a * c * u0).sum().item()
    step_value = (a * c * (0.75 * 0.1 * a.sign() + 0.25 * u0)).sum().item()
    result = sharpness(model, batches, spec, loss_fn=_linear_loss, generator=11)
    assert result.value == pytest.approx(max(0.0, start_value, step_value), rel=1e-5)
    zero_start = sharpness(model, batches, SharpnessSpec("worst", "linf", 0.1, n_iters=1), loss_fn=_linear_loss)
    assert zero_start.value == pytest.approx((a * c).abs().sum().item() * 0.075, rel=1e-5)
    assert result.value != pytest.approx(zero_start.value, rel=1e-3)  # the start is used


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_search_beats_its_start_and_stays_feasible(norm: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    batches = [(torch.randn(32, 6), torch.randint(0, 4, (32,))) for _ in range(2)]
    rho = 0.05 if norm == "linf" else 0.5
    spec = SharpnessSpec("worst", norm, rho, n_iters=5, random_start=True)
    result = sharpness(model, batches, spec, generator=3, return_perturbations=True)
    w = _flat(model)
    c = w.abs()
    generator = torch.Generator().manual_seed(3)  # the call draws one start per batch, in order
    for (x, y), value, perturbation in zip(batches, result.per_batch, result.perturbations):
        start = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(w + c * uniform_start(spec, c, w, generator), start.parameters())
        with torch.no_grad():
            start_increase = (F.cross_entropy(start(x), y) - F.cross_entropy(model(x), y)).item()
        assert value >= max(start_increase, 0.0) - 1e-6
        u = torch.cat([d.reshape(-1) for d in perturbation.values()]) / c
        size = u.abs().max() if norm == "linf" else u.norm()
        assert size <= rho * (1 + 1e-5)


def test_random_start_is_reproducible_and_leaves_no_trace() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    batches = [(torch.randn(16, 5), torch.randint(0, 3, (16,)))]
    spec = SharpnessSpec("worst", "linf", 0.05, n_iters=3, random_start=True)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    first = sharpness(model, batches, spec, generator=4).value
    assert sharpness(model, batches, spec, generator=torch.Generator().manual_seed(4)).value == first
    assert sharpness(model, batches, spec, generator=5).value != first
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
