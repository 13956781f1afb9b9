"""The training module: one mixed batch feeds both SAM passes, BN moves once per step, rho=0 is plain SGD."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import compose_config, tiny_run_overrides
from torch.utils.data import DataLoader, TensorDataset

from lit_sharp.models import preact_resnet18
from lit_sharp.module import ClassifierModule
from lit_sharp.run_folder import CHECKPOINT_DIR
from lit_sharp.train import run, run_dir_of


def one_step(module, x, y):
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=len(y)))


def test_both_sam_passes_see_the_same_mixed_batch_and_bn_moves_once():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model = preact_resnet18(width=4)
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    module = ClassifierModule(model, lr=0.1, sam_rho=0.05, mixup_alpha=0.5, warmup_fraction=0.0, seed=3)
    one_step(module, x, y)
    assert len(seen) == 2
    assert torch.equal(seen[0], seen[1])
    assert not torch.equal(seen[0], x)  # mixup was applied (lambda < 1 for this seed and step)
    assert model.bn.num_batches_tracked.item() == 1


def test_bn_statistics_after_a_sam_step_equal_those_after_a_plain_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    sam_model = preact_resnet18(width=4)
    plain_model = preact_resnet18(width=4)
    plain_model.load_state_dict(sam_model.state_dict())
    one_step(ClassifierModule(sam_model, lr=0.1, sam_rho=0.1, warmup_fraction=0.0), x, y)
    one_step(ClassifierModule(plain_model, lr=0.1, sam_rho=0.0, warmup_fraction=0.0), x, y)
    for name, buffer in sam_model.named_buffers():
        assert torch.equal(buffer, dict(plain_model.named_buffers())[name]), name
    # The weights did move differently: the SAM step used the gradient at w + e.
    assert not torch.equal(sam_model.linear.weight, plain_model.linear.weight)


def test_rho_zero_uses_plain_sgd_and_sam_otherwise():
    from lit_sharp.sam import SAM

    plain = ClassifierModule(preact_resnet18(width=4), sam_rho=0.0).configure_optimizers()
    sam = ClassifierModule(preact_resnet18(width=4), sam_rho=0.05).configure_optimizers()
    assert type(plain) is torch.optim.SGD and isinstance(sam, SAM)
    assert plain.defaults["momentum"] == 0.9 and plain.defaults["weight_decay"] == 5e-4


def test_bad_check_interval_is_refused():
    with pytest.raises(ValueError, match="check_finite_every"):
        ClassifierModule(preact_resnet18(width=4), check_finite_every=0)


def test_bf16_mixed_precision_trains_with_sam(synthetic_root, tmp_path):
    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "trainer.precision=bf16-mixed",
                         "trainer.max_steps=3", "~callbacks.sharpness", "~callbacks.corruption", "logger=none")
    assert run(cfg)["run"]["status"] == "completed"


def test_options_for_a_callback_that_is_not_configured_are_refused(synthetic_root, tmp_path):
    from lit_sharp.errors import ConfigError

    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "callbacks=none")
    with pytest.raises(ConfigError, match="callbacks.sharpness.*~callbacks.sharpness"):
        run(cfg)


#: The paper's recipe (docs/protocol.md section 2) and each experiment's peak learning rate.
PAPER_RECIPE = {"trainer.max_epochs": 200, "data.batch_size": 128, "data.synthetic": False, "data.augment": False,
                "data.randaugment": "paper", "module.momentum": 0.9, "module.weight_decay": 5e-4,
                "module.warmup_fraction": 0.4, "module.sam_rho": 0.0, "module.mixup_alpha": 0.0,
                "trainer.precision": "bf16-mixed"}
PAPER_MODELS = {"paper_resnet18": ({"module.lr": 0.1, "model.name": "resnet18", "model.width": 64}, 11_172_170),
                "paper_simplevit": ({"module.lr": 0.03125, "model.name": "simplevit", "model.variant": "paper",
                                     "model.dim": 512, "model.depth": 6}, 18_927_114)}
#: Shrinks the model for the training step only; the rest of the experiment runs as composed.
SMALL_MODEL = {"paper_resnet18": ["model.width=4", "+model.blocks_per_stage=1"],
               "paper_simplevit": ["model.dim=16", "model.depth=1", "model.heads=2", "model.mlp_dim=16",
                                   "model.dim_head=8"]}


@pytest.mark.parametrize("experiment", ["paper_resnet18", "paper_simplevit"])
def test_paper_experiments_compose_the_paper_recipe_and_model_and_start(synthetic_root, tmp_path, experiment):
    from omegaconf import OmegaConf

    from lit_sharp.assembly import build_model

    recipe = compose_config(f"experiment={experiment}")
    expected, n_params = {**PAPER_RECIPE, **PAPER_MODELS[experiment][0]}, PAPER_MODELS[experiment][1]
    assert {key: OmegaConf.select(recipe, key) for key in expected} == expected
    # The full-size model as the run builds it (test_models derives these counts from the architectures).
    assert sum(p.numel() for p in build_model(recipe.model).parameters()) == n_params
    # Two SAM steps with mixup and augmentation through the real path, the model shrunk (a CPU would take minutes
    # at full size).
    cfg = compose_config(f"experiment={experiment}", *SMALL_MODEL[experiment], "data=synthetic",
                         f"data.root={synthetic_root}", f"paths.root={tmp_path}", "trainer.max_steps=2",
                         "callbacks=none", "logger=none", "trainer.enable_progress_bar=false", "module.sam_rho=0.05",
                         "module.mixup_alpha=0.5", "data.augment=true", "data.batch_size=16")
    record = run(cfg)
    assert record["run"]["status"] == "completed"
    assert record["hparams"]["model"] == experiment.removeprefix("paper_")
    assert record["config"]["trainer.precision"] == "bf16-mixed" and record["config"]["module.sam_rho"] == 0.05
    checkpoint = torch.load(run_dir_of(cfg) / CHECKPOINT_DIR / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2


def test_auto_settings_resolve_to_the_cpu_path_here_and_the_gpu_path_on_cuda(monkeypatch):
    from lit_sharp.config import resolve_auto

    cfg = compose_config()
    assert (cfg.trainer.precision, cfg.module.channels_last, cfg.module.check_finite_every) == ("auto", None, None)
    cpu = resolve_auto(cfg)
    assert (cpu.trainer.precision, cpu.module.channels_last, cpu.data.channels_last, cpu.module.check_finite_every) == (
        "32-true", False, False, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the decision is under test here
    gpu = resolve_auto(cfg)
    assert (gpu.trainer.precision, gpu.module.channels_last, gpu.data.channels_last, gpu.module.check_finite_every) == (
        "bf16-mixed", True, True, 25)
    assert resolve_auto(compose_config("trainer.precision=32-true")).trainer.precision == "32-true"
    assert cfg.trainer.precision == "auto"  # the caller's config is left as it was


@pytest.mark.parametrize("experiment", ["paper_resnet18", "paper_simplevit"])
def test_paper_experiments_choose_bf16_explicitly_on_every_device(experiment):
    from lit_sharp.config import resolve_auto

    assert resolve_auto(compose_config(f"experiment={experiment}")).trainer.precision == "bf16-mixed"


def test_compiled_sam_training_does_not_recompile_and_measurements_run_uncompiled():
    # aot_eager: dynamo's graph capture and guards as with inductor (what decides recompiles), without inductor's
    # C++ code generation, which takes minutes on a small CPU.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiles_before_step, compiles_after_first_forward = [], []

    class CountCompiles(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            compiles_before_step.append(counters["frames"]["total"])

        def on_before_backward(self, trainer, pl_module, loss):
            compiles_after_first_forward.append(counters["frames"]["total"])

    torch.manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    model = preact_resnet18(width=4, blocks_per_stage=1)
    module = ClassifierModule(model, lr=0.05, sam_rho=0.05, mixup_alpha=0.5, warmup_fraction=0.5, compile="aot_eager")
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[CountCompiles()])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    after_training = counters["frames"]["total"]
    # Pass 1 of step 0 compiled the model; nothing else did (pass 2, with BN frozen, reuses that graph).
    assert compiles_after_first_forward[0] > 0
    assert compiles_before_step[1:] + [after_training] == [compiles_after_first_forward[0]] * 6, compiles_before_step
    assert model.bn.num_batches_tracked.item() == 6  # pass 1 moved BN once per step, pass 2 not at all

    # End-of-training measurements: eval mode, another batch size, no gradient; the plain model answers.
    with torch.no_grad():
        eval_logits = module.eval()(x[:5])
    assert counters["frames"]["total"] == after_training
    torch.testing.assert_close(eval_logits, model(x[:5]))
    assert set(module.state_dict()) == {f"model.{name}" for name in model.state_dict()}
