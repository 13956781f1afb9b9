"""Tests for lit_sharp.sam: SAM/ASAM against hand computations, exactness and BatchNorm freezing."""

from __future__ import annotations

import contextlib
import copy
import functools
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_sharp.sam import SAM, BatchNormStatsFreezer, frozen_bn_stats

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _quadratic_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A, b, w0 of L(w) = 0.5 w^T A w - b^T w on R^5, A symmetric positive definite."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(5, 5))
    return m @ m.T + np.eye(5), rng.normal(size=5), rng.normal(size=5)


def _hand_sam_trajectory(
    a: np.ndarray,
    b: np.ndarray,
    w0: np.ndarray,
    lrs: list[float],
    rhos: list[float],
    momentum: float,
    adaptive: bool,
) -> np.ndarray:
    """SAM/ASAM + SGD(momentum, dampening 0) written out from the formulas, gradients in closed form."""
    w, buf = w0.copy(), None
    for lr, rho in zip(lrs, rhos):
        g = a @ w - b
        if adaptive:
            e = rho * w**2 * g / (np.linalg.norm(np.abs(w) * g) + 1e-12)
        else:
            e = rho * g / (np.linalg.norm(g) + 1e-12)
        g_at_ascent = a @ (w + e) - b
        if momentum:
            buf = g_at_ascent if buf is None else momentum * buf + g_at_ascent
            w = w - lr * buf
        else:
            w = w - lr * g_at_ascent
    return w


def _quadratic_sam_trajectory(
    a: np.ndarray,
    b: np.ndarray,
    w0: np.ndarray,
    lrs: list[float],
    rhos: list[float],
    momentum: float,
    adaptive: bool,
    use_closure: bool,
) -> np.ndarray:
    """The same trajectory through SAM, with w split over two parameter groups (the norm must be joint)."""
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    w1 = nn.Parameter(torch.from_numpy(w0[:2].copy()))
    w2 = nn.Parameter(torch.from_numpy(w0[2:].copy()))
    opt = SAM([{"params": [w1]}, {"params": [w2]}], torch.optim.SGD, rho=rhos[0], adaptive=adaptive, lr=lrs[0],
              momentum=momentum)

    def loss_and_backward() -> torch.Tensor:
        w = torch.cat([w1, w2])
        loss = 0.5 * w @ a_t @ w - b_t @ w
        loss.backward()
        return loss

    for lr, rho in zip(lrs, rhos):
        for group in opt.param_groups:  # as an LR schedule would
            group["lr"], group["rho"] = lr, rho
        opt.zero_grad()
        loss_and_backward()
        if use_closure:
            opt.step(loss_and_backward)
        else:
            opt.first_step(zero_grad=True)
            loss_and_backward()
            opt.second_step()
    return torch.cat([w1, w2]).detach().numpy()


class _SmallBNNet(nn.Module):
    """Conv-BN-ReLU-pool-Linear-BN1d-Linear: two BatchNorm kinds, CIFAR-shaped input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.bn1d = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(F.relu(self.bn2d(self.conv(x))), 4).flatten(1)  # (B, 64)
        return self.fc2(F.relu(self.bn1d(self.fc1(h))))


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(n)]


def _sam_train_step(model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step()


def _assert_same_tensors(model_a: nn.Module, model_b: nn.Module) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


# ---------------------------------------------------------------------------------------------
# SAM / ASAM against hand computations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
def test_matches_hand_computation_on_quadratic(momentum: float, adaptive: bool) -> None:
    a, b, w0 = _quadratic_problem()
    lrs, rhos = [0.1, 0.05, 0.02], [0.05, 0.2, 0.1]
    expected = _hand_sam_trajectory(a, b, w0, lrs, rhos, momentum, adaptive)
    got = _quadratic_sam_trajectory(a, b, w0, lrs, rhos, momentum, adaptive, use_closure=False)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)
    # SAM really moved away from plain SGD, so the comparison is informative.
    plain = _hand_sam_trajectory(a, b, w0, lrs, [0.0] * 3, momentum, adaptive)
    assert np.abs(expected - plain).max() > 1e-3


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_step_with_closure_equals_first_and_second_step(adaptive: bool) -> None:
    a, b, w0 = _quadratic_problem(seed=1)
    args = (a, b, w0, [0.1, 0.1, 0.1], [0.1, 0.1, 0.1], 0.9, adaptive)
    via_closure = _quadratic_sam_trajectory(*args, use_closure=True)
    via_two_steps = _quadratic_sam_trajectory(*args, use_closure=False)
    assert np.array_equal(via_closure, via_two_steps)


def test_step_returns_closure_loss_at_ascent_point() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.0)

    def closure() -> torch.Tensor:
        loss = 0.5 * (w**2).sum()
        loss.backward()
        return loss

    closure()
    # g = w = (3, 4), ||g|| = 5, e = 0.5 * (0.6, 0.8): w + e = (3.3, 4.4), loss 0.5 * (3.3^2 + 4.4^2).
    assert opt.step(closure).item() == pytest.approx(0.5 * (3.3**2 + 4.4**2), rel=1e-12)


def test_first_step_perturbation_in_closed_form_and_none_grads_skipped() -> None:
    used = nn.Parameter(torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64))
    unused = nn.Parameter(torch.tensor([5.0, 6.0], dtype=torch.float64))
    opt = SAM([used, unused], torch.optim.SGD, rho=0.3, lr=0.1)
    c = torch.tensor([2.0, 1.0, -2.0], dtype=torch.float64)  # loss c.w: g = c, ||g|| = 3
    (c @ used).backward()
    before_used, before_unused = used.detach().clone(), unused.detach().clone()

    opt.first_step()
    assert unused.grad is None
    torch.testing.assert_close(used.detach(), before_used + 0.3 * c / (3.0 + 1e-12), rtol=1e-15, atol=0)
    assert torch.equal(unused.detach(), before_unused)

    opt.second_step()
    # Linear loss: the gradient at w + e is c again, so one SGD step from the restored w.
    torch.testing.assert_close(used.detach(), before_used - 0.1 * c, rtol=1e-14, atol=0)
    assert torch.equal(unused.detach(), before_unused)


def test_second_step_restores_weights_bitwise() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e3).add_(0.123456789)  # large weights: w + e - e would round differently
    before = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.7, adaptive=True, lr=0.0)
    model(torch.randn(5, 7)).square().mean().backward()
    opt.first_step()
    assert opt.is_perturbed
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    opt.second_step()
    assert not opt.is_perturbed
    _assert_same_tensors(model, before)


# ---------------------------------------------------------------------------------------------
# rho = 0 and resuming are exact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_rho_zero_equals_sgd_bitwise(nesterov: bool) -> None:
    torch.manual_seed(0)
    sam_model = _SmallBNNet()
    sgd_model = copy.deepcopy(sam_model)
    hparams = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=0.0, **hparams)
    sgd = torch.optim.SGD(sgd_model.parameters(), **hparams)
    for x, y in _batches(4):
        sgd.zero_grad()
        F.cross_entropy(sgd_model(x), y).backward()
        sgd.step()

        sam.zero_grad()
        F.cross_entropy(sam_model(x), y).backward()
        sam.first_step()
        assert not sam.is_perturbed
        sam.second_step()
    _assert_same_tensors(sam_model, sgd_model)


def test_state_dict_round_trip_continues_bitwise() -> None:
    torch.manual_seed(0)
    model = _SmallBNNet()
    hparams = dict(rho=0.05, lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = SAM(model.parameters(), torch.optim.SGD, **hparams)
    batches = _batches(5, seed=3)
    for x, y in batches[:2]:
        _sam_train_step(model, opt, x, y)
    opt.param_groups[0]["rho"] = 0.1  # a changed option must survive the round trip too

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    saved_state = checkpoint["opt"]["state"]
    assert len(saved_state) == len(list(model.parameters()))
    assert all(set(entry) == {"momentum_buffer"} for entry in saved_state.values())  # no weight copies

    torch.manual_seed(1)
    resumed_model = _SmallBNNet()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = SAM(resumed_model.parameters(), torch.optim.SGD, **hparams)
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.param_groups[0]["rho"] == 0.1
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.state is resumed.base_optimizer.state

    for x, y in batches[2:]:
        _sam_train_step(model, opt, x, y)
        _sam_train_step(resumed_model, resumed, x, y)
    _assert_same_tensors(resumed_model, model)


def test_deepcopy_of_model_and_optimizer_continues_identically() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    _sam_train_step(model, opt, x, y)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    for _ in range(2):
        _sam_train_step(model, opt, x, y)
        _sam_train_step(model_copy, opt_copy, x, y)
    _assert_same_tensors(model_copy, model)


# ---------------------------------------------------------------------------------------------
# Sharing with the base optimizer
# ---------------------------------------------------------------------------------------------


def test_lr_scheduler_and_groups_are_shared_with_base_optimizer() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.0, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(2):
        opt.zero_grad()
        w.sum().backward()  # g = (1, 1)
        opt.step(lambda: w.sum().backward())
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25
    # lr 1.0 then 0.5 with g = 1: w - 1.5
    assert torch.equal(w.detach(), torch.tensor([-0.5, 0.5]))


def test_added_param_group_gets_base_defaults_and_is_stepped() -> None:
    first, second = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = SAM([first], torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [second], "lr": 1.0})
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["rho"] == 0.0
    (first.sum() + second.sum()).backward()
    opt.second_step()
    assert torch.equal(second.detach(), torch.zeros(3))


def test_accepts_a_partial_base_optimizer() -> None:
    w = nn.Parameter(torch.tensor([2.0]))
    opt = SAM([w], functools.partial(torch.optim.SGD, momentum=0.5), rho=0.0, lr=0.5)
    assert opt.param_groups[0]["momentum"] == 0.5
    w.sum().backward()
    opt.second_step()
    assert torch.equal(w.detach(), torch.tensor([1.5]))


# ---------------------------------------------------------------------------------------------
# BatchNorm running statistics
# ---------------------------------------------------------------------------------------------


def test_bn_statistics_after_sam_step_equal_those_after_plain_step() -> None:
    torch.manual_seed(0)
    sam_model = _SmallBNNet()
    sgd_model = copy.deepcopy(sam_model)
    x, y = _batches(1, seed=5)[0]

    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
    F.cross_entropy(sgd_model(x), y).backward()
    sgd.step()
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    _sam_train_step(sam_model, sam, x, y)

    for sam_bn, sgd_bn in [(sam_model.bn2d, sgd_model.bn2d), (sam_model.bn1d, sgd_model.bn1d)]:
        assert sam_bn.track_running_stats
        assert int(sam_bn.num_batches_tracked) == 1
        assert torch.equal(sam_bn.num_batches_tracked, sgd_bn.num_batches_tracked)
        assert torch.equal(sam_bn.running_mean, sgd_bn.running_mean)
        assert torch.equal(sam_bn.running_var, sgd_bn.running_var)
    assert not torch.equal(sam_model.fc1.weight, sgd_model.fc1.weight)  # the steps themselves differ


def test_frozen_bn_still_normalizes_with_batch_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
        bn.weight.copy_(torch.randn(3))
        bn.bias.copy_(torch.randn(3))
    buffers_before = {k: v.clone() for k, v in bn.named_buffers()}
    x = torch.randn(6, 3, 5, 5) * 2 + 1

    with frozen_bn_stats(bn):
        out = bn(x)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    by_hand = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, bn.eval()(x), atol=1e-2)
    for name, before in buffers_before.items():
        assert torch.equal(getattr(bn, name), before), name


def test_frozen_bn_restores_statistics_even_on_exception_and_changes_no_attribute() -> None:
    tracking, cumulative = nn.BatchNorm1d(4), nn.BatchNorm1d(4, momentum=None)
    untracked = nn.BatchNorm1d(4, track_running_stats=False)
    model = nn.Sequential(tracking, cumulative, untracked)
    attributes_before = [dict(vars(layer)) for layer in model]
    with pytest.raises(KeyError), frozen_bn_stats(model):
        model(torch.randn(8, 4))
        # No flag is switched (torch.compile guards on module attributes); the statistics move, then come back.
        assert [dict(vars(layer)) for layer in model] == attributes_before
        assert int(tracking.num_batches_tracked) == 1
        raise KeyError("boom")
    assert tracking.track_running_stats and cumulative.track_running_stats
    assert not untracked.track_running_stats
    assert int(tracking.num_batches_tracked) == 0 and int(cumulative.num_batches_tracked) == 0
    assert torch.equal(cumulative.running_mean, torch.zeros(4))
    assert torch.equal(cumulative.running_var, torch.ones(4))


@contextlib.contextmanager
def _untracked_bn(model: nn.Module):
    """The former way of freezing: ``track_running_stats = False`` for the pass (the reference semantics)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def test_freezer_matches_switching_tracking_off_bit_for_bit_over_several_sam_steps() -> None:
    torch.manual_seed(0)
    reference = _SmallBNNet()
    frozen = copy.deepcopy(reference)
    freezer = BatchNormStatsFreezer(frozen)
    opts = [SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9) for m in (reference, frozen)]
    for x, y in _batches(4, seed=9):
        for model, opt, freeze in ((reference, opts[0], lambda: _untracked_bn(reference)), (frozen, opts[1], freezer.frozen)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            with freeze():
                F.cross_entropy(model(x), y).backward()
            opt.second_step()
    _assert_same_tensors(reference, frozen)
    assert int(frozen.bn2d.num_batches_tracked) == 4


def test_freezer_reuses_its_buffers_and_follows_a_dtype_change() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    freezer = BatchNormStatsFreezer(model)
    with freezer.frozen():
        model(torch.randn(8, 4))
    first = list(freezer._saved)
    with freezer.frozen():
        model(torch.randn(8, 4))
    assert all(a is b for a, b in zip(first, freezer._saved))  # no allocation in the steady state
    model.double()
    before = model[1].running_mean.clone()
    with freezer.frozen():
        model(torch.randn(8, 4, dtype=torch.float64))
    assert freezer._saved[0].dtype == torch.float64 and torch.equal(model[1].running_mean, before)


# ---------------------------------------------------------------------------------------------
# Errors a user can cause
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [-0.01, float("nan"), float("inf")])
def test_bad_rho_raises_naming_rho(rho: float) -> None:
    with pytest.raises(ValueError, match="rho"):
        SAM([nn.Parameter(torch.ones(1))], torch.optim.SGD, rho=rho, lr=0.1)


def test_bad_rho_in_param_group_raises() -> None:
    opt = SAM([nn.Parameter(torch.ones(1))], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho=-1"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "rho": -1})
    with pytest.raises(ValueError, match="rho=-0.5"):
        SAM([{"params": [nn.Parameter(torch.ones(1))], "rho": -0.5}], torch.optim.SGD, lr=0.1)


def test_bad_adaptive_and_base_optimizer_raise() -> None:
    params = [nn.Parameter(torch.ones(1))]
    with pytest.raises(TypeError, match="adaptive"):
        SAM(params, torch.optim.SGD, adaptive="yes", lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params, "sgd", lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params, lambda groups, **kw: object(), lr=0.1)


def test_misuse_of_the_two_steps_raises() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.first_step()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    w.square().sum().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.state_dict()
    opt.second_step()
    assert "state" in opt.state_dict()
