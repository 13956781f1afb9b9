"""Counting, per training step, the ops that make a GPU host wait (the CPU's sync check: ``gpu_check.py``, tests).

On a CPU nothing waits, but the same ops run: a value read back to the host (``.item()``, ``bool(t)``, ``float(t)``:
``_local_scalar_dense``, ``is_nonzero``; ``torch.equal``), an output whose size depends on values (``nonzero``,
``masked_select``, ``unique``, and indexing or indexed assignment with a boolean mask, which runs ``nonzero``
inside the op where this mode cannot see it), a copy from an accelerator to the host, and a tensor made from host
data (``torch.tensor(x)``: ``lift_fresh``; ``torch.tensor(x, device="cuda")`` is a blocking host-to-device copy).
Counting them on the CPU finds the syncs a GPU step would have.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import lightning.pytorch as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READING = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
                "unique_consecutive", "lift_fresh", "lift_fresh_copy"}

#: Per-step counts of the last fit that used a ``StepHostReads`` callback (Hydra builds the callback, so the test
#: cannot hold a reference to it).
LAST: dict[int, Counter] = {}


def _indexes_with_a_mask(func, args) -> bool:
    if func.overloadpacket.__name__ not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _is_device_to_host_copy(func, args, kwargs, out) -> bool:
    name = func.overloadpacket.__name__
    if name == "_to_copy":
        source, target = args[0], out
    elif name == "copy_":
        target, source = args[0], args[1]
    else:
        return False
    return isinstance(source, torch.Tensor) and source.device.type != "cpu" and target.device.type == "cpu"


class HostReadCounter(TorchDispatchMode):
    """While active, counts the host-reading ops per ``step`` (set by the caller; None pauses the count)."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.counts: dict[int, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.step is not None:
            name = func.overloadpacket.__name__
            if (name in HOST_READING or _indexes_with_a_mask(func, args)
                    or _is_device_to_host_copy(func, args, kwargs or {}, out)):
                self.counts[self.step][name] += 1
        return out


class StepHostReads(pl.Callback):
    """Counts host-reading ops from the start of each training batch to the start of the next (so the logger flush
    and progress bar of that step count); the end of an epoch and any validation are not counted."""

    def __init__(self) -> None:
        self.mode = HostReadCounter()

    def on_train_start(self, trainer, pl_module) -> None:
        LAST.clear()
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode.step = trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        self.mode.step = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.mode.step = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.step = None
        self.mode.__exit__(None, None, None)
        LAST.update(self.mode.counts)
