"""The diagonal linear network study: library curvature against the closed forms of the paper's Section 5.2."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy import stats

from lit_sharp.sharpness import SharpnessSpec, sharpness
from lit_sharp.studies.diagonal_linear import (
    DiagonalLinearNetwork,
    StudyConfig,
    balanced_scale,
    half_squared_error,
    main,
    run,
    train,
)


@pytest.fixture(scope="module")
def whitened_minima() -> tuple[torch.Tensor, torch.Tensor, list[DiagonalLinearNetwork]]:
    """Networks trained to a global minimum on whitened data (X^T X = I: orthonormal columns, n >= d)."""
    generator = torch.Generator().manual_seed(0)
    d, n = 8, 12
    x, _ = torch.linalg.qr(torch.randn(n, d, generator=generator, dtype=torch.float64))
    beta = torch.zeros(d, dtype=torch.float64)
    beta[:3] = torch.tensor([1.5, -0.8, 0.6], dtype=torch.float64)
    y = x @ beta
    inits = torch.tensor([0.1, 0.3, 1.0], dtype=torch.float64)
    u0 = inits[:, None] * torch.randn(3, d, generator=generator, dtype=torch.float64)
    v0 = inits[:, None] * torch.randn(3, d, generator=generator, dtype=torch.float64)
    u, v, loss, _ = train(x, y, torch.full((3,), 0.2, dtype=torch.float64), u0, v0, 1e-12, 20_000)
    assert (loss <= 1e-12).all()
    return x, y, [DiagonalLinearNetwork(u[i], v[i]) for i in range(3)]


def _value(model, x, y, kind: str, adaptive: bool, scale=None, **counts: int) -> float:
    spec = SharpnessSpec(kind, adaptive=adaptive, n_samples=counts.get("n_samples", 300), n_iters=counts.get("n_iters", 16))
    return sharpness(model, [(x.float(), y.float())], spec, loss_fn=half_squared_error, scale=scale).value


def test_curvature_of_trained_networks_matches_the_closed_forms(whitened_minima) -> None:
    x, y, models = whitened_minima
    for model in models:
        u, v = model.u.detach().double(), model.v.detach().double()
        beta = u * v
        # The Hessian is block diagonal in the pairs (u_i, v_i) with blocks [[v^2, uv], [uv, u^2]] (Eq. 8-9):
        # Hutchinson's off-diagonal terms are the 2 uv entries of each block, so its error is small but not zero.
        # Rademacher: Var = 2 sum_{i != j} A_ij^2 per draw, 300 draws, a 5-sigma bound; A_uv = c_u c_v u_i v_i.
        def tolerance(off_diagonal: torch.Tensor) -> float:
            return 5 * (2 * 2 * off_diagonal.square().sum().item() / 300) ** 0.5

        assert _value(model, x, y, "hessian_trace", False) == pytest.approx((u**2 + v**2).sum().item(),
                                                                            abs=tolerance(beta))  # fmt: skip
        assert _value(model, x, y, "hessian_max_eig", False) == pytest.approx((u**2 + v**2).max().item(), rel=0.01)
        # Section 5.2's scale: every coordinate pair gives 2 |u_i v_i|, the top eigenvalue ||beta||_inf ... times 2.
        balanced = balanced_scale(model)
        rescaled_trace = _value(model, x, y, "hessian_trace", True, balanced)
        assert rescaled_trace == pytest.approx(2 * beta.abs().sum().item(), abs=tolerance(beta))
        assert _value(model, x, y, "hessian_max_eig", True, balanced) == pytest.approx(
            2 * beta.abs().max().item(), rel=0.01
        )
        # c = |w|: the rescaled blocks are [[u^2 v^2, ...]]: trace 2 ||beta||_2^2, top eigenvalue 2 ||beta||_inf^2.
        assert _value(model, x, y, "hessian_trace", True) == pytest.approx(2 * beta.square().sum().item(),
                                                                           abs=tolerance(beta * beta.abs()))  # fmt: skip
        assert _value(model, x, y, "hessian_max_eig", True) == pytest.approx(2 * beta.square().max().item(), rel=0.01)


def test_balanced_scale_is_invariant_to_the_alpha_reparametrisation(whitened_minima) -> None:
    x, y, models = whitened_minima
    model = models[1]
    twin = DiagonalLinearNetwork(model.u.detach() * 4.0, model.v.detach() / 4.0)
    for kind in ("hessian_trace", "hessian_max_eig"):
        same = [_value(m, x, y, kind, True, balanced_scale(m)) for m in (model, twin)]
        plain = [_value(m, x, y, kind, False) for m in (model, twin)]
        assert same[1] == pytest.approx(same[0], rel=1e-3)
        assert plain[1] != pytest.approx(plain[0], rel=0.1)


def test_cli_writes_the_three_files(tmp_path, capsys) -> None:
    main(["--out", str(tmp_path), "--n-models", "6", "--dim", "40", "--n-train", "30", "--hutchinson-samples", "20",
          "--lanczos-iters", "10"])  # fmt: skip
    assert {path.name for path in tmp_path.iterdir()} >= {"runs.csv", "correlations.csv", "figure7.png"}
    with (tmp_path / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 6 and {"test_loss", "l1_norm", "trace", "trace_balanced", "max_eig_abs_w"} <= set(runs[0])
    with (tmp_path / "correlations.csv").open() as handle:
        measures = {row["measure"] for row in csv.DictReader(handle)}
    assert {"trace", "trace_balanced", "max_eig_balanced", "trace_abs_w"} <= measures
    assert (tmp_path / "figure7.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "(1)" in printed and "(2)" in printed and "(3)" in printed


#: A size that runs in seconds; the README's table is measured at the defaults (200 models, d = 200, n = 100).
SMALL_STUDY = StudyConfig(n_models=40, dim=100, n_train=50, hutchinson_samples=50, lanczos_iters=20, seed=0)


def test_the_readmes_findings_hold_at_a_small_size(tmp_path) -> None:
    findings = run(SMALL_STUDY, tmp_path, progress=False)
    with (tmp_path / "runs.csv").open() as handle:
        runs = [row for row in csv.DictReader(handle) if row["converged"] == "True"]
    assert len(runs) == findings["n_converged"] >= 35

    def column(name: str) -> np.ndarray:
        return np.array([float(row[name]) for row in runs])

    test_loss = column("test_loss")
    tau = {name: stats.kendalltau(column(name), test_loss).statistic
           for name in ("l1_norm", "trace", "trace_balanced", "trace_abs_w", "max_eig_balanced")}
    # (1) ||u * v||_1 is close to half the rescaled trace (README: median gap 4.0%, max 8.4%).
    gap = np.abs(column("l1_norm") - column("trace_balanced") / 2) / column("l1_norm")
    assert np.median(gap) < 0.1 and gap.max() < 0.2
    # (2) The rescaled trace ranks models by test loss, a little better than the plain trace; ||u * v||_1, which it
    # approximates, best; the trace under c = |w| (2 ||beta||_2^2) ranks them the other way.
    assert tau["l1_norm"] > 0.8
    assert tau["trace_balanced"] > tau["trace"] > 0.5
    assert tau["trace_abs_w"] < 0
    # (3) The rescaled top eigenvalue does not rank models like the rescaled trace, nor by test loss.
    assert stats.kendalltau(column("trace_balanced"), column("max_eig_balanced")).statistic < 0.1
    assert tau["max_eig_balanced"] < 0.1
    # The study's own correlations.csv says the same.
    with (tmp_path / "correlations.csv").open() as handle:
        written = {row["measure"]: float(row["tau"]) for row in csv.DictReader(handle)}
    for name, value in tau.items():
        assert written[name] == pytest.approx(value, abs=1e-12), name
