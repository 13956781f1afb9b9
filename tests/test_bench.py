"""The GPU benchmark's code paths, run on the CPU at toy sizes so the script is known to work before a GPU runs it."""

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_gpu  # noqa: E402

TINY_RESNET = {"width": 4, "blocks_per_stage": 1}


def test_training_flops_of_a_linear_model_match_the_closed_form(monkeypatch):
    # A Linear(d, k) classifier: forward 2dk flops per image; backward only the weight gradient, another 2dk
    # (the input needs no gradient); bias and loss terms are not matmuls and are not counted.
    monkeypatch.setitem(bench_gpu.MODELS, "linear", lambda: torch.nn.Sequential(torch.nn.Flatten(),
                                                                                 torch.nn.Linear(3 * 32 * 32, 10)))
    flops = bench_gpu.train_flops_per_image("linear", device="cpu")
    d, k = 3 * 32 * 32, 10
    assert flops == pytest.approx(2 * d * k + 2 * d * k)


def test_throughput_runs_the_real_training_path():
    img_s = bench_gpu.throughput("resnet18", sam=True, precision="32-true", steps=2, warmup=1, device="cpu",
                                 n_images=512, **TINY_RESNET)
    assert img_s > 0


def test_preset_timing_covers_the_48_specs(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_gpu, "sharpness", lambda model, batches, spec: calls.append(spec.name))
    assert bench_gpu.preset_seconds("resnet18", device="cpu", n_batches=1, **TINY_RESNET) >= 0
    assert len(calls) == len(set(calls)) == 48


def test_compiled_sam_step_is_timed_against_eager_without_recompiling():
    import bench_sam

    result = bench_sam.measure_compiled(quick=True, device="cpu", backend="aot_eager", batch_size=8)
    assert result["compiled_vs_eager"] > 0 and result["eager_sam_step_ms"] > 0
    assert result["recompiles_after_warmup"] == 0


# Run in a child process in which these packages cannot be imported, as on a bare GPU machine (torch, Lightning,
# timm, torchmetrics, einops only). vit_pytorch is allowed for the full dry run only while lit_sharp.models.vit
# still imports it; the check itself imports the ViT's module only when it builds the ViT (next test).
_BLOCKER = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
imported = blocked & {name.split(".")[0] for name in sys.modules}
assert not imported, imported
"""
_NOT_ON_GPU_MACHINES = "hydra,omegaconf,wandb,submitit"


def _run_blocked(blocked, *command, cwd=REPO):
    import subprocess

    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _BLOCKER, blocked, *command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_gpu_check_dry_run_runs_every_path_without_hydra_omegaconf_wandb_or_submitit(tmp_path):
    import json

    result = _run_blocked(_NOT_ON_GPU_MACHINES, "bench/run.py", "--gpu-check", "--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("gpu_check: passed=yes") and "grid_gpu_hours=" in summary, summary
    (path,) = tmp_path.glob("*-cpu.json")
    check = json.loads(path.read_text())["gpu_check"]
    runs = {(r["model"], r["sam"], r["precision"]) for r in check["runs"]}
    assert runs == {(m, s, p) for m in ("resnet18", "simplevit") for s in (False, True)
                    for p in ("bf16-mixed", "32-true")}
    # set_sync_debug_mode exists for CUDA only: on a CPU that part is skipped, and says so.
    assert all(r["sync"].startswith("skipped") and r["img_s"] > 0 for r in check["runs"])
    # On a CPU the resumed run repeats the uninterrupted one exactly.
    assert [(r["model"], r["first_step_rel_diff"], r["mean_rel_diff"]) for r in check["resume"]] == [
        ("resnet18", 0.0, 0.0), ("simplevit", 0.0, 0.0)]
    assert all(p["seconds"] > 0 for p in check["preset"].values())
    assert check["projection"]["target_gpu_hours"] == 48 and check["projection"]["both_grids_gpu_hours"] > 0


def test_gpu_check_imports_the_vit_module_only_to_build_the_vit(tmp_path):
    script = tmp_path / "build_resnet.py"
    script.write_text("import sys\nsys.path.insert(0, 'bench')\nimport gpu_check\n"
                      "gpu_check.build_model('resnet18', width=4, blocks_per_stage=1)\n"
                      "assert 'lit_sharp.models.vit' not in sys.modules\n")
    result = _run_blocked(_NOT_ON_GPU_MACHINES + ",vit_pytorch", str(script))
    assert result.returncode == 0, result.stderr[-3000:]
