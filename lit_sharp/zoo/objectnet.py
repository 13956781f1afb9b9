"""ObjectNet (Barbu et al. 2019) scored by an ImageNet classifier: the mapping files of the release, the score of
each ObjectNet class as the maximum of its ImageNet logits, and the 2-pixel border crop of its images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import Tensor

from lit_sharp.errors import DataError

#: The files of the release's ``mappings/`` folder that the class mapping is built from.
MAPPING_FILES = (
    "folder_to_objectnet_label.json",  # image folder name -> ObjectNet class name
    "objectnet_to_imagenet_1k.json",  # ObjectNet class name -> ImageNet class names joined by "; "
    "imagenet_to_label_2012_v2",  # line i: the ImageNet class name of ImageNet 2012 id i
    "pytorch_to_imagenet_2012_id.json",  # classifier index (sorted synsets) -> ImageNet 2012 id
)
#: Pixels cut from each side of an ObjectNet image: the release's images carry a 1-2 pixel red border.
BORDER = 2


@dataclass(frozen=True)
class ObjectNetMapping:
    """The ObjectNet classes that overlap ImageNet-1k (113 in the release).

    Attributes:
        folders: the image folder of each class, sorted; a class's target is its position here.
        imagenet_indices: for each class, the classifier indices (0..999) of its ImageNet classes.
    """

    folders: tuple[str, ...]
    imagenet_indices: tuple[tuple[int, ...], ...]

    def project(self, logits: Tensor) -> Tensor:
        """``(B, 1000)`` ImageNet logits -> ``(B, classes)``: each ObjectNet class scores its best ImageNet class."""
        width = max(len(group) for group in self.imagenet_indices)
        # Pad each group with its own first index: a repeated column leaves the maximum unchanged.
        table = [list(group) + [group[0]] * (width - len(group)) for group in self.imagenet_indices]
        index = torch.tensor(table, device=logits.device)
        return logits[:, index].amax(dim=-1)


def read_objectnet_mapping(mappings: Path) -> ObjectNetMapping:
    """Build the class mapping from the release's ``mappings/`` folder (the files of :data:`MAPPING_FILES`).

    Raises:
        DataError: a file is missing or unreadable, or names an ImageNet class it does not define unambiguously.
    """
    folder_of = {label: folder for folder, label in _read_json(mappings, MAPPING_FILES[0]).items()}
    to_imagenet = _read_json(mappings, MAPPING_FILES[1])
    lines = _read(mappings, MAPPING_FILES[2]).splitlines()
    classifier_of_2012 = {int(id_2012): int(index) for index, id_2012 in _read_json(mappings, MAPPING_FILES[3]).items()}
    ids_of_name: dict[str, list[int]] = {}
    for id_2012, name in enumerate(lines):
        ids_of_name.setdefault(name.strip(), []).append(id_2012)
    groups = {}
    for label, names in to_imagenet.items():
        if label not in folder_of:
            raise DataError(f"{mappings / MAPPING_FILES[0]} has no folder for the ObjectNet class {label!r}")
        indices = []
        for name in names.split("; "):
            ids = ids_of_name.get(name, [])
            if len(ids) != 1:
                raise DataError(
                    f"{mappings / MAPPING_FILES[1]} maps {label!r} to the ImageNet class {name!r}, which "
                    f"{mappings / MAPPING_FILES[2]} lists {len(ids)} times (expected once)"
                )
            indices.append(classifier_of_2012[ids[0]])
        groups[folder_of[label]] = tuple(indices)
    folders = tuple(sorted(groups))
    return ObjectNetMapping(folders, tuple(groups[folder] for folder in folders))


def crop_border(image: Image.Image) -> Image.Image:
    """Cut :data:`BORDER` pixels from each side of an ObjectNet image, before the model's own transform."""
    return ImageOps.crop(image, border=BORDER)


def _read(folder: Path, name: str) -> str:
    path = folder / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(
            f"cannot read the ObjectNet mapping file {path} ({error.strerror or error}): it ships in the "
            "release's mappings/ folder"
        ) from None


def _read_json(folder: Path, name: str) -> dict:
    try:
        content = json.loads(_read(folder, name))
    except json.JSONDecodeError as error:
        raise DataError(f"the ObjectNet mapping file {folder / name} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise DataError(f"the ObjectNet mapping file {folder / name} must hold a JSON object")
    return content
