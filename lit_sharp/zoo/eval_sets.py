"""The evaluation sets of an ImageNet classifier (the paper's Section 4): ImageNet val and its ReaL labels,
ImageNet-V2, ImageNet-Sketch, ImageNet-R, ImageNet-A and ObjectNet, each an optional folder under one root.

Every set is read with :class:`torchvision.datasets.ImageFolder` and the model's own timm transform
(``timm.data.create_transform(**data_config)``); a mistake is :func:`lit_sharp.top1.misclassified` of the logits
the set scores, counted by :class:`lit_sharp.evaluation.ClassificationError`. A set whose folder is absent is
skipped with one line for the run summary; a folder without the set's classes is a :class:`EvalSetError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm.data
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from lit_sharp.errors import DataError
from lit_sharp.eval_mode import evaluation_mode
from lit_sharp.evaluation import ClassificationError
from lit_sharp.zoo.imagenet_classes import imagenet_synsets, real_file_name, real_labels, subset_indices, subset_synsets
from lit_sharp.zoo.objectnet import crop_border, read_objectnet_mapping

#: Every evaluation set, in the order of the run summary; each one's metric is ``<name>/err``.
EVAL_SETS = ("imagenet", "imagenet_real", "imagenet_v2", "imagenet_sketch", "imagenet_r", "imagenet_a", "objectnet")
#: Where each set lies under the root: the folder names of the public archives (README, "Evaluation sets").
#: ``imagenet_real`` relabels the ``imagenet`` images and has no folder of its own.
DEFAULT_FOLDERS: dict[str, str] = {
    "imagenet": "imagenet/val",
    "imagenet_v2": "imagenetv2-matched-frequency-format-val",
    "imagenet_sketch": "sketch",
    "imagenet_r": "imagenet-r",
    "imagenet_a": "imagenet-a",
    "objectnet": "objectnet-1.0",
}


class EvalSetError(DataError):
    """An evaluation set's folder does not hold the classes the set has."""

    def __init__(
        self, name: str, folder: Path, found: int, expected: int, missing: Sequence[str], extra: Sequence[str]
    ) -> None:
        details = "".join(
            f"; {what}: {', '.join(sorted(names)[:5])}{' ...' if len(names) > 5 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra))
            if names
        )
        super().__init__(
            f"evaluation set {name} at {folder}: found {found} class folders, expected the {expected} classes of "
            f"{name}{details}. Give the folder of the extracted archive (README, 'Evaluation sets')"
        )


@dataclass
class EvalResults:
    """What :func:`evaluation_errors` measured.

    Attributes:
        metrics: ``"<set>/err"`` -> top-1 error (a fraction) for every set present.
        skipped: one line per absent set, for the run summary.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Scoring:
    """How one set turns the model's 1000 logits into a decision: its class folders, their targets, the logits it
    scores, and an image step before the model's transform."""

    targets: dict[str, int]
    project: Callable[[Tensor], Tensor] | None = None
    before_transform: Callable[[Any], Any] | None = None
    image_folder: str = ""


def evaluation_errors(
    model: nn.Module,
    root: str | os.PathLike,
    *,
    data_config: Mapping[str, Any] | None = None,
    sets: Sequence[str] = EVAL_SETS,
    folders: Mapping[str, str] | None = None,
    batch_size: int = 250,
    num_workers: int = 0,
) -> EvalResults:
    """Top-1 error of an ImageNet classifier on every evaluation set found under ``root``.

    ImageNet val, ImageNet-V2 and ImageNet-Sketch score all 1000 logits. ImageNet-R and ImageNet-A score the 200
    logits of their classes (timm's class lists). ObjectNet crops a 2-pixel border, then scores each of its 113
    ImageNet-overlapping classes by the maximum logit of its ImageNet classes (the release's ``mappings/``); its
    other classes are not evaluated. ImageNet-ReaL (Beyer et al. 2020) relabels the val images with timm's copy of
    the ReaL labels: an image is wrong where the arg-max is none of its labels, and images without labels do not
    count.

    Args:
        model: maps ``(B, 3, H, W)`` images to 1000 ImageNet logits.
        root: the folder holding the sets (:data:`DEFAULT_FOLDERS`).
        data_config: timm's data config (input size, interpolation, crop, mean, std); None resolves the model's own
            with ``timm.data.resolve_model_data_config``.
        sets: the sets to evaluate, a subset of :data:`EVAL_SETS`.
        folders: set name -> folder under ``root``, overriding :data:`DEFAULT_FOLDERS`.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes.

    Returns:
        The errors of the sets present and one line for each set absent.

    Raises:
        ValueError: an unknown set name.
        EvalSetError: a set's folder does not hold its classes.
        DataError: ObjectNet's mapping files are missing or unreadable.
    """
    unknown = sorted(set(sets) - set(EVAL_SETS))
    if unknown:
        raise ValueError(f"unknown evaluation sets {unknown}; known: {EVAL_SETS}")
    folders = {**DEFAULT_FOLDERS, **(folders or {})}
    config = dict(data_config) if data_config is not None else timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config)
    results = EvalResults()
    for name in sets:
        if name == "imagenet_real":
            continue  # scored in the imagenet pass
        folder = Path(root) / folders[name]
        if not folder.is_dir():
            results.skipped.append(f"{name}: skipped, no folder {folder}")
            continue
        scoring = _scoring(name, folder)
        _check_classes(name, folder / scoring.image_folder, scoring.targets)
        dataset = _LabelledFolder(folder / scoring.image_folder, scoring.targets, _compose(scoring, transform))
        pin = next(model.parameters()).device.type == "cuda"
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin)
        real = name == "imagenet" and "imagenet_real" in sets
        errors = _count_errors(model, loader, scoring.project, dataset.samples if real else None)
        results.metrics[f"{name}/err"] = errors.pop("err")
        if real:
            if "real" in errors:
                results.metrics["imagenet_real/err"] = errors["real"]
            else:
                results.skipped.append(f"imagenet_real: skipped, the files of {folder} are not named ILSVRC2012_val_*")
    if "imagenet_real" in sets and "imagenet" not in sets:
        results.skipped.append("imagenet_real: skipped, it relabels the imagenet set, which was not requested")
    elif "imagenet_real" in sets and "imagenet/err" not in results.metrics:
        results.skipped.append("imagenet_real: skipped, no imagenet val folder")
    return results


def _scoring(name: str, folder: Path) -> _Scoring:
    if name in ("imagenet", "imagenet_sketch"):
        return _Scoring({synset: index for index, synset in enumerate(imagenet_synsets())})
    if name == "imagenet_v2":
        return _Scoring({str(index): index for index in range(len(imagenet_synsets()))})  # folders "0" .. "999"
    if name in ("imagenet_r", "imagenet_a"):
        columns = torch.tensor(subset_indices(name))
        return _Scoring(
            {synset: position for position, synset in enumerate(subset_synsets(name))},
            project=lambda logits: logits[:, columns.to(logits.device)],
        )
    mapping = read_objectnet_mapping(folder / "mappings")
    return _Scoring(
        {name: position for position, name in enumerate(mapping.folders)},
        project=mapping.project,
        before_transform=crop_border,
        image_folder="images",
    )


def _compose(scoring: _Scoring, transform: Callable) -> Callable:
    return transform if scoring.before_transform is None else transforms.Compose([scoring.before_transform, transform])


def _check_classes(name: str, folder: Path, targets: Mapping[str, int]) -> None:
    found = {entry.name for entry in os.scandir(folder) if entry.is_dir()} if folder.is_dir() else set()
    missing = sorted(set(targets) - found)
    # ObjectNet's folder also holds the classes without an ImageNet counterpart; the other sets hold only theirs.
    extra = [] if name == "objectnet" else sorted(found - set(targets))
    if missing or extra:
        raise EvalSetError(name, folder, len(found), len(targets), missing, extra)


class _LabelledFolder(ImageFolder):
    """An ImageFolder whose targets come from the set's class list, not from the sorted folder names (ImageNet-V2's
    folders ``"0" .. "999"`` sort as strings; ObjectNet's folder holds classes that are not evaluated)."""

    def __init__(self, root: Path, targets: Mapping[str, int], transform: Callable) -> None:
        self._targets = dict(targets)
        super().__init__(str(root), transform=transform, loader=_read_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = {entry.name for entry in os.scandir(directory) if entry.is_dir()}
        classes = sorted(name for name in self._targets if name in present)
        return classes, {name: self._targets[name] for name in classes}


def _read_image(path: str) -> Any:
    try:
        return default_loader(path)
    except OSError as error:  # PIL's unreadable, truncated or unknown image
        raise DataError(f"cannot read the image {path} ({error}): replace or delete the file") from None


@torch.inference_mode()
def _count_errors(
    model: nn.Module,
    loader: DataLoader,
    project: Callable[[Tensor], Tensor] | None,
    samples: Sequence[tuple[str, int]] | None,
) -> dict[str, float]:
    """``err`` of the scored logits; with ``samples`` (the val images in loader order) also ReaL's ``real``."""
    device = next(model.parameters()).device
    metric = ClassificationError().to(device)
    real = _RealCounter(samples, device) if samples is not None else None
    with evaluation_mode(model):
        for x, y in loader:
            logits = model(x.to(device, non_blocking=True))
            scored = logits if project is None else project(logits)
            metric.update(scored, y.to(device, non_blocking=True))
            if real is not None:
                real.update(logits)
    wrong, seen = metric.counts()
    if seen == 0:
        raise DataError(f"no images found under {loader.dataset.root}")
    errors = {"err": wrong / seen}
    if real is not None and real.usable:
        errors["real"] = real.error()
    return errors


class _RealCounter:
    """ReaL error: the arg-max (as :func:`lit_sharp.top1.misclassified` takes it) is wrong where it is none of the
    image's ReaL labels; images ReaL leaves without a label do not count."""

    def __init__(self, samples: Sequence[tuple[str, int]], device: torch.device) -> None:
        entry_of = {real_file_name(index): labels for index, labels in enumerate(real_labels())}
        labels = [entry_of.get(Path(path).name) for path, _ in samples]
        self.usable = all(entry is not None for entry in labels)
        # Multi-hot (n_images, 1000) on the host; each batch's rows go to the device with it.
        self._multi_hot = torch.zeros(len(samples), len(imagenet_synsets()), dtype=torch.bool)
        for row, entry in enumerate(labels):
            if entry:
                self._multi_hot[row, list(entry)] = True
        self._device = device
        self._offset = 0
        self._wrong = torch.zeros((), dtype=torch.long, device=device)
        self._seen = torch.zeros((), dtype=torch.long, device=device)

    def update(self, logits: Tensor) -> None:
        rows = self._multi_hot[self._offset : self._offset + len(logits)].to(self._device, non_blocking=True)
        self._offset += len(logits)
        labelled = rows.any(dim=1)
        correct = rows.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
        self._wrong += (labelled & ~correct).sum()
        self._seen += labelled.sum()

    def error(self) -> float:
        return int(self._wrong) / int(self._seen)


def image_dataset(folder: Path, data_config: Mapping[str, Any]) -> Dataset:
    """The 1000-class ImageFolder at ``folder`` (ImageNet train or val layout) with the model's eval transform.

    Raises:
        EvalSetError: the folder does not hold the 1000 ImageNet class folders.
    """
    targets = {synset: index for index, synset in enumerate(imagenet_synsets())}
    if not folder.is_dir():
        raise DataError(f"no ImageNet folder {folder}: give the folder of the 1000 class folders")
    _check_classes("imagenet", folder, targets)
    return _LabelledFolder(folder, targets, timm.data.create_transform(**data_config))
