"""Cost of ``lit_sharp.sharpness.sharpness`` against the floor of what it has to compute, in one process.

Worst case: Auto-PGD with ``n_iters`` steps needs ``n_iters + 1`` loss evaluations per batch and a gradient at all
but the last, so the floor is ``n_iters + 1`` plain forward+backward passes per batch on the same model and data;
the target is at most 1.10 times that. Average case: the floor is ``n_samples`` forward passes per batch.
Ratios, not seconds, are the result: both sides run on the same machine, interleaved, medians of a few repetitions.

Run ``python bench/bench_sharpness.py [--full] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lit_sharp.models import preact_resnet18
from lit_sharp.sharpness import SharpnessSpec, sharpness
from timing import interleaved_times

BATCH_SIZE = 128  # m of the paper's m-sharpness
N_ITERS = 20
#: (width, blocks per stage, batches, average-case samples, repetitions) of the quick and the full measurement.
QUICK, FULL = (8, 1, 2, 20, 5), (64, 2, 8, 100, 5)


def _interleaved_medians(
    functions: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in interleaved_times(functions, device, repeats).items()}


def measure(quick: bool = True, device: str | None = None) -> dict[str, object]:
    """Time sharpness() against its floor on a PreAct ResNet.

    Args:
        quick: 2 batches, width 8, one block per stage, 20 average-case samples, 5 repetitions (a minute on a CPU);
            otherwise 8 batches of ResNet-18 proper (width 64, two blocks per stage), 100 samples, 5 repetitions.
        device: where to run; default CUDA when available.

    Returns:
        ``sharpness_vs_floor`` (worst-case linf adaptive time over ``n_iters + 1`` forward+backward passes per
        batch; the target is <= 1.10), ``average_vs_floor`` (average case over ``n_samples`` forward passes per
        batch), the median seconds behind them and the setting.
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    width, blocks, n_batches, n_samples, repeats = QUICK if quick else FULL
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = preact_resnet18(width=width, blocks_per_stage=blocks).to(target).eval()
    batches = [
        (torch.randn(BATCH_SIZE, 3, 32, 32, generator=generator).to(target),
         torch.randint(0, 10, (BATCH_SIZE,), generator=generator).to(target))
        for _ in range(n_batches)
    ]  # fmt: skip
    worst = SharpnessSpec("worst", "linf", 0.002, adaptive=True, n_iters=N_ITERS)
    average = SharpnessSpec("average", "l2", 0.1, adaptive=True, n_samples=n_samples)

    def forward_backward_floor() -> None:
        for x, y in batches:
            for _ in range(N_ITERS + 1):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def forward_floor() -> None:
        with torch.no_grad():
            for x, y in batches:
                for _ in range(n_samples):
                    F.cross_entropy(model(x), y)

    functions: dict[str, Callable[[], object]] = {
        "floor_worst": forward_backward_floor,
        "sharpness_worst": lambda: sharpness(model, batches, worst),
        "floor_average": forward_floor,
        "sharpness_average": lambda: sharpness(model, batches, average),
    }
    seconds: dict[str, float] = {}
    for group in (("floor_worst", "sharpness_worst"), ("floor_average", "sharpness_average")):
        seconds |= _interleaved_medians({name: functions[name] for name in group}, target, repeats)
    result: dict[str, object] = {
        "sharpness_vs_floor": seconds["sharpness_worst"] / seconds["floor_worst"],
        "average_vs_floor": seconds["sharpness_average"] / seconds["floor_average"],
        "seconds": seconds,
        "setting": dict(device=str(target), width=width, blocks_per_stage=blocks, batches=n_batches,
                        batch_size=BATCH_SIZE, n_iters=N_ITERS, n_samples=n_samples, repeats=repeats,
                        threads=torch.get_num_threads()),  # fmt: skip
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="ResNet-18 proper, 8 batches (slow on a CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    result = measure(quick=not args.full, device=args.device)
    print(f"setting: {result['setting']}")
    print(f"median seconds: { {name: round(value, 4) for name, value in result['seconds'].items()} }")
    print(f"sharpness_vs_floor (worst case, target <= 1.10): {result['sharpness_vs_floor']:.3f}")
    print(f"average_vs_floor (average case): {result['average_vs_floor']:.3f}")


if __name__ == "__main__":
    main()
