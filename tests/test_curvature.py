"""Tests of the curvature kinds of ``lit_sharp.sharpness`` against exact Hessians (``torch.autograd.functional``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lit_sharp.sharpness import PRESETS, SharpnessSpec, normalize_logits, preset, sharpness

SIGMAS = 5  # a k-sigma bound on Hutchinson's estimate: fails by chance with probability < 1e-6


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # 43 parameters


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(2)]


def _exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ln: bool = False) -> torch.Tensor:
    """The dense Hessian of the mean cross-entropy over all parameters (named_parameters order), in float64."""
    named = [(name, param.detach().double()) for name, param in model.named_parameters()]
    twin = copy.deepcopy(model).double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([p.numel() for _, p in named])
        logits = functional_call(twin, {n: c.view(p.shape) for (n, p), c in zip(named, chunks)}, (x.double(),))
        return F.cross_entropy(normalize_logits(logits) if ln else logits, y)

    return torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for _, p in named]))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def _rescaled_hessians(model, batches, adaptive: bool, ln: bool = False) -> list[torch.Tensor]:
    c = _flat(model).abs() if adaptive else torch.ones_like(_flat(model))
    return [c[:, None] * _exact_hessian(model, x, y, ln) * c[None, :] for x, y in batches]


@pytest.mark.parametrize(("adaptive", "ln"), [(False, False), (True, False), (True, True)])
def test_hutchinson_trace_is_within_its_sampling_error_of_the_exact_trace(adaptive: bool, ln: bool) -> None:
    model, batches, n_samples = _mlp(), _batches(), 400
    hessians = _rescaled_hessians(model, batches, adaptive, ln)
    exact = sum(h.trace() for h in hessians).item() / len(hessians)
    # Rademacher z: Var(z^T A z) = 2 sum_{i != j} A_ij^2; the value is a mean over draws, then over batches.
    variance = sum(2 * (h.square().sum() - h.diagonal().square().sum()) for h in hessians).item()
    sigma = math.sqrt(variance / n_samples) / len(hessians)
    spec = SharpnessSpec("hessian_trace", adaptive=adaptive, normalize_logits=ln, n_samples=n_samples)
    result = sharpness(model, batches, spec)
    assert abs(result.value - exact) < SIGMAS * sigma
    assert sigma < 0.2 * abs(exact)  # the bound is tight enough to mean something
    assert len(result.per_batch) == 2 and result.value == pytest.approx(sum(result.per_batch) / 2, rel=1e-12)
    assert math.isnan(result.err_increase) and result.perturbations is None


@pytest.mark.parametrize(("adaptive", "ln"), [(False, False), (True, False), (True, True)])
def test_lanczos_top_eigenvalue_matches_the_exact_one(adaptive: bool, ln: bool) -> None:
    model, batches = _mlp(), _batches()
    hessians = _rescaled_hessians(model, batches, adaptive, ln)
    exact = sum(torch.linalg.eigvalsh(h)[-1] for h in hessians).item() / len(hessians)
    spec = SharpnessSpec("hessian_max_eig", adaptive=adaptive, normalize_logits=ln, n_iters=20)
    assert sharpness(model, batches, spec).value == pytest.approx(exact, rel=0.01)


def test_top_eigenvalue_is_the_largest_algebraic_one() -> None:
    # A saddle whose most negative eigenvalue is the largest in magnitude: power iteration would return it.
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    curvature = torch.tensor([0.5, -4.0, 1.5])

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (curvature * model.weight[0] ** 2).sum() + 0 * output.sum()

    spec = SharpnessSpec("hessian_max_eig", adaptive=False, n_iters=3)
    assert sharpness(model, [(torch.ones(1, 3), torch.zeros(1))], spec, loss_fn=loss).value == pytest.approx(1.5)


def test_explicit_scale_replaces_the_absolute_weights() -> None:
    model, batches = _mlp(), _batches()
    spec = SharpnessSpec("hessian_max_eig", adaptive=True, n_iters=20)
    absolute = {name: param.detach().abs() for name, param in model.named_parameters()}
    assert sharpness(model, batches, spec, scale=absolute).value == pytest.approx(sharpness(model, batches, spec).value)
    halves = {name: torch.full_like(param, 0.5) for name, param in model.named_parameters()}
    exact = sum(torch.linalg.eigvalsh(0.25 * _exact_hessian(model, x, y))[-1] for x, y in batches).item() / 2
    assert sharpness(model, batches, spec, scale=halves).value == pytest.approx(exact, rel=0.01)
    with pytest.raises(ValueError, match="standard"):
        sharpness(model, batches, SharpnessSpec("hessian_trace", adaptive=False), scale=absolute)
    with pytest.raises(ValueError, match="every parameter name"):
        sharpness(model, batches, spec, scale={"0.weight": absolute["0.weight"]})


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _conv_scaled(model: nn.Sequential, factor: float) -> nn.Sequential:
    """The same function in eval mode: the conv (and BN's running statistics and epsilon) scaled by ``factor``."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.mul_(factor)
        twin[0].bias.mul_(factor)
        twin[1].running_mean.mul_(factor)
        twin[1].running_var.mul_(factor**2)
    twin[1].eps = model[1].eps * factor**2
    return twin


@pytest.mark.parametrize("kind", ["hessian_trace", "hessian_max_eig"])
def test_adaptive_curvature_is_invariant_to_the_batchnorm_rescaling(kind: str) -> None:
    model = _conv_bn()
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 2, 4, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator))]
    adaptive, standard = (SharpnessSpec(kind, adaptive=flag, n_iters=15, n_samples=30) for flag in (True, False))
    twin = _conv_scaled(model, 3.0)
    with torch.no_grad():
        torch.testing.assert_close(twin(batches[0][0]), model(batches[0][0]), rtol=1e-5, atol=1e-5)
    # Same generator seed: the same Rademacher vectors, so even the trace estimate is invariant, not only its mean.
    assert sharpness(twin, batches, adaptive).value == pytest.approx(sharpness(model, batches, adaptive).value, rel=1e-3)
    assert sharpness(twin, batches, standard).value != pytest.approx(sharpness(model, batches, standard).value, rel=0.1)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.int32) if tensor.dtype == torch.float32 else tensor.detach()


@pytest.mark.parametrize("kind", ["hessian_trace", "hessian_max_eig"])
def test_leaves_no_trace(kind: str) -> None:
    model, batches = _conv_bn().train(), [(torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,)))]
    model[4].weight.grad = torch.full_like(model[4].weight, 0.25)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}
    grads = {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    sharpness(model, batches, SharpnessSpec(kind, n_iters=5, n_samples=5))
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert torch.equal(_bits(tensor), _bits(state[name])), name
    for name, param in model.named_parameters():
        before, values = grads[name]
        assert param.grad is before and (values is None or torch.equal(param.grad, values)), name
    assert model.training and all(module.training for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_curvature_names_parse_and_the_preset_is_opt_in() -> None:
    spec = SharpnessSpec("hessian_trace", adaptive=True, normalize_logits=True)
    assert spec.name == "hessian_trace_adaptive_ln"
    assert SharpnessSpec.from_name("hessian_trace_adaptive_ln") == spec
    assert SharpnessSpec.from_name("sharpness/hessian_max_eig_standard") == SharpnessSpec("hessian_max_eig", adaptive=False)
    assert SharpnessSpec.from_name("hessian_max_eig_adaptive", n_iters=7).n_iters == 7
    names = {s.name for s in preset("curvature", n_samples=50)}
    assert names == {f"{k}_{v}" for k in ("hessian_trace", "hessian_max_eig") for v in ("standard", "adaptive", "adaptive_ln")}
    assert {s.n_samples for s in preset("curvature", n_samples=50)} == {50}
    assert not any(s.kind.startswith("hessian") for name in ("paper_resnet18", "paper_simplevit") for s in PRESETS[name])
    with pytest.raises(ValueError, match="norm and SharpnessSpec.rho must be None"):
        SharpnessSpec("hessian_trace", "l2", 0.1)
    with pytest.raises(ValueError, match="norm"):
        SharpnessSpec("worst")


def test_the_callback_accepts_curvature_names() -> None:
    from callbacks.sharpness import AdaptiveSharpness

    model, batches = _mlp(), _batches()
    callback = AdaptiveSharpness(["hessian_trace_adaptive", "hessian_max_eig_standard"], dataloader=batches,
                                 n_examples=None, batch_size=16)  # fmt: skip
    assert [spec.name for spec in callback.specs] == ["hessian_trace_adaptive", "hessian_max_eig_standard"]
    assert len(AdaptiveSharpness("curvature").specs) == 6
    results = callback.measure(model, progress=False)
    expected = sharpness(model, batches, SharpnessSpec("hessian_max_eig", adaptive=False)).value
    assert results["sharpness/hessian_max_eig_standard"] == pytest.approx(expected, rel=1e-6)
    assert math.isnan(results["sharpness_err_increase/hessian_trace_adaptive"])


def test_pyhessian_agrees_on_the_top_eigenvalue() -> None:
    # A second, independent implementation (power iteration, Yao et al. 2020), test-only dependency.
    pyhessian = pytest.importorskip("pyhessian")
    model, (x, y) = _mlp(), _batches()[0]
    ours = sharpness(model, [(x, y)], SharpnessSpec("hessian_max_eig", adaptive=False, n_iters=20)).value
    torch.manual_seed(0)
    theirs = pyhessian.hessian(copy.deepcopy(model), F.cross_entropy, data=(x, y), cuda=False)
    eigenvalues, _ = theirs.eigenvalues(maxIter=500, tol=1e-7)
    assert ours == pytest.approx(eigenvalues[0], rel=0.01)
