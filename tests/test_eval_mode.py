"""Tests for lit_sharp.eval_mode: evaluation mode for a block, every module's own training flag restored."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lit_sharp.eval_mode import evaluation_mode
from lit_sharp.evaluation import classification_error


def _mixed_model() -> nn.Module:
    """A model in training mode whose BatchNorm the caller keeps frozen in evaluation mode."""
    return _freeze_batch_norm(
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Sequential(nn.ReLU(), nn.Linear(6, 3)))
    )


def _freeze_batch_norm(model: nn.Module) -> nn.Module:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.eval()
    return model


def _flags(model: nn.Module) -> list[tuple[str, bool]]:
    return [(name, module.training) for name, module in model.named_modules()]


def test_the_block_runs_in_evaluation_mode_and_every_flag_comes_back() -> None:
    model = _mixed_model()
    before = _flags(model)
    assert dict(before) == {"": True, "0": True, "1": False, "2": True, "2.0": True, "2.1": True}
    with evaluation_mode(model):
        assert not any(training for _, training in _flags(model))
    assert _flags(model) == before


def test_every_flag_comes_back_when_the_block_raises() -> None:
    model = _mixed_model()
    before = _flags(model)
    with pytest.raises(RuntimeError, match="inside"):
        with evaluation_mode(model):
            raise RuntimeError("inside")
    assert _flags(model) == before


def test_a_model_in_evaluation_mode_stays_there() -> None:
    model = _mixed_model().eval()
    with evaluation_mode(model):
        pass
    assert not any(training for _, training in _flags(model))


class _ModeProbe(nn.Module):
    """Predicts class 0 in evaluation mode and class 1 in training mode, and records the modes it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mixed_model()
        self.modes: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.add(self.training)
        logits = torch.zeros(len(x), 3)
        logits[:, int(self.training)] = 1.0
        return logits + 0.0 * self.body(x).sum()


def test_classification_error_evaluates_in_evaluation_mode_and_restores_mixed_modes() -> None:
    probe = _freeze_batch_norm(_ModeProbe())
    before = _flags(probe)
    assert not dict(before)["body.1"]
    batches = [(torch.randn(5, 4), torch.tensor([0, 0, 0, 1, 2])), (torch.randn(3, 4), torch.tensor([0, 1, 0]))]
    assert classification_error(probe, batches) == 3 / 8
    assert probe.modes == {False}
    assert _flags(probe) == before  # the frozen BatchNorm did not come back training


def test_classification_error_restores_the_modes_when_the_model_raises() -> None:
    probe = _freeze_batch_norm(_ModeProbe())
    before = _flags(probe)
    with pytest.raises(RuntimeError):
        classification_error(probe, [(torch.randn(2, 5), torch.tensor([0, 1]))])  # 5 features, not 4
    assert _flags(probe) == before


# ----------------------------------------------------------------------------------------------------------------
# Float32 that is float32: TF32 (and oneDNN's bfloat16) off while a measurement runs, the settings restored after

#: torch >= 2.9 sets float32 precision per backend and operation; older torch has the two legacy settings.
NEW_PRECISION_API = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision")
SHARPNESS_SPECS = "[worst_linf_adaptive_rho0.001,average_l2_adaptive_rho0.1,hessian_trace_standard]"


def _precision_settings() -> dict[str, object]:
    """The process-wide settings that decide how float32 matrix products and convolutions are computed."""
    if NEW_PRECISION_API:
        backends = torch.backends
        return {"cuda.matmul": backends.cuda.matmul.fp32_precision, "cudnn.conv": backends.cudnn.conv.fp32_precision,
                "mkldnn.matmul": backends.mkldnn.matmul.fp32_precision,
                "mkldnn.conv": backends.mkldnn.conv.fp32_precision}
    return {"matmul": torch.get_float32_matmul_precision(), "cudnn": torch.backends.cudnn.allow_tf32}


def _is_full_float32(settings: dict[str, object]) -> bool:
    if NEW_PRECISION_API:
        return all(value == "ieee" for value in settings.values())
    return settings == {"matmul": "highest", "cudnn": False}


@pytest.fixture
def reduced_precision_allowed():
    """TF32 allowed for convolutions and matrix products (bfloat16 for oneDNN's), set the way a user would; the
    process's own settings come back after the test."""
    if NEW_PRECISION_API:
        nodes = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
                 torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv]
        saved = [node.fp32_precision for node in nodes]
    else:
        saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    settings = _precision_settings()
    assert not _is_full_float32(settings)
    yield settings
    if NEW_PRECISION_API:
        for node, value in zip(nodes, saved):
            node.fp32_precision = value
    else:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


class _PrecisionProbe:
    """A forward hook that records the precision settings at every forward pass, and can raise after the first."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.seen: list[dict[str, object]] = []

    def __call__(self, module: nn.Module, inputs, output) -> None:
        self.seen.append(_precision_settings())
        if self.fail:
            raise RuntimeError("probe: the measurement fails here")


def _measurements(synthetic_root, tmp_path) -> tuple[dict[str, object], object]:
    """The configured end-of-training measurements of a tiny run (final errors, sharpness with a curvature spec,
    CIFAR-10-C) and the data module they read."""
    from conftest import compose_config, tiny_run_overrides

    from lit_sharp.assembly import build_datamodule, build_named_callbacks
    from lit_sharp.measurements import is_measurement

    cfg = compose_config(*tiny_run_overrides(synthetic_root, tmp_path), "data.sharpness_size=32",
                         f"callbacks.sharpness.specs={SHARPNESS_SPECS}")
    measures = {key: callback for key, callback in build_named_callbacks(cfg).items() if is_measurement(callback)}
    assert set(measures) == {"final_errors", "sharpness", "corruption"}
    # Two iterations and draws per spec are enough to see the settings; the paper's 20 would only cost time.
    sharpness = measures["sharpness"]
    sharpness.specs = [dataclasses.replace(spec, n_iters=2, n_samples=2) for spec in sharpness.specs]
    return measures, build_datamodule(cfg)


@pytest.mark.parametrize("fail", [False, True], ids=["completes", "raises"])
def test_every_measurement_runs_in_full_float32_and_restores_the_settings(synthetic_root, tmp_path,
                                                                           reduced_precision_allowed, fail):
    from lit_sharp.models import preact_resnet18

    measures, datamodule = _measurements(synthetic_root, tmp_path)
    for key, callback in measures.items():
        model = preact_resnet18(width=4, blocks_per_stage=1)
        probe = _PrecisionProbe(fail)
        model.register_forward_hook(probe)
        if fail:
            with pytest.raises(RuntimeError, match="probe"):
                callback.measure(model, datamodule, progress=False)
        else:
            callback.measure(model, datamodule, progress=False)
        assert probe.seen, key
        assert all(_is_full_float32(settings) for settings in probe.seen), (key, probe.seen[0])
        assert _precision_settings() == reduced_precision_allowed, key


def test_full_float32_nests_and_restores_the_outer_settings(reduced_precision_allowed):
    from lit_sharp.eval_mode import full_float32

    with full_float32():
        with full_float32():
            assert _is_full_float32(_precision_settings())
        assert _is_full_float32(_precision_settings())
    assert _precision_settings() == reduced_precision_allowed

