import pickle
import shutil

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from lit_sharp.constants import CIFAR10_MEAN, CIFAR10_STD
from lit_sharp.data import CIFAR10DataModule
from lit_sharp.data.augment import AugmentedImages, EpochSampler
from lit_sharp.data.reading import load_cifar10
from lit_sharp.data.synthetic import SYNTHETIC_MARKER
from lit_sharp.errors import DataError


def raw_batches(root, names):
    images, labels = [], []
    for name in names:
        with open(root / "cifar-10-batches-py" / name, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += entry["labels"]
    return np.concatenate(images), np.asarray(labels)


def normalized(images):
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)


def test_loaders_follow_the_protocol(synthetic_root):
    dm = CIFAR10DataModule(synthetic_root, clean_train_size=300, sharpness_size=100, sharpness_batch_size=32,
                           eval_batch_size=64)
    dm.setup()
    train_images, train_labels = raw_batches(synthetic_root, [f"data_batch_{i}" for i in range(1, 6)])
    test_images, test_labels = raw_batches(synthetic_root, ["test_batch"])

    batches = list(dm.sharpness_dataloader())
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), normalized(train_images[:100]))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.as_tensor(train_labels[:100]))

    clean = list(dm.clean_train_dataloader())
    assert sum(len(y) for _, y in clean) == 300
    assert torch.equal(torch.cat([y for _, y in clean]), torch.as_tensor(train_labels[:300]))
    test = list(dm.test_dataloader())
    torch.testing.assert_close(torch.cat([x for x, _ in test]), normalized(test_images))
    assert torch.equal(torch.cat([y for _, y in test]), torch.as_tensor(test_labels))


def test_training_loader_is_a_seeded_permutation_per_epoch(synthetic_root):
    dm = CIFAR10DataModule(synthetic_root, batch_size=64, seed=1)
    loader = dm.train_dataloader()
    train_images, _ = raw_batches(synthetic_root, [f"data_batch_{i}" for i in range(1, 6)])
    sampler = loader.sampler
    first = [index for _, index in sampler]
    assert sorted(first) == list(range(len(train_images)))
    assert first == [index for _, index in sampler]
    sampler.set_epoch(1)
    assert [index for _, index in sampler] != first
    sampler.set_epoch(0)
    x, _ = next(iter(loader))
    # No augmentation: each example is the normalized image at the sampled index.
    torch.testing.assert_close(x, normalized(train_images[first[:64]]))


def test_augmentation_is_reproducible_per_seed_epoch_and_index(synthetic_root):
    images, labels = load_cifar10(synthetic_root, train=True)
    dataset = AugmentedImages(images, labels, augment=True, seed=0)
    state = torch.get_rng_state()
    a, _ = dataset[(0, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert torch.equal(a, dataset[(0, 5)][0])
    assert not torch.equal(a, dataset[(1, 5)][0])
    assert not torch.equal(a, AugmentedImages(images, labels, augment=True, seed=1)[(0, 5)][0])
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32


def test_epoch_sampler_without_shuffle_is_in_order():
    assert [i for _, i in EpochSampler(5, seed=0, shuffle=False)] == [0, 1, 2, 3, 4]


def test_missing_data_names_the_folder_and_both_ways_out(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path / "nowhere", train=True)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data.download=true" in message and "place" in message


def test_truncated_synthetic_batch_names_the_file(synthetic_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(root, train=True)


def test_real_data_keeps_torchvisions_checksum_and_names_the_corrupt_file(synthetic_root, tmp_path):
    root = tmp_path / "unmarked"
    shutil.copytree(synthetic_root, root)
    (root / SYNTHETIC_MARKER).unlink()
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR10(str(root), train=True)  # what torchvision itself says
    with pytest.raises(DataError, match="data_batch_1.*corrupt"):
        load_cifar10(root, train=True)
