"""Test-only transcription of the sharpness evaluation released with the paper (tml-epfl/sharpness-vs-generalization,
``sharpness.py``, ``models.py``, ``utils.py``), the reference the tests compare ``lit_sharp.sharpness`` against.

The logic is kept line for line, including what an efficient implementation would do differently (a forward
pass per step only to read the loss, ``state_dict`` deep copies, host syncs, the ellipsoid projection by
bisection). Adaptations, and nothing else: ``.cuda()`` becomes the model's device; batches are ``(x, y)`` pairs;
prints and the unused options (random init, restarts, layer patterns, logging strings) are dropped; the
average case draws from an explicit ``torch.Generator`` instead of the global RNG.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class LogitNormalizationWrapper(nn.Module):
    """``models.LogitNormalizationWrapper``: center the logits and divide them by their L2 norm."""

    def __init__(self, model: nn.Module, normalize_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.normalize_logits = normalize_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.normalize_logits:
            out = out - out.mean(dim=-1, keepdim=True)
            out_norms = out.norm(dim=-1, keepdim=True)
            out_norms = torch.max(out_norms, 10**-10 * torch.ones_like(out_norms))
            out = out / out_norms
        return out


def zero_grad(model):
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


def checkpoint_schedule(n_iters):
    """The ``version == 'default'`` block of ``eval_APGD_sharpness``."""
    p = [0, 0.22]
    w = [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    return w[1:]


def weight_ascent_step_momentum(
    model, x, y, loss_f, orig_param_dict, delta_dict, prev_delta_dict, step_size, rho, momentum=0.75,
    adaptive=False, norm="linf",
):
    delta_dict_backup = {param: delta_dict[param].clone() for param in delta_dict}

    zero_grad(model)
    output = model(x)
    obj = loss_f(output, y)
    obj.backward()

    with torch.no_grad():
        if norm == "l2":
            grad_norm = sum([param.grad.norm() ** 2 for _, param in model.named_parameters()]) ** 0.5
            for _, param in model.named_parameters():
                delta_dict[param] += (
                    step_size / (grad_norm + 1e-12) * param.grad * (1 if not adaptive else orig_param_dict[param].abs())
                )
        elif norm == "linf":
            for _, param in model.named_parameters():
                grad_sign_curr = param.grad.sign()
                delta_dict[param] += step_size * grad_sign_curr * (1 if not adaptive else orig_param_dict[param].abs())
        else:
            raise ValueError("wrong norm")

    zero_grad(model)

    with torch.no_grad():
        if norm == "l2":

            def weighted_norm(delta_dict):
                return (
                    sum(
                        [
                            ((delta_dict[param] / (orig_param_dict[param].abs() if adaptive else 1)) ** 2).sum()
                            for param in delta_dict
                        ]
                    )
                    ** 0.5
                )

            if not adaptive:
                delta_norm = weighted_norm(delta_dict)
                if delta_norm > rho:
                    for param in delta_dict:
                        delta_dict[param] *= rho / delta_norm
            else:
                lmbd = 0.1
                max_lmbd_limit = 10.0
                min_lmbd, max_lmbd = 0.0, max_lmbd_limit
                delta_dict_tmp = {param: delta_dict[param].clone() for param in delta_dict}

                curr_norm = new_norm = weighted_norm(delta_dict_tmp)
                if curr_norm > rho:
                    while (new_norm - rho).abs() > 10**-5:
                        curr_norm = new_norm
                        for param in delta_dict:
                            c = 1 / orig_param_dict[param].abs() if adaptive else 1
                            delta_dict_tmp[param] = delta_dict[param] / (1 + 2 * lmbd * c**2)
                        new_norm = weighted_norm(delta_dict_tmp)
                        if new_norm > rho:
                            lmbd, min_lmbd = (lmbd + max_lmbd) / 2, lmbd
                        else:
                            lmbd, max_lmbd = (min_lmbd + lmbd) / 2, lmbd
                        if (max_lmbd_limit - max_lmbd) < 10**-2:
                            max_lmbd_limit, max_lmbd = max_lmbd_limit * 2, max_lmbd * 2
                delta_dict = {param: delta_dict_tmp[param].clone() for param in delta_dict_tmp}

        elif norm == "linf":
            for param in delta_dict:
                param_curr = orig_param_dict[param].abs() if adaptive else torch.ones_like(orig_param_dict[param])
                delta_dict[param] = torch.max(torch.min(delta_dict[param], param_curr * rho), -1.0 * param_curr * rho)
        else:
            raise ValueError("wrong norm")

        for param_name, param in model.named_parameters():
            delta_dict[param] = momentum * delta_dict[param] + (1 - momentum) * prev_delta_dict[param]

        for param in model.parameters():
            param.data = orig_param_dict[param] + delta_dict[param]

        for param_name, param in model.named_parameters():
            prev_delta_dict[param] = delta_dict_backup[param]

    return delta_dict, prev_delta_dict


def eval_APGD_sharpness(
    model, batches, loss_f, rho=0.01, step_size_mult=1, n_iters=200, min_update_ratio=0.75, adaptive=False,
    norm="linf",
):
    """Worst-case sharpness per batch, averaged; returns ``(sharpness, error increase, max delta norm)``."""
    device = next(model.parameters()).device

    def get_loss_and_err(model, loss_fn, x, y):
        with torch.no_grad():
            output = model(x)
            loss = loss_fn(output, y)
            err = (output.max(1)[1] != y).float().mean()
        return loss.cpu().item(), err.cpu().item()

    orig_model_state_dict = copy.deepcopy(model.state_dict())
    orig_param_dict = {param: param.clone() for param in model.parameters()}

    n_batches, delta_norm = 0, 0.0
    avg_loss, avg_err, avg_init_loss, avg_init_err = 0.0, 0.0, 0.0, 0.0

    w = checkpoint_schedule(n_iters)
    step_size_scaler = 0.5

    for i_batch, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)

        init_loss, init_err = get_loss_and_err(model, loss_f, x, y)
        avg_init_loss += init_loss
        avg_init_err += init_err

        worst_loss_over_restarts = init_loss
        worst_err_over_restarts = init_err
        worst_delta_norm_over_restarts = 0.0

        delta_dict = {param: torch.zeros_like(param) for param in model.parameters()}
        prev_delta_dict = {param: delta_dict[param].clone() for param in delta_dict}
        worst_model_dict = copy.deepcopy(model.state_dict())

        prev_worst_loss, worst_loss = init_loss, init_loss
        worst_err = init_err
        worst_delta_norm = 0.0
        step_size, prev_step_size = 2 * rho * step_size_mult, 2 * rho * step_size_mult
        prev_cp = 0
        num_of_updates = 0

        for i in range(n_iters):
            delta_dict, prev_delta_dict = weight_ascent_step_momentum(
                model, x, y, loss_f, orig_param_dict, delta_dict, prev_delta_dict, step_size, rho, momentum=0.75,
                adaptive=adaptive, norm=norm,
            )

            with torch.no_grad():
                curr_loss, curr_err = get_loss_and_err(model, loss_f, x, y)
                delta_norm_total = torch.cat([d.flatten() for d in delta_dict.values()]).norm().item()

                if curr_loss > worst_loss:
                    worst_loss = curr_loss
                    worst_err = curr_err
                    worst_model_dict = copy.deepcopy(model.state_dict())
                    worst_delta_norm = delta_norm_total
                    num_of_updates += 1

                if i in w:
                    cond1 = num_of_updates < (min_update_ratio * (i - prev_cp))
                    cond2 = (prev_step_size == step_size) and (prev_worst_loss == worst_loss)
                    prev_step_size, prev_worst_loss, prev_cp = step_size, worst_loss, i
                    num_of_updates = 0

                    if cond1 or cond2:
                        step_size *= step_size_scaler
                        model.load_state_dict(worst_model_dict)

        if worst_loss > worst_loss_over_restarts:
            worst_loss_over_restarts = worst_loss
            worst_err_over_restarts = worst_err
            worst_delta_norm_over_restarts = worst_delta_norm

        model.load_state_dict(orig_model_state_dict)

        n_batches += 1
        avg_loss += worst_loss_over_restarts
        avg_err += worst_err_over_restarts
        delta_norm = max(delta_norm, worst_delta_norm_over_restarts)

    return (avg_loss - avg_init_loss) / n_batches, (avg_err - avg_init_err) / n_batches, delta_norm


def random_init_lw(delta_dict, rho, orig_param_dict, norm="l2", adaptive=False, generator=None):
    assert norm in ["l2", "linf"], f"Unknown perturbation model {norm}."

    for param in delta_dict:
        if norm == "l2":
            delta_dict[param] = torch.randn(
                delta_dict[param].shape, generator=generator, device=delta_dict[param].device
            )
        elif norm == "linf":
            delta_dict[param] = (
                2 * torch.rand(delta_dict[param].shape, generator=generator, device=delta_dict[param].device) - 1
            )

    for param in delta_dict:
        param_norm_curr = orig_param_dict[param].abs() if adaptive else 1
        delta_dict[param] *= rho * param_norm_curr

    return delta_dict


def eval_average_sharpness(model, batches, loss_f, n_iters=100, rho=1.0, adaptive=False, norm="l2", generator=None):
    """Average-case sharpness per batch, averaged; returns ``(sharpness, error increase, 0.0)``."""
    device = next(model.parameters()).device

    def get_loss_and_err(model, loss_fn, x, y):
        with torch.no_grad():
            output = model(x)
            loss = loss_fn(output, y)
            err = (output.max(1)[1] != y).float().mean()
        return loss.cpu().item(), err.cpu().item()

    orig_param_dict = {param_name: p.clone() for param_name, p in model.named_parameters()}
    noisy_model = copy.deepcopy(model)

    delta_dict = {param_name: torch.zeros_like(param) for param_name, param in model.named_parameters()}

    n_batches, avg_loss, avg_err, avg_init_loss, avg_init_err = 0, 0.0, 0.0, 0.0, 0.0

    with torch.no_grad():
        for i_batch, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)

            init_loss, init_err = get_loss_and_err(model, loss_f, x, y)
            avg_init_loss += init_loss
            avg_init_err += init_err

            batch_loss, batch_err = 0.0, 0.0

            for i in range(n_iters):
                delta_dict = random_init_lw(
                    delta_dict, rho, orig_param_dict, norm=norm, adaptive=adaptive, generator=generator
                )
                for (param_name, delta), (_, param) in zip(delta_dict.items(), noisy_model.named_parameters()):
                    param.data = orig_param_dict[param_name] + delta_dict[param_name]

                curr_loss, curr_err = get_loss_and_err(noisy_model, loss_f, x, y)
                batch_loss += curr_loss
                batch_err += curr_err

            n_batches += 1
            avg_loss += batch_loss / n_iters
            avg_err += batch_err / n_iters

    return (avg_loss - avg_init_loss) / n_batches, (avg_err - avg_init_err) / n_batches, 0.0
