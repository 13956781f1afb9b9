"""The benchmarks' code paths, run on the CPU at toy sizes so the scripts are known to work before a GPU runs them,
and their ratios held to plausible bands (wide: the machine is shared; each ratio is retried a few times, so that a
slow spell does not fail it, while a benchmark that does the wrong amount of work fails every try)."""

import sys
import time

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_gpu  # noqa: E402

TINY_RESNET = {"width": 4, "blocks_per_stage": 1}
TRIES = 3


def _first_in_bands(measure, bands):
    """Measure up to TRIES times; return the first result whose ratios all lie in their bands, else the last."""
    for _ in range(TRIES):
        result = measure()
        if all(low <= result[key] <= high for key, (low, high) in bands.items()):
            break
    return result


def _pass_counter(model):
    """Count forward passes and the backward passes through the logits; time-stamp the forwards."""
    counts = {"forward": 0, "backward": 0, "times": []}

    def on_forward(module, args, output):
        counts["forward"] += 1
        counts["times"].append(time.perf_counter())
        if output.requires_grad:
            output.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

    model.register_forward_hook(on_forward)
    return counts


def test_training_flops_of_a_linear_model_match_the_closed_form(monkeypatch):
    # A Linear(d, k) classifier: forward 2dk flops per image; backward only the weight gradient, another 2dk
    # (the input needs no gradient); bias and loss terms are not matmuls and are not counted.
    monkeypatch.setitem(bench_gpu.MODELS, "linear", lambda: torch.nn.Sequential(torch.nn.Flatten(),
                                                                                 torch.nn.Linear(3 * 32 * 32, 10)))
    flops = bench_gpu.train_flops_per_image("linear", device="cpu")
    d, k = 3 * 32 * 32, 10
    assert flops == pytest.approx(2 * d * k + 2 * d * k)


def _counted_resnet(monkeypatch):
    """Make bench_gpu build its ResNet with a pass counter; returns the counts of the models it builds."""
    build, counts = bench_gpu.MODELS["resnet18"], []

    def counted(**kwargs):
        model = build(**kwargs)
        counts.append(_pass_counter(model))
        return model

    monkeypatch.setitem(bench_gpu.MODELS, "resnet18", counted)
    return counts


def test_throughput_times_the_sam_steps_of_the_real_training_path(monkeypatch, one_thread):
    built = _counted_resnet(monkeypatch)
    steps, warmup = 2, 1
    img_s = bench_gpu.throughput("resnet18", sam=True, precision="32-true", steps=steps, warmup=warmup, device="cpu",
                                 n_images=512, **TINY_RESNET)
    (counts,) = built
    # SAM: two forward and two backward passes per step.
    assert (counts["forward"], counts["backward"]) == (2 * (warmup + steps), 2 * (warmup + steps))
    # The timed span (from before the first timed step to the end) holds the timed steps' passes.
    assert steps * bench_gpu.BATCH / img_s >= counts["times"][-1] - counts["times"][2 * warmup]


def test_preset_timing_runs_every_spec_of_the_preset_with_its_passes(monkeypatch, one_thread):
    from lit_sharp.sharpness import preset, sharpness

    built, results = _counted_resnet(monkeypatch), {}
    monkeypatch.setattr(bench_gpu, "sharpness",
                        lambda model, batches, spec: results.setdefault(spec.name, sharpness(model, batches, spec)))
    n_iters, n_samples, n_batches = 2, 3, 2
    seconds = bench_gpu.preset_seconds("resnet18", device="cpu", n_batches=n_batches, batch_size=4,
                                       preset_kwargs={"n_iters": n_iters, "n_samples": n_samples}, **TINY_RESNET)
    specs = preset("paper_resnet18")
    assert set(results) == {spec.name for spec in specs} and len(specs) == len(results)
    # Per batch: worst case n_iters + 1 forward and n_iters backward passes, average case n_samples + 1 forward.
    n_worst = sum(spec.kind == "worst" for spec in specs)
    n_average = sum(spec.kind == "average" for spec in specs)
    assert n_worst + n_average == len(specs)
    (counts,) = built
    assert counts["forward"] == n_batches * (n_worst * (n_iters + 1) + n_average * (n_samples + 1))
    assert counts["backward"] == n_batches * n_worst * n_iters
    assert all(result.value == result.value for result in results.values())  # real values, no NaN
    assert seconds >= counts["times"][-1] - counts["times"][0]  # the returned time spans the work


def test_sam_step_costs_about_two_sgd_steps_and_rho0_one(one_thread):
    import bench_sam

    bands = {"sam_step": (1.5, 3.0), "sam_rho0_step": (0.7, 1.4)}
    result = _first_in_bands(lambda: bench_sam.measure(quick=True, device="cpu", batch_size=32), bands)
    assert all(low <= result[key] <= high for key, (low, high) in bands.items()), result


def test_sharpness_costs_about_its_floor_of_passes(one_thread, monkeypatch):
    import bench_sharpness

    # Toy sizes: width 4, one block per stage, one batch of 32, 10 iterations and 10 samples, 3 repetitions.
    monkeypatch.setattr(bench_sharpness, "QUICK", (4, 1, 1, 10, 3))
    monkeypatch.setattr(bench_sharpness, "BATCH_SIZE", 32)
    monkeypatch.setattr(bench_sharpness, "N_ITERS", 10)
    # Worst case: n_iters + 1 forward and n_iters backward passes over a floor of n_iters + 1 forward+backward ones;
    # average case: n_samples + 1 forward passes over n_samples.
    bands = {"sharpness_vs_floor": (0.7, 1.5), "average_vs_floor": (0.8, 1.8)}
    result = _first_in_bands(lambda: bench_sharpness.measure(quick=True, device="cpu"), bands)
    assert all(low <= result[key] <= high for key, (low, high) in bands.items()), result


def test_compiled_sam_step_is_timed_against_eager_without_recompiling(one_thread):
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

    # One thread, as the in-process tests (one_thread): two on a shared 2-core machine wait on each other.
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
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
    # On a CPU the host reads of the checked steps are counted: none in steps 1, 3, 4 (step 0 warms up; at 2 and 5,
    # ends of an epoch, the logger flushes; test_gpu_check_sync_check_fails_on_a_host_read_in_the_step shows that a
    # read in the step is seen).
    assert all(r["sync"] == "ok (3 steps with no host read)" and r["img_s"] > 0 for r in check["runs"])
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


def _dry_run_data(tmp_path):
    import gpu_check

    return gpu_check.learnable_data(gpu_check.DRY, tmp_path / "data")


def test_gpu_check_sync_check_fails_on_a_host_read_in_the_step(monkeypatch, tmp_path, one_thread):
    import gpu_check

    from lit_sharp.module import ClassifierModule

    step = ClassifierModule.training_step

    def step_that_reads_the_loss(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        float(loss)  # what a stray .item() in the step does: the host waits for the device
        return loss

    monkeypatch.setattr(ClassifierModule, "training_step", step_that_reads_the_loss)
    probe, status = gpu_check._train_checked("resnet18", False, "32-true", gpu_check.DRY, _dry_run_data(tmp_path),
                                             tmp_path / "run")
    assert status.startswith("FAILED: host reads in checked steps"), status
    # Every checked step (1, 3 and 4 of 0..5: the due ones are 2 and 5) saw the read, and only the checked ones.
    assert sorted(probe.host_reads) == [1, 3, 4] and probe.checked_steps == 3
    assert all(reads.get("_local_scalar_dense") == 1 for reads in probe.host_reads.values()), probe.host_reads
    record = {"runs": [{"sync": status, "loss_falls": True}], "resume": []}
    assert not gpu_check.passed(record, enforce_loss=True)


def test_gpu_check_resume_check_fails_when_the_resumed_run_leaves_the_trajectory(tmp_path, one_thread):
    import gpu_check

    data, workdir = _dry_run_data(tmp_path), tmp_path / "run"
    uninterrupted = gpu_check.train("resnet18", True, "bf16-mixed", gpu_check.DRY, data, workdir, check_syncs=False,
                                    save_after_epoch=1).loss_list()
    assert gpu_check._resume("resnet18", gpu_check.DRY, data, workdir, uninterrupted)["ok"]
    # A checkpoint that does not hold the run's weights: the classifier's weights scaled tenfold.
    checkpoint = torch.load(workdir / "mid.ckpt", weights_only=False)
    checkpoint["state_dict"]["model.linear.weight"] *= 10
    torch.save(checkpoint, workdir / "mid.ckpt")
    resumed = gpu_check._resume("resnet18", gpu_check.DRY, data, workdir, uninterrupted)
    assert resumed["resumed_at_step"] == 4 and not resumed["ok"], resumed
    assert resumed["first_step_rel_diff"] > gpu_check.RESUME_FIRST_STEP_RTOL
    assert not gpu_check.passed({"runs": [], "resume": [resumed]}, enforce_loss=True)


def test_gpu_check_loss_check_compares_the_first_and_last_windows():
    import gpu_check

    window = gpu_check.LOSS_WINDOW
    # 3 * window steps: the first window's mean is 2, the last window's 2 * (1 - drop), the middle ones other values.
    for drop, falls in ((0.05, True), (0.2, True), (0.049, False), (0.0, False), (-0.1, False)):
        losses = [2.0] * window + [5.0] * window + [2.0 * (1 - drop)] * window
        first, last, verdict = gpu_check.loss_check(dict(enumerate(losses)))
        assert (first, verdict) == (2.0, falls) and last == pytest.approx(2.0 * (1 - drop))
    # Fewer than 2 * window steps: half of them on each side (6 steps: 3 and 3).
    assert gpu_check.loss_check(dict(enumerate([3.0, 3.0, 3.0, 1.0, 1.0, 1.0])))[:2] == (3.0, 1.0)
    flat = {"runs": [{"sync": "ok", "loss_falls": False}], "resume": []}
    assert not gpu_check.passed(flat, enforce_loss=True) and gpu_check.passed(flat, enforce_loss=False)
