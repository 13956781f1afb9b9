"""Sharpness-Aware Minimization as a plain ``torch.optim.Optimizer``.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021)
and its adaptive variant ASAM (Kwon et al., ICML 2021) take the base optimizer's step with the gradient
measured at an ascent point ``w + e`` of the same mini-batch instead of at ``w``:

    e = rho * g / ||g||_2                       (SAM)
    e = rho * w**2 * g / || |w| * g ||_2        (ASAM)

with ``g = grad L_B(w)`` and the norm taken over all parameters together. The interface follows
``davda54/sam`` (``first_step`` / ``second_step`` / ``step(closure)``), with the base optimizer's state
(momentum buffers) carried by ``state_dict`` so that a resumed run continues exactly.

This module imports torch only; ``BatchNormStatsFreezer`` (or the one-off ``frozen_bn_stats``) is the
companion that keeps BatchNorm running statistics out of the second forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

__all__ = ["SAM", "BatchNormStatsFreezer", "frozen_bn_stats"]

# Guards the division by the gradient norm when the gradient vanishes (then e = 0).
_NORM_EPS = 1e-12


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any base optimizer (Foret et al., ICLR 2021).

    One SAM step on a mini-batch ``B`` is

        g   = grad L_B(w)                       (computed by the caller)
        e   = rho * g / ||g||_2                 or, adaptive (ASAM), rho * w**2 * g / || |w| * g ||_2
        g'  = grad L_B(w + e)
        w  <- base_optimizer_step(w, g')

    The norm runs over every parameter of every group that has a gradient, with a 1e-12 guard in the
    denominator. ``rho`` and ``adaptive`` are per-group options, like ``lr``; ``param_groups`` and
    ``state`` are the base optimizer's own objects, so an LR schedule that edits
    ``sam.param_groups[i]["lr"]`` changes the base step, and ``sam.state[p]`` holds its momentum buffer.

    With ``rho=0`` no perturbation is made at all and ``second_step`` is exactly the base optimizer's
    step (bit for bit), so callers may skip the second forward/backward pass.

    The weights ``w`` are kept in preallocated buffers between ``first_step`` and ``second_step`` and
    restored by copy (subtracting ``e`` again would not give ``w`` back bit for bit). These buffers are
    not part of ``state_dict()``: a checkpoint is taken between SAM steps, never halfway through one,
    and ``state_dict()`` refuses to run while the weights are perturbed.

    Args:
        params: iterable of parameters or of dicts defining parameter groups (as for any optimizer).
        base_optimizer: the optimizer class (or a factory such as ``functools.partial(torch.optim.SGD, ...)``)
            to build over the same parameter groups, e.g. ``torch.optim.SGD``.
        rho: radius of the ascent step (default 0.05); 0 turns SAM into the base optimizer.
        adaptive: use ASAM's scale-invariant ascent step ``rho * w**2 * g / || |w| * g ||_2``.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    Raises:
        ValueError: if ``rho`` is negative or not finite (also for a ``rho`` given in a parameter group).
        TypeError: if ``adaptive`` is not a bool, or ``base_optimizer`` does not build a
            ``torch.optim.Optimizer``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def loss_at_current_weights():
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = loss_at_current_weights()               # gradient at w
        >>> opt.first_step(zero_grad=True)              # w -> w + e
        >>> _ = loss_at_current_weights()               # gradient at w + e (BN: wrap in frozen_bn_stats)
        >>> opt.second_step(zero_grad=True)             # back to w, base step with that gradient
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        _check_rho(rho)
        if not isinstance(adaptive, bool):
            raise TypeError(f"SAM: adaptive must be a bool, got {adaptive!r}.")
        if not callable(base_optimizer):
            raise TypeError(
                f"SAM: base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}."
            )
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, Optimizer):
            raise TypeError(
                f"SAM: base_optimizer must build a torch.optim.Optimizer, got {type(self.base_optimizer).__name__}."
            )
        # Groups added later through SAM must get the base optimizer's defaults too.
        self.defaults.update(self.base_optimizer.defaults)
        self._share_base_state()
        self._init_perturbation_buffers()

    def _share_base_state(self) -> None:
        # One set of group dicts and one state mapping for both objects: no copy can drift.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _init_perturbation_buffers(self) -> None:
        self._saved_weights: dict[Tensor, Tensor] = {}
        self._perturbed: list[Tensor] = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its ``rho`` (if given) is validated like the constructor's."""
        if "rho" in param_group:
            _check_rho(param_group["rho"])
        super().add_param_group(param_group)

    @property
    def is_perturbed(self) -> bool:
        """Whether ``first_step`` moved the weights to ``w + e`` and ``second_step`` has not yet run."""
        return bool(self._perturbed)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient from ``w`` to ``w + e`` (the ascent point).

        ``e = rho * g / (||g||_2 + 1e-12)``, or ``rho * w**2 * g / (|| |w| * g ||_2 + 1e-12)`` for adaptive
        groups, with one norm over all parameters of all groups. Groups with ``rho == 0`` are not moved;
        when every group has ``rho == 0`` nothing is computed at all. No host synchronization.

        Args:
            zero_grad: clear the gradients afterwards, ready for the backward pass at ``w + e``.

        Raises:
            RuntimeError: if called twice without ``second_step`` in between, or if no parameter has a
                gradient (run ``loss.backward()`` at ``w`` first).
        """
        if self._perturbed:
            raise RuntimeError(
                "SAM.first_step was called twice without second_step: call second_step() to restore the weights first."
            )
        if any(group["rho"] != 0 for group in self.param_groups):
            self._perturb()
        if zero_grad:
            self.zero_grad()

    def _perturb(self) -> None:
        params_per_group = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        if not any(params_per_group):
            raise RuntimeError(
                "SAM.first_step found no parameter with a gradient: call loss.backward() at the current weights first."
            )
        guarded_norm = self._ascent_norm(params_per_group) + _NORM_EPS
        for group, params in zip(self.param_groups, params_per_group):
            if group["rho"] == 0 or not params:
                continue
            saved = [self._saved_weight_buffer(p) for p in params]
            torch._foreach_copy_(saved, params)
            for device_params in _split_by_device(params):
                scale = (group["rho"] / guarded_norm).to(device_params[0].device)
                torch._foreach_add_(device_params, _ascent_direction(device_params, group["adaptive"], scale))
            self._perturbed.extend(params)

    def _ascent_norm(self, params_per_group: list[list[Tensor]]) -> Tensor:
        """``||g||_2`` (or ``|| |w| * g ||_2``) over all parameters together, as a 0-dim tensor."""
        shared_device = next(p for params in params_per_group for p in params).device
        per_tensor_norms: list[Tensor] = []
        for group, params in zip(self.param_groups, params_per_group):
            if not params:
                continue
            grads = [p.grad for p in params]
            scaled = torch._foreach_mul(torch._foreach_abs(params), grads) if group["adaptive"] else grads
            per_tensor_norms.extend(n.to(shared_device) for n in torch._foreach_norm(scaled))
        return torch.linalg.vector_norm(torch.stack(per_tensor_norms))

    def _saved_weight_buffer(self, param: Tensor) -> Tensor:
        buffer = self._saved_weights.get(param)
        # Reallocated only when the parameter changed shape, dtype or device (e.g. after model.to(...)).
        stale = buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (param.shape, param.dtype, param.device)
        if stale:
            buffer = torch.empty_like(param, memory_format=torch.preserve_format)
            self._saved_weights[param] = buffer
        return buffer

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights ``w`` saved by ``first_step`` and take the base optimizer's step.

        The gradient in ``p.grad`` is the one taken at ``w + e``. Without a preceding ``first_step`` (or with
        ``rho == 0`` everywhere) this is exactly one step of the base optimizer.

        Args:
            zero_grad: clear the gradients after the step.
        """
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self._saved_weights[p] for p in self._perturbed])
            self._perturbed = []
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One full SAM step: ``first_step``, one ``closure()`` call at ``w + e``, ``second_step``.

        The gradient at ``w`` must already be in ``p.grad``; ``first_step`` then clears it so that the
        closure's backward pass leaves exactly the gradient at ``w + e``.

        Args:
            closure: re-evaluates the loss at the current weights and calls ``backward()`` on it
                (wrap the forward pass in ``frozen_bn_stats`` when the model has BatchNorm).

        Returns:
            Whatever the closure returns: the loss at ``w + e``.

        Raises:
            ValueError: if ``closure`` is None.
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that recomputes the loss and its gradients; "
                "or call first_step() and second_step() around your own backward pass."
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers, step counts) and the groups with ``rho``/``adaptive``.

        Raises:
            RuntimeError: if called between ``first_step`` and ``second_step``.
        """
        if self._perturbed:
            raise RuntimeError(
                "SAM.state_dict was called between first_step and second_step, while the weights are at w + e: "
                "save checkpoints only after second_step()."
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` into both SAM and its base optimizer.

        Args:
            state_dict: the dict returned by ``state_dict()`` (of a SAM over the same parameter groups).

        Raises:
            RuntimeError: if called between ``first_step`` and ``second_step``.
        """
        if self._perturbed:
            raise RuntimeError(
                "SAM.load_state_dict was called between first_step and second_step: call second_step() first."
            )
        super().load_state_dict(state_dict)
        # The load builds new group dicts and a new state mapping; the base optimizer must take them over
        # (its __setstate__ also fills in any option an older checkpoint lacks).
        self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ drops every other attribute, which would lose the base optimizer on pickling.
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_perturbed" not in self.__dict__:
            self._init_perturbation_buffers()


def _check_rho(rho: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"SAM: rho must be a finite number >= 0, got rho={rho!r}.")


def _ascent_direction(params: list[Tensor], adaptive: bool, scale: Tensor) -> list[Tensor]:
    """``scale * g`` or, adaptive, ``scale * w**2 * g`` for each parameter (new tensors)."""
    grads = [p.grad for p in params]
    if not adaptive:
        return torch._foreach_mul(grads, scale)
    direction = torch._foreach_mul(params, params)
    torch._foreach_mul_(direction, grads)
    torch._foreach_mul_(direction, scale)
    return direction


def _split_by_device(params: list[Tensor]) -> list[list[Tensor]]:
    # A 0-dim scale tensor on one accelerator cannot multiply tensors on another.
    by_device: dict[torch.device, list[Tensor]] = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    return list(by_device.values())


class BatchNormStatsFreezer:
    """Keeps the BatchNorm running statistics of a module where they were, across forward passes, by save and restore.

    For SAM's second forward pass at ``w + e`` (docs/protocol.md section 2: BatchNorm running statistics are updated
    by the first pass only). Entering :meth:`frozen` copies ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` of every ``torch.nn.modules.batchnorm._BatchNorm`` that tracks them into buffers kept from
    call to call; leaving it copies them back, also after an exception. In between the layers behave exactly as in
    training (batch statistics normalize; the running buffers move), and the copy back undoes the move bit for bit.

    Why not switch ``track_running_stats`` off for the pass: that changes a module attribute every step, which
    ``torch.compile`` guards on: pass 2 fails the guards of pass 1's graph and is compiled again into a second graph
    (twice the compile time and graph memory, and one more entry toward dynamo's recompile limit).
    Copies into preallocated buffers change no attribute, allocate nothing in the steady state and never read a
    value back to the host. The buffers are allocated again only when a statistic changed shape, dtype or device
    (e.g. after ``model.to(...)``). Other norm layers (InstanceNorm, GroupNorm, LayerNorm) are left alone.

    Args:
        module: the model (or any module) whose BatchNorm statistics to freeze; its layers are listed once, here.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> freezer = BatchNormStatsFreezer(model)
        >>> with freezer.frozen():
        ...     _ = model(torch.randn(8, 4))
        >>> int(model[1].num_batches_tracked)
        0
    """

    def __init__(self, module: nn.Module) -> None:
        layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self._layers = layers
        self._saved: list[Tensor] = []

    def _statistics(self) -> list[Tensor]:
        names = ("running_mean", "running_var", "num_batches_tracked")
        return [stat for layer in self._layers for name in names if (stat := getattr(layer, name)) is not None]

    def _buffers_for(self, stats: list[Tensor]) -> list[Tensor]:
        def fits(buffer: Tensor, stat: Tensor) -> bool:
            return (buffer.shape, buffer.dtype, buffer.device) == (stat.shape, stat.dtype, stat.device)

        if len(self._saved) != len(stats) or not all(fits(b, s) for b, s in zip(self._saved, stats)):
            self._saved = [torch.empty_like(stat) for stat in stats]
        return self._saved

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Within the block, running statistics may move; on exit they are exactly what they were on entry."""
        stats = self._statistics()
        if not stats:
            yield
            return
        saved = self._buffers_for(stats)
        with torch.no_grad():
            torch._foreach_copy_(saved, stats)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(stats, saved)


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Keep every BatchNorm layer of ``module`` from updating its running statistics (a one-off
    :class:`BatchNormStatsFreezer`; a training loop should keep one freezer, whose buffers are reused every step).

    Layers still normalize with the statistics of the current batch in training mode, and with the running
    statistics in eval mode. On exit ``running_mean``, ``running_var`` and ``num_batches_tracked`` hold the values
    they had on entry, bit for bit, also after an exception; no module attribute is changed.

    Args:
        module: the model (or any module) whose BatchNorm layers to freeze.

    Returns:
        A context manager.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> with frozen_bn_stats(model):
        ...     _ = model(torch.randn(8, 4))
        >>> int(model[1].num_batches_tracked)
        0
    """
    with BatchNormStatsFreezer(module).frozen():
        yield
