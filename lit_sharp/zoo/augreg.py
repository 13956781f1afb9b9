"""The AugReg ViT-B/16 zoos (Steiner et al. 2021, "How to train your ViT?"): which fine-tunes, their hyperparameters,
and their ``.npz`` files loaded into timm's ``vit_base_patch16_224`` by timm's own JAX-checkpoint loader.

The release lists every checkpoint in ``index.csv``: one row per fine-tune, with the pretraining columns
``name, ds, epochs, lr, aug, wd, do, sd`` and the fine-tuning columns ``adapt_ds, adapt_lr, adapt_steps,
adapt_resolution``; ``adapt_filename`` names the file ``<adapt_filename>.npz`` next to it. The paper's zoos are the
B/16 models pretrained for 300 epochs on ImageNet-1k (``ds == "i1k"``) or ImageNet-21k (``ds == "i21k"``; ``i21k_30``
is the 30-epoch run, not used), with 7 augmentation settings x weight decay {0.03, 0.1} x dropout = stochastic depth
{0, 0.1}, each fine-tuned on ``imagenet2012`` for 20k steps at lr 0.01 and 0.03, resolution 224: 56 models each.

The ``aug`` column says ``none, light0, light1, medium1, medium2, strong1, strong2``; the paper renumbers them
(none, light0, light1, medium0, medium1, strong0, strong1) and groups them into none / light / medium / strong, the
``aug_group`` hyperparameter here.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_sharp.zoo.architecture import create_timm_model
from lit_sharp.zoo.safe_files import READ_ERRORS, ModelFileError, npz_shapes, require_file

BASE_URL = "https://storage.googleapis.com/vit_models/augreg"
INDEX_FILE = "index.csv"
ARCHITECTURE = "vit_base_patch16_224"
MODEL_NAME = "B/16"
AUGMENTATIONS = ("none", "light0", "light1", "medium1", "medium2", "strong1", "strong2")
WEIGHT_DECAYS = (0.03, 0.1)
DROPOUTS = (0.0, 0.1)  # dropout and stochastic depth are set together
FINETUNE_LRS = (0.01, 0.03)
FINETUNE_DATASET = "imagenet2012"
FINETUNE_STEPS = 20_000
RESOLUTION = 224

#: Columns that are hyperparameters (the others are the release's own accuracies and file names).
_TEXT_COLUMNS = ("name", "ds", "aug", "adapt_ds")
_INT_COLUMNS = ("epochs", "adapt_steps", "adapt_resolution")
_FLOAT_COLUMNS = ("lr", "wd", "do", "sd", "adapt_lr")

# e.g. B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224
_FILE_NAME = re.compile(
    r"(?P<name>[A-Za-z0-9_]+?)-(?P<ds>i1k|i21k(?:_30)?)-(?P<epochs>\d+)ep-lr_(?P<lr>[0-9.e-]+)"
    r"-aug_(?P<aug>[a-z0-9]+)-wd_(?P<wd>[0-9.]+)-do_(?P<do>[0-9.]+)-sd_(?P<sd>[0-9.]+)"
    r"--(?P<adapt_ds>[a-z0-9_]+)-steps_(?P<adapt_steps>\d+)k-lr_(?P<adapt_lr>[0-9.]+)-res_(?P<adapt_resolution>\d+)"
)


def aug_group(aug: str) -> str:
    """The paper's augmentation group of an ``aug`` value: ``"medium2"`` -> ``"medium"``."""
    return aug.rstrip("0123456789")


def hparams_from_row(row: dict[str, str]) -> dict[str, Any]:
    """The training hyperparameters of one ``index.csv`` row, typed (numbers as numbers), with ``aug_group``."""
    hparams: dict[str, Any] = {key: row[key] for key in _TEXT_COLUMNS}
    hparams.update({key: int(float(row[key])) for key in _INT_COLUMNS})
    hparams.update({key: float(row[key]) for key in _FLOAT_COLUMNS})
    hparams["aug_group"] = aug_group(hparams["aug"])
    return hparams


def hparams_from_file_name(file_name: str) -> dict[str, Any] | None:
    """The same hyperparameters as :func:`hparams_from_row`, read from a fine-tune's file name (``.npz`` or not).

    The name's model part writes ``/`` and ``+`` as ``_`` (``R50_L_32`` is ``R50+L/32``); steps are in thousands.
    Returns None for a name that is not an AugReg fine-tune's.
    """
    match = _FILE_NAME.fullmatch(file_name.removesuffix(".npz"))
    if match is None:
        return None
    fields = match.groupdict()
    *hybrid, last = fields["name"].rsplit("_", 1)
    fields["name"] = "+".join(hybrid[0].split("_")) + "/" + last if hybrid else last
    fields["adapt_steps"] = str(int(fields["adapt_steps"]) * 1000)
    return hparams_from_row(fields)


def in_zoo(hparams: dict[str, Any], ds: str) -> bool:
    """Whether a fine-tune belongs to the paper's zoo pretrained on ``ds`` (``"i1k"`` or ``"i21k"``)."""
    return (
        hparams["name"] == MODEL_NAME and hparams["ds"] == ds and hparams["aug"] in AUGMENTATIONS
        and hparams["wd"] in WEIGHT_DECAYS and hparams["do"] in DROPOUTS and hparams["sd"] == hparams["do"]
        and hparams["adapt_ds"] == FINETUNE_DATASET and hparams["adapt_lr"] in FINETUNE_LRS
        and hparams["adapt_steps"] == FINETUNE_STEPS and hparams["adapt_resolution"] == RESOLUTION
    )


def read_index(path: Path) -> dict[str, dict[str, Any]]:
    """``adapt_filename -> hyperparameters`` for every row of the ``index.csv`` at ``path``.

    Raises:
        ModelFileError: the file is missing, lacks a column, or holds a value that is not a number where one is due.
    """
    fix = "fetch it with `python -m lit_sharp.zoo download augreg_in1k --to DIR` (any AugReg zoo)"
    require_file(path, fix)
    try:
        with path.open(newline="") as handle:
            return {row["adapt_filename"]: hparams_from_row(row) for row in csv.DictReader(handle)}
    except READ_ERRORS + (TypeError,) as exc:
        raise ModelFileError(path, f"not the AugReg index.csv ({type(exc).__name__}: {exc})", fix) from exc


@dataclass(frozen=True)
class AugRegZoo:
    """One AugReg zoo: the B/16 fine-tunes pretrained on ``ds``, kept as ``<root>/<adapt_filename>.npz``.

    Attributes:
        zoo: the zoo's name (``augreg_in1k``).
        ds: the ``index.csv`` pretraining data set (``i1k`` or ``i21k``).
        timm_tag: the timm pretrained tag whose data config (crop, interpolation, mean, std) these models share.
        base_url: where ``index.csv`` and the ``.npz`` files are served.
    """

    zoo: str
    ds: str
    timm_tag: str
    base_url: str = BASE_URL

    def metadata_files(self) -> list[tuple[str, str]]:
        """``(url, file name)`` of the zoo's metadata, fetched before the models."""
        return [(f"{self.base_url}/{INDEX_FILE}", INDEX_FILE)]

    def names(self, root: Path) -> list[str]:
        """The zoo's models, sorted: from ``<root>/index.csv`` if present, else from the ``.npz`` files in ``root``."""
        return sorted(name for name, hparams in self._catalogue(root).items() if in_zoo(hparams, self.ds))

    def file_name(self, name: str) -> str:
        return f"{name}.npz"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{self.file_name(name)}"

    def hparams(self, name: str, root: Path) -> dict[str, Any]:
        """The model's hyperparameters: its ``index.csv`` row when the index is there, else its file name's."""
        index = root / INDEX_FILE
        hparams = read_index(index).get(name) if index.is_file() else hparams_from_file_name(name)
        if hparams is None or not in_zoo(hparams, self.ds):
            raise ModelFileError(root / self.file_name(name), f"not a model of the zoo {self.zoo}",
                                 f"list its models with `python -m lit_sharp.zoo list {self.zoo} --root {root}`")
        return hparams

    def load(self, name: str, root: Path, model_kwargs: dict[str, Any] | None = None):
        """The fine-tune ``name`` as timm's ViT-B/16 in evaluation mode, with its hyperparameters and data config."""
        hparams = self.hparams(name, root)
        model = load_augreg_npz(root / self.file_name(name), f"{ARCHITECTURE}.{self.timm_tag}", model_kwargs,
                                fix=f"fetch it with `python -m lit_sharp.zoo download {self.zoo} --to {root}`")
        return model, hparams

    def _catalogue(self, root: Path) -> dict[str, dict[str, Any]]:
        index = root / INDEX_FILE
        if index.is_file():
            return read_index(index)
        parsed = {path.stem: hparams_from_file_name(path.name) for path in root.glob("*.npz")}
        return {name: hparams for name, hparams in parsed.items() if hparams is not None}


def load_augreg_npz(path: Path, timm_name: str, model_kwargs: dict[str, Any] | None, fix: str):
    """A timm ViT built as ``timm_name`` (+ ``model_kwargs``) with the weights of the AugReg ``.npz`` at ``path``.

    timm's ``VisionTransformer.load_pretrained`` (``_load_weights``) does the conversion from the JAX layout. It
    skips a head whose size differs from the model's without a word, so the head is checked here first.

    Raises:
        ModelFileError: the file is missing, truncated, not an AugReg checkpoint, or made for another architecture.
    """
    shapes = npz_shapes(path, fix)
    model = create_timm_model(timm_name, model_kwargs)
    head = shapes.get("head/bias")
    if head is None or head[-1] != model.num_classes:
        raise ModelFileError(path, f"has no {model.num_classes}-class head (head/bias: {head}); not an ImageNet "
                             "fine-tune of the AugReg release", fix)
    try:
        model.load_pretrained(str(path))
    except READ_ERRORS as exc:
        raise ModelFileError(path, f"does not fit {timm_name} ({type(exc).__name__}: {exc})", fix) from exc
    return model.eval()
