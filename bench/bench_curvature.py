"""Cost of the curvature kinds of ``lit_sharp.sharpness`` against the floor of the Hessian-vector products they need.

``hessian_trace`` needs ``n_samples`` and ``hessian_max_eig`` ``n_iters`` Hessian-vector products per batch. The floor
is that many products done the plain way on the same model and data, each a forward pass, a graph-building backward
pass and a double backward pass (``torch.autograd.grad`` twice). The library builds the graph once per batch, so its
ratio can be below 1. Ratios, not seconds: both sides run interleaved in one process, medians of a few repetitions.

Run ``python bench/bench_curvature.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from lit_sharp.models import preact_resnet18
from lit_sharp.sharpness import SharpnessSpec, sharpness
from timing import seconds

N_PRODUCTS = 10


def measure(device: str | None = None, repeats: int = 3) -> dict[str, object]:
    """Time each curvature spec (standard and adaptive) against ``N_PRODUCTS`` plain Hessian-vector products.

    Returns:
        ``<spec name>_vs_floor`` for every spec, the median seconds and the setting.
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = preact_resnet18(width=8, blocks_per_stage=1).to(target).eval()
    x = torch.randn(64, 3, 32, 32, generator=generator).to(target)
    y = torch.randint(0, 10, (64,), generator=generator).to(target)
    params = list(model.parameters())

    def floor() -> None:
        for _ in range(N_PRODUCTS):
            gradients = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
            torch.autograd.grad(gradients, params, grad_outputs=[torch.ones_like(p) for p in params])

    specs = [SharpnessSpec(kind, adaptive=adaptive, n_samples=N_PRODUCTS, n_iters=N_PRODUCTS)
             for kind in ("hessian_trace", "hessian_max_eig") for adaptive in (False, True)]  # fmt: skip
    functions = {"floor": floor} | {spec.name: (lambda s=spec: sharpness(model, [(x, y)], s)) for spec in specs}
    for function in functions.values():
        function()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(seconds(function, target))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result: dict[str, object] = {f"{spec.name}_vs_floor": medians[spec.name] / medians["floor"] for spec in specs}
    result["seconds"] = medians
    result["setting"] = dict(device=str(target), width=8, batch_size=64, products=N_PRODUCTS, repeats=repeats,
                             threads=torch.get_num_threads())  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    result = measure(device=args.device)
    print(f"setting: {result['setting']}")
    print(f"median seconds: { {name: round(value, 4) for name, value in result['seconds'].items()} }")
    for key, value in result.items():
        if key.endswith("_vs_floor"):
            print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
