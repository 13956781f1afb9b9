"""``model.init``: the authors' released initialisation (He normal with fan_out for convolutions, norm layers 1/0,
linear biases 0) or PyTorch's defaults, applied once when a run starts from scratch, never on resume or evaluation,
and part of the run's identity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_config, tiny_run_overrides
from lightning.pytorch.callbacks import Callback
from scipy import stats
from torch import nn

import lit_sharp.assembly as assembly
import lit_sharp.training as training_module
from lit_sharp.assembly import build_model
from lit_sharp.errors import ConfigError
from lit_sharp.models.init import released_init
from lit_sharp.run_folder import IDENTITY_FILE, claim_identity, identity_of, last_checkpoint
from lit_sharp.train import run, run_dir_of

#: Allowed deviation in standard errors. The draws are seeded, so a pass is reproducible, not a matter of luck.
Z = 5.0
TINY_RESNET = ("model.width=16",)
TINY_VIT = ("model=simplevit", "model.dim=32", "model.depth=2", "model.heads=2", "model.mlp_dim=64", "model.dim_head=16")


def _model_cfg(*overrides: str):
    return compose_config(*overrides).model


def _built(model_cfg, init_seed: int | None) -> tuple[nn.Module, torch.Tensor]:
    """The model built after seeding the global generator, and the global generator's next draws."""
    torch.manual_seed(123)
    model = build_model(model_cfg, init_seed=init_seed)
    return model, torch.rand(8)


def test_released_convolution_weights_are_he_normal_with_fan_out():
    model = build_model(_model_cfg(*TINY_RESNET), init_seed=0)
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    # The stem (3 -> 16), the first convolution of stages 2-4 and the shortcuts have fan_in != fan_out.
    assert sum(conv.in_channels != conv.out_channels for _, conv in convs) >= 4
    standardised = []
    for name, conv in convs:
        weight = conv.weight.detach().double().flatten()
        n = weight.numel()
        sigma = math.sqrt(2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]))
        # n normal draws: the sample mean has standard error sigma / sqrt(n), the sample std sigma / sqrt(2 n).
        assert abs(weight.std().item() / sigma - 1) < Z / math.sqrt(2 * n), (name, weight.std().item(), sigma)
        assert abs(weight.mean().item()) < Z * sigma / math.sqrt(n), name
        standardised.append(weight / sigma)
    pooled = torch.cat(standardised).numpy()
    assert stats.kstest(pooled, "norm").pvalue > 1e-3  # normal, not PyTorch's default uniform


def test_released_sets_norm_layers_and_linear_biases_and_leaves_everything_else():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.GroupNorm(2, 8),
                          nn.BatchNorm2d(8, affine=False), nn.LayerNorm(8), nn.Linear(8, 5), nn.Linear(5, 4, bias=False))
    with torch.no_grad():
        for param in model.parameters():  # away from every default, so that setting 1 and 0 is visible
            param.copy_(torch.randn_like(param) + 3.0)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    released_init(model, torch.Generator().manual_seed(0))
    after = dict(model.named_parameters())
    assert not torch.equal(after["0.weight"], before["0.weight"])
    for name in ("1", "2"):  # BatchNorm2d, GroupNorm
        assert torch.equal(after[f"{name}.weight"], torch.ones(8)) and torch.equal(after[f"{name}.bias"], torch.zeros(8))
    assert torch.equal(after["5.bias"], torch.zeros(5))
    # Untouched, as by the released function: the convolution's bias, LayerNorm, every linear weight.
    for name in ("0.bias", "4.weight", "4.bias", "5.weight", "6.weight"):
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("overrides", [TINY_RESNET, TINY_VIT], ids=["resnet18", "simplevit"])
def test_linear_weights_keep_torch_defaults_and_the_global_generator_does_not_move(overrides):
    constructed, after_constructed = _built(_model_cfg(*overrides, "model.init=torch"), init_seed=None)
    torch_init, after_torch = _built(_model_cfg(*overrides, "model.init=torch"), init_seed=0)
    released, after_released = _built(_model_cfg(*overrides), init_seed=0)
    for name, tensor in constructed.state_dict().items():
        assert torch.equal(torch_init.state_dict()[name], tensor), name  # model.init=torch: the constructors' weights
    linears = {name: module for name, module in released.named_modules() if isinstance(module, nn.Linear)}
    assert linears
    for name, linear in linears.items():
        assert torch.equal(linear.weight, constructed.get_submodule(name).weight), name
        assert linear.weight.abs().max() <= 1 / math.sqrt(linear.in_features)  # PyTorch's U(-1/sqrt(fan_in), ...)
    # The initialisation draws from a generator of its own: the run's other random streams are the same either way.
    assert torch.equal(after_torch, after_constructed) and torch.equal(after_released, after_constructed)


def test_released_simplevit_has_zero_biases_in_every_linear_layer():
    released = build_model(_model_cfg(*TINY_VIT), init_seed=0)
    default = build_model(_model_cfg(*TINY_VIT, "model.init=torch"), init_seed=0)
    biased = [name for name, module in released.named_modules() if isinstance(module, nn.Linear) and module.bias is not None]
    assert len(biased) == 1 + 2 * 2 + 1  # patch embedding, two MLP layers per block, head
    for name in biased:
        assert torch.equal(released.get_submodule(name).bias, torch.zeros_like(released.get_submodule(name).bias)), name
        assert default.get_submodule(name).bias.abs().sum() > 0, name  # PyTorch's default bias is not zero
    for module in released.modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and not module.bias.any()


def test_the_initialisation_is_a_function_of_the_seed():
    first = build_model(_model_cfg(*TINY_RESNET), init_seed=0).conv1.weight
    assert torch.equal(build_model(_model_cfg(*TINY_RESNET), init_seed=0).conv1.weight, first)
    assert not torch.equal(build_model(_model_cfg(*TINY_RESNET), init_seed=1).conv1.weight, first)


def test_an_unknown_initialisation_is_refused_before_training(synthetic_root, tmp_path):
    with pytest.raises(ConfigError) as info:
        run(compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "model.init=xavier"))
    assert info.value.key == "model.init" and "released, torch" in str(info.value)
    assert not (tmp_path / "quickstart").exists()


def test_the_initialisation_is_part_of_the_run_identity(synthetic_root, tmp_path):
    released = compose_config(*tiny_run_overrides(synthetic_root, tmp_path))
    default = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "model.init=torch")
    assert released.model.init == "released"  # the default of the study's configs
    assert run_dir_of(released) == run_dir_of(default)  # one folder name: the identity tells the runs apart
    mine, theirs = identity_of(released), identity_of(default)
    assert {key for key in mine if mine[key] != theirs.get(key)} == {"model.init"}
    folder = tmp_path / "a"
    folder.mkdir()
    claim_identity(default, folder)
    with pytest.raises(ConfigError, match=r"model.init: 'torch' -> 'released'"):
        claim_identity(released, folder)
    # A folder recorded before model.init existed holds a run initialised with PyTorch's defaults.
    recorded_before = tmp_path / "b"
    recorded_before.mkdir()
    (recorded_before / IDENTITY_FILE).write_text(json.dumps({k: v for k, v in theirs.items() if k != "model.init"}))
    claim_identity(default, recorded_before)
    with pytest.raises(ConfigError, match=r"model.init: 'torch' -> 'released'"):
        claim_identity(released, recorded_before)


def test_a_resumed_or_evaluated_run_is_not_initialised_again(synthetic_root, tmp_path, monkeypatch):
    calls: list[str] = []
    initialise = assembly.initialise

    def counted(model, scheme, generator=None):
        calls.append(scheme)
        return initialise(model, scheme, generator)

    monkeypatch.setattr(assembly, "initialise", counted)

    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1:
                raise KeyError("simulated crash")

    class StartingWeights(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {name: tensor.clone() for name, tensor in pl_module.state_dict().items()}

    # Two short epochs of plain SGD without augmentation or validation: a checkpoint, a crash, a relaunch.
    cheap = ("~callbacks.sharpness", "~callbacks.corruption", "logger=none", "data.augment=false", "module.sam_rho=0",
             "module.mixup_alpha=0", "trainer.check_val_every_n_epoch=10", "data.batch_size=128")
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *cheap, "trainer.max_epochs=2")
    build = training_module.build_named_callbacks
    monkeypatch.setattr(training_module, "build_named_callbacks", lambda cfg: {**build(cfg), "crash": Crash()})
    with pytest.raises(KeyError):
        run(cfg)
    assert calls == ["released"]
    checkpoint = last_checkpoint(run_dir_of(cfg))
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]

    starting = StartingWeights()
    monkeypatch.setattr(training_module, "build_named_callbacks", lambda cfg: {**build(cfg), "start": starting})
    assert run(cfg)["run"]["status"] == "completed"
    assert calls == ["released"]  # the relaunch resumed from the checkpoint without initialising
    assert saved.keys() == starting.state.keys()
    assert all(torch.equal(starting.state[name], tensor) for name, tensor in saved.items())

    run(compose_config(*tiny_run_overrides(synthetic_root, tmp_path), *cheap, "mode=eval", f"ckpt_path={checkpoint}"))
    assert calls == ["released"]
