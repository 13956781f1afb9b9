"""Cost of a SAM training step relative to a plain SGD step, measured in the same process.

A SAM step runs two forward/backward passes (the second with BatchNorm statistics frozen) plus the ascent
and restore of the weights, so its cost should be about twice a plain step (target: ratio <= 2.1); with
``rho = 0`` the second pass is skipped and the cost should match plain SGD (ratio ~= 1.0).

``measure_compiled`` times the same SAM step with the model under ``torch.compile`` against the eager step
(``compiled_vs_eager``, below 1 when compiling pays), after a warm-up that includes the compilation.

Run as ``python bench/bench_sam.py [--full] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lit_sharp.sam import SAM, BatchNormStatsFreezer
from timing import seconds

BATCH_SIZE = 128
SGD_HPARAMS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def _cifar_cnn() -> nn.Module:
    """A small CIFAR-size CNN with BatchNorm (about 0.3M parameters)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32), nn.MaxPool2d(2),  # (B, 32, 16, 16)
        *block(32, 64), nn.MaxPool2d(2),  # (B, 64, 8, 8)
        *block(64, 128), *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 128)
        nn.Linear(128, 10),
    )


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _sam_step(model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor,
              freezer: BatchNormStatsFreezer | None = None) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with (freezer or BatchNormStatsFreezer(model)).frozen():
        F.cross_entropy(model(x), y).backward()
    opt.second_step()


def _sam_rho0_step(model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor) -> None:
    # With rho = 0 the gradient at w + e is the gradient at w: the second pass is skipped.
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    opt.second_step()


def measure(quick: bool = True, device: str | None = None, batch_size: int = BATCH_SIZE) -> dict[str, float]:
    """Median time of a SAM step over the median time of a plain SGD step, on the same batch.

    Args:
        quick: fewer repetitions (for a smoke run); the full run uses more.
        device: where to run ("cpu", "cuda", ...); default "cpu".

    Returns:
        ``{"sam_step": ratio, "sam_rho0_step": ratio, "plain_step_ms": milliseconds}``.
    """
    dev = torch.device(device or "cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(dev)  # (B, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(dev)

    torch.manual_seed(0)
    models = {name: _cifar_cnn().to(dev).train() for name in ("plain", "sam", "sam_rho0")}
    plain_opt = torch.optim.SGD(models["plain"].parameters(), **SGD_HPARAMS)
    sam_opt = SAM(models["sam"].parameters(), torch.optim.SGD, rho=0.05, **SGD_HPARAMS)
    freezer = BatchNormStatsFreezer(models["sam"])
    rho0_opt = SAM(models["sam_rho0"].parameters(), torch.optim.SGD, rho=0.0, **SGD_HPARAMS)
    steps: dict[str, Callable[[], None]] = {
        "plain": lambda: _plain_step(models["plain"], plain_opt, x, y),
        "sam": lambda: _sam_step(models["sam"], sam_opt, x, y, freezer),
        "sam_rho0": lambda: _sam_rho0_step(models["sam_rho0"], rho0_opt, x, y),
    }

    warmup, repetitions = (3, 9) if quick else (5, 31)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(warmup + repetitions):
        # Interleaved so that drifts in machine load hit all three alike.
        for name, step in steps.items():
            elapsed = seconds(step, dev)
            if rep >= warmup:
                times[name].append(elapsed)
    plain = statistics.median(times["plain"])
    return {
        "sam_step": statistics.median(times["sam"]) / plain,
        "sam_rho0_step": statistics.median(times["sam_rho0"]) / plain,
        "plain_step_ms": plain * 1e3,
    }


def measure_compiled(quick: bool = True, device: str | None = None, backend: str = "inductor",
                     batch_size: int = BATCH_SIZE) -> dict[str, float]:
    """Median time of a SAM step with the model compiled over that of the same step in eager mode.

    Both run the same CNN from the same weights on the same batch, interleaved; the compiled one is warmed up
    (compiled) first. BatchNorm statistics are frozen by copies, so the second pass reuses the first's graph.

    Args:
        quick: fewer repetitions.
        device: where to run; default "cpu".
        backend: the ``torch.compile`` backend (inductor is what training uses; "aot_eager" for a quick test).
        batch_size: images per step.

    Returns:
        ``compiled_vs_eager`` (ratio), ``eager_sam_step_ms``, ``compile_s`` (the warm-up steps) and
        ``recompiles_after_warmup`` (dynamo frames compiled during the timed steps; 0 when nothing recompiles).
    """
    import time

    from torch._dynamo.utils import counters

    dev = torch.device(device or "cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(dev)
    torch.manual_seed(0)
    eager = _cifar_cnn().to(dev).train()
    plain_copy = _cifar_cnn().to(dev).train()
    plain_copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(plain_copy, backend=backend)
    runs = {}
    for name, model, params in (("eager", eager, eager), ("compiled", compiled, plain_copy)):
        opt = SAM(params.parameters(), torch.optim.SGD, rho=0.05, **SGD_HPARAMS)
        freezer = BatchNormStatsFreezer(params)
        runs[name] = lambda model=model, opt=opt, freezer=freezer: _sam_step(model, opt, x, y, freezer)
    start = time.perf_counter()
    for _ in range(3):  # compiles on the first call; the next ones must not recompile
        seconds(runs["compiled"], dev)
    compile_s = time.perf_counter() - start
    frames_after_warmup = counters["frames"]["total"]
    seconds(runs["eager"], dev)
    repetitions = 7 if quick else 31
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(repetitions):
        for name in (("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager")):
            times[name].append(seconds(runs[name], dev))
    eager_s = statistics.median(times["eager"])
    return {"compiled_vs_eager": statistics.median(times["compiled"]) / eager_s, "eager_sam_step_ms": eager_s * 1e3,
            "compile_s": compile_s, "recompiles_after_warmup": counters["frames"]["total"] - frames_after_warmup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more repetitions")
    parser.add_argument("--device", default=None, help="torch device, default cpu")
    args = parser.parse_args()
    for name, value in measure(quick=not args.full, device=args.device).items():
        print(f"{name}: {value:.3f}")
    for name, value in measure_compiled(quick=not args.full, device=args.device).items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
