"""Benchmarks of lit_sharp, each a ratio against a baseline measured side by side in this process.

``python bench/run.py --quick`` (CPU, a few minutes) prints a table and then the line
``ratios: lightning_overhead=X dataloader_img_s_per_worker=Y sam_step=Z compiled_vs_eager=C sharpness_vs_floor=W
device_aug_ops=N`` (N: ATen ops per 128-image batch of the device augmentation, ``bench_augment.py``).
Without ``--quick`` (needs a GPU) it also measures the campaign figures of ``bench_gpu.py``. Both write
``bench/results/<date>-<device>.json`` with the machine, versions and command.

``python bench/run.py --gpu-check [--dry-run] [--steps N] [--models resnet18,simplevit]`` runs the short GPU check of
``gpu_check.py`` instead (sync-free steady state, falling loss, resume, images/s, MFU, projected grid time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_augment  # noqa: E402
import bench_sam  # noqa: E402
import bench_sharpness  # noqa: E402
import bench_training  # noqa: E402
import bench_zoo  # noqa: E402

TARGETS = {"lightning_overhead": 1.05, "sam_step": 2.1, "sharpness_vs_floor": 1.10, "device_aug_ops": 120,
           **bench_zoo.TARGETS_AT_MOST}
#: Targets that a value must reach rather than stay under (throughput ratios).
TARGETS_AT_LEAST = dict(bench_zoo.TARGETS_AT_LEAST)
ZOO_KEYS = ("zoo_sharpness_vs_floor", "zoo_error_pass_vs_bare", "zoo_decoded_img_s_per_worker")


def _machine() -> dict[str, str]:
    import lightning

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "threads": str(torch.get_num_threads()), "command": " ".join(sys.argv)}


def cpu_ratios(quick: bool, zoo: dict | None = None) -> dict[str, float]:
    """The CPU ratios; ``zoo``, when given, receives the zoo bench's whole result (spreads, passes, setting)."""
    training = bench_training.measure(quick=quick)
    sam = bench_sam.measure(quick=quick, device="cpu")
    compiled = bench_sam.measure_compiled(quick=quick, device="cpu")
    sharp = bench_sharpness.measure(quick=quick, device="cpu")
    zoo_result = bench_zoo.measure(quick=quick, device="cpu")
    if zoo is not None:
        zoo.update(zoo_result)
    return {
        "lightning_overhead": training["lightning_overhead"],
        "dataloader_img_s_per_worker": training["dataloader_img_s_per_worker"],
        "sam_step": sam["sam_step"],
        "sam_rho0_step": sam["sam_rho0_step"],
        "compiled_vs_eager": compiled["compiled_vs_eager"],
        "sharpness_vs_floor": float(sharp["sharpness_vs_floor"]),
        "average_vs_floor": float(sharp["average_vs_floor"]),
        "device_aug_ops": bench_augment.measure()["device_aug_ops"],
        **{key: float(zoo_result[key]) for key in ZOO_KEYS},
    }


def _print_table(ratios: dict[str, float]) -> None:
    print(f"{'measure':<30} {'value':>10} {'target':>8}  met")
    for key, value in ratios.items():
        if key in TARGETS_AT_LEAST:
            bound, met = f">= {TARGETS_AT_LEAST[key]}", "yes" if value >= TARGETS_AT_LEAST[key] else "NO"
        elif key in TARGETS:
            bound, met = f"<= {TARGETS[key]}", "yes" if value <= TARGETS[key] else "NO"
        else:
            bound, met = "", ""
        print(f"{key:<30} {value:>10.4g} {bound:>8}  {met}")


def _print_gpu(results: dict) -> None:
    print(f"\nGPU: {results['device']}")
    for row in results["rows"]:
        extra = "" if "img_s" not in row else f"  {row['img_s']:,.0f} img/s" + (
            f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "")
        target = "" if row.get("target") is None else f"  (target <= {row['target']})"
        print(f"{row['what']:<40} {row['value']:>10.1f} {row['unit']}{target}{extra}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu-check" in argv:
        import gpu_check

        return gpu_check.main([arg for arg in argv if arg != "--gpu-check"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU ratios only, small sizes (a few minutes)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON record")
    parser.add_argument("--gpu-check", action="store_true", help="the short GPU check of gpu_check.py (see above)")
    args = parser.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("error: the full benchmark needs a CUDA device; use --quick on a CPU", file=sys.stderr)
        return 2
    record: dict = {"machine": _machine(), "date": dt.date.today().isoformat()}
    zoo: dict = {}
    ratios = cpu_ratios(quick=args.quick, zoo=zoo) if args.quick else {}
    if zoo:
        record["zoo"] = zoo
    if not args.quick:
        import bench_gpu

        record["gpu"] = bench_gpu.measure()
        _print_gpu(record["gpu"])
        record["zoo_gpu"] = bench_zoo.gpu_projection()
        bench_zoo.print_projection(record["zoo_gpu"])
    record["ratios"] = ratios
    if ratios:
        _print_table(ratios)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{record['date']}-{record['machine']['device'].split(' (')[0].replace(' ', '_')}.json"
    (args.out / name).write_text(json.dumps(record, indent=2))
    print(f"written {args.out / name}")
    if ratios:
        keys = ("lightning_overhead", "dataloader_img_s_per_worker", "sam_step", "compiled_vs_eager",
                "sharpness_vs_floor")
        print("ratios: " + " ".join(f"{key}={ratios[key]:.3f}" for key in keys)
              + f" device_aug_ops={ratios['device_aug_ops']}")
        print("zoo: " + " ".join(f"{key}={ratios[key]:.3f}" for key in ZOO_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
