"""Weight initialisation of a freshly built model, chosen by ``model.init``.

``released`` is the initialisation of the paper authors' code; ``torch`` keeps what the layers' constructors drew
(PyTorch's defaults). Only a model trained from scratch is initialised: a resumed or evaluated model gets its weights
from a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

#: The values of ``model.init``.
INITS = ("released", "torch")


def initialise(model: nn.Module, scheme: str, generator: torch.Generator | None = None) -> nn.Module:
    """Initialise ``model``'s parameters in place with ``scheme`` (one of :data:`INITS`) and return it.

    Args:
        model: a freshly built model.
        scheme: ``released`` (:func:`released_init`) or ``torch`` (leave the constructors' weights as they are).
        generator: the random numbers ``released`` draws; None draws from torch's global generator.

    Raises:
        ValueError: an unknown ``scheme``.
    """
    if scheme == "released":
        released_init(model, generator)
    elif scheme != "torch":
        raise ValueError(f"unknown initialisation {scheme!r}; expected one of {', '.join(INITS)}")
    return model


@torch.no_grad()
def released_init(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """The He initialisation of ``init_weights`` in the authors' released ``models.py`` (Andriushchenko et al.,
    ``tml-epfl/sharpness-vs-generalization``; their training script ``tml-epfl/understanding-sam``,
    ``deep_nets/train.py``, applies it with ``model.apply`` to every model it trains from scratch).

    Per module type, as there:

    - ``nn.Conv2d`` weight ~ ``N(0, 2 / fan_out)``, ``fan_out = out_channels * kernel_h * kernel_w``
      (``kaiming_normal_`` with ``mode="fan_out"``, ReLU gain ``sqrt(2)``). A convolution bias is left as it is
      (the released function does not touch it; the study's convolutions have none).
    - ``nn.BatchNorm2d`` and ``nn.GroupNorm``: weight 1, bias 0.
    - ``nn.Linear``: bias 0; the weight keeps PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    - everything else (LayerNorm: already 1 and 0; the ViT's fixed position embedding) is left as it is.

    For the SimpleViT this zeroes the bias of the patch embedding, of both MLP layers of every block and of the
    head; its attention projections have no bias (the released function, written for convolutional networks, would
    fail on them, reading ``m.bias.data`` of ``None``; here a layer without a bias is skipped).

    Args:
        model: the model, changed in place.
        generator: the source of the convolution weights' random numbers; None uses torch's global generator.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            if module.weight is not None:  # affine=False has no parameters to set
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
