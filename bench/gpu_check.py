"""GPU check of the training path, short enough to run on any GPU before a campaign (a few minutes on an H200).

``python bench/run.py --gpu-check`` (or ``python bench/gpu_check.py``) trains both paper models (PreAct ResNet-18,
SimpleViT), plain SGD and SAM (rho 0.05), in bf16-mixed and 32-true, for ``steps`` steps each through the real
training path (Lightning ``Trainer``, ``ClassifierModule``, the device-resident pipeline with RandAugment and mixup
0.5, the CSV logger and the progress bar at their defaults) on learnable synthetic CIFAR-size data, and checks:

- no host sync in the steady state: from step ``warmup`` on, every step in which no host read is due runs under
  ``torch.cuda.set_sync_debug_mode("error")`` (from the start of its batch to the start of the next, so the data
  pipeline's next batch, the logging and the progress bar count). Due reads, not checked: the NaN check every
  ``check_finite_every`` steps (25, the GPU default) and the logger flush every ``log_every_n_steps`` (50), and the
  end of each epoch. A sync raises; the run is recorded as failed and repeated without the check for its timing;
- the loss falls: the mean training loss of the last 20 steps is at least 5% below that of the first 20;
- a resumed run continues the same trajectory: a checkpoint taken at the end of the second-to-last epoch of the
  SAM bf16-mixed run is resumed in a new ``Trainer``; the loss of its first step must match the uninterrupted run's
  to 1e-2 relative (same weights, batch and mixup draw; only nondeterministic GPU kernels differ) and the mean loss
  of the resumed steps to 5% relative (bf16 rounding differences grow over steps, they do not change the course);

and measures steady-state images/s, MFU (training FLOPs per image from ``torch.utils.flop_counter`` x images/s over
the GPU's peak dense throughput), the paper sharpness preset's time per model (in IEEE float32, as measurements
run, and with TF32 allowed: the cost of that setting), and projects the time of a 200-epoch run and the GPU-hours of
both 204-run grids, each beside its target (``docs/performance.md``). Results go
to ``bench/results/<date>-<gpu>.json`` (key ``gpu_check``) and one ``gpu_check:`` summary line; the exit status is
0 when every check passed.

``--dry-run`` runs every code path on the CPU at toy sizes (tiny models, a few steps): the tests use it. There the
sync check counts, over the same steps, the ops that would make a GPU host wait (``host_reads.py``, as the step's
own test does: ``set_sync_debug_mode`` exists for CUDA only) and fails on any; the loss-falls verdict is not enforced
(six steps are too few); the resume check is enforced (on a CPU it must hold to rounding). The verdicts are functions
of the measured data (:func:`sync_check`, :func:`loss_check`, :func:`resume_check`, :func:`passed`).

Imports: torch, Lightning, numpy, torchvision (the device pipeline), filelock, and ``lit_sharp`` modules that need
nothing else; no Hydra, omegaconf, W&B or submitit. The ViT's module is imported only when the ViT is built.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):  # bench/ for bench_gpu, the repository root for lit_sharp
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import bench_gpu  # noqa: E402
from host_reads import HostReadCounter  # noqa: E402
from lit_sharp.data.device_loader import DeviceTrainLoader  # noqa: E402
from lit_sharp.data.reading import load_cifar10  # noqa: E402
from lit_sharp.data.synthetic import write_synthetic  # noqa: E402
from lit_sharp.module import ClassifierModule  # noqa: E402
from lit_sharp.progress import LoggedStepProgressBar  # noqa: E402

#: Paper peak learning rates (configs/experiment/paper_*.yaml).
PEAK_LR = {"resnet18": 0.1, "simplevit": 0.03125}
#: The GPU default of ``module.check_finite_every`` (lit_sharp.config, not imported here: it needs omegaconf).
CHECK_FINITE_EVERY = 25
SAM_RHO, MIXUP_ALPHA = 0.05, 0.5
LOSS_WINDOW, MIN_LOSS_DROP = 20, 0.05
RESUME_FIRST_STEP_RTOL, RESUME_MEAN_RTOL = 1e-2, 0.05
PRECISIONS = ("bf16-mixed", "32-true")
GRID_RUNS = {False: 68, True: 136}  # per 204-run grid: a third plain SGD, two thirds SAM (rho 0.05 and 0.1)


@dataclass(frozen=True)
class Sizes:
    """How much the check does; ``FULL`` on a GPU, ``DRY`` on a CPU for the tests."""

    device: str
    steps: int
    warmup: int
    batch: int
    n_images: int
    log_every: int
    preset_batches: int
    preset_batch: int
    model_kwargs: dict[str, dict[str, int]] = field(default_factory=dict)
    preset_kwargs: dict[str, int] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_images // self.batch


FULL = Sizes("cuda", steps=300, warmup=30, batch=128, n_images=12_800, log_every=50, preset_batches=8, preset_batch=128,
             model_kwargs={"resnet18": {}, "simplevit": {}})
DRY = Sizes("cpu", steps=6, warmup=1, batch=8, n_images=16, log_every=3, preset_batches=1, preset_batch=2,
            model_kwargs={"resnet18": {"width": 4, "blocks_per_stage": 1},
                          "simplevit": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "dim_head": 8}},
            preset_kwargs={"n_iters": 1, "n_samples": 1})


class MidRunCheckpoint(ModelCheckpoint):
    """The training runs' own checkpointing (``lit_sharp.assembly.checkpointing``: at an epoch's end), every
    ``every_n_epochs``, timing itself so that the throughput can leave it out."""

    def __init__(self, dirpath: Path, every_n_epochs: int) -> None:
        super().__init__(dirpath=str(dirpath), filename="mid", save_top_k=1, monitor=None, every_n_epochs=every_n_epochs,
                         save_on_train_epoch_end=True, enable_version_counter=False)
        self.seconds = 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        began = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.seconds += time.perf_counter() - began


class CheckProbe(pl.Callback):
    """Per-step losses (kept on the device), steady-state timing and sync-check windows.

    One callback, so that the order of its parts is fixed: the sync-debug mode is off whenever it syncs itself. On a
    CUDA device a window runs under ``set_sync_debug_mode("error")``; elsewhere a :class:`HostReadCounter` counts the
    host reads of each window into ``host_reads`` (step -> op -> count).
    """

    def __init__(self, sizes: Sizes, check_syncs: bool, checkpoint: MidRunCheckpoint | None = None) -> None:
        self.sizes, self.check_syncs, self.checkpoint = sizes, check_syncs, checkpoint
        self.losses: dict[int, torch.Tensor] = {}
        self.checked_steps = 0
        self.start: float | None = None
        self.seconds = 0.0
        self._step = 0
        self._counter = HostReadCounter() if check_syncs and sizes.device != "cuda" else None
        self._counting = False
        self.host_reads: dict[int, dict[str, int]] = {}

    def _sync_mode(self, mode: str) -> None:
        if self._counter is not None:
            self._counter.step = self._step if mode == "error" else None
        elif self.check_syncs:
            torch.cuda.set_sync_debug_mode(mode)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._counter is not None:
            self._counter.__enter__()
            self._counting = True

    def _stop_counting(self) -> None:
        if self._counting:
            self._counter.__exit__(None, None, None)
            self._counting = False
            self.host_reads = {step: dict(ops) for step, ops in self._counter.counts.items() if ops}

    def _drain(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = self._step = trainer.global_step
        self._sync_mode("default")
        if step == self.sizes.warmup and self.start is None:
            self._drain(pl_module)
            self.start = time.perf_counter()
        due = (step + 1) % CHECK_FINITE_EVERY == 0 or (step + 1) % trainer.log_every_n_steps == 0
        if step >= self.sizes.warmup and not due:
            self.checked_steps += self.check_syncs
            self._sync_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[self._step] = loss.detach()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync_mode("default")  # before the checkpoint callback, which runs after the others

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync_mode("default")
        self._stop_counting()
        self._drain(pl_module)
        if self.start is not None:
            excluded = self.checkpoint.seconds if self.checkpoint is not None else 0.0
            self.seconds = time.perf_counter() - self.start - excluded

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._sync_mode("default")
        self._stop_counting()

    def loss_list(self) -> dict[int, float]:
        steps = sorted(self.losses)
        values = torch.stack([self.losses[s].float() for s in steps]).cpu().tolist()
        return dict(zip(steps, values))


def build_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """A paper model by name (the ViT's module is imported only here, when it is built)."""
    return bench_gpu.MODELS[name](**kwargs)


def train(name: str, sam: bool, precision: str, sizes: Sizes, data: tuple[np.ndarray, np.ndarray], workdir: Path, *,
          check_syncs: bool, save_after_epoch: int | None = None, resume_from: Path | None = None) -> CheckProbe:
    """``sizes.steps`` training steps of one configuration; the probe holds losses, timing and the sync count."""
    torch.manual_seed(0)
    on_gpu = sizes.device == "cuda"
    channels_last = name == "resnet18" and on_gpu
    loader = DeviceTrainLoader(*data, batch_size=sizes.batch, augment=True, seed=0, device=sizes.device,
                               drop_last=True, channels_last=channels_last)
    module = ClassifierModule(build_model(name, **sizes.model_kwargs[name]), lr=PEAK_LR[name],
                              sam_rho=SAM_RHO if sam else 0.0, mixup_alpha=MIXUP_ALPHA,
                              check_finite_every=CHECK_FINITE_EVERY, channels_last=channels_last)
    # Saved at the end of 0-based epoch save_after_epoch only: the runs have save_after_epoch + 2 epochs.
    checkpoint = MidRunCheckpoint(workdir, save_after_epoch + 1) if save_after_epoch is not None else None
    probe = CheckProbe(sizes, check_syncs, checkpoint)
    callbacks = [probe, LoggedStepProgressBar(), *([checkpoint] if checkpoint else [])]
    trainer = pl.Trainer(accelerator="cuda" if on_gpu else "cpu", devices=1, precision=precision,
                         # max_epochs, as the study's runs: resuming an end-of-epoch checkpoint with max_steps makes
                         # Lightning 2.6 run one more batch in the finished epoch.
                         max_epochs=sizes.steps // sizes.steps_per_epoch, log_every_n_steps=sizes.log_every,
                         enable_checkpointing=checkpoint is not None,
                         logger=CSVLogger(str(workdir), name="csv"), callbacks=callbacks,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=str(workdir))
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume_from) if resume_from else None)
    return probe


def _train_checked(name: str, sam: bool, precision: str, sizes: Sizes, data, workdir: Path,
                   **kwargs: Any) -> tuple[CheckProbe, str]:
    """Train under the sync check; after a sync error, record it and train again without the check for timing."""
    on_gpu = sizes.device == "cuda"
    try:
        probe = train(name, sam, precision, sizes, data, workdir, check_syncs=True, **kwargs)
    except RuntimeError as error:
        if not on_gpu or "synchroniz" not in str(error).lower():
            raise
        torch.cuda.set_sync_debug_mode("default")
        probe = train(name, sam, precision, sizes, data, workdir, check_syncs=False, **kwargs)
        return probe, sync_check(0, {}, error=str(error))
    return probe, sync_check(probe.checked_steps, probe.host_reads, on_gpu=on_gpu)


def sync_check(checked_steps: int, host_reads: dict[int, dict[str, int]], *, error: str | None = None,
               on_gpu: bool = True) -> str:
    """The sync verdict: ``FAILED: ...`` after a sync error (CUDA) or any host read counted (CPU), else ``ok (...)``.

    Args:
        checked_steps: steps run under the check.
        host_reads: step -> op -> count, of the checked windows (the CPU's count; empty on a GPU).
        error: the sync-debug mode's error, if one was raised.
        on_gpu: whether the steps ran under ``set_sync_debug_mode("error")`` (else the host reads were counted).
    """
    if error is not None:
        return f"FAILED: {error.splitlines()[0]}"
    if host_reads:
        return f"FAILED: host reads in checked steps {host_reads}"
    how = "under error mode" if on_gpu else "with no host read"
    return f"ok ({checked_steps} steps {how})"


def loss_check(losses: dict[int, float]) -> tuple[float, float, bool]:
    """``(first, last, falls)``: the mean loss of the first and of the last ``LOSS_WINDOW`` steps (half of them when
    fewer than ``2 * LOSS_WINDOW``), and whether ``last <= (1 - MIN_LOSS_DROP) * first``."""
    values = [losses[s] for s in sorted(losses)]
    window = max(1, min(LOSS_WINDOW, len(values) // 2))
    first, last = statistics.fmean(values[:window]), statistics.fmean(values[-window:])
    return first, last, last <= (1 - MIN_LOSS_DROP) * first


def resume_check(uninterrupted: dict[int, float], resumed: dict[int, float]) -> dict[str, Any]:
    """Whether the resumed steps' losses follow the uninterrupted run's: the first step to ``RESUME_FIRST_STEP_RTOL``
    relative, the mean over the resumed steps to ``RESUME_MEAN_RTOL`` relative.

    Args:
        uninterrupted: step -> loss of the run that was not stopped.
        resumed: step -> loss of the run resumed from its checkpoint (a suffix of the same steps).
    """
    steps = sorted(resumed)
    first_diff = abs(resumed[steps[0]] - uninterrupted[steps[0]]) / abs(uninterrupted[steps[0]])
    mean_a = statistics.fmean(uninterrupted[s] for s in steps)
    mean_diff = abs(statistics.fmean(resumed.values()) - mean_a) / abs(mean_a)
    return {"resumed_at_step": steps[0], "steps": len(steps), "first_step_rel_diff": first_diff,
            "mean_rel_diff": mean_diff, "tolerances": [RESUME_FIRST_STEP_RTOL, RESUME_MEAN_RTOL],
            "ok": first_diff <= RESUME_FIRST_STEP_RTOL and mean_diff <= RESUME_MEAN_RTOL}


def _resume(name: str, sizes: Sizes, data, workdir: Path, uninterrupted: dict[int, float]) -> dict[str, Any]:
    resumed = train(name, True, "bf16-mixed", sizes, data, workdir / "resumed", check_syncs=False,
                    resume_from=workdir / "mid.ckpt").loss_list()
    return {"model": name, **resume_check(uninterrupted, resumed)}


def learnable_data(sizes: Sizes, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic CIFAR-size images with class structure (:mod:`lit_sharp.data.synthetic`), so the loss can fall."""
    write_synthetic(root, seed=0, n_train=sizes.n_images, n_test=10, n_corrupt=1)
    return load_cifar10(root, train=True)


def run_check(sizes: Sizes, models: tuple[str, ...] = ("resnet18", "simplevit")) -> dict[str, Any]:
    """Every check and measurement; returns the record written to ``bench/results``."""
    dry = sizes.device != "cuda"
    epochs = sizes.steps // sizes.steps_per_epoch
    save_after = epochs - 2  # 0-based: the end of the second-to-last epoch; the resumed run does the last one
    assert epochs == 3, "the resume check is laid out for 3 epochs"
    record: dict[str, Any] = {"sizes": {k: v for k, v in vars(sizes).items() if not k.endswith("kwargs")},
                              "runs": [], "resume": [], "preset": {}, "projection": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = learnable_data(sizes, Path(tmp) / "data")
        for name in models:
            flops = bench_gpu.train_flops_per_image(name, device=sizes.device, **sizes.model_kwargs[name])
            for sam in (False, True):
                for precision in PRECISIONS:
                    workdir = Path(tmp) / f"{name}-{int(sam)}-{precision}"
                    resume_source = sam and precision == "bf16-mixed"
                    probe, sync = _train_checked(name, sam, precision, sizes, data, workdir,
                                                 save_after_epoch=save_after if resume_source else None)
                    losses = probe.loss_list()
                    first, last, falls = loss_check(losses)
                    img_s = (sizes.steps - sizes.warmup) * sizes.batch / probe.seconds
                    peak = bench_gpu._peak(precision)
                    record["runs"].append({
                        "model": name, "sam": sam, "precision": precision, "sync": sync, "loss_first": first,
                        "loss_last": last, "loss_falls": falls, "img_s": img_s,
                        "mfu": img_s * flops * (2 if sam else 1) / (peak * 1e12) if peak else None,
                        "run_200_epochs_s": bench_gpu.EPOCHS * bench_gpu.TRAIN_IMAGES / img_s,
                        "target_s": bench_gpu.TARGETS_S_200_EPOCHS[(name, sam)] if precision == "bf16-mixed" else None,
                    })
                    if resume_source:
                        record["resume"].append(_resume(name, sizes, data, workdir, losses))
            record["preset"][name] = {
                "seconds": bench_gpu.preset_seconds(name, device=sizes.device, n_batches=sizes.preset_batches,
                                                    batch_size=sizes.preset_batch, preset_kwargs=sizes.preset_kwargs,
                                                    **sizes.model_kwargs[name]),
                "target_s": bench_gpu.TARGETS_PRESET_S[name]}
            # The same preset with TF32 allowed: what measuring in IEEE float32 costs.
            record["preset"][name]["seconds_tf32"] = bench_gpu.preset_seconds(
                name, device=sizes.device, n_batches=sizes.preset_batches, batch_size=sizes.preset_batch,
                preset_kwargs=sizes.preset_kwargs, tf32=True, **sizes.model_kwargs[name])
    record["projection"] = _projection(record)
    record["passed"] = passed(record, enforce_loss=not dry)
    return record


def _projection(record: dict[str, Any]) -> dict[str, Any]:
    """GPU-hours of both grids at bf16-mixed, one run at a time per GPU: runs x (training + sharpness preset)."""
    hours = 0.0
    for row in record["runs"]:
        if row["precision"] == "bf16-mixed":
            preset_s = record["preset"][row["model"]]["seconds"]
            hours += GRID_RUNS[row["sam"]] * (row["run_200_epochs_s"] + preset_s) / 3600
    return {"both_grids_gpu_hours": hours, "target_gpu_hours": 48}


def passed(record: dict[str, Any], enforce_loss: bool) -> bool:
    """Every run free of syncs, every resume on course and, when ``enforce_loss``, every run's loss falling."""
    syncs_ok = all(not row["sync"].startswith("FAILED") for row in record["runs"])
    loss_ok = all(row["loss_falls"] for row in record["runs"]) or not enforce_loss
    return syncs_ok and loss_ok and all(r["ok"] for r in record["resume"])


def summary_line(record: dict[str, Any]) -> str:
    """One line: verdicts, then seconds per 200-epoch bf16 run, preset seconds and grid GPU-hours (targets in JSON)."""
    runs = record["runs"]
    ok_syncs = sum(not r["sync"].startswith("FAILED") for r in runs)
    parts = [f"passed={'yes' if record['passed'] else 'NO'}", f"sync_free={ok_syncs}/{len(runs)}",
             f"loss_falls={sum(r['loss_falls'] for r in runs)}/{len(runs)}",
             f"resume={sum(r['ok'] for r in record['resume'])}/{len(record['resume'])}"]
    for r in runs:
        if r["precision"] == "bf16-mixed":
            parts.append(f"{r['model']}_{'sam' if r['sam'] else 'plain'}_200ep_s={r['run_200_epochs_s']:.0f}")
    parts += [f"preset_{name}_s={p['seconds']:.1f}" for name, p in record["preset"].items()]
    parts += [f"preset_{name}_tf32_s={p['seconds_tf32']:.1f}" for name, p in record["preset"].items()]
    parts.append(f"grid_gpu_hours={record['projection']['both_grids_gpu_hours']:.1f}")
    return "gpu_check: " + " ".join(parts)


def write_record(record: dict[str, Any], out: Path) -> Path:
    """Add the check to ``<out>/<date>-<device>.json`` (the file the full benchmark of that day also writes)."""
    import lightning

    on_gpu = torch.cuda.is_available() and record["sizes"]["device"] == "cuda"
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    date = dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{date}-{device.replace(' ', '_')}.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing.setdefault("machine", {"device": device, "torch": torch.__version__, "lightning": lightning.__version__,
                                    "python": sys.version.split()[0]})
    existing["date"] = date
    existing["gpu_check"] = {**record, "command": " ".join(sys.argv)}
    path.write_text(json.dumps(existing, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every code path on the CPU at toy sizes")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per configuration, a multiple of 3 (3 epochs; default 300)")
    parser.add_argument("--models", default="resnet18,simplevit", help="comma-separated: resnet18, simplevit")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON record")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA device; --dry-run runs it on the CPU at toy sizes", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else FULL
    if args.steps:
        if args.steps % 3 or args.steps // 3 <= sizes.warmup // 3 + 1:
            parser.error(f"--steps must be a multiple of 3 (3 epochs: the resume check needs them) and > {sizes.warmup}")
        sizes = Sizes(**{**vars(sizes), "steps": args.steps, "n_images": args.steps // 3 * sizes.batch})
    record = run_check(sizes, tuple(args.models.split(",")))
    path = write_record(record, args.out)
    for row in record["runs"]:
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        print(f"{row['model']:<10} {'SAM' if row['sam'] else 'plain':<5} {row['precision']:<10} "
              f"{row['img_s']:>9,.0f} img/s{mfu}; loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}; "
              f"sync {row['sync']}")
    print(f"written {path}")
    print(summary_line(record))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
