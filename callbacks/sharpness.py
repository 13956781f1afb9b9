r"""
Adaptive Sharpness
^^^^^^^^^^^^^^^^^^

Measures the sharpness of the trained model at the end of training and logs it to every attached logger.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from tqdm.auto import tqdm
from typing_extensions import override

from lit_sharp.callbacks._logging import log_final_metrics
from lit_sharp.sharpness import PRESETS, SharpnessSpec, sharpness

SpecsArgument = Union[str, SharpnessSpec, Sequence[Union[str, SharpnessSpec]]]

VALUE_PREFIX = "sharpness/"
ERR_INCREASE_PREFIX = "sharpness_err_increase/"


class AdaptiveSharpness(Callback):
    r"""Compute sharpness definitions of the trained model when training ends and log them.

    Adaptive sharpness as evaluated in ``A Modern Look at the Relationship between Sharpness and Generalization``
    by Maksym Andriushchenko, Francesco Croce, Maximilian Müller, Matthias Hein and Nicolas Flammarion (ICML 2023),
    computed by :func:`lit_sharp.sharpness.sharpness`: average- or worst-case (Auto-PGD in weight space), l2 or
    linf, adaptive (``c = |w|``, Kwon et al. 2021) or standard, with or without logit normalization, as the mean
    over batches of the per-batch value.

    The work runs in ``on_train_end``: it needs gradients, which validation and test hooks (inference mode) do not
    allow, and since ``self.log`` is not allowed there either the numbers go straight to ``trainer.loggers`` (and
    into the W&B run summary), as :class:`~lightning.pytorch.callbacks.LearningRateMonitor` does. For each spec,
    ``sharpness/<spec.name>`` is the sharpness and ``sharpness_err_increase/<spec.name>`` the increase in
    classification error at the chosen perturbation; :attr:`results` holds the same numbers.

    The module only needs a ``forward`` that returns logits. It is evaluated on its own device, in evaluation mode
    and float32, and is left exactly as it was.

    Args:
        specs: a preset name (``"paper_resnet18"``, ``"paper_simplevit"``: 48 specs each), one
            :class:`~lit_sharp.sharpness.SharpnessSpec`, or a list of specs, spec names such as
            ``"worst_linf_adaptive_ln_rho0.002"`` (as a YAML config lists them) or preset names.
        dataloader: yields ``(x, y)`` batches; the first ``n_examples`` examples are used, in order. If None, the
            datamodule's ``sharpness_dataloader()`` is used.
        n_examples: how many examples (1024 in the paper); None uses all the dataloader yields.
        batch_size: examples per batch, the ``m`` of m-sharpness (128 in the paper).

    Raises:
        ValueError: an unknown preset or malformed spec name (naming the field: ``kind``, ``norm``, ``rho``, ...),
            duplicate specs, ``n_examples`` or ``batch_size`` below 1, or a ``dataloader`` that is not iterable.
        MisconfigurationException: at ``fit`` setup, if neither ``dataloader`` nor the datamodule's
            ``sharpness_dataloader()`` gives the data.

    Example::

        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,)))
        >>> loader = DataLoader(data, batch_size=64)
        >>> sharpness = AdaptiveSharpness("paper_resnet18", dataloader=loader, n_examples=256)
        >>> len(sharpness.specs)
        48
        >>> trainer = Trainer(callbacks=[sharpness], logger=False, enable_progress_bar=False)
        >>> # after trainer.fit(model): sharpness.results["sharpness/worst_linf_adaptive_ln_rho0.002"]
    """

    def __init__(
        self,
        specs: SpecsArgument,
        dataloader: Iterable[Any] | None = None,
        n_examples: int | None = 1024,
        batch_size: int = 128,
    ) -> None:
        self.specs = _resolve_specs(specs)
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise ValueError(
                f"dataloader must be an iterable of (x, y) batches or None, got {type(dataloader).__name__}"
            )
        if n_examples is not None and not _is_positive_int(n_examples):
            raise ValueError(f"n_examples must be an integer >= 1 or None, got {n_examples!r}")
        if not _is_positive_int(batch_size):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.dataloader = dataloader
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.results: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            specs=[spec.name for spec in self.specs], n_examples=self.n_examples, batch_size=self.batch_size
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the data can be found, so that a misconfiguration fails before training, not after."""
        if stage == "fit" and self.dataloader is None and not _has_sharpness_dataloader(trainer):
            raise _missing_data()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute every spec on the trained module and log the values."""
        self.measure(pl_module, trainer.datamodule, progress=trainer.is_global_zero)
        log_final_metrics(trainer, self.results)

    def measure(self, model: torch.nn.Module, datamodule: Any = None, *, progress: bool = True) -> dict[str, float]:
        """Compute every spec on ``model`` (outside a Trainer too, e.g. to evaluate a checkpoint).

        Args:
            model: returns logits; measured on its own device.
            datamodule: provides ``sharpness_dataloader()`` when the callback was given no ``dataloader``.
            progress: show a progress bar over the specs.

        Returns:
            ``sharpness/<spec name>`` and ``sharpness_err_increase/<spec name>`` for every spec (also kept in ``results``).
        """
        started = time.perf_counter()
        device = next(model.parameters()).device
        batches = [(x.to(device), y.to(device)) for x, y in _rebatch(self._data_source(datamodule), self.n_examples,
                                                                      self.batch_size)]
        results: dict[str, float] = {}
        for spec in tqdm(self.specs, desc="sharpness", unit="spec", disable=not progress):
            result = sharpness(model, batches, spec)
            results[VALUE_PREFIX + spec.name] = result.value
            results[ERR_INCREASE_PREFIX + spec.name] = result.err_increase
        self.results = results
        first = self.specs[0].name
        rank_zero_info(
            f"AdaptiveSharpness: {len(self.specs)} specs on {sum(len(y) for _, y in batches)} examples in batches of "
            f"{self.batch_size} ({time.perf_counter() - started:.1f}s); {first} = {results[VALUE_PREFIX + first]:.6g}"
        )
        return results

    def _data_source(self, datamodule: Any) -> Iterable[Any]:
        if self.dataloader is not None:
            return self.dataloader
        if not callable(getattr(datamodule, "sharpness_dataloader", None)):
            raise _missing_data()
        return datamodule.sharpness_dataloader()


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


def _rebatch(source: Iterable[Any], n_examples: int | None, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``n_examples`` examples of ``source``, in order, cut into batches of ``batch_size``."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    taken = 0
    for index, batch in enumerate(source):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"the sharpness dataloader must yield (x, y) pairs; batch {index} is a {type(batch).__name__}"
            )
        x, y = batch
        keep = len(y) if n_examples is None else min(len(y), n_examples - taken)
        xs.append(x[:keep])
        ys.append(y[:keep])
        taken += keep
        if n_examples is not None and taken >= n_examples:
            break
    if taken == 0:
        raise ValueError("the sharpness dataloader yielded no examples")
    if n_examples is not None and taken < n_examples:
        rank_zero_warn(
            f"AdaptiveSharpness: the dataloader holds {taken} examples, fewer than n_examples={n_examples}"
        )
    return list(zip(torch.cat(xs).split(batch_size), torch.cat(ys).split(batch_size)))
