"""Checkpoints from elsewhere: the authors' files load as they are, old-layout files fail once and convert."""

import re

import pytest
import torch
from conftest import compose_config, tiny_run_overrides
from test_models import released_preact_resnet18_shapes, released_simplevit_shapes

from lit_sharp.errors import ConfigError, UserError
from lit_sharp.checkpoints import load_weights
from lit_sharp.models.convert import main as convert_main
from lit_sharp.train import run, run_dir_of

QUIET = ["~callbacks.sharpness", "~callbacks.corruption", "logger=none"]
CONVERT_HINT = re.escape("python -m lit_sharp.models.convert")


def random_state(shapes, seed):
    """Weights for a literal key/shape list; BN variances positive, counters integer, as in a trained model."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.2
    return state


def to_old_layout(key):
    """The project's earlier ResNet keys: the eight blocks in one ``layers`` Sequential, a bare shortcut conv.

    ``layer<s>.<b>.X`` was ``layers.<2 (s - 1) + b>.X`` and ``shortcut.0.weight`` was ``shortcut.weight``;
    ``conv1``, ``bn`` and ``linear`` did not change.
    """
    match = re.fullmatch(r"(model\.)?layer(\d)\.(\d)\.(.+)", key)
    if not match:
        return key
    prefix, stage, block, rest = match.group(1) or "", int(match[2]), int(match[3]), match[4]
    rest = "shortcut.weight" if rest == "shortcut.0.weight" else rest
    return f"{prefix}layers.{2 * (stage - 1) + block}.{rest}"


def eval_overrides(synthetic_root, tmp_path, ckpt, name, *extra):
    return [*tiny_run_overrides(synthetic_root, tmp_path, *QUIET, *extra), "mode=eval", f"ckpt_path={ckpt}",
            f"name={name}"]


def assert_same_tensors(a, b):
    assert list(a) == list(b)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_authors_checkpoint_dicts_and_plain_state_dicts_evaluate_alike(synthetic_root, tmp_path):
    last = random_state(released_preact_resnet18_shapes(width=4), seed=1)
    best = random_state(released_preact_resnet18_shapes(width=4), seed=2)
    files = {
        "released": {"last": last, "best": best},  # what the authors' training code saves; eval_sharpness reads 'last'
        "plain": last,
        "lightning": {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in last.items()}},
    }
    metrics = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        assert_same_tensors(load_weights(path), last)
        if name != "lightning":  # evaluating Lightning files is covered in test_evaluate.py
            metrics[name] = run(compose_config(*eval_overrides(synthetic_root, tmp_path, path, name)))["metrics"]
            assert (tmp_path / name / f"eval-{name}" / "results.json").is_file()
    assert 0.0 <= metrics["released"]["final/test_err"] <= 1.0
    assert metrics["released"] == metrics["plain"]


def test_the_authors_simplevit_state_dict_evaluates(synthetic_root, tmp_path):
    shapes = released_simplevit_shapes(dim=16, depth=1, heads=2, mlp_dim=32, dim_head=8)
    path = tmp_path / "vit.pth"
    torch.save({"last": random_state(shapes, seed=3)}, path)
    vit = ["model=simplevit", "model.dim=16", "model.depth=1", "model.heads=2", "model.mlp_dim=32", "model.dim_head=8"]
    # quickstart sets model.width (a ResNet option): drop it for the ViT.
    overrides = [o for o in eval_overrides(synthetic_root, tmp_path, path, "vit") if o != "model.width=4"]
    vit = [vit[0], "~model.width", *vit[1:]]
    record = run(compose_config(*overrides, *vit))
    assert 0.0 <= record["metrics"]["final/test_err"] <= 1.0
    assert record["hparams"]["model"] == "simplevit"
    with pytest.raises(ConfigError, match="does not fit model simplevit"):  # the 1.x network is another one
        run(compose_config(*overrides, *vit, "model.variant=vit_pytorch_latest"))


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling it without weights_only would create the marker file

    path = tmp_path / "payload.pth"
    torch.save({"last": random_state({"linear.weight": (10, 32)}, seed=0), "extra": Payload()}, path)
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_weights(path)
    assert not marker.exists()


def test_an_old_layout_checkpoint_fails_once_and_converts(synthetic_root, tmp_path, capsys):
    new = random_state(released_preact_resnet18_shapes(width=4), seed=4)
    old = {to_old_layout(key): value for key, value in new.items()}
    assert "layers.7.conv2.weight" in old and "layers.2.shortcut.weight" in old and "layer1.0.bn1.weight" not in old
    old_path, new_path = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save(old, old_path)

    with pytest.raises(UserError) as refused:
        run(compose_config(*eval_overrides(synthetic_root, tmp_path, old_path, "old")))
    message = str(refused.value)
    assert str(old_path) in message and re.search(CONVERT_HINT, message) and "Missing key" not in message

    assert convert_main([str(old_path), str(new_path)]) == 0  # python -m lit_sharp.models.convert OLD NEW
    assert capsys.readouterr().out.strip() == f"{new_path}: {sum(k != to_old_layout(k) for k in new)} keys renamed"
    assert_same_tensors(torch.load(new_path, weights_only=True), new)  # the released layout, the same tensors
    assert 0.0 <= run(compose_config(*eval_overrides(synthetic_root, tmp_path, new_path, "new")))["metrics"][
        "final/test_err"] <= 1.0
    assert convert_main([str(new_path), str(tmp_path / "again.pth")]) == 1  # nothing to convert: refused


def test_resuming_from_an_old_layout_run_checkpoint_fails_once_then_converts_in_place(synthetic_root, tmp_path):
    train = tiny_run_overrides(synthetic_root, tmp_path, *QUIET, "trainer.max_steps=2")
    run(compose_config(*train))
    lightning = torch.load(run_dir_of(compose_config(*train)) / "checkpoints" / "last.ckpt", weights_only=True)
    old = {**lightning, "state_dict": {to_old_layout(k): v for k, v in lightning["state_dict"].items()}}
    assert "model.layers.4.shortcut.weight" in old["state_dict"]

    # A run of the earlier layout, interrupted: its folder holds the checkpoint and no results yet.
    other = [*train, "module.lr=0.04"]
    ckpt = run_dir_of(compose_config(*other)) / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(old, ckpt)
    with pytest.raises(UserError) as refused:
        run(compose_config(*other))
    assert str(ckpt) in str(refused.value) and re.search(CONVERT_HINT, str(refused.value))

    assert convert_main([str(ckpt), str(ckpt)]) == 0  # in place
    converted = torch.load(ckpt, weights_only=True)
    assert_same_tensors(converted["state_dict"], lightning["state_dict"])
    assert converted["global_step"] == lightning["global_step"]
    assert converted["optimizer_states"][0]["state"].keys() == lightning["optimizer_states"][0]["state"].keys()
    assert run(compose_config(*other))["run"]["status"] == "completed"


def test_simplevit_runs_recorded_before_the_variant_existed_rebuild_the_vit_pytorch_1x_network():
    import vit_pytorch

    from lit_sharp.assembly import build_model
    from lit_sharp.evaluate import recorded_model_config
    from lit_sharp.models import SimpleViT

    tiny = {"model.num_classes": 10, "model.image_size": 32, "model.patch_size": 4, "model.dim": 16, "model.depth": 1,
            "model.heads": 2, "model.mlp_dim": 32, "model.dim_head": 8}
    vit = {"model.name": "simplevit", "model._target_": "lit_sharp.models.simple_vit", **tiny}
    old_record = {"run": {"name": "old"}, "config": vit}
    assert type(build_model(recorded_model_config(old_record))) is vit_pytorch.SimpleViT
    new_record = {"run": {"name": "new"}, "config": {**vit, "model.variant": "paper"}}
    assert type(build_model(recorded_model_config(new_record))) is SimpleViT
