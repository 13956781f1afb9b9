"""The ImageNet class lists that timm ships: the 1000 synsets in classifier order, the 200-class subsets of
ImageNet-R and ImageNet-A, and the ReaL labels of the validation images (Beyer et al. 2020)."""

from __future__ import annotations

import functools
import json
import pkgutil

from timm.data import ImageNetInfo

#: The 200-class evaluation sets whose class lists timm ships as ``_info/<name>_synsets.txt``.
SUBSETS = ("imagenet_r", "imagenet_a")


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 WordNet ids of ImageNet-1k, in the order of a classifier's 1000 logits (sorted, as timm's list)."""
    return tuple(ImageNetInfo("imagenet-1k").label_names())


@functools.cache
def subset_synsets(name: str) -> tuple[str, ...]:
    """The synsets of a 200-class set (``"imagenet_r"`` or ``"imagenet_a"``), read from timm's list."""
    if name not in SUBSETS:
        raise ValueError(f"unknown ImageNet subset {name!r}; known: {SUBSETS}")
    return tuple(_timm_info_file(f"{name}_synsets.txt").split())


@functools.cache
def subset_indices(name: str) -> tuple[int, ...]:
    """The positions among the 1000 logits of a subset's classes, in the order of :func:`subset_synsets`."""
    position = {synset: index for index, synset in enumerate(imagenet_synsets())}
    return tuple(position[synset] for synset in subset_synsets(name))


@functools.cache
def real_labels() -> tuple[tuple[int, ...], ...]:
    """ReaL labels: entry ``i`` lists the correct classes of ``ILSVRC2012_val_{i + 1:08d}.JPEG`` (empty: none is)."""
    return tuple(tuple(labels) for labels in json.loads(_timm_info_file("imagenet_real_labels.json")))


def real_file_name(index: int) -> str:
    """The validation file name that ReaL entry ``index`` (0-based) labels."""
    return f"ILSVRC2012_val_{index + 1:08d}.JPEG"


def _timm_info_file(name: str) -> str:
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    if data is None:
        raise RuntimeError(f"timm does not ship _info/{name}: update timm")
    return data.decode("utf-8")
