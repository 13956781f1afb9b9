"""Figure 7 of "A Modern Look at the Relationship between Sharpness and Generalization" (Section 5.2): Hessian trace
and top eigenvalue, plain and rescaled, against the test loss of diagonal linear networks on sparse regression.

A diagonal linear network predicts ``<x, beta>`` with ``beta = u * v``, weights ``w = (u, v)`` in ``R^{2d}``. For
whitened data at a zero-loss minimum the Hessian of ``L(w) = 1/2 ||X (u * v) - y||^2`` is
``[[diag(v^2), diag(u v)], [diag(u v), diag(u^2)]]`` (the paper's Eq. 8, which implies the factor 1/2), so
``tr H = sum u^2 + v^2``; rescaled by ``c_u = sqrt(|u| / |v|)``, ``c_v = sqrt(|v| / |u|)`` (each coordinate pairs
``|u_i| |v_i|``; the paper's Section 5.2 writes the two halves of ``c`` the other way round) the trace is
``2 ||beta||_1``, and with ``c = |w|`` it is ``2 ||beta||_2^2``. Every curvature number here is computed by
:func:`lit_sharp.sharpness.sharpness` (Hessian-vector products); the closed forms are for the tests.

Choices where the paper is silent (all options): ``n = 100`` training points with i.i.d. ``N(0, 1/n)`` features
(whitened in expectation, ``E X^T X = I``), the ``d * (1 - sparsity) = 20`` nonzero coordinates of ``beta*`` drawn
from ``N(0, 1)``, noise-free labels; initialisation ``u_0, v_0 ~ alpha N(0, I)`` with ``alpha`` log-uniform in
``[0.01, 1]`` and learning rates log-uniform in ``[0.01, 0.1]``; plain full-batch gradient descent until the training
loss is at most 1e-5. The test loss is the population loss ``E_x 1/2 (x^T (beta - beta*))^2 = ||beta - beta*||^2 / (2n)``
for ``x ~ N(0, I/n)``, i.e. an infinite test set.

Run ``python -m lit_sharp.studies.diagonal_linear --out DIR [--n-models 200] [--seed 0]``; it writes ``runs.csv``
(one row per model), ``correlations.csv`` (Kendall's tau of every measure with the test loss) and ``figure7.png``,
and prints the paper's three findings with the measured numbers.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_sharp.analysis import kendall_tau
from lit_sharp.errors import ConfigError
from lit_sharp.sharpness import SharpnessSpec, sharpness

#: Measures computed per model: column name -> (spec kind, rescaling). ``balanced`` is Section 5.2's scale.
MEASURES: dict[str, tuple[str, str]] = {
    "trace": ("hessian_trace", "none"),
    "max_eig": ("hessian_max_eig", "none"),
    "trace_balanced": ("hessian_trace", "balanced"),
    "max_eig_balanced": ("hessian_max_eig", "balanced"),
    "trace_abs_w": ("hessian_trace", "abs_w"),
    "max_eig_abs_w": ("hessian_max_eig", "abs_w"),
}
_SCALE_FLOOR = 1e-30  # |u| or |v| exactly 0 would make the balanced scale 0/0


@dataclass(frozen=True)
class StudyConfig:
    """The sparse regression problem, the grid of trained models and the estimators (see the module docstring)."""

    n_models: int = 200
    seed: int = 0
    dim: int = 200
    n_train: int = 100
    sparsity: float = 0.9
    lr_range: tuple[float, float] = (0.08, 0.2)
    init_range: tuple[float, float] = (0.01, 1.0)
    target_loss: float = 1e-5
    max_steps: int = 40_000
    hutchinson_samples: int = 100
    lanczos_iters: int = 20

    def __post_init__(self) -> None:
        for name in ("n_models", "dim", "n_train", "max_steps", "hutchinson_samples", "lanczos_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("lr_range", "init_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f"{name} must be two numbers 0 < low <= high, got {(low, high)}")
        if self.target_loss <= 0:
            raise ConfigError(f"target_loss must be > 0, got {self.target_loss}")


class DiagonalLinearNetwork(nn.Module):
    """``x -> <x, u * v>``."""

    def __init__(self, u: Tensor, v: Tensor) -> None:
        super().__init__()
        self.u = nn.Parameter(u.detach().clone().float())
        self.v = nn.Parameter(v.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.u * self.v)


def half_squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``1/2 ||prediction - target||^2``: the loss whose Hessian at a whitened minimum is the paper's Eq. 8."""
    return 0.5 * (prediction - target).square().sum()


def balanced_scale(model: DiagonalLinearNetwork) -> dict[str, Tensor]:
    """Section 5.2's scale: ``c_u = sqrt(|u| / |v|)``, ``c_v = sqrt(|v| / |u|)``, invariant to ``(a u, v / a)``."""
    u, v = model.u.detach().abs().clamp_min(_SCALE_FLOOR), model.v.detach().abs().clamp_min(_SCALE_FLOOR)
    return {"u": (u / v).sqrt(), "v": (v / u).sqrt()}


def make_problem(config: StudyConfig, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, y, beta*)``: features ``N(0, 1/n)``, a sparse ``beta*`` with ``N(0, 1)`` nonzeros, ``y = X beta*``."""
    x = torch.randn(config.n_train, config.dim, generator=generator, dtype=torch.float64) / math.sqrt(config.n_train)
    n_nonzero = max(1, round(config.dim * (1 - config.sparsity)))
    beta = torch.zeros(config.dim, dtype=torch.float64)
    support = torch.randperm(config.dim, generator=generator)[:n_nonzero]
    beta[support] = torch.randn(n_nonzero, generator=generator, dtype=torch.float64)
    return x, x @ beta, beta


def _log_uniform(low: float, high: float, count: int, generator: torch.Generator) -> Tensor:
    return torch.empty(count, dtype=torch.float64).uniform_(math.log(low), math.log(high), generator=generator).exp()


def train(
    x: Tensor, y: Tensor, lrs: Tensor, u0: Tensor, v0: Tensor, target_loss: float, max_steps: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full-batch gradient descent on ``1/2 ||X (u * v) - y||^2`` for every model at once (rows of ``u0``, ``v0``).

    Each model stops at its first iterate with loss <= ``target_loss``. In float64: the target is far below
    float32's resolution of the residual. Returns ``(u, v, final loss, steps)`` per model; a model that diverged
    or ran out of steps has a loss above the target.
    """
    u, v = u0.clone(), v0.clone()
    steps = torch.zeros(len(lrs), dtype=torch.long)
    loss = torch.full((len(lrs),), math.inf, dtype=torch.float64)
    running = torch.arange(len(lrs))  # models still training; finished ones leave the batch
    for step in range(max_steps + 1):
        uu, vv = u[running], v[running]
        residual = (uu * vv) @ x.T - y  # (models, n)
        batch_loss = 0.5 * residual.square().sum(dim=1)
        loss[running] = batch_loss
        active = (batch_loss > target_loss) & torch.isfinite(batch_loss)
        if step == max_steps or not active.any():
            break
        running, uu, vv, residual = running[active], uu[active], vv[active], residual[active]
        scaled = lrs[running][:, None] * (residual @ x)  # lr * d loss / d beta
        u[running], v[running] = uu - scaled * vv, vv - scaled * uu
        steps[running] += 1
    return u, v, loss, steps


def measure_model(model: DiagonalLinearNetwork, x: Tensor, y: Tensor, config: StudyConfig) -> dict[str, float]:
    """Trace and top eigenvalue of the Hessian, plain and under both rescalings, by the library."""
    batches = [(x.float(), y.float())]
    values: dict[str, float] = {}
    for column, (kind, rescaling) in MEASURES.items():
        spec = SharpnessSpec(kind, adaptive=rescaling != "none", n_samples=config.hutchinson_samples,
                             n_iters=config.lanczos_iters)  # fmt: skip
        scale = balanced_scale(model) if rescaling == "balanced" else None
        values[column] = sharpness(model, batches, spec, loss_fn=half_squared_error, scale=scale).value
    return values


def run(config: StudyConfig, out: Path | str, *, progress: bool = True) -> dict[str, object]:
    """Train ``config.n_models`` networks, measure them, write the three files into ``out``; returns the findings."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # Every tensor here is tiny: a second thread only adds synchronisation (tens of times slower on a busy machine).
    torch.set_num_threads(1)
    try:
        return _run(config, out, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: StudyConfig, out: Path, progress: bool) -> dict[str, object]:
    generator = torch.Generator().manual_seed(config.seed)
    x, y, beta_star = make_problem(config, generator)
    lrs = _log_uniform(*config.lr_range, config.n_models, generator)
    inits = _log_uniform(*config.init_range, config.n_models, generator)
    u0 = inits[:, None] * torch.randn(config.n_models, config.dim, generator=generator, dtype=torch.float64)
    v0 = inits[:, None] * torch.randn(config.n_models, config.dim, generator=generator, dtype=torch.float64)
    u, v, losses, steps = train(x, y, lrs, u0, v0, config.target_loss, config.max_steps)
    rows = []
    for index in tqdm(range(config.n_models), desc="diagonal linear networks", unit="model", disable=not progress):
        converged = bool(losses[index] <= config.target_loss)
        beta = u[index] * v[index]
        row: dict[str, object] = {
            "model": index, "lr": float(lrs[index]), "init_scale": float(inits[index]), "steps": int(steps[index]),
            "converged": converged, "train_loss": float(losses[index]),
            "test_loss": float((beta - beta_star).square().sum() / (2 * config.n_train)),
            "l1_norm": float(beta.abs().sum()), "l2_norm_squared": float(beta.square().sum()),
        }  # fmt: skip
        if converged:
            row |= measure_model(DiagonalLinearNetwork(u[index], v[index]), x, y, config)
        rows.append(row)
    kept = [row for row in rows if row["converged"]]
    _write_csv(out / "runs.csv", rows)
    correlations = _correlations(kept)
    _write_csv(out / "correlations.csv", correlations)
    findings = _findings(kept, correlations, len(rows))
    _plot(kept, findings, out / "figure7.png")
    return findings


def _write_csv(path: Path, rows: Sequence[dict[str, object]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _correlations(kept: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    test = [row["test_loss"] for row in kept]
    rows = []
    for measure in ("l1_norm", "l2_norm_squared", *MEASURES):
        tau = kendall_tau([row[measure] for row in kept], test)
        rows.append({"measure": measure, "target": "test_loss", "tau": "" if tau is None else tau, "n": len(kept)})
    return rows


def _findings(kept: Sequence[dict[str, object]], correlations: list[dict[str, object]], n_models: int) -> dict:
    tau = {row["measure"]: (row["tau"] if row["tau"] != "" else math.nan) for row in correlations}
    gaps = [abs(row["l1_norm"] - row["trace_balanced"] / 2) / row["l1_norm"] for row in kept]
    reverse = kendall_tau([row["trace_balanced"] for row in kept], [row["max_eig_balanced"] for row in kept])
    return {
        "n_models": n_models,
        "n_converged": len(kept),
        "l1_vs_half_trace_median_relative_gap": _median(gaps),
        "l1_vs_half_trace_max_relative_gap": max(gaps, default=math.nan),
        "tau_test_trace": tau["trace"],
        "tau_test_trace_balanced": tau["trace_balanced"],
        "tau_test_trace_abs_w": tau["trace_abs_w"],
        "tau_test_max_eig_balanced": tau["max_eig_balanced"],
        "tau_test_l1_norm": tau["l1_norm"],
        "tau_trace_balanced_vs_max_eig_balanced": math.nan if reverse is None else reverse,
    }


def _median(values: Sequence[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else math.nan


def _plot(kept: Sequence[dict[str, object]], findings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = [row["test_loss"] for row in kept]
    colour = [math.log10(row["lr"]) for row in kept]
    panels = [
        ("l1_norm", "trace_balanced", r"$\|u \odot v\|_1$", r"$\mathrm{tr}(\tilde\nabla^2 L(w))$"),
        ("trace", "test_loss", r"$\mathrm{tr}(\nabla^2 L(w))$", "test loss"),
        ("trace_balanced", "test_loss", r"$\mathrm{tr}(\tilde\nabla^2 L(w))$", "test loss"),
        ("trace_balanced", "max_eig_balanced", r"$\mathrm{tr}(\tilde\nabla^2 L(w))$",
         r"$\lambda_{\max}(\tilde\nabla^2 L(w))$"),
    ]  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (x_key, y_key, x_label, y_label) in zip(axes, panels):
        xs, ys = [row[x_key] for row in kept], (test if y_key == "test_loss" else [row[y_key] for row in kept])
        points = ax.scatter(xs, ys, c=colour, cmap="viridis", s=14)
        tau = kendall_tau(xs, ys)
        ax.set_title(r"$\tau$ = " + ("n/a" if tau is None else f"{tau:.2f}"))
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
    if kept:
        low, high = min(row["l1_norm"] for row in kept), max(row["l1_norm"] for row in kept)
        axes[0].plot([low, high], [2 * low, 2 * high], "k--", lw=1, label=r"$2\|u \odot v\|_1$")
        axes[0].legend(loc="upper left")
        figure.colorbar(points, ax=axes[-1], label=r"$\log_{10}$ learning rate")
    figure.suptitle(f"Diagonal linear networks: {findings['n_converged']} models, sparse regression "
                    r"($\tilde\nabla^2$: rescaled Hessian, $c_u = \sqrt{|u|/|v|}$)")  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(findings: dict) -> str:
    """The paper's three findings beside the measured numbers."""
    return "\n".join([
        f"models converged to the target loss: {findings['n_converged']} / {findings['n_models']}",
        "(1) ||u*v||_1 is approximated by half the rescaled trace: median relative gap "
        f"{findings['l1_vs_half_trace_median_relative_gap']:.2%}, max {findings['l1_vs_half_trace_max_relative_gap']:.2%}",
        "(2) the rescaled trace correlates with the test loss better than the plain trace (paper: tau ~0.8): "
        f"tau rescaled {findings['tau_test_trace_balanced']:.3f} vs plain {findings['tau_test_trace']:.3f} "
        f"(c = |w|: {findings['tau_test_trace_abs_w']:.3f}; ||u*v||_1: {findings['tau_test_l1_norm']:.3f})",
        "(3) rescaled trace and rescaled top eigenvalue can rank models in opposite orders: tau between them "
        f"{findings['tau_trace_balanced_vs_max_eig_balanced']:.3f}; tau of the rescaled top eigenvalue with the test "
        f"loss {findings['tau_test_max_eig_balanced']:.3f}",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for runs.csv, correlations.csv, figure7.png")
    parser.add_argument("--n-models", type=int, default=defaults.n_models)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dim", type=int, default=defaults.dim)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--sparsity", type=float, default=defaults.sparsity)
    parser.add_argument("--lr-range", type=float, nargs=2, default=defaults.lr_range, metavar=("LOW", "HIGH"))
    parser.add_argument("--init-range", type=float, nargs=2, default=defaults.init_range, metavar=("LOW", "HIGH"))
    parser.add_argument("--target-loss", type=float, default=defaults.target_loss)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--hutchinson-samples", type=int, default=defaults.hutchinson_samples)
    parser.add_argument("--lanczos-iters", type=int, default=defaults.lanczos_iters)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in args.items()}
    try:
        config = StudyConfig(**args)
    except ConfigError as error:
        parser.error(str(error))
    findings = run(config, out)
    print(report(findings))
    print(f"wrote {out / 'runs.csv'}, {out / 'correlations.csv'}, {out / 'figure7.png'}")


if __name__ == "__main__":
    main()
