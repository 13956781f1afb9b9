"""Tests of the zoo analysis (the paper's Table 1, Figures 2 and 3, App. B) on hand-made ``results.json`` records."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wandb
from matplotlib.image import imread
from scipy.stats import kendalltau

from lit_sharp.analysis import (
    AUG_SIZES,
    ZOO_HEADLINE_MEASURES,
    correlations,
    generalization_gap,
    load_runs,
    main,
    parse_measure,
    split_runs,
    zoo_point_styles,
)
from lit_sharp.results import flatten, json_metrics, write_results
from lit_sharp.sharpness import IMAGENET_HEADLINE, preset
from wandb_offline import read_offline_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The headline specs as the ImageNet presets name them (worst case from a random start).
HEADLINE = IMAGENET_HEADLINE.name
HEADLINE_LN = dataclasses.replace(IMAGENET_HEADLINE, normalize_logits=True).name
AVERAGE = "average_linf_adaptive_rho0.1"
AUGS = ("none", "light0", "medium1", "strong1")


def zoo_record(name: str, hparams: Mapping[str, Any], metrics: Mapping[str, float | None],
               config: Mapping[str, Any] | None = None, status: str = "completed") -> dict[str, Any]:
    """A zoo model's record in the ``results.json`` layout (``run``, ``hparams``, ``config``, ``metrics``)."""
    finite = {key: value for key, value in metrics.items() if value is not None}
    return {"run": {"name": name, "status": status, "seconds": 1.0, "wandb_id": None}, "hparams": dict(hparams),
            "config": flatten(config or {}), "metrics": json_metrics(finite)}


def write_zoo(root: Path, records: list[dict[str, Any]]) -> Path:
    for record in records:
        write_results(root / record["run"]["name"], record)
    return root


def augreg_zoo(zoo: str = "augreg_in1k", seed: int = 0, group: str | None = None) -> list[dict[str, Any]]:
    """16 AugReg-like models (4 augmentations x 2 weight decays x dropout = stochastic depth in {0, 0.1}).

    With model index ``i``: headline sharpness ``i + 1``; ImageNet error rises with it (tau +1), ImageNet-V2 error
    falls (tau -1), ImageNet-R error is random; the training error makes the gap ``imagenet/err - final/train_err``
    fall with ``i`` (tau -1), so the gap with the wrong sign would give +1. The LN measure is random, the
    average-case one falls with ``i``. No ImageNet-Sketch, -A, ObjectNet or ReaL: those sets were not given.
    """
    rng = np.random.default_rng(seed)
    records = []
    grid = itertools.product(AUGS, (0.03, 0.1), (0.0, 0.1))
    for i, (aug, wd, do) in enumerate(grid):
        imagenet = 0.2 + 0.01 * i
        train = 0.05 + 0.015 * i  # the gap, imagenet - train = 0.15 - 0.005 i, falls
        metrics = {"imagenet/err": imagenet, "imagenet_v2/err": 0.6 - 0.01 * i,
                   "imagenet_r/err": float(rng.uniform(0.4, 0.8)), "final/train_err": train,
                   f"sharpness/{HEADLINE}": i + 1.0, f"sharpness/{HEADLINE_LN}": float(rng.uniform(1, 5)),
                   f"sharpness/{AVERAGE}": 0.5 - 0.01 * i}
        hparams = {"model": "vit_base_patch16_224", "zoo": zoo, "ds": "i1k", "aug": aug, "wd": wd, "do": do, "sd": do,
                   "adapt_lr": 0.01 if i % 2 else 0.03}
        config = {"logger": {"group": group, "project": "zoo_proj"}} if group else None
        records.append(zoo_record(f"{zoo}_{i:02d}", hparams, metrics, config))
    return records


def clip_zoo(group: str | None = None) -> list[dict[str, Any]]:
    """8 CLIP-like fine-tunes: errors on ImageNet, Sketch, -A and ObjectNet, no training error (so no gap), lr
    rising with the index."""
    records = []
    for i in range(8):
        metrics = {"imagenet/err": 0.3 - 0.01 * i, "imagenet_sketch/err": 0.5 + 0.01 * i,
                   "imagenet_a/err": 0.7 + 0.02 * (i % 3), "objectnet/err": 0.6 - 0.005 * i,
                   f"sharpness/{HEADLINE}": 2.0 + i, f"sharpness/{HEADLINE_LN}": 1.0 + (i * 5) % 8}
        hparams = {"model": "vit_base_patch32_clip_quickgelu_224", "zoo": "clip_soups", "lr": 1e-5 * 2**i,
                   "wd": 0.1, "epochs": 10, "label_smoothing": 0.0, "model_index": i}
        config = {"logger": {"group": group, "project": "zoo_proj"}} if group else None
        records.append(zoo_record(f"model_{i}", hparams, metrics, config))
    return records


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def cell(rows: list[dict[str, str]], **where: str) -> dict[str, str]:
    matches = [row for row in rows if all(row[key] == value for key, value in where.items())]
    assert len(matches) == 1, (where, matches)
    return matches[0]


def values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [record["metrics"][key] for record in records]


# ----------------------------------------------------------------------------------------------------------------------
# Table 1: correlations.csv and tables.md
# ----------------------------------------------------------------------------------------------------------------------


def test_table1_taus_by_hand_and_against_scipy(tmp_path: Path) -> None:
    records = augreg_zoo()
    out = tmp_path / "out"
    assert main([str(write_zoo(tmp_path / "zoo", records)), "--out", str(out), "--bootstrap", "200"]) == 0
    rows = read_csv(out / "correlations.csv")

    # One row per measure and target present, all over the whole zoo: no CIFAR subgroups, no granulated rows.
    targets = ["imagenet_err", "imagenet_v2_err", "imagenet_r_err", "gen_gap"]
    assert {row["subgroup"] for row in rows} == {"all"} and {row["model"] for row in rows} == {"augreg_in1k"}
    assert [(row["measure"], row["target"]) for row in rows] == [
        (measure, target) for measure in (HEADLINE_LN, HEADLINE, AVERAGE) for target in targets]

    def tau(measure: str, target: str) -> float:
        row = cell(rows, measure=measure, target=target)
        assert row["n"] == "16"
        assert float(row["ci_low"]) <= float(row["tau"]) <= float(row["ci_high"])
        return float(row["tau"])

    assert tau(HEADLINE, "imagenet_err") == pytest.approx(1.0)
    assert tau(HEADLINE, "imagenet_v2_err") == pytest.approx(-1.0)
    # App. B's gap falls while ImageNet error rises: a gap taken the wrong way round would read +1.
    assert tau(HEADLINE, "gen_gap") == pytest.approx(-1.0)
    assert tau(AVERAGE, "imagenet_err") == pytest.approx(-1.0)
    gap = [r["metrics"]["imagenet/err"] - r["metrics"]["final/train_err"] for r in records]
    for measure in (HEADLINE, HEADLINE_LN, AVERAGE):
        sharp = values(records, f"sharpness/{measure}")
        for target, errors in (("imagenet_r_err", values(records, "imagenet_r/err")), ("gen_gap", gap),
                               ("imagenet_v2_err", values(records, "imagenet_v2/err"))):
            assert tau(measure, target) == pytest.approx(kendalltau(sharp, errors).statistic, rel=1e-12)
    assert -1 < tau(HEADLINE_LN, "imagenet_r_err") < 1  # the random columns are not trivially ranked

    table = (out / "tables.md").read_text()
    assert "| Sharpness | LogitNorm | ρ | τ IN [95% CI] | τ IN-v2 [95% CI] | τ IN-R [95% CI] | " \
           "τ Gen. gap (IN) [95% CI] | n |" in table
    headline_row = next(line for line in table.splitlines() if line.startswith("| Adaptive worst-case ℓ∞ | No |"))
    assert headline_row.startswith("| Adaptive worst-case ℓ∞ | No | 0.002 | **1.00** [1.00, 1.00] | "
                                   "**-1.00** [-1.00, -1.00] | ")
    assert headline_row.endswith("| **-1.00** [-1.00, -1.00] | 16 |")
    # Table 1's row order: worst case with LN, without, then average case.
    assert table.index("| Adaptive worst-case ℓ∞ | Yes |") < table.index("| Adaptive worst-case ℓ∞ | No |") \
        < table.index("| Adaptive avg-case ℓ∞ | No | 0.1 |")


def test_absent_sets_give_no_column_and_no_gap_without_training_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([str(write_zoo(tmp_path / "zoo", clip_zoo())), "--out", str(out), "--bootstrap", "0"])
    rows = read_csv(out / "correlations.csv")
    assert {row["target"] for row in rows} == {"imagenet_err", "imagenet_sketch_err", "imagenet_a_err",
                                               "objectnet_err"}
    assert all(row["tau"] != "" and row["n"] == "8" for row in rows)
    assert float(cell(rows, measure=HEADLINE, target="imagenet_err")["tau"]) == pytest.approx(-1.0)
    assert float(cell(rows, measure=HEADLINE, target="imagenet_sketch_err")["tau"]) == pytest.approx(1.0)
    table = (out / "tables.md").read_text()
    assert "| Sharpness | LogitNorm | ρ | τ IN [95% CI] | τ IN-Sketch [95% CI] | τ IN-A [95% CI] | " \
           "τ ObjectNet [95% CI] | n |" in table
    assert "IN-R" not in table and "Gen. gap" not in table


def test_a_model_missing_a_set_lowers_that_cells_n_only() -> None:
    records = clip_zoo()
    del records[0]["metrics"]["objectnet/err"]
    rows = correlations(records, bootstrap=0)
    n = {row["target"]: row["n"] for row in rows if row["measure"] == HEADLINE}
    assert n == {"imagenet_err": 8, "imagenet_sketch_err": 8, "imagenet_a_err": 8, "objectnet_err": 7}


def test_generalization_gap_is_test_minus_train_error() -> None:
    (record,) = clip_zoo()[:1]
    assert generalization_gap(record) is None  # no training error measured
    record["metrics"]["final/train_err"] = 0.125
    assert generalization_gap(record) == pytest.approx(0.3 - 0.125)


# ----------------------------------------------------------------------------------------------------------------------
# The filter on measured error
# ----------------------------------------------------------------------------------------------------------------------


def failed_in21k_zoo() -> list[dict[str, Any]]:
    """12 ImageNet-21k AugReg-like models ranked perfectly, and two at about 100% error with the lowest sharpness,
    which would pull every tau below 1 if they entered."""
    records = augreg_zoo("augreg_in21k")[:12]
    for index, err in ((12, 0.999), (13, 0.9985)):
        metrics = {"imagenet/err": err, "imagenet_v2/err": err, "imagenet_r/err": err, "final/train_err": 0.998,
                   f"sharpness/{HEADLINE}": -1.0 - index}
        records.append(zoo_record(f"augreg_in21k_{index:02d}", {"model": "vit_base_patch16_224",
                                                                "zoo": "augreg_in21k", "aug": "none", "wd": 0.1,
                                                                "do": 0.0, "sd": 0.0}, metrics))
    return records


def test_error_filter_drops_only_the_failed_models_and_says_so(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    root = write_zoo(tmp_path / "zoo", failed_in21k_zoo())
    main([str(root), "--out", str(out), "--bootstrap", "0"])
    summary = capsys.readouterr().out
    assert "augreg_in21k: 12 of 14 completed runs kept (imagenet/err <= 0.9), 2 dropped " \
           "(2 with imagenet/err > 0.9)" in summary
    assert "augreg_in21k: 12 of 14 completed runs kept (imagenet/err <= 0.9)" in (out / "tables.md").read_text()
    runs = {row["name"]: row for row in read_csv(out / "runs.csv")}
    assert {name for name, row in runs.items() if row["kept"] == "False"} == {"augreg_in21k_12", "augreg_in21k_13"}
    assert runs["augreg_in21k_12"]["drop_reason"] == "imagenet/err > 0.9"
    # No training-error filter on zoos: every kept model has final/train_err far above CIFAR-10's 1%.
    assert all(float(row["final/train_err"]) >= 0.05 for row in runs.values() if row["kept"] == "True")
    row = cell(read_csv(out / "correlations.csv"), measure=HEADLINE, target="imagenet_err")
    assert (float(row["tau"]), row["n"]) == (pytest.approx(1.0), "12")

    main([str(root), "--out", str(tmp_path / "all"), "--bootstrap", "0", "--max-test-err", "1"])
    row = cell(read_csv(tmp_path / "all" / "correlations.csv"), measure=HEADLINE, target="imagenet_err")
    assert row["n"] == "14" and float(row["tau"]) < 0.9


def test_a_model_without_imagenet_error_is_kept() -> None:
    records = failed_in21k_zoo()
    del records[0]["metrics"]["imagenet/err"]
    kept, dropped = split_runs(records)
    assert len(kept) == 12 and records[0] in kept
    assert [reason for _, reason in dropped] == ["imagenet/err > 0.9"] * 2


def test_mixed_folder_keeps_cifar_rows_and_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cifar = [zoo_record(f"r{i}", {"model": "resnet18", "lr": 0.01 * (i + 1), "sam_rho": 0.0, "mixup_alpha": 0.0,
                                  "augment": False, "seed": 0},
                        {"final/train_err": 0.02 * (i == 3), "final/test_err": 0.1 + 0.01 * i,
                         "c10c/err": 0.3 - 0.01 * i, f"sharpness/{AVERAGE}": float(i)})
             for i in range(5)]
    root = write_zoo(tmp_path / "runs", cifar + clip_zoo())
    main([str(root), "--out", str(tmp_path / "out"), "--bootstrap", "0"])
    summary = capsys.readouterr().out
    assert "resnet18: 4 of 5 completed runs kept (final/train_err <= 0.01), 1 dropped" in summary
    assert "clip_soups: 8 of 8 completed runs kept (imagenet/err <= 0.9)" in summary
    rows = read_csv(tmp_path / "out" / "correlations.csv")
    resnet = [row for row in rows if row["model"] == "resnet18"]
    assert {row["target"] for row in resnet} == {"test_err", "c10c_err"}
    assert "granulated:mean" in {row["subgroup"] for row in resnet}
    assert float(cell(resnet, measure=AVERAGE, target="test_err", subgroup="all")["tau"]) == pytest.approx(1.0)
    assert cell(resnet, measure=AVERAGE, target="test_err", subgroup="all")["n"] == "4"
    assert {row["subgroup"] for row in rows if row["model"] == "clip_soups"} == {"all"}
    assert {path.name for path in (tmp_path / "out").glob("*.png")} == {
        f"zoo_clip_soups_{HEADLINE}.png", f"zoo_clip_soups_{HEADLINE_LN}.png"}


def test_bad_zoo_records_are_skipped_with_a_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = clip_zoo()
    records[0]["hparams"]["zoo"] = 3
    records[1]["metrics"]["imagenet/err"] = "0.3"
    main([str(write_zoo(tmp_path / "zoo", records)), "--out", str(tmp_path / "out"), "--bootstrap", "0"])
    out = capsys.readouterr().out
    assert "hparams.zoo is 3, expected a zoo name" in out
    assert "metrics['imagenet/err'] is '0.3'" in out
    assert len(load_runs(tmp_path / "zoo")[0]) == 6
    with pytest.raises(SystemExit):
        main([str(tmp_path / "zoo"), "--out", str(tmp_path / "out"), "--max-test-err", "1.5"])


# ----------------------------------------------------------------------------------------------------------------------
# Figures 2 and 3
# ----------------------------------------------------------------------------------------------------------------------


def test_augreg_encodings() -> None:
    records = augreg_zoo()
    styles = zoo_point_styles(records, "augreg_in1k")
    hparams = [record["hparams"] for record in records]
    # Colour is dropout / stochastic depth, marker weight decay, size the augmentation group; each only that.
    for styles_of, key in ((styles.colours, "do"), (styles.markers, "wd")):
        by_value = {h[key]: styles_of[i] for i, h in enumerate(hparams)}
        assert len(set(by_value.values())) == 2
        assert all(styles_of[i] == by_value[h[key]] for i, h in enumerate(hparams))
    size_of = {h["aug"]: styles.sizes[i] for i, h in enumerate(hparams)}
    assert [size_of[aug] for aug in AUGS] == sorted(size_of.values()) == list(AUG_SIZES)
    assert [label for label, *_ in styles.legend] == [
        "do=0.0, sd=0.0", "do=0.1, sd=0.1", "wd=0.03", "wd=0.1", "aug none", "aug light", "aug medium",
        "aug strong"]


def test_clip_colour_darkens_with_the_learning_rate() -> None:
    records = clip_zoo()
    records[3]["hparams"]["lr"] = None
    styles = zoo_point_styles(records, "clip_soups")
    # Relative luminance (ITU-R BT.709 weights on the RGB values) falls as the learning rate doubles each model.
    luminance = [float(np.dot(colour[:3], (0.2126, 0.7152, 0.0722)))
                 for i, colour in enumerate(styles.colours) if i != 3]
    assert luminance == sorted(luminance, reverse=True) and luminance[0] > luminance[-1] + 0.5
    assert styles.colours[3] == "tab:gray" and styles.legend == [("no lr", "tab:gray", "o", 28.0)]
    assert styles.colour_scale is not None and styles.colour_scale[2] == "fine-tuning learning rate"


def red_pixels(path: Path) -> int:
    """Pixels of tab:red (214, 39, 40), the colour of the second dropout / stochastic depth value, drawn at 85%
    opacity on white (about (220, 72, 72)); no other colour of the figure is that red."""
    red, green, blue = np.moveaxis(imread(path)[..., :3], -1, 0)
    return int(((red > 0.75) & (green < 0.4) & (blue < 0.4)).sum())


def test_zoo_figures_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([str(write_zoo(tmp_path / "zoo", augreg_zoo())), "--out", str(out), "--bootstrap", "0",
          "--measure", AVERAGE])
    names = {f"zoo_augreg_in1k_{measure}.png" for measure in (HEADLINE, HEADLINE_LN, AVERAGE)}
    assert {path.name for path in out.glob("*.png")} == names
    contents = {name: (out / name).read_bytes() for name in names}
    assert all(data.startswith(PNG_MAGIC) and len(data) > 20_000 for data in contents.values())
    assert len(set(contents.values())) == 3  # each measure its own picture
    assert red_pixels(out / f"zoo_augreg_in1k_{HEADLINE}.png") > 1000  # the legend alone has about 80

    # The same zoo with one dropout / stochastic depth value everywhere has no red at all: colour follows do/sd.
    same_do = augreg_zoo()
    for record in same_do:
        record["hparams"]["do"] = record["hparams"]["sd"] = 0.0
    main([str(write_zoo(tmp_path / "same_do", same_do)), "--out", str(tmp_path / "same"), "--bootstrap", "0"])
    assert red_pixels(tmp_path / "same" / f"zoo_augreg_in1k_{HEADLINE}.png") == 0


# ----------------------------------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------------------------------


def test_wandb_offline_run_per_zoo_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    augreg = augreg_zoo(group="zoo_augreg_in1k")
    root = write_zoo(tmp_path / "zoos", augreg + clip_zoo(group="zoo_clip_soups"))
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out), "--bootstrap", "0", "--wandb"]) == 0
    wandb.teardown()

    csv_rows = read_csv(out / "correlations.csv")
    runs = {read_offline_run(folder)["group"]: folder for folder in (out / "wandb").glob("offline-run-*")}
    assert set(runs) == {"zoo_augreg_in1k", "zoo_clip_soups"}
    for group, zoo in (("zoo_augreg_in1k", "augreg_in1k"), ("zoo_clip_soups", "clip_soups")):
        media = runs[group] / "files" / "media"
        (table_file,) = (media / "table").glob("correlations_*.table.json")
        table = json.loads(table_file.read_text())
        assert len(table["data"]) == len([row for row in csv_rows if row["model"] == zoo])
        assert {row[0] for row in table["data"]} == {zoo}
        images = sorted(path.name for path in (media / "images").rglob("*.png"))
        assert len(images) == 2 and all(name.startswith(f"zoo_{zoo}_") for name in images)

    logged = read_offline_run(runs["zoo_augreg_in1k"])
    assert logged["job_type"] == "analysis"
    (row,) = [row for row in logged["history"] if "correlations/_type" in row]
    for target in ("imagenet_err", "imagenet_v2_err", "imagenet_r_err", "gen_gap"):
        key = f"zoo/augreg_in1k/{HEADLINE}/{target}"
        assert row[f"{key}_table/_type"] == "table-file"
        panel = logged["config"][f"_wandb/visualize/{key}"]["panel_config"]
        assert panel["panelDefId"].startswith("wandb/scatter")
        assert panel["fieldSettings"] == {"x": "sharpness", "y": target}
    assert not any("imagenet_sketch" in key for key in logged["config"])  # a set this zoo lacks

    (runs_file,) = (runs["zoo_augreg_in1k"] / "files" / "media" / "table" / "runs" / "augreg_in1k").glob(
        f"{HEADLINE}_*.table.json")
    runs_table = json.loads(runs_file.read_text())
    assert runs_table["columns"] == ["run", "do", "sd", "wd", "aug", "adapt_lr", "sharpness", "imagenet_err",
                                     "imagenet_v2_err", "imagenet_r_err", "gen_gap"]
    expected = []
    for record in augreg:
        h, m = record["hparams"], record["metrics"]
        expected.append([record["run"]["name"], h["do"], h["sd"], h["wd"], h["aug"], h["adapt_lr"],
                         m[f"sharpness/{HEADLINE}"], m["imagenet/err"], m["imagenet_v2/err"], m["imagenet_r/err"],
                         pytest.approx(m["imagenet/err"] - m["final/train_err"])])
    assert sorted(runs_table["data"]) == expected


def test_the_zoo_headline_measures_are_specs_of_both_imagenet_presets() -> None:
    assert ZOO_HEADLINE_MEASURES == (HEADLINE, HEADLINE_LN)
    for name in ("imagenet_augreg", "imagenet_clip"):
        names = {spec.name for spec in preset(name)}
        assert set(ZOO_HEADLINE_MEASURES) <= names, name
        assert all(parse_measure(measure) is not None for measure in names), name  # Table 1 can order every row
