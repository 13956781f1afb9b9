"""Writers of the ImageNet evaluation sets' real layouts, for tests: ImageFolder trees of tiny one-colour images.

Every 1000-class set has all 1000 class folders, ImageNet-R and -A their 200, ObjectNet its 113 evaluated folders, one
folder without an ImageNet class and the release's ``mappings/`` files. Solid red, green and blue images make the
predictions of a model that scores the mean colour countable by hand (see ``tests/test_zoo_eval_sets.py``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from PIL import Image

from lit_sharp.zoo.imagenet_classes import imagenet_synsets, subset_synsets

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
#: The folders :func:`write_eval_tree` can write: the evaluation sets and the ImageNet training folder.
TREE_PARTS = ("imagenet", "imagenet_train", "imagenet_sketch", "imagenet_v2", "imagenet_r", "imagenet_a", "objectnet")


def write_image(path: Path, colour: tuple[int, int, int], border: tuple[int, int, int] | None = None) -> None:
    """An 8 x 8 image of one colour (JPEG), or a 4 x 4 one inside a 2-pixel ``border`` (lossless, for PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if border is None:
        Image.new("RGB", (8, 8), colour).save(path, quality=95)
    else:
        image = Image.new("RGB", (8, 8), border)
        image.paste(Image.new("RGB", (4, 4), colour), (2, 2))
        image.save(path)


def write_objectnet_mappings(folder: Path) -> dict[str, tuple[int, ...]]:
    """Mapping files in the release's formats for 113 classes, and the classifier indices each folder should get.

    ImageNet 2012 ids are a permutation of the classifier indices (``id = 7 p + 3 mod 1000``), as in the release.
    """
    folder.mkdir(parents=True)
    id_of = {p: (7 * p + 3) % 1000 for p in range(1000)}
    name_of_id = {id_2012: f"imagenet class {id_2012}" for id_2012 in range(1000)}
    groups = {"obj_000": (500, 1), "obj_001": (2,), "obj_002": (0, 302)}  # 0: red, 1: green, 2: blue
    groups |= {f"obj_{j:03d}": (100 + j, 300 + j) for j in range(3, 113)}
    (folder / "imagenet_to_label_2012_v2").write_text("".join(f"{name_of_id[i]}\n" for i in range(1000)))
    (folder / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(p): i for p, i in id_of.items()}))
    labels = {name: f"Object {name[4:]}" for name in groups} | {"no_imagenet_class": "Tarp"}
    (folder / "folder_to_objectnet_label.json").write_text(json.dumps(labels))
    to_imagenet = {labels[name]: "; ".join(name_of_id[id_of[p]] for p in group) for name, group in groups.items()}
    (folder / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet))
    return groups


def write_eval_tree(root: Path, parts: Collection[str] = TREE_PARTS) -> Path:
    """The ``parts`` of :data:`TREE_PARTS` under ``root``, in the folder layout of the extracted archives.

    ImageNet val: red for even classes, green for odd ones, named like the ILSVRC2012 val files ReaL labels; train: two
    images per class, red, green, blue in turn; Sketch red; V2 red, green, blue by class; R and A blue for their
    second class, green otherwise; ObjectNet blue for ``obj_001``, green otherwise, inside a red border.
    """
    for index, synset in enumerate(imagenet_synsets()):
        if "imagenet" in parts:
            write_image(root / "imagenet/val" / synset / f"ILSVRC2012_val_{index + 1:08d}.JPEG", (RED, GREEN)[index % 2])
        if "imagenet_train" in parts:
            for copy in range(2):
                write_image(root / "imagenet/train" / synset / f"{synset}_{copy}.JPEG",
                            (RED, GREEN, BLUE)[(index + copy) % 3])
        if "imagenet_sketch" in parts:
            write_image(root / "sketch" / synset / "sketch_0.JPEG", RED)
        if "imagenet_v2" in parts:
            write_image(root / "imagenetv2-matched-frequency-format-val" / str(index) / "v2.jpeg",
                        (RED, GREEN, BLUE)[index % 3])
    for name, folder in (("imagenet_r", "imagenet-r"), ("imagenet_a", "imagenet-a")):
        if name in parts:
            for position, synset in enumerate(subset_synsets(name)):
                write_image(root / folder / synset / "image.jpg", BLUE if position == 1 else GREEN)
    if "objectnet" in parts:
        groups = write_objectnet_mappings(root / "objectnet-1.0/mappings")
        for name in [*groups, "no_imagenet_class"]:
            write_image(root / "objectnet-1.0/images" / name / "image.png", BLUE if name == "obj_001" else GREEN,
                        border=RED)
    return root
