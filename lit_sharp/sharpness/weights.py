"""The parameters of a model as one flat vector, and the context that leaves no trace: eval mode, float32 with
gradients, a forked RNG, and every parameter, buffer and flag restored bitwise on exit; the local generator."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import Tensor, nn

from lit_sharp.eval_mode import evaluation_mode

#: The seed of the local generator when the caller gives none, so that a call is reproducible.
DEFAULT_SEED = 0


class FlatWeights:
    """The parameters of a model seen as one flat float32 vector (named_parameters order).

    Work vectors (perturbations, gradients) are flat so that each update is a single elementwise op; they are
    written into the parameters in place and the original values copied back at the end, which restores them
    bitwise without any state_dict copy.
    """

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters: there is nothing to perturb")
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        for name, param in named:
            if param.dtype != torch.float32:
                raise ValueError(
                    f"sharpness is evaluated in float32 but parameter {name!r} is {param.dtype}: "
                    "call model.float() first"
                )
        devices = {param.device for param in self.params}
        if len(devices) > 1:
            raise ValueError(
                f"model parameters are spread over {sorted(map(str, devices))}: move the model to one device"
            )
        self.device = self.params[0].device
        self.numels = [param.numel() for param in self.params]
        self.shapes = [param.shape for param in self.params]
        self.origin = torch.cat([param.detach().reshape(-1) for param in self.params])  # (n_weights,)

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into views shaped like the parameters."""
        return [chunk.view(shape) for chunk, shape in zip(flat.split(self.numels), self.shapes)]

    def as_dict(self, flat: Tensor) -> dict[str, Tensor]:
        """Parameter name -> view of ``flat``."""
        return dict(zip(self.names, self.views(flat)))

    def load(self, flat: Tensor) -> None:
        """Write ``flat`` into the parameters in place."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views(flat))

    def gradient(self, loss: Tensor) -> Tensor:
        """The flat gradient of ``loss`` with respect to the parameters."""
        # autograd.grad leaves every .grad untouched; parameters the loss does not reach get a zero gradient.
        grads = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
        return torch.cat([grad.reshape(-1) for grad in grads])


@contextmanager
def evaluation_context(model: nn.Module) -> Iterator[FlatWeights]:
    """Eval mode, float32 with gradients, private RNG; on exit, everything restored bitwise."""
    with ExitStack() as stack:
        # Entered first so that the saved copies below are ordinary tensors even for a caller in inference mode.
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        weights = FlatWeights(model)
        stack.enter_context(torch.autocast(device_type=weights.device.type, enabled=False))
        stack.enter_context(_forked_rng(weights.device))
        stack.enter_context(evaluation_mode(model))
        requires_grad = [param.requires_grad for param in weights.params]
        buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
        try:
            for param in weights.params:
                param.requires_grad_(True)
            yield weights
        finally:
            weights.load(weights.origin)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for param, flag in zip(weights.params, requires_grad):
                param.requires_grad_(flag)


def _forked_rng(device: torch.device) -> AbstractContextManager[None]:
    # A model may draw random numbers even in eval mode; whatever it draws must not move the caller's RNG.
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=cuda_devices, device_type="cuda")


def local_generator(generator: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """The caller's generator (checked to be on ``device``'s type), or a new one on ``device`` seeded with the seed."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model is on {device}: "
                f"pass a seed or a generator on {device.type}"
            )
        return generator
    if generator is not None and (isinstance(generator, bool) or not isinstance(generator, int)):
        raise ValueError(f"generator must be an int seed, a torch.Generator or None, got {generator!r}")
    return torch.Generator(device=device).manual_seed(DEFAULT_SEED if generator is None else generator)
