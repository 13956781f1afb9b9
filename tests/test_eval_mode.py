"""Tests for lit_sharp.eval_mode: evaluation mode for a block, every module's own training flag restored."""

from __future__ import annotations

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
