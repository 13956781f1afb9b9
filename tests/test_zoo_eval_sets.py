"""The ImageNet evaluation sets and the fixed training subsets, on tiny image trees in the real layouts.

The model scores each image by its mean colour: ImageNet classes 0, 1, 2 (and the first two classes of ImageNet-A)
respond to red, green and blue, every other logit is 0. Solid red, green and blue images therefore have predictions
that can be counted by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm.data
import torch
from PIL import Image
from torch import nn
from zoo_sets import GREEN, RED, write_eval_tree, write_objectnet_mappings

from lit_sharp.errors import DataError, UserError
from lit_sharp.zoo.eval_sets import EVAL_SETS, EvalSetError, evaluation_errors
from lit_sharp.zoo.imagenet_classes import imagenet_synsets, subset_indices, subset_synsets
from lit_sharp.zoo.objectnet import ObjectNetMapping, crop_border, read_objectnet_mapping
from lit_sharp.zoo.train_subsets import fixed_indices, sharpness_batches, train_error_subset

DATA_CONFIG = dict(input_size=(3, 8, 8), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # fmt: skip
INFO = Path(timm.data.__file__).parent / "_info"  # timm's own class-list files, read here without timm's code
A_FIRST, A_SECOND = 6, 11  # the first two ImageNet indices of ImageNet-A (checked below against timm's file)


class MeanColour(nn.Module):
    """1000 logits, a linear function of the image's mean (normalized) colour."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1000, 3))
        with torch.no_grad():
            for index, channel in ((0, 0), (1, 1), (2, 2), (A_FIRST, 1), (A_SECOND, 2)):
                self.weight[index, channel] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.weight.T


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eval_tree(tmp_path_factory.mktemp("sets"))


# ----------------------------------------------------------------------------------------------- class lists


def test_class_lists_are_the_files_timm_ships() -> None:
    assert list(imagenet_synsets()) == (INFO / "imagenet_synsets.txt").read_text().split()
    for name in ("imagenet_r", "imagenet_a"):
        assert list(subset_synsets(name)) == (INFO / f"{name}_synsets.txt").read_text().split()
        assert list(subset_indices(name)) == [int(line) for line in (INFO / f"{name}_indices.txt").read_text().split()]
        assert len(set(subset_indices(name))) == 200
    assert subset_indices("imagenet_a")[:2] == (A_FIRST, A_SECOND)


@pytest.mark.parametrize("name", ["imagenet_r", "imagenet_a"])
def test_subset_scoring_selects_exactly_the_listed_logits(name: str) -> None:
    from lit_sharp.zoo.eval_sets import _scoring

    scoring = _scoring(name, Path("unused"))
    logits = torch.arange(2000.0).reshape(2, 1000)
    listed = [int(line) for line in (INFO / f"{name}_indices.txt").read_text().split()]
    assert scoring.project(logits).tolist() == [listed, [1000 + index for index in listed]]
    assert sorted(scoring.targets.values()) == list(range(200))


# ----------------------------------------------------------------------------------------------- ObjectNet


def test_objectnet_class_scores_the_maximum_of_its_imagenet_logits() -> None:
    mapping = ObjectNetMapping(folders=("alarm_clock", "bicycle"), imagenet_indices=((409, 530), (444, 671, 870)))
    logits = torch.zeros(2, 1000)
    logits[0, [409, 530, 444, 671, 870]] = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5])
    logits[1, [409, 530, 444, 671, 870]] = torch.tensor([-2.0, -3.0, -5.0, -4.0, -1.0])
    assert mapping.project(logits).tolist() == [[3.0, 2.0], [-2.0, -1.0]]


def test_objectnet_mapping_follows_the_release_files(tmp_path: Path) -> None:
    groups = write_objectnet_mappings(tmp_path / "mappings")
    mapping = read_objectnet_mapping(tmp_path / "mappings")
    assert mapping.folders == tuple(sorted(groups)) and len(mapping.folders) == 113
    assert dict(zip(mapping.folders, mapping.imagenet_indices)) == groups


def test_objectnet_crop_removes_two_pixels_on_each_side() -> None:
    image = Image.new("RGB", (12, 10), RED)
    image.paste(Image.new("RGB", (8, 6), GREEN), (2, 2))
    cropped = crop_border(image)
    assert cropped.size == (8, 6) and set(cropped.getdata()) == {GREEN}


def test_objectnet_ambiguous_imagenet_name_is_one_clear_error(tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    write_objectnet_mappings(mappings)
    lines = (mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    lines[0] = lines[10]  # obj_000 maps to classifier index 1, 2012 id 10, whose name now also names id 0
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines))
    with pytest.raises(DataError, match="'Object 000' to the ImageNet class 'imagenet class 10'.*2 times"):
        read_objectnet_mapping(mappings)


# ----------------------------------------------------------------------------------------------- errors


def test_errors_match_the_hand_count(root: Path) -> None:
    results = evaluation_errors(MeanColour(), root, data_config=DATA_CONFIG)
    real = json.loads((INFO / "imagenet_real_labels.json").read_text())
    labelled = [k for k in range(1000) if real[k]]
    real_wrong = sum(k % 2 not in real[k] for k in labelled)  # the prediction of val image k is class k % 2
    assert results.metrics == {
        "imagenet/err": 998 / 1000,  # red -> 0, green -> 1: only classes 0 and 1 are right
        "imagenet_real/err": real_wrong / len(labelled),
        "imagenet_v2/err": 997 / 1000,  # folder "k" is class k, not the k-th name in string order
        "imagenet_sketch/err": 999 / 1000,
        "imagenet_r/err": 198 / 200,  # green -> R's first class (ImageNet 1), blue -> its second (ImageNet 2)
        "imagenet_a/err": 198 / 200,  # green -> A's first class (ImageNet 6), blue -> its second (ImageNet 11)
        "objectnet/err": 111 / 113,  # after the crop: green -> obj_000 (max of 500 and 1), blue -> obj_001
    }
    assert results.skipped == []


def test_without_the_crop_objectnet_would_see_the_border(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_sharp.zoo.eval_sets as eval_sets

    monkeypatch.setattr(eval_sets, "crop_border", lambda image: image)
    uncropped = evaluation_errors(MeanColour(), root, data_config=DATA_CONFIG, sets=["objectnet"])
    # The red border (48 of 64 pixels) wins the mean colour: every image goes to obj_002, which scores red.
    assert uncropped.metrics["objectnet/err"] == 112 / 113


def test_absent_sets_are_skipped_with_one_line_each(root: Path, tmp_path: Path) -> None:
    (tmp_path / "imagenet-r").symlink_to(root / "imagenet-r")
    results = evaluation_errors(MeanColour(), tmp_path, data_config=DATA_CONFIG)
    assert results.metrics == {"imagenet_r/err": 198 / 200}
    assert len(results.skipped) == len(EVAL_SETS) - 1
    assert all(line.split(":")[0] in EVAL_SETS for line in results.skipped)
    assert any(str(tmp_path / "objectnet-1.0") in line for line in results.skipped)


def test_a_wrong_class_count_is_one_clear_error(root: Path, tmp_path: Path) -> None:
    for synset in subset_synsets("imagenet_a")[1:]:  # drop the first class
        (tmp_path / "imagenet-a" / synset).mkdir(parents=True)
        (tmp_path / "imagenet-a" / synset / "image.jpg").symlink_to(root / "imagenet-a" / synset / "image.jpg")
    with pytest.raises(EvalSetError) as error:
        evaluation_errors(MeanColour(), tmp_path, data_config=DATA_CONFIG, sets=["imagenet_a"])
    message = str(error.value)
    assert isinstance(error.value, UserError)
    assert str(tmp_path / "imagenet-a") in message and "found 199" in message and "expected the 200" in message
    assert subset_synsets("imagenet_a")[0] in message
    (tmp_path / "sketch" / "n00000000").mkdir(parents=True)  # a 1000-class set with one folder too many
    for synset in imagenet_synsets():
        (tmp_path / "sketch" / synset).symlink_to(root / "sketch" / synset)
    with pytest.raises(EvalSetError, match="found 1001 .*expected the 1000.*unexpected: n00000000"):
        evaluation_errors(MeanColour(), tmp_path, data_config=DATA_CONFIG, sets=["imagenet_sketch"])


def test_a_corrupt_image_is_one_clear_error(root: Path, tmp_path: Path) -> None:
    for synset in subset_synsets("imagenet_r"):
        (tmp_path / "imagenet-r" / synset).mkdir(parents=True)
        (tmp_path / "imagenet-r" / synset / "image.jpg").symlink_to(root / "imagenet-r" / synset / "image.jpg")
    truncated = tmp_path / "imagenet-r" / subset_synsets("imagenet_r")[7] / "truncated.jpg"
    truncated.write_bytes((root / "imagenet-r" / subset_synsets("imagenet_r")[7] / "image.jpg").read_bytes()[:40])
    with pytest.raises(DataError, match=f"cannot read the image {truncated}"):
        evaluation_errors(MeanColour(), tmp_path, data_config=DATA_CONFIG, sets=["imagenet_r"])


# ----------------------------------------------------------------------------------------------- training subsets


def test_training_subsets_are_a_fixed_seeded_choice_without_augmentation(root: Path) -> None:
    train = root / "imagenet/train"
    files = sorted(str(path) for path in train.glob("*/*.JPEG"))  # ImageFolder order: classes, then files, sorted
    chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:100].tolist()
    subset = train_error_subset(train, DATA_CONFIG, size=100)
    assert [subset.dataset.samples[i][0] for i in subset.indices] == [files[i] for i in chosen]
    assert fixed_indices(len(files), 100) == chosen
    batches = sharpness_batches(train, DATA_CONFIG, n_batches=2, batch_size=4)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8)] * 2
    again = sharpness_batches(train, DATA_CONFIG, n_batches=2, batch_size=4)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(batches, again))
    first = subset[0]  # the sharpness images are the first of the training-error subset, decoded alike
    assert torch.equal(batches[0][0][0], first[0]) and batches[0][1][0] == first[1]
    transform = timm.data.create_transform(**DATA_CONFIG)
    assert torch.equal(first[0], transform(Image.open(files[chosen[0]]).convert("RGB")))
    with pytest.raises(DataError, match="holds 2000 images; sharpness needs 2048"):
        sharpness_batches(train, DATA_CONFIG)
