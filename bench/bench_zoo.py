"""What measuring a pretrained ImageNet zoo costs beyond the forward and backward passes it cannot avoid.

On a small timm ViT (``vit_tiny_patch16_224``, narrower and with 2 blocks in quick mode), in one process, interleaved:

- ``zoo_sharpness_vs_floor``: the headline spec (worst-case linf adaptive, rho 0.002, 20 Auto-PGD steps from a
  uniform random start) against the floor of the passes that algorithm needs per batch: ``n_iters + 2`` forward
  passes, ``n_iters`` of them with a backward pass (a forward at ``delta = 0`` for the reference loss, a
  forward+backward at the random start, ``n_iters - 1`` forward+backward steps and the last step's forward alone).
  That floor is below the ``(n_iters + 1)`` forward+backward passes of a zero start by one backward less one
  forward. Target <= 1.10.
- ``zoo_error_pass_vs_bare``: the evaluation sets' error loop (``lit_sharp.zoo.eval_sets``: inference mode, the
  error metric, one host read at the end) over decoded batches, as throughput relative to a bare
  ``with torch.no_grad(): model(x)`` loop over the same tensors. Target >= 0.9.
- ``zoo_decoded_img_s_per_worker``: images/s one DataLoader worker decodes from real JPEGs in an ImageNet folder
  with the model's own timm transform (``lit_sharp.zoo.eval_sets.image_dataset``), the rate the error pass is fed at.

Each ratio is the median over rounds of the per-round ratio (each round times both sides, the order alternating),
with the smallest and largest per-round ratio as its spread. On a GPU, :func:`gpu_projection` times the zoos' real
architectures in float32 with TF32 off and projects each zoo's GPU-hours.

Run ``python bench/bench_zoo.py [--full] [--gpu] [--threads N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lit_sharp.sharpness import IMAGENET_HEADLINE, SharpnessSpec, preset, sharpness
from timing import interleaved_times

# lit_sharp.zoo is imported where it is used: through timm it imports W&B when installed, which bench/run.py's
# --gpu-check path must not.

TARGETS_AT_MOST = {"zoo_sharpness_vs_floor": 1.10}
TARGETS_AT_LEAST = {"zoo_error_pass_vs_bare": 0.9}

#: The bench's ViT on a CPU: timm's tiny ViT, narrower and with 2 blocks, at the zoos' 224 pixels.
QUICK_VIT = {"embed_dim": 96, "depth": 2}
FULL_VIT: dict[str, Any] = {}

#: Models per zoo, and each zoo's architecture (timm name, overrides, the head on top) and sharpness preset.
ZOO_MODELS = {"augreg_in1k": 56, "augreg_in21k": 56, "clip_soups": 72}
ZOO_ARCHITECTURE = {"augreg_in1k": "vit_b16", "augreg_in21k": "vit_b16", "clip_soups": "clip_b32"}
ZOO_PRESET = {"augreg_in1k": "imagenet_augreg", "augreg_in21k": "imagenet_augreg", "clip_soups": "imagenet_clip"}
#: Images of each evaluation set (ObjectNet: the images of its 113 ImageNet classes; ReaL relabels the val images in
#: the same pass); a model also classifies the fixed training-error subset (``TRAIN_ERROR_IMAGES``).
EVAL_SET_IMAGES = {"imagenet": 50_000, "imagenet_v2": 10_000, "imagenet_sketch": 50_889, "imagenet_r": 30_000,
                   "imagenet_a": 7_500, "objectnet": 18_574}


def _ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    per_round = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}


def build_vit(model_kwargs: dict[str, Any], device: torch.device) -> nn.Module:
    """timm's ``vit_tiny_patch16_224`` with a 1000-class head and ``model_kwargs``, in evaluation mode."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, **model_kwargs)
    return model.to(device).eval()


class PassCounter:
    """Counts a model's forward passes, and its backward passes as gradients reaching its output."""

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = 0
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self.forward += 1
        if output.requires_grad:
            output.register_hook(self._on_backward)

    def _on_backward(self, gradient: torch.Tensor) -> None:
        self.backward += 1

    def counts(self, function: Callable[[], object]) -> tuple[int, int]:
        """``(forward, backward)`` passes of one call of ``function``."""
        self.forward = self.backward = 0
        function()
        return self.forward, self.backward

    def remove(self) -> None:
        self._handle.remove()


def sharpness_floor(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], n_iters: int) -> None:
    """The passes worst-case sharpness from a random start needs: per batch, a forward pass, ``n_iters``
    forward+backward passes, a forward pass."""
    for x, y in batches:
        with torch.no_grad():
            F.cross_entropy(model(x), y)
        for _ in range(n_iters):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            F.cross_entropy(model(x), y)
    model.zero_grad(set_to_none=True)


def bare_forward(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The least a classification pass does: ``model(x)`` for every batch, without gradients."""
    with torch.no_grad():
        for x, _ in batches:
            model(x)


def _random_batches(n_batches: int, batch_size: int, image_size: int, device: torch.device
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
             torch.randint(0, 1000, (batch_size,), generator=generator).to(device)) for _ in range(n_batches)]


def write_jpeg_folder(folder: Path, size: tuple[int, int] = (400, 300), per_class: int = 1) -> Path:
    """An ImageNet-layout folder (the 1000 class folders) of real JPEGs with smooth, photo-like content."""
    from PIL import Image

    from lit_sharp.zoo.imagenet_classes import imagenet_synsets

    rng = np.random.default_rng(0)
    width, height = size
    for index, synset in enumerate(imagenet_synsets()):
        (folder / synset).mkdir(parents=True, exist_ok=True)
        for copy in range(per_class):
            coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
            image.save(folder / synset / f"{synset}_{copy}.JPEG", quality=90)
    return folder


def decoded_img_s_per_worker(folder: Path, data_config: dict[str, Any], batch_size: int, batches: int) -> float:
    """Images/s one DataLoader worker decodes and transforms (worker start-up and the first batch excluded)."""
    import time

    from torch.utils.data import DataLoader

    from lit_sharp.zoo.eval_sets import image_dataset

    loader = DataLoader(image_dataset(folder, data_config), batch_size=batch_size, num_workers=1, shuffle=False)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    seen = sum(len(next(iterator)[1]) for _ in range(batches))
    return seen / (time.perf_counter() - start)


def measure(quick: bool = True, device: str | None = None, *, model_kwargs: dict[str, Any] | None = None,
            n_batches: int | None = None, batch_size: int | None = None, n_iters: int = 20, repeats: int = 5,
            decode_batches: int | None = None) -> dict[str, Any]:
    """Time the zoo's sharpness and error pass against their floors on a small timm ViT (module docstring).

    Args:
        quick: ``QUICK_VIT`` at 224 pixels, 1 sharpness batch of 16, 4 error batches of 32 (a minute or two on a
            free CPU core); otherwise the full tiny ViT, 2 batches of 64 and 8 error batches of 128 (for a GPU).
            Both keep the protocol's 197 tokens per image: the search's own per-step work grows with the
            parameters, a pass with images x tokens, so fewer tokens would overstate its share.
        device: where to run; default CUDA when available.
        model_kwargs: timm overrides of the ViT, replacing the mode's (tests use a smaller one).
        n_batches, batch_size: sharpness batches; None keeps the mode's.
        n_iters: Auto-PGD steps of the headline spec.
        repeats: timed rounds per comparison.
        decode_batches: timed DataLoader batches (None keeps the mode's; 0 skips the decoding measure).

    Returns:
        ``zoo_sharpness_vs_floor``, ``zoo_error_pass_vs_bare`` (median per-round ratios, spreads under
        ``spread``), ``zoo_decoded_img_s_per_worker``, ``passes`` (forward and backward passes of one call of each
        timed function, counted), the median seconds and the setting.
    """
    from lit_sharp.zoo.eval_sets import _count_errors  # the evaluation sets' own loop, over decoded batches

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = dict(QUICK_VIT if quick else FULL_VIT) if model_kwargs is None else dict(model_kwargs)
    n_batches = n_batches or (1 if quick else 2)
    batch_size = batch_size or (16 if quick else 64)
    eval_batches, eval_batch_size = (4, 32) if quick else (8, 128)
    decode_batches = (4 if quick else 10) if decode_batches is None else decode_batches
    model = build_vit(kwargs, target)
    image_size = model.patch_embed.img_size[0]
    batches = _random_batches(n_batches, batch_size, image_size, target)
    eval_data = _random_batches(eval_batches, eval_batch_size, image_size, target)
    spec: SharpnessSpec = dataclasses.replace(IMAGENET_HEADLINE, n_iters=n_iters)
    functions: dict[str, Callable[[], object]] = {
        "floor": lambda: sharpness_floor(model, batches, n_iters),
        "sharpness": lambda: sharpness(model, batches, spec),
        "bare_forward": lambda: bare_forward(model, eval_data),
        "error_pass": lambda: _count_errors(model, eval_data, None, None),
    }
    counter = PassCounter(model)
    passes = {name: counter.counts(function) for name, function in functions.items()}
    counter.remove()
    times = interleaved_times({name: functions[name] for name in ("floor", "sharpness")}, target, repeats)
    times |= interleaved_times({name: functions[name] for name in ("bare_forward", "error_pass")}, target, repeats)
    sharp = _ratio(times["sharpness"], times["floor"])
    # Throughput ratio: images per second of the error pass over those of the bare loop.
    error_pass = _ratio(times["bare_forward"], times["error_pass"])
    result: dict[str, Any] = {
        "zoo_sharpness_vs_floor": sharp["median"],
        "zoo_error_pass_vs_bare": error_pass["median"],
        "spread": {"zoo_sharpness_vs_floor": sharp, "zoo_error_pass_vs_bare": error_pass},
        "passes": passes,
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "setting": dict(device=str(target), model="vit_tiny_patch16_224", model_kwargs=kwargs, batches=n_batches,
                        batch_size=batch_size, n_iters=n_iters, spec=spec.name, eval_batches=eval_batches,
                        eval_batch_size=eval_batch_size, repeats=repeats, threads=torch.get_num_threads()),
    }
    if decode_batches:
        import timm.data

        with tempfile.TemporaryDirectory() as folder:
            jpegs = write_jpeg_folder(Path(folder))
            result["zoo_decoded_img_s_per_worker"] = decoded_img_s_per_worker(
                jpegs, timm.data.resolve_model_data_config(model), eval_batch_size, decode_batches)
    return result


def build_zoo_architecture(architecture: str, device: torch.device, model_kwargs: dict[str, Any] | None = None
                           ) -> nn.Module:
    """A zoo's architecture with random weights: ``vit_b16`` (AugReg, timm's ViT-B/16 at 224) or ``clip_b32``
    (the soups' classifier: timm's quick-GELU CLIP ViT-B/32 tower, L2 normalisation, a 1000-class linear head)."""
    from lit_sharp.zoo.architecture import create_timm_model
    from lit_sharp.zoo.clip_soups import TOWER, NormalizedFeatureClassifier

    torch.manual_seed(0)
    if architecture == "vit_b16":
        model = create_timm_model("vit_base_patch16_224.augreg_in1k", model_kwargs)
    else:
        tower = create_timm_model(TOWER, {"num_classes": 512, **(model_kwargs or {})})
        model = NormalizedFeatureClassifier(tower, nn.Linear(tower.num_classes, 1000))
    return model.to(device).eval()


def pass_seconds(model: nn.Module, device: torch.device, batch_size: int, repeats: int) -> dict[str, float]:
    """Median seconds of one forward pass (inference mode) and of one forward+backward pass of a batch."""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    times = interleaved_times({"forward": forward, "forward_backward": forward_backward}, device, repeats)
    model.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in times.items()}


def model_seconds(zoo: str, forward_s: float, forward_backward_s: float) -> dict[str, float]:
    """Projected seconds to measure one model of ``zoo`` from per-batch pass times at the sharpness batch size.

    Sharpness: every spec of the zoo's preset on :data:`SHARPNESS_BATCHES` batches; per batch a worst-case spec
    costs ``n_iters`` forward+backward and 2 forward passes from a random start (1 from zero), an average-case spec
    ``n_samples + 1`` forward passes. Errors: one forward pass per image of :data:`EVAL_SET_IMAGES` and of the
    training-error subset. Decoding is not counted (DataLoader workers run beside the device).
    """
    from lit_sharp.zoo.train_subsets import SHARPNESS_BATCH_SIZE, SHARPNESS_BATCHES, TRAIN_ERROR_IMAGES

    per_batch = 0.0
    for spec in preset(ZOO_PRESET[zoo]):
        if spec.kind == "worst":
            per_batch += spec.n_iters * forward_backward_s + (2 if spec.random_start else 1) * forward_s
        else:
            per_batch += (spec.n_samples + 1) * forward_s
    sharpness_s = SHARPNESS_BATCHES * per_batch
    errors_s = (sum(EVAL_SET_IMAGES.values()) + TRAIN_ERROR_IMAGES) * forward_s / SHARPNESS_BATCH_SIZE
    return {"sharpness_s": sharpness_s, "errors_s": errors_s, "total_s": sharpness_s + errors_s}


def gpu_projection(device: str | None = None, *, repeats: int = 5, batch_size: int = 256,
                   model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """GPU-hours of each zoo, from the measured pass times of its real architecture in float32 with TF32 off.

    Args:
        device: default CUDA.
        repeats: timed rounds per pass time.
        batch_size: images per timed pass; :func:`model_seconds` takes the times as those of a sharpness batch
            (256 images), so other sizes are for tests.
        model_kwargs: timm overrides (tests run tiny sizes on a CPU).
    """
    target = torch.device(device or "cuda")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        passes = {}
        for architecture in sorted(set(ZOO_ARCHITECTURE.values())):
            model = build_zoo_architecture(architecture, target, model_kwargs)
            passes[architecture] = pass_seconds(model, target, batch_size, repeats)
            del model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    zoos = {}
    for zoo, n_models in ZOO_MODELS.items():
        times = passes[ZOO_ARCHITECTURE[zoo]]
        per_model = model_seconds(zoo, times["forward"], times["forward_backward"])
        zoos[zoo] = {"models": n_models, **per_model, "gpu_hours": n_models * per_model["total_s"] / 3600}
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu"
    return {"device": name, "precision": "float32, TF32 off", "batch_size": batch_size, "passes": passes,
            "zoos": zoos}


def print_result(result: dict[str, Any]) -> None:
    print(f"setting: {result['setting']}")
    print(f"passes (forward, backward) per call: {result['passes']}")
    print(f"median seconds: { {name: round(value, 4) for name, value in result['seconds'].items()} }")
    for key, bound in (*((k, f'<= {v}') for k, v in TARGETS_AT_MOST.items()),
                       *((k, f'>= {v}') for k, v in TARGETS_AT_LEAST.items())):
        spread = result["spread"][key]
        print(f"{key} (target {bound}): {result[key]:.3f} (rounds {spread['min']:.3f} .. {spread['max']:.3f})")
    if "zoo_decoded_img_s_per_worker" in result:
        print(f"zoo_decoded_img_s_per_worker: {result['zoo_decoded_img_s_per_worker']:.0f}")


def print_projection(projection: dict[str, Any]) -> None:
    print(f"\nZoo projection on {projection['device']} ({projection['precision']}, batch {projection['batch_size']})")
    for architecture, times in projection["passes"].items():
        print(f"{architecture}: forward {times['forward'] * 1e3:.1f} ms, forward+backward "
              f"{times['forward_backward'] * 1e3:.1f} ms per batch")
    for zoo, row in projection["zoos"].items():
        print(f"{zoo:<13} {row['models']:>3} models x ({row['sharpness_s']:.0f} s sharpness + {row['errors_s']:.0f} s "
              f"errors) = {row['gpu_hours']:.2f} GPU-hours")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the tiny ViT at 224 pixels (slow on a CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--gpu", action="store_true", help="also project the zoos' GPU-hours (needs CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        # On a CPU shared with other jobs, more threads than free cores make every op wait for the slowest thread.
        torch.set_num_threads(args.threads)
    print_result(measure(quick=not args.full, device=args.device))
    if args.gpu:
        print_projection(gpu_projection())


if __name__ == "__main__":
    main()
