"""``lit_sharp.sharpness`` against the values the paper's released evaluation code computed for two small trained
models (``tests/data/released_sharpness/``, see its README): 12 worst-case and 8 average-case specs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_sharp.sharpness import SharpnessSpec, sharpness

DATA = Path(__file__).parent / "data" / "released_sharpness"
#: The released algorithm is deterministic from a zero start: only the float32 reduction order differs (~1e-5).
WORST_CASE_REL = 1e-3
#: Independent 20-draw measurements averaged per average-case spec (different seeds from the released run's).
AVERAGE_SEEDS = (0, 1, 2, 3)


class ConvBN(nn.Module):
    """``conv_bn`` of the data README: two bias-free 3x3 convolutions with BatchNorm and ReLU, spatial mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class PatchMLP(nn.Module):
    """``patch_mlp`` of the data README: 4x4 patch embedding, LayerNorm, one residual GELU layer, token mean."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(48, 16)
        self.norm1 = nn.LayerNorm(16)
        self.mlp = nn.Linear(16, 16)
        self.norm2 = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 9 patches in row-major order, each flattened as (channel, row, column).
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(len(x), -1, 48)
        tokens = self.norm1(self.embed(patches))
        tokens = tokens + F.gelu(self.mlp(tokens))
        return self.fc(self.norm2(tokens.mean(dim=1)))


ARCHITECTURES = {"conv_bn": ConvBN, "patch_mlp": PatchMLP}


def _cases(kind: str) -> list[dict]:
    cases = json.loads((DATA / "values.json").read_text())["cases"]
    return [case for case in cases if case["kind"] == kind]


@pytest.fixture(scope="module")
def released() -> dict[str, tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Each model with its trained weights (``strict=True``: the structure must match) and its 4 batches of 32."""
    stored = torch.load(DATA / "models_and_batches.pt", weights_only=True)
    batch_size = json.loads((DATA / "values.json").read_text())["batch_size"]
    loaded = {}
    for name, architecture in ARCHITECTURES.items():
        model = architecture()
        model.load_state_dict(stored["state_dicts"][name], strict=True)
        x, y = stored["batches"][name]
        loaded[name] = (model.eval(), list(zip(x.split(batch_size), y.split(batch_size))))
    return loaded


def _spec(case: dict) -> SharpnessSpec:
    spec = SharpnessSpec.from_name(case["spec"], n_iters=case["n_iters"], n_samples=case["n_samples"] or 20)
    assert (spec.kind, spec.norm, spec.adaptive, spec.normalize_logits, spec.rho) == (
        case["kind"], case["norm"], case["adaptive"], case["normalize_logits"], case["rho"]
    )  # fmt: skip
    return spec


def _case_id(case: dict) -> str:
    return f"{case['model']}-{case['spec']}"


def test_the_reference_covers_every_definition_on_both_models() -> None:
    worst, average = _cases("worst"), _cases("average")
    assert (len(worst), len(average)) == (12, 8)
    for cases in (worst, average):
        assert {case["model"] for case in cases} == set(ARCHITECTURES)
    variants = {(c["norm"], c["adaptive"], c["normalize_logits"]) for c in worst}
    assert variants == {(n, a, ln) for n in ("linf", "l2") for a, ln in ((False, False), (True, False), (True, True))}


@pytest.mark.parametrize("case", _cases("worst"), ids=_case_id)
def test_worst_case_matches_the_released_code(released, case: dict) -> None:
    model, batches = released[case["model"]]
    value = sharpness(model, batches, _spec(case)).value
    assert case["value"] > 1e-3  # a radius where the model is measurably sharp
    assert value == pytest.approx(case["value"], rel=WORST_CASE_REL)


@pytest.mark.parametrize("case", _cases("average"), ids=_case_id)
def test_average_case_matches_the_released_code(released, case: dict) -> None:
    model, batches = released[case["model"]]
    spec = _spec(case)
    values = [sharpness(model, batches, spec, generator=seed).value for seed in AVERAGE_SEEDS]
    # Both sides are means of independent 20-draw measurements: ours of len(AVERAGE_SEEDS), the reference of
    # `repetitions`; the difference has this standard deviation, and 3 of them bound it.
    sd = case["sd_of_one_measurement"] * math.sqrt(1 / len(values) + 1 / case["repetitions"])
    assert abs(sum(values) / len(values) - case["value"]) < 3 * sd


@pytest.mark.parametrize("model_name", list(ARCHITECTURES))
@pytest.mark.parametrize("ln", [False, True])
def test_steepest_adaptive_l2_exceeds_the_released_maximizer(released, model_name: str, ln: bool) -> None:
    # A stronger maximizer of the same objective: higher than the paper's algorithm, hence a name of its own.
    (case,) = [c for c in _cases("worst") if c["model"] == model_name and c["norm"] == "l2" and c["adaptive"]
               and c["normalize_logits"] == ln]  # fmt: skip
    model, batches = released[model_name]
    steepest = SharpnessSpec("worst", "l2", case["rho"], normalize_logits=ln, method="steepest")
    assert sharpness(model, batches, steepest).value > 1.02 * case["value"]
