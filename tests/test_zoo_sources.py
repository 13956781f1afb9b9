"""The zoos' model sources: AugReg .npz and model soups .pt files load into timm with the original logits, the paper's
zoos are selected from index.csv, hyperparameters are read from the metadata or file names, bad files end in one
clear error, and nothing in a file can run code."""

from __future__ import annotations

import itertools
import os
import zipfile

import numpy as np
import pytest
import timm
import torch
from torch import nn
from zoo_files import (
    TINY_CLIP,
    TINY_VIT,
    OpenAIClipVisual,
    augreg_file_name,
    distractor_rows,
    randomize_,
    save_augreg_npz,
    soup_reference_logits,
    soup_state_dict,
    write_hparam_info,
    write_index,
    zoo_rows,
)

from lit_sharp.errors import ConfigError, UserError
from lit_sharp.zoo import augreg
from lit_sharp.zoo.__main__ import main as zoo_main
from lit_sharp.zoo.download import DownloadError
from lit_sharp.zoo.safe_files import ModelFileError
from lit_sharp.zoo.sources import list_zoo, load_zoo_model

NAME = augreg_file_name("i1k", "strong2", 0.1, 0.1, 0.01)


@pytest.fixture()
def augreg_root(tmp_path):
    """index.csv with both paper zoos and other rows, and one tiny fine-tune saved in the release's layout."""
    write_index(tmp_path / "index.csv", zoo_rows("i1k") + zoo_rows("i21k") + distractor_rows())
    reference = randomize_(timm.create_model("vit_base_patch16_224", **TINY_VIT)).eval()
    save_augreg_npz(reference, tmp_path / f"{NAME}.npz")
    return tmp_path, reference


def test_augreg_npz_gives_the_original_logits(augreg_root):
    root, reference = augreg_root
    model, hparams, data_config = load_zoo_model("augreg_in1k", NAME, root, model_kwargs=TINY_VIT)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not model.training
    assert hparams == {"name": "B/16", "ds": "i1k", "aug": "strong2", "adapt_ds": "imagenet2012", "epochs": 300,
                       "adapt_steps": 20000, "adapt_resolution": 224, "lr": 0.001, "wd": 0.1, "do": 0.1, "sd": 0.1,
                       "adapt_lr": 0.01, "aug_group": "strong"}
    # AugReg scales inputs to [-1, 1]: mean and std 0.5; the size is the model's own.
    assert data_config["mean"] == data_config["std"] == (0.5, 0.5, 0.5)
    assert data_config["input_size"] == (3, 32, 32)


def test_index_selects_exactly_the_papers_zoos(augreg_root):
    root, _ = augreg_root
    for zoo, ds in (("augreg_in1k", "i1k"), ("augreg_in21k", "i21k")):
        expected = sorted(
            f"B_16-{ds}-300ep-lr_0.001-aug_{aug}-wd_{wd}-do_{d}-sd_{d}--imagenet2012-steps_20k-lr_{lr}-res_224"
            for aug, wd, d, lr in itertools.product(augreg.AUGMENTATIONS, ("0.03", "0.1"), ("0.0", "0.1"),
                                                    ("0.01", "0.03")))
        assert list_zoo(zoo, root) == expected
        assert len(expected) == 56


def test_without_index_the_zoo_is_read_from_file_names(tmp_path):
    for row in zoo_rows("i1k")[:3] + zoo_rows("i21k")[:2] + distractor_rows():
        (tmp_path / f"{row['adapt_filename']}.npz").touch()
    (tmp_path / "notes.npz").touch()
    assert list_zoo("augreg_in1k", tmp_path) == sorted(r["adapt_filename"] for r in zoo_rows("i1k")[:3])
    assert list_zoo("augreg_in21k", tmp_path) == sorted(r["adapt_filename"] for r in zoo_rows("i21k")[:2])


def test_file_name_and_index_row_give_the_same_hparams(tmp_path):
    rows = zoo_rows("i21k") + distractor_rows()
    write_index(tmp_path / "index.csv", rows)
    from_index = augreg.read_index(tmp_path / "index.csv")
    for row in rows:
        assert augreg.hparams_from_file_name(str(row["adapt_filename"]) + ".npz") == from_index[row["adapt_filename"]]
    hybrid = augreg.hparams_from_file_name(
        "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384")
    assert (hybrid["name"], hybrid["adapt_resolution"], hybrid["aug_group"]) == ("R50+L/32", 384, "medium")
    assert augreg.hparams_from_file_name("model_3.pt") is None
    assert [augreg.aug_group(a) for a in augreg.AUGMENTATIONS] == [
        "none", "light", "light", "medium", "medium", "strong", "strong"]


def test_hparams_come_from_the_file_name_without_index(augreg_root):
    root, reference = augreg_root
    (root / "index.csv").unlink()
    model, hparams, _ = load_zoo_model("augreg_in1k", NAME, root, model_kwargs=TINY_VIT)
    assert (hparams["aug"], hparams["wd"], hparams["do"], hparams["adapt_lr"]) == ("strong2", 0.1, 0.1, 0.01)


def test_soups_checkpoint_gives_the_reference_logits(tmp_path):
    torch.manual_seed(0)
    visual, head = OpenAIClipVisual(output_dim=16).eval(), nn.Linear(16, 10)
    torch.save(soup_state_dict(visual, head), tmp_path / "model_3.pt")
    table = write_hparam_info(tmp_path / "hparam_info.json")
    model, hparams, data_config = load_zoo_model("clip_soups", "model_3", tmp_path, model_kwargs=TINY_CLIP)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), soup_reference_logits(visual, head, x), rtol=1e-5, atol=1e-5)
    assert hparams == {**table["model_3"], "aug": "none"}  # the release's null aug, named
    # OpenAI CLIP's preprocessing: its mean/std, bicubic, short side resized to the crop (crop_pct 1).
    assert data_config["mean"] == (0.48145466, 0.4578275, 0.40821073)
    assert (data_config["interpolation"], data_config["crop_pct"]) == ("bicubic", 1.0)
    assert list_zoo("clip_soups", tmp_path) == [f"model_{i}" for i in range(72)]


def test_timm_zoo_offline_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DownloadError, match=r"resnet18\.a1_in1k.*internet access"):
        load_zoo_model("timm", "resnet18.a1_in1k", tmp_path)
    with pytest.raises(ConfigError, match="no pretrained model"):
        load_zoo_model("timm", "resnet_nonexistent", tmp_path)
    with pytest.raises(ConfigError, match="unknown zoo"):
        list_zoo("imagenet_zoo", tmp_path)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert isinstance(exc.value, UserError) and "\n" not in message
    return message


def test_missing_truncated_and_foreign_npz(augreg_root):
    root, _ = augreg_root
    other = augreg_file_name("i1k", "none", 0.03, 0.0, 0.03)
    with pytest.raises(ModelFileError) as missing:
        load_zoo_model("augreg_in1k", other, root, model_kwargs=TINY_VIT)
    assert f"{other}.npz: no such file" in _one_line(missing) and "download augreg_in1k" in str(missing.value)

    path = root / f"{NAME}.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as truncated:
        load_zoo_model("augreg_in1k", NAME, root, model_kwargs=TINY_VIT)
    assert "not a readable .npz" in _one_line(truncated)

    # timm's loader would keep a random head for a checkpoint whose head has another size (a pretraining one).
    save_augreg_npz(timm.create_model("vit_base_patch16_224", **{**TINY_VIT, "num_classes": 7}), path)
    with pytest.raises(ModelFileError) as other_head:
        load_zoo_model("augreg_in1k", NAME, root, model_kwargs=TINY_VIT)
    assert "has no 10-class head (head/bias: (7,))" in _one_line(other_head)

    np.savez(path, **{"embedding/kernel": np.zeros((8, 8, 3, 32), np.float32), "head/bias": np.zeros(10)})
    with pytest.raises(ModelFileError) as foreign:
        load_zoo_model("augreg_in1k", NAME, root, model_kwargs=TINY_VIT)
    assert "does not fit vit_base_patch16_224.augreg_in1k (KeyError" in _one_line(foreign)

    with zipfile.ZipFile(path, "w") as archive:  # an object array: a pickle inside the archive
        archive.writestr("head/bias.npy", _object_npy())
    with pytest.raises(ModelFileError, match="not a readable .npz"):
        load_zoo_model("augreg_in1k", NAME, root, model_kwargs=TINY_VIT)

    with pytest.raises(ModelFileError, match="not a model of the zoo augreg_in21k"):
        load_zoo_model("augreg_in21k", NAME, root, model_kwargs=TINY_VIT)


def _object_npy() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bad_soups_files_end_in_one_clear_error(tmp_path):
    write_hparam_info(tmp_path / "hparam_info.json")
    path = tmp_path / "model_1.pt"

    with pytest.raises(ModelFileError) as missing:
        load_zoo_model("clip_soups", "model_1", tmp_path, model_kwargs=TINY_CLIP)
    assert "model_1.pt: no such file" in _one_line(missing)

    marker = tmp_path / "code_ran"
    torch.save({"weight": _RunsCode(str(marker))}, path)
    with pytest.raises(ModelFileError) as evil:
        load_zoo_model("clip_soups", "model_1", tmp_path, model_kwargs=TINY_CLIP)
    assert "not a readable PyTorch state dict" in _one_line(evil) and not marker.exists()

    visual, head = OpenAIClipVisual(output_dim=16), nn.Linear(16, 10)
    torch.save(soup_state_dict(visual, head), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable PyTorch state dict"):
        load_zoo_model("clip_soups", "model_1", tmp_path, model_kwargs=TINY_CLIP)

    path.write_text("model_1 weights: see the release page\n")
    with pytest.raises(ModelFileError, match="not a readable PyTorch state dict"):
        load_zoo_model("clip_soups", "model_1", tmp_path, model_kwargs=TINY_CLIP)

    torch.save(timm.create_model("vit_base_patch16_224", **TINY_VIT).state_dict(), path)
    with pytest.raises(ModelFileError, match="not a model soups checkpoint"):
        load_zoo_model("clip_soups", "model_1", tmp_path, model_kwargs=TINY_CLIP)

    torch.save(soup_state_dict(OpenAIClipVisual(width=48, output_dim=16), head), path)
    with pytest.raises(ModelFileError) as wrong_size:
        load_zoo_model("clip_soups", "model_1", tmp_path, model_kwargs=TINY_CLIP)
    assert "does not fit vit_base_patch32_clip_quickgelu_224" in _one_line(wrong_size)

    (tmp_path / "hparam_info.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="not the model soups hparam_info.json"):
        load_zoo_model("clip_soups", "model_1", tmp_path, model_kwargs=TINY_CLIP)


def test_list_command(augreg_root, capsys):
    root, _ = augreg_root
    assert zoo_main(["list", "augreg_in21k", "--root", str(root)]) == 0
    assert capsys.readouterr().out.split() == list_zoo("augreg_in21k", root)
    assert zoo_main(["list", "augreg_in1k", "--root", str(root), "--downloaded"]) == 0
    assert capsys.readouterr().out.split() == list_zoo("augreg_in1k", root, downloaded_only=True) == [NAME]
    (root / "index.csv").write_text("name,ds\nB/16,i1k\n")
    assert zoo_main(["list", "augreg_in1k", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "index.csv: not the AugReg index.csv" in err and err.count("\n") == 1
