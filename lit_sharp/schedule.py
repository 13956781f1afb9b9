"""The learning-rate schedule of the study: linear warm-up from 0, then linear decay to 0 (docs/protocol.md section 2)."""

from __future__ import annotations


def warmup_linear_lr(step: int, total_steps: int, peak_lr: float, warmup_fraction: float = 0.4) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    ``lr(t) = peak * t / W`` for ``t < W`` and ``peak * (T - t) / (T - W)`` afterwards, with ``W = warmup_fraction * T``:
    0 at the first step, the peak at 40% of training (paper), and 0 after the last step.

    Args:
        step: the optimizer step about to be taken.
        total_steps: all optimizer steps of the run (``T``).
        peak_lr: the learning rate at the end of the warm-up.
        warmup_fraction: ``W / T`` in [0, 1].

    Raises:
        ValueError: ``total_steps < 1`` or ``warmup_fraction`` outside [0, 1].
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
    warmup_steps = warmup_fraction * total_steps
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps == warmup_steps:
        return peak_lr
    return peak_lr * max(total_steps - step, 0) / (total_steps - warmup_steps)
