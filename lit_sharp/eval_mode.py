"""Evaluation mode for the length of a ``with`` block: every module in evaluation mode and float32 arithmetic in
float32 (no TF32), the module flags and the precision settings restored afterwards.

Every measurement (final errors, CIFAR-10-C, sharpness, curvature) runs inside :func:`evaluation_mode`; the
validation curves computed during training keep the training step's settings. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["evaluation_mode", "full_float32"]


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` and all its submodules in evaluation mode, with :func:`full_float32`; afterwards give each
    module back its own training flag and restore the precision settings.

    Both come back even when the block raises. ``model.train(was_training)`` would not do: it sets every
    submodule to the flag of the top-level module, so a submodule the caller keeps in evaluation mode (a frozen
    BatchNorm inside a training model) would come back training.

    Example::

        with evaluation_mode(model), torch.no_grad():
            logits = model(x)
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with full_float32():
            yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def full_float32() -> Iterator[None]:
    """Float32 matrix products and convolutions computed in IEEE float32 for the block, the settings restored after.

    On Ampere and later GPUs cuDNN convolutions run in TF32 by default (10-bit mantissa), and matrix products do too
    after ``torch.set_float32_matmul_precision("high")``; a loss increase of parts in 1e4 (sharpness at the smallest
    radii) would drown in that rounding. The settings are process-wide, and readable on any machine.

    torch >= 2.9 sets precision per backend and operation (``fp32_precision``, "ieee" being full float32): cuBLAS
    matrix products, cuDNN convolutions and recurrent layers, and oneDNN matrix products and convolutions (where
    ``set_float32_matmul_precision("medium")`` allows bfloat16 on a CPU) are set to "ieee". Older torch has one
    flag for cuDNN (``torch.backends.cudnn.allow_tf32``) and one matmul precision, set to ``False`` and
    ``"highest"``. Only the API of the installed torch is used: mixing both makes torch >= 2.9 raise.
    """
    saved = _read_precision()
    _write_precision(_FULL_FLOAT32)
    try:
        yield
    finally:
        _write_precision(saved)


def _precision_nodes() -> dict[str, object] | None:
    """The ``fp32_precision`` holders of torch >= 2.9 by name; None for an older torch."""
    backends = torch.backends
    conv = getattr(backends.cudnn, "conv", None)
    if conv is None or not hasattr(backends.cuda.matmul, "fp32_precision"):
        return None
    return {"cuda.matmul": backends.cuda.matmul, "cudnn.conv": conv, "cudnn.rnn": backends.cudnn.rnn,
            "mkldnn.matmul": backends.mkldnn.matmul, "mkldnn.conv": backends.mkldnn.conv}


_NODES = _precision_nodes()
#: The settings of :func:`full_float32`, in the layout of :func:`_read_precision`.
_FULL_FLOAT32: dict[str, object] = (dict.fromkeys(_NODES, "ieee") if _NODES is not None
                                    else {"matmul": "highest", "cudnn": False})


def _read_precision() -> dict[str, object]:
    if _NODES is not None:
        return {name: node.fp32_precision for name, node in _NODES.items()}
    return {"matmul": torch.get_float32_matmul_precision(), "cudnn": torch.backends.cudnn.allow_tf32}


def _write_precision(settings: dict[str, object]) -> None:
    if _NODES is not None:
        for name, node in _NODES.items():
            node.fp32_precision = settings[name]
        return
    torch.set_float32_matmul_precision(settings["matmul"])
    torch.backends.cudnn.allow_tf32 = settings["cudnn"]
