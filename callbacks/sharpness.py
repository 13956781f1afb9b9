r"""
Adaptive Sharpness
^^^^^^^^^^^^^^^^^^

Measures the sharpness of the model during and at the end of training and logs it to every attached logger.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from tqdm.auto import tqdm
from typing_extensions import override

from lit_sharp.callbacks.metric_logging import log_final_metrics, log_metrics
from lit_sharp.sharpness import PRESETS, SharpnessSpec, sharpness

SpecsArgument = Union[str, SharpnessSpec, Sequence[Union[str, SharpnessSpec]]]
LossFn = Callable[[Tensor, Tensor], Tensor]
BatchTransform = Callable[[Any], tuple[Any, Tensor]]
ForwardFn = Callable[[nn.Module, Any], Tensor]

VALUE_PREFIX = "sharpness/"
ERR_INCREASE_PREFIX = "sharpness_err_increase/"
#: Seconds one measurement took. Outside ``sharpness/``, whose every key is a spec name to the analysis.
SECONDS_KEY = "sharpness_cost/seconds"


class AdaptiveSharpness(Callback):
    r"""Compute sharpness definitions of the model during and at the end of training, and log them.

    Adaptive sharpness as evaluated in ``A Modern Look at the Relationship between Sharpness and Generalization``
    by Maksym Andriushchenko, Francesco Croce, Maximilian Müller, Matthias Hein and Nicolas Flammarion (ICML 2023),
    computed by :func:`lit_sharp.sharpness.sharpness`: average- or worst-case (Auto-PGD in weight space), l2 or
    linf, adaptive (``c = |w|``, Kwon et al. 2021) or standard, with or without logit normalization, as the mean
    over batches of the per-batch value.

    **When.** Always once training ends (``on_train_end``); with ``every_n_epochs`` also at the end of every k-th
    epoch, and with ``every_n_steps`` after every k-th optimizer step (train hooks: the measure needs gradients,
    which validation and test hooks, run under inference mode, do not allow). Each measurement goes straight to
    ``trainer.loggers`` at the trainer's global step (so W&B and CSV show curves), with ``epoch`` and
    ``sharpness_cost/seconds``, its wall time; the final one also into the W&B run summary. For each spec,
    ``sharpness/<spec.name>`` is the sharpness and ``sharpness_err_increase/<spec.name>`` the increase in
    classification error at the chosen perturbation. :attr:`results` holds the latest measurement, which after
    ``fit`` is the final one, and :attr:`history` every measurement; both go into checkpoints. A final measurement
    that would repeat one made at the same global step is not run again.

    **Training is untouched.** A measurement runs in evaluation mode and float32 and leaves behind exactly the
    state it found: parameters, buffers (BatchNorm statistics), gradients, train/eval mode of every submodule
    (:func:`~lit_sharp.sharpness.sharpness` sees to these) and the random streams of torch (CPU and CUDA), numpy
    and Python's ``random`` (this callback restores them around loading the data and measuring); the optimizer is
    never touched. The data are read once per ``fit`` and kept, so every measurement sees the same examples.

    **DDP.** Rank 0 measures and broadcasts its numbers; the other ranks wait for them in the broadcast. Every
    rank then holds and logs the same numbers, which are by construction those of a single process (same batches
    in the same order, and the average case draws its noise batch after batch from one seeded stream, which a
    split of the batches across ranks would change). The other ranks idle meanwhile, and a measurement must end
    within the process group's timeout (30 minutes by default, ``DDPStrategy(timeout=...)``). The model must be
    replicated on every rank (DDP, not FSDP or DeepSpeed sharding), and its forward in eval mode must not run
    collective operations.

    **Any classifier.** The model only needs a forward that returns logits ``(batch, classes)``.
    ``batch_transform`` turns whatever the dataloader yields (e.g. a dict of a text model) into
    ``(inputs, targets)``; ``inputs`` may be a tensor or a dict, list or tuple of tensors whose first dimension is
    the batch. ``forward_fn(model, inputs)`` replaces ``model(inputs)`` (e.g. ``lambda m, x: m(**x)``).
    ``loss_fn(logits, targets)`` replaces the mean cross-entropy.

    Args:
        specs: a preset name (``"paper_resnet18"``, ``"paper_simplevit"``: 48 and 49 specs), one
            :class:`~lit_sharp.sharpness.SharpnessSpec`, or a list of specs, spec names such as
            ``"worst_linf_adaptive_ln_rho0.002"`` (as a YAML config lists them) or preset names.
        dataloader: yields batches, ``(inputs, targets)`` pairs unless ``batch_transform`` is given; the first
            ``n_examples`` examples are used, in order. If None, the datamodule's ``sharpness_dataloader()``.
        n_examples: how many examples (1024 in the paper); None uses all the dataloader yields.
        batch_size: examples per batch, the ``m`` of m-sharpness (128 in the paper).
        every_n_epochs: also measure at the end of every ``every_n_epochs``-th epoch; None: not by epoch.
        every_n_steps: also measure after every ``every_n_steps``-th optimizer step; None: not by step.
        loss_fn: ``loss_fn(logits, targets) -> scalar tensor``; None: mean cross-entropy.
        batch_transform: ``batch -> (inputs, targets)``; None: a batch must be an ``(inputs, targets)`` pair.
        forward_fn: ``forward_fn(model, inputs) -> logits``; None: ``model(inputs)``.
        measure_at_end: measure once training ends. False leaves the final measurement to the caller (lit_sharp's
            own runs measure after ``fit``, so that a measurement killed midway is retried on relaunch) while the
            schedule still draws the curve during training.

    Raises:
        ValueError: an unknown preset or malformed spec name (naming the field: ``kind``, ``norm``, ``rho``, ...),
            duplicate specs, ``n_examples``, ``batch_size``, ``every_n_epochs`` or ``every_n_steps`` not an integer
            >= 1, or a ``dataloader`` that is not iterable; when the data are read, a batch that is not an
            ``(inputs, targets)`` pair (naming the batch and what it holds) or inputs whose batch size differs
            from that of the targets.
        TypeError: ``loss_fn``, ``batch_transform`` or ``forward_fn`` is not callable.
        MisconfigurationException: at ``fit`` setup, if neither ``dataloader`` nor the datamodule's
            ``sharpness_dataloader()`` gives the data.

    Example::

        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(64, 32), torch.randint(0, 2, (64,)))
        >>> sharpness = AdaptiveSharpness("worst_linf_adaptive_rho0.01", dataloader=DataLoader(data, batch_size=32),
        ...                               n_examples=64, batch_size=32, every_n_epochs=1)
        >>> trainer = Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[sharpness],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> [(entry["epoch"], entry["step"]) for entry in sharpness.history]
        [(0, 4), (1, 8)]
        >>> sorted(sharpness.results)
        ['sharpness/worst_linf_adaptive_rho0.01', 'sharpness_err_increase/worst_linf_adaptive_rho0.01']
        >>> len(AdaptiveSharpness("paper_resnet18").specs)
        48
    """

    def __init__(
        self,
        specs: SpecsArgument,
        dataloader: Iterable[Any] | None = None,
        n_examples: int | None = 1024,
        batch_size: int = 128,
        *,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        loss_fn: LossFn | None = None,
        batch_transform: BatchTransform | None = None,
        forward_fn: ForwardFn | None = None,
        measure_at_end: bool = True,
    ) -> None:
        self.specs = _resolve_specs(specs)
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise ValueError(f"dataloader must be an iterable of batches or None, got {type(dataloader).__name__}")
        for name, value in (("n_examples", n_examples), ("every_n_epochs", every_n_epochs),
                            ("every_n_steps", every_n_steps)):  # fmt: skip
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if not _is_positive_int(batch_size):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        for name, function in (("loss_fn", loss_fn), ("batch_transform", batch_transform), ("forward_fn", forward_fn)):
            if function is not None and not callable(function):
                raise TypeError(f"{name} must be callable or None, got {function!r}")
        self.dataloader = dataloader
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.loss_fn = loss_fn
        self.batch_transform = batch_transform
        self.forward_fn = forward_fn
        self.measure_at_end = bool(measure_at_end)
        self.results: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._batches: list[tuple[Any, Tensor]] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            specs=[spec.name for spec in self.specs], n_examples=self.n_examples, batch_size=self.batch_size,
            every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps,
        )  # fmt: skip

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the data can be found, so that a misconfiguration fails before training, not after."""
        if stage != "fit":
            return
        if self.dataloader is None and not _has_sharpness_dataloader(trainer):
            raise _missing_data()
        self._batches = None  # a new fit may bring a new datamodule

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the data now, so that a batch that does not fit fails before training, not after it."""
        if trainer.is_global_zero:
            with _rng_untouched():
                self._data(trainer.datamodule)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure after every ``every_n_steps``-th optimizer step."""
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0 and not self._done(step):
            self._measure_in_fit(trainer, pl_module, final=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure at the end of every ``every_n_epochs``-th epoch."""
        every = self.every_n_epochs
        if every is not None and (trainer.current_epoch + 1) % every == 0 and not self._done(trainer.global_step):
            self._measure_in_fit(trainer, pl_module, final=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the trained model, unless the last measurement was of these very weights."""
        if not self.measure_at_end:
            return
        if not self._done(trainer.global_step) or not self.results:
            self._measure_in_fit(trainer, pl_module, final=True)

    def measure(self, model: torch.nn.Module, datamodule: Any = None, *, progress: bool = True) -> dict[str, float]:
        """Compute every spec on ``model`` (outside a Trainer too, e.g. to evaluate a checkpoint).

        Args:
            model: returns logits; measured on its own device.
            datamodule: provides ``sharpness_dataloader()`` when the callback was given no ``dataloader``.
            progress: show a progress bar over the specs.

        Returns:
            ``sharpness/<spec name>`` and ``sharpness_err_increase/<spec name>`` for every spec (also kept in
            :attr:`results`).
        """
        started = time.perf_counter()
        data = self._data(datamodule)
        measured, batches = _measurable(model, data, _device_of(model), self.forward_fn)
        results: dict[str, float] = {}
        for spec in tqdm(self.specs, desc="sharpness", unit="spec", disable=not progress):
            result = sharpness(measured, batches, spec, loss_fn=self.loss_fn)
            results[VALUE_PREFIX + spec.name] = result.value
            results[ERR_INCREASE_PREFIX + spec.name] = result.err_increase
        self.results = results
        first = self.specs[0].name
        rank_zero_info(
            f"AdaptiveSharpness: {len(self.specs)} specs on {sum(len(y) for _, y in data)} examples in batches of "
            f"{self.batch_size} ({time.perf_counter() - started:.1f}s); {first} = {results[VALUE_PREFIX + first]:.6g}"
        )
        return results

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results), "history": [dict(entry) for entry in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

    def _done(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["step"] == step

    def _measure_in_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, final: bool) -> None:
        measured: tuple[dict[str, float], float] | None = None
        if trainer.is_global_zero:
            started = time.perf_counter()
            with _rng_untouched():
                results = self.measure(pl_module, trainer.datamodule, progress=final)
            measured = (results, time.perf_counter() - started)
        # The other ranks wait here for rank 0's numbers (see the class docstring).
        results, seconds = trainer.strategy.broadcast(measured, src=0)
        self.results = dict(results)
        epoch, step = trainer.current_epoch, trainer.global_step
        self.history.append({"epoch": epoch, "step": step, SECONDS_KEY: seconds, **results})
        metrics = {**results, "epoch": epoch, SECONDS_KEY: seconds}
        if final:
            log_final_metrics(trainer, metrics)
        else:
            log_metrics(trainer, metrics)

    def _data(self, datamodule: Any) -> list[tuple[Any, Tensor]]:
        if self._batches is None:
            if self.dataloader is not None:
                source = self.dataloader
            elif callable(getattr(datamodule, "sharpness_dataloader", None)):
                source = datamodule.sharpness_dataloader()
            else:
                raise _missing_data()
            pairs = (_as_pair(batch, index, self.batch_transform) for index, batch in enumerate(source))
            self._batches = _rebatch(pairs, self.n_examples, self.batch_size)
        return self._batches


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Every global random stream a dataloader, a dataset or a model may draw from is as before on exit.

    A DataLoader draws its base seed from torch's global generator each time it is iterated, a shuffling sampler
    draws more, and datasets often use numpy or ``random``: reading the data must not shift the training's order.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class _InputsByPosition(nn.Module):
    """The model seen by :func:`~lit_sharp.sharpness.sharpness` when inputs are not one tensor or need ``forward_fn``.

    ``sharpness`` moves ``(x, y)`` tensor pairs to the device; inputs of any other structure stay here, on the
    device, and the ``x`` it is handed is an empty tensor of shape ``(0, i)`` naming batch ``i``: the index rides
    in the shape, which survives the move to the device and is read without a device sync. Parameter names gain
    the prefix ``model.``.
    """

    def __init__(self, model: nn.Module, inputs: list[Any], forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs
        self.forward_fn = forward_fn

    def forward(self, key: Tensor) -> Tensor:
        return self.forward_fn(self.model, self.inputs[key.shape[1]])

    @staticmethod
    def key(index: int) -> Tensor:
        return torch.empty(0, index)


def _call_model(model: nn.Module, inputs: Any) -> Tensor:
    return model(inputs)


def _measurable(
    model: nn.Module, data: list[tuple[Any, Tensor]], device: torch.device, forward_fn: ForwardFn | None
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """The model and batches to hand to ``sharpness``: as they are for tensor inputs, else via the adapter."""
    with torch.inference_mode(False):  # tensors made under inference mode could not be saved for backward
        if forward_fn is None and all(isinstance(inputs, Tensor) for inputs, _ in data):
            return model, [(x.to(device), y.to(device)) for x, y in data]
        inputs = [apply_to_collection(x, Tensor, _to_float32_on, device) for x, _ in data]
        adapter = _InputsByPosition(model, inputs, forward_fn or _call_model)
        return adapter, [(_InputsByPosition.key(index), y.to(device)) for index, (_, y) in enumerate(data)]


def _to_float32_on(tensor: Tensor, device: torch.device) -> Tensor:
    # As sharpness() does with a tensor x: the model is evaluated in float32.
    return tensor.to(device, dtype=torch.float32 if tensor.is_floating_point() else None).clone()


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("the model has no parameters: there is nothing to perturb")
    return parameter.device


def _as_pair(batch: Any, index: int, transform: BatchTransform | None) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of one batch, or an error that says what the batch is and what to pass."""
    pair = batch if transform is None else transform(batch)
    if isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], Tensor):
        return pair[0], pair[1]
    if transform is not None:
        raise ValueError(
            f"batch_transform returned {_describe(pair)} for batch {index}; it must return (inputs, targets) with "
            "targets a tensor"
        )
    hint = "pass batch_transform=, a function batch -> (inputs, targets)"
    if isinstance(pair, Mapping):
        keys = list(pair)
        raise ValueError(
            f"the sharpness dataloader's batch {index} is a dict with keys {keys}; {hint}, e.g. "
            f"batch_transform=lambda batch: (batch[{keys[0]!r}], batch[{keys[-1]!r}])"
        )
    raise ValueError(f"the sharpness dataloader's batch {index} is {_describe(pair)}, not (inputs, targets); {hint}")


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _has_sharpness_dataloader(trainer: pl.Trainer) -> bool:
    return callable(getattr(trainer.datamodule, "sharpness_dataloader", None))


def _missing_data() -> MisconfigurationException:
    return MisconfigurationException(
        "AdaptiveSharpness has no data: pass `dataloader=` (a DataLoader of (x, y) training examples without "
        "augmentation) or give the datamodule a `sharpness_dataloader()` method"
    )


def _resolve_specs(specs: SpecsArgument) -> list[SharpnessSpec]:
    entries = [specs] if isinstance(specs, (str, SharpnessSpec)) else specs
    if not isinstance(entries, Iterable):
        raise ValueError(f"specs must be a preset name, a SharpnessSpec or a list of them, got {type(specs).__name__}")
    resolved: list[SharpnessSpec] = []
    for entry in entries:
        if isinstance(entry, SharpnessSpec):
            resolved.append(entry)
        elif isinstance(entry, str) and entry in PRESETS:
            resolved.extend(PRESETS[entry])
        elif isinstance(entry, str):
            resolved.append(_spec_from_name(entry))
        else:
            raise ValueError(f"specs entries must be SharpnessSpec objects, spec names or preset names, got {entry!r}")
    if not resolved:
        raise ValueError("specs is empty: give a preset name or at least one spec")
    names = [spec.name for spec in resolved]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"specs lists {duplicates} more than once")
    return resolved


def _spec_from_name(name: str) -> SharpnessSpec:
    try:
        return SharpnessSpec.from_name(name)
    except ValueError as error:
        if not str(error).startswith("cannot parse sharpness name"):
            raise  # a well-formed name with a bad field: the message names the field
        raise ValueError(
            f"unknown sharpness preset or spec name {name!r}; known presets: {sorted(PRESETS)}; "
            "spec names look like 'worst_linf_adaptive_ln_rho0.002'"
        ) from None


def _rebatch(pairs: Iterable[tuple[Any, Tensor]], n_examples: int | None, batch_size: int) -> list[tuple[Any, Tensor]]:
    """The first ``n_examples`` examples of ``pairs``, in order, cut into batches of ``batch_size``, on the CPU."""
    inputs: list[Any] = []
    targets: list[Tensor] = []
    taken = 0
    for index, (x, y) in enumerate(pairs):
        _check_batch_size(x, len(y), index)
        keep = len(y) if n_examples is None else min(len(y), n_examples - taken)
        inputs.append(apply_to_collection(x, Tensor, lambda t: t[:keep].cpu()))
        targets.append(y[:keep].cpu())
        taken += keep
        if n_examples is not None and taken >= n_examples:
            break
    if taken == 0:
        raise ValueError("the sharpness dataloader yielded no examples")
    if n_examples is not None and taken < n_examples:
        rank_zero_warn(f"AdaptiveSharpness: the dataloader holds {taken} examples, fewer than n_examples={n_examples}")
    all_inputs, all_targets = _concat(inputs), torch.cat(targets)
    return [
        (apply_to_collection(all_inputs, Tensor, lambda t: t[start : start + batch_size]),
         all_targets[start : start + batch_size])
        for start in range(0, taken, batch_size)
    ]  # fmt: skip


def _check_batch_size(inputs: Any, size: int, index: int) -> None:
    sizes = []
    apply_to_collection(inputs, Tensor, lambda t: sizes.append(len(t) if t.dim() else None))
    if not sizes:
        raise ValueError(f"the inputs of the sharpness dataloader's batch {index} hold no tensor: got {_describe(inputs)}")
    if any(other != size for other in sizes):
        raise ValueError(
            f"the inputs of the sharpness dataloader's batch {index} have batch sizes {sizes} but its targets {size}: "
            "every input tensor's first dimension must be the batch"
        )


def _concat(parts: list[Any]) -> Any:
    """Concatenate along the batch dimension, tensor by tensor, inputs that share one structure."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {key: _concat([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([part[i] for part in parts]) for i in range(len(first)))
    return first  # not batched (e.g. a flag): the first batch's value stands for all
