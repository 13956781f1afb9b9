"""The model zoos by name: their model lists, files, hyperparameters and loaders behind two calls.

``list_zoo(zoo, root)`` names a zoo's models; ``load_zoo_model(zoo, name, root)`` returns the model in evaluation
mode, its own training hyperparameters (from the zoo's metadata) and timm's data config for it (input size,
interpolation, crop, mean, std), which is how that model expects its images.

- ``augreg_in1k`` / ``augreg_in21k``: 56 AugReg ViT-B/16 each, pretrained on ImageNet-1k / -21k; files
  ``index.csv`` and ``<adapt_filename>.npz`` (:mod:`lit_sharp.zoo.augreg`).
- ``clip_soups``: 72 CLIP ViT-B/32 fine-tunes (model soups); files ``hparam_info.json`` and ``model_<i>.pt``
  (:mod:`lit_sharp.zoo.clip_soups`).
- ``timm``: any timm name with pretrained weights, fetched by timm into its own cache
  (:mod:`lit_sharp.zoo.timm_models`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from lit_sharp.errors import ConfigError
from lit_sharp.zoo.augreg import AugRegZoo
from lit_sharp.zoo.clip_soups import ClipSoupsZoo
from lit_sharp.zoo.timm_models import TimmZoo


class ZooSource(Protocol):
    """What a zoo provides: metadata to fetch first, model names, their files and URLs, hyperparameters, a loader."""

    zoo: str

    def metadata_files(self) -> list[tuple[str, str]]: ...

    def names(self, root: Path) -> list[str]: ...

    def file_name(self, name: str) -> str: ...

    def hparams(self, name: str, root: Path) -> dict[str, Any]: ...

    def load(self, name: str, root: Path, model_kwargs: dict[str, Any] | None = None
             ) -> tuple[nn.Module, dict[str, Any]]: ...


ZOOS: dict[str, ZooSource] = {
    "augreg_in1k": AugRegZoo("augreg_in1k", ds="i1k", timm_tag="augreg_in1k"),
    "augreg_in21k": AugRegZoo("augreg_in21k", ds="i21k", timm_tag="augreg_in21k_ft_in1k"),
    "clip_soups": ClipSoupsZoo(),
    "timm": TimmZoo(),
}

#: The zoos whose files ``python -m lit_sharp.zoo download`` fetches (timm fetches its own).
DOWNLOADABLE = ("augreg_in1k", "augreg_in21k", "clip_soups")


def zoo_source(zoo: str) -> ZooSource:
    """The source called ``zoo``; raises :class:`ConfigError` naming the known zoos."""
    if zoo not in ZOOS:
        raise ConfigError("zoo", zoo, f"unknown zoo; choose one of {', '.join(ZOOS)}")
    return ZOOS[zoo]


def list_zoo(zoo: str, root: Path | str, *, downloaded_only: bool = False) -> list[str]:
    """The names of ``zoo``'s models (see each source for where the list comes from).

    Args:
        zoo: a key of :data:`ZOOS` other than ``timm`` (whose models the user names).
        root: the folder of the zoo's files.
        downloaded_only: keep only the models whose file is under ``root`` (after a trial ``download --only N``).
    """
    source, root = zoo_source(zoo), Path(root)
    names = source.names(root)
    return [name for name in names if (root / source.file_name(name)).is_file()] if downloaded_only else names


def load_zoo_model(zoo: str, name: str, root: Path | str, model_kwargs: dict[str, Any] | None = None
                   ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Load model ``name`` of ``zoo`` from the files under ``root``.

    Args:
        zoo: a key of :data:`ZOOS`.
        name: one of ``list_zoo(zoo, root)`` (for ``timm``: any pretrained timm name).
        root: the folder the zoo's files were downloaded to.
        model_kwargs: passed to ``timm.create_model`` (e.g. a smaller architecture for tests).

    Returns:
        ``(model, hparams, data_config)``: the model in evaluation mode on the CPU, its training hyperparameters, and
        ``timm.data.resolve_model_data_config(model)``.

    Raises:
        lit_sharp.errors.UserError: an unknown zoo or model, or a file that is missing, truncated or foreign.
    """
    from timm.data import resolve_model_data_config

    model, hparams = zoo_source(zoo).load(name, Path(root), model_kwargs)
    return model, hparams, resolve_model_data_config(model)
