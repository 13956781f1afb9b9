"""mixup (Zhang et al. 2018) with one lambda per batch, drawn from a seed rather than a global RNG.

The batch is mixed with its own reverse, as timm's ``Mixup`` does in ``mode="batch"`` with cutmix off and no label
smoothing. timm draws lambda from numpy's global RNG, which a resumed run cannot replay without reseeding the
global RNG; drawing it from ``(seed, step)`` here gives the same mixing, resumable bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from lit_sharp.seeding import MIXUP_STREAM, derived_seed


def mixup_lambda(alpha: float, seed: int, step: int) -> float:
    """``lambda ~ Beta(alpha, alpha)`` for optimizer step ``step`` of a run seeded with ``seed`` (1.0 when alpha is 0)."""
    if alpha <= 0:
        return 1.0
    return float(np.random.default_rng(derived_seed(MIXUP_STREAM, seed, step)).beta(alpha, alpha))


def mix_batch(x: torch.Tensor, y: torch.Tensor, lam: float, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with its reverse: ``x' = lam x + (1 - lam) x.flip(0)``, soft targets likewise.

    Args:
        x: inputs ``(B, ...)``.
        y: integer labels ``(B,)``.
        lam: the mixing weight of the original order.
        num_classes: width of the one-hot targets.

    Returns:
        ``(x', t')`` with ``t'`` of shape ``(B, num_classes)``; each row of ``t'`` sums to 1.
    """
    # scatter_ rather than F.one_hot: on a CPU one_hot reads min(y) and max(y) back (.item()) to check the range;
    # scatter_ checks the indices inside its kernel. Same values.
    targets = torch.zeros((len(y), num_classes), dtype=x.dtype, device=x.device).scatter_(1, y.unsqueeze(1), 1.0)
    mixed_x = x.mul(lam).add_(x.flip(0), alpha=1.0 - lam)
    mixed_t = targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)
    return mixed_x, mixed_t
