"""A zoo grid through the real entry point: three tiny AugReg models in the release's ``.npz`` layout, measured on tiny
evaluation sets in their real folder layouts; the records, a relaunch, a resumed measurement, the analysis, bad inputs.

Two models are measured in this process (``lit_sharp.train.run``), then ``python train.py -m`` runs the grid over all
three: the two measured models are skipped, the third is measured. The numbers are checked against references
computed here with torchvision's ImageFolder and transforms and the sharpness function on hand-picked batches.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import REPO, compose_config, subprocess_env
from torchvision import datasets, transforms
from wandb_offline import offline_runs, read_offline_run
from zoo_files import augreg_file_name, randomize_, save_augreg_npz, write_index, zoo_rows
from zoo_sets import write_eval_tree, write_image

from lit_sharp.errors import ConfigError, UserError
from lit_sharp.results import read_results
from lit_sharp.sharpness import preset, sharpness
from lit_sharp.train import run
from lit_sharp.zoo.__main__ import main as zoo_main
from lit_sharp.zoo.augreg import hparams_from_file_name
from lit_sharp.zoo.run import zoo_run_dir

#: A ViT-B/16 shrunk for a test (1000 classes, as every ImageNet model).
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
MODELS = [augreg_file_name("i1k", aug, wd, dropout, 0.01)
          for aug, wd, dropout in (("none", 0.03, 0.0), ("medium1", 0.1, 0.1), ("strong2", 0.1, 0.0))]
GRID = "zoo_augreg_in1k"
N_TRAIN_ERR, N_BATCHES, BATCH = 40, 2, 4
ABSENT = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "objectnet")


def tiny_overrides(zoo_root: Path, sets: Path, runs: Path, *extra: str) -> list[str]:
    """A zoo run small enough for a test: tiny models, 40 training-error images, 2 x 4 sharpness images, 2 steps."""
    kwargs = ",".join(f"{key}:{value}" for key, value in TINY.items())
    return [f"experiment={GRID}", f"paths.root={runs}", f"zoo.root={zoo_root}", f"zoo.data={sets}",
            f"zoo.model_kwargs={{{kwargs}}}", f"zoo.train_error_images={N_TRAIN_ERR}",
            f"zoo.sharpness_batches={N_BATCHES}", f"zoo.sharpness_batch_size={BATCH}", "zoo.sharpness_n_iters=2",
            "zoo.sharpness_n_samples=2", "zoo.batch_size=500", "zoo.num_workers=0", *extra]


def reference_model(seed: int) -> torch.nn.Module:
    return randomize_(timm.create_model("vit_base_patch16_224", **TINY), seed=seed).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """index.csv of the 56-model zoo and the files of three of its models (a trial download)."""
    root = tmp_path_factory.mktemp("augreg")
    write_index(root / "index.csv", zoo_rows("i1k"))
    for seed, name in enumerate(MODELS):
        save_augreg_npz(reference_model(seed), root / f"{name}.npz")
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet val and train and ImageNet-R; V2, Sketch, A and ObjectNet absent."""
    return write_eval_tree(tmp_path_factory.mktemp("sets"), parts=("imagenet", "imagenet_train", "imagenet_r"))


@pytest.fixture(scope="module")
def grid(zoo_root: Path, sets: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two models measured in this process, then the grid of all three through ``python train.py -m``."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(zoo_root, sets, runs)
    first = {name: run(compose_config(*overrides, f"zoo.model={name}")) for name in MODELS[:2]}
    before = {name: (runs / GRID / name / "results.json").read_bytes() for name in MODELS[:2]}
    listed = _list_models(zoo_root)
    command = [sys.executable, "train.py", "-m", *overrides, f"zoo.model={listed}"]
    launched = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=subprocess_env(OMP_NUM_THREADS="1"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    return runs, overrides, first, before, launched


def _list_models(zoo_root: Path) -> str:
    # The documented way to name a whole zoo: `python -m lit_sharp.zoo list ... --downloaded --comma`.
    done = io.StringIO()
    with contextlib.redirect_stdout(done):
        assert zoo_main(["list", "augreg_in1k", "--root", str(zoo_root), "--downloaded", "--comma"]) == 0
    return done.getvalue().strip()


def test_list_names_a_downloaded_zoo_on_one_comma_separated_line(zoo_root: Path, capsys) -> None:
    assert _list_models(zoo_root) == ",".join(sorted(MODELS))
    assert zoo_main(["list", "augreg_in1k", "--root", str(zoo_root)]) == 0
    assert len(capsys.readouterr().out.split()) == 56


def test_each_model_has_its_record(grid, zoo_root: Path) -> None:
    runs, *_ = grid
    specs = preset("imagenet_augreg", n_iters=2, n_samples=2)
    for name in MODELS:
        record = read_results(runs / GRID / name)
        assert record["run"]["status"] == "completed", record["run"]
        assert record["hparams"] == {**hparams_from_file_name(name), "zoo": "augreg_in1k", "model": name}
        assert set(record["metrics"]) == {"imagenet/err", "imagenet_real/err", "imagenet_r/err", "final/train_err",
                                          *(f"sharpness/{spec.name}" for spec in specs),
                                          *(f"sharpness_err_increase/{spec.name}" for spec in specs)}
        assert len(specs) == 12 and "sharpness/worst_linf_adaptive_rho0.002_random_start" in record["metrics"]
        assert [line.split(":")[0] for line in record["run"]["skipped"]] == list(ABSENT)
        assert record["config"]["zoo.model"] == name and record["config"]["logger.group"] == GRID
        wandb_run = read_offline_run(offline_runs(runs / GRID / name)[-1])
        assert wandb_run["group"] == GRID and wandb_run["job_type"] == "zoo"
        assert wandb_run["summary"]["imagenet/err"] == record["metrics"]["imagenet/err"]


def _transform() -> transforms.Compose:
    # AugReg's preprocessing (timm's pretrained config of vit_base_patch16_224.augreg_in1k): bicubic resize to
    # floor(32 / 0.9) = 35, centre crop 32, mean = std = 0.5.
    return transforms.Compose([transforms.Resize(35, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(32), transforms.ToTensor(),
                               transforms.Normalize((0.5,) * 3, (0.5,) * 3)])


def test_numbers_match_references_computed_here(grid, sets: Path) -> None:
    runs, *_ = grid
    seed = 2  # measured by the grid launch
    model = reference_model(seed)
    record = read_results(runs / GRID / MODELS[seed])["metrics"]
    val = datasets.ImageFolder(str(sets / "imagenet/val"), transform=_transform())  # synsets sort as ImageNet's order
    with torch.no_grad():
        x = torch.stack([image for image, _ in val])
        wrong = int((model(x).argmax(1) != torch.tensor(val.targets)).sum())
    assert record["imagenet/err"] == wrong / len(val)
    train = datasets.ImageFolder(str(sets / "imagenet/train"), transform=_transform())
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        chosen = [train[i] for i in order[:N_TRAIN_ERR]]
        logits = model(torch.stack([image for image, _ in chosen]))
        train_wrong = int((logits.argmax(1) != torch.tensor([label for _, label in chosen])).sum())
    assert record["final/train_err"] == train_wrong / N_TRAIN_ERR
    batches = [(torch.stack([image for image, _ in chosen[i:i + BATCH]]),
                torch.tensor([label for _, label in chosen[i:i + BATCH]])) for i in range(0, N_BATCHES * BATCH, BATCH)]
    for spec in (preset("imagenet_augreg", n_iters=2, n_samples=2)[i] for i in (1, 4, 7)):
        expected = sharpness(model, batches, spec).value
        assert record[f"sharpness/{spec.name}"] == pytest.approx(expected, rel=1e-4, abs=1e-6), spec.name


def test_relaunch_skips_measured_models_and_measures_the_missing_one(grid) -> None:
    runs, _, first, before, launched = grid
    for name in MODELS[:2]:
        assert (runs / GRID / name / "results.json").read_bytes() == before[name]
        assert len(offline_runs(runs / GRID / name)) == 1  # no second W&B run either
        assert first[name]["run"]["status"] == "completed"
        assert f"skipping {runs / GRID / name}" in launched.stdout + launched.stderr
    assert len(offline_runs(runs / GRID / MODELS[2])) == 1
    assert "measuring final/train_err (2 of 14)" in launched.stdout + launched.stderr
    again = run(compose_config(*grid[1], f"zoo.model={MODELS[0]}", "zoo.batch_size=7", "zoo.num_workers=1"))
    assert again == read_results(runs / GRID / MODELS[0])  # speed-only keys: the same run, skipped
    with pytest.raises(ConfigError, match=r"another configuration \(zoo.sharpness_batch_size: 4 -> 2\)"):
        run(compose_config(*grid[1], f"zoo.model={MODELS[0]}", "zoo.sharpness_batch_size=2"))
    assert (runs / GRID / MODELS[0] / "results.json").read_bytes() == before[MODELS[0]]


def test_the_analysis_reads_the_zoo_grid(grid, tmp_path: Path) -> None:
    import csv

    from lit_sharp.analysis import ZOO_HEADLINE_MEASURES
    from lit_sharp.analysis.cli import main as analysis_main

    runs, *_ = grid
    out = tmp_path / "out"
    # The tiny random models err on about 99.9% of ImageNet: keep them all (the default drops models above 90%).
    assert analysis_main([str(runs / GRID), "--out", str(out), "--bootstrap", "0", "--max-test-err", "1"]) == 0
    with (out / "correlations.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["model"] == "augreg_in1k"]
    assert {row["target"] for row in rows} == {"imagenet_err", "imagenet_r_err", "imagenet_real_err", "gen_gap"}
    assert {row["measure"] for row in rows} >= set(ZOO_HEADLINE_MEASURES)
    assert {row["n"] for row in rows} == {"3"}
    assert sorted(path.name for path in out.glob("zoo_augreg_in1k_*.png")) == sorted(
        f"zoo_augreg_in1k_{measure}.png" for measure in ZOO_HEADLINE_MEASURES)


def test_an_interrupted_measurement_resumes_where_it_stopped(zoo_root: Path, tmp_path: Path, caplog) -> None:
    sets = write_eval_tree(tmp_path / "sets", parts=("imagenet_train", "imagenet_r"))
    train = sets / "imagenet/train"
    files = sorted(train.glob("*/*.JPEG"))
    second = files[torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[1]]
    second.write_bytes(second.read_bytes()[:40])  # a sharpness image, not in a 1-image training-error subset
    overrides = tiny_overrides(zoo_root, sets, tmp_path / "runs", f"zoo.model={MODELS[0]}", "zoo.train_error_images=1")
    with pytest.raises(Exception, match=f"cannot read the image {second}"):
        run(compose_config(*overrides))
    record = read_results(zoo_run_dir(compose_config(*overrides)))
    assert record["run"]["status"] == "failed" and record["run"]["measured"] == ["eval_sets", "final/train_err"]
    assert record["run"]["measurement"] == "sharpness/worst_linf_adaptive_rho0.001_random_start"
    assert set(record["metrics"]) == {"imagenet_r/err", "final/train_err"}
    write_image(second, (255, 0, 0))
    with caplog.at_level("INFO", logger="lit_sharp.zoo.run"):
        resumed = run(compose_config(*overrides))
    assert "keeping the recorded measurements eval_sets, final/train_err" in caplog.text
    assert "measuring eval_sets" not in caplog.text
    assert resumed["run"]["status"] == "completed" and len(resumed["metrics"]) == 2 + 24
    assert {key: resumed["metrics"][key] for key in record["metrics"]} == record["metrics"]


def test_a_missing_model_file_is_one_clear_message(zoo_root: Path, sets: Path, tmp_path: Path) -> None:
    absent = augreg_file_name("i1k", "light0", 0.1, 0.1, 0.03)  # in index.csv, not downloaded
    with pytest.raises(UserError) as error:  # the command prints it as one line "error: ..." and exits 2
        run(compose_config(*tiny_overrides(zoo_root, sets, tmp_path, f"zoo.model={absent}")))
    message = str(error.value)
    assert "\n" not in message and str(zoo_root / f"{absent}.npz") in message and "download augreg_in1k" in message
    refused = read_results(tmp_path / GRID / absent)
    assert refused["run"]["status"] == "failed" and refused["run"]["refused"]
    assert refused["hparams"] == {"zoo": "augreg_in1k", "model": absent}


def test_a_missing_model_name_says_how_to_list_the_zoo(zoo_root: Path, sets: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"zoo.model=None.*python -m lit_sharp.zoo list augreg_in1k --root {zoo_root}"):
        run(compose_config(*tiny_overrides(zoo_root, sets, tmp_path)))
    with pytest.raises(ConfigError, match="zoo.sharpness_batches=0"):
        run(compose_config(*tiny_overrides(zoo_root, sets, tmp_path, "zoo.model=x", "zoo.sharpness_batches=0")))
    assert not (tmp_path / GRID).exists()


def test_an_unfinished_zoo_grid_points_at_its_own_relaunch(tmp_path: Path, capsys) -> None:
    from omegaconf import OmegaConf

    from lit_sharp.cli import GridReport
    from lit_sharp.outcomes import write_outcome

    sweep = tmp_path / "sweep"
    write_outcome(sweep / "0", "completed", None, MODELS[0], [f"zoo.model={MODELS[0]}"])
    write_outcome(sweep / "1", "failed", "cannot read the model file", MODELS[1], [f"zoo.model={MODELS[1]}"])
    config = OmegaConf.create({"mode": "zoo", "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": []}}})
    with pytest.raises(SystemExit) as exit_:
        GridReport().on_multirun_end(config)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("; see the same command again, which measures only what is missing")
    assert "grid status" not in lines[0] and MODELS[1] in lines[1] and "cannot read the model file" in lines[1]
