"""Tests of ``lit_sharp.analysis`` on hand-made ``results.json`` records with known ranks."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
import numpy as np
from scipy.stats import bootstrap, kendalltau

from lit_sharp.analysis import (
    CSV_COLUMNS,
    SCATTER_COLUMNS,
    bootstrap_ci,
    bootstrap_taus,
    bootstrap_weights,
    correlations,
    granulated_tau,
    kendall_tau,
    load_runs,
    main,
    measure_sort_key,
    parse_measure,
    scatter_runs,
    split_by_train_err,
    wandb_target,
)
from lit_sharp.results import make_record, write_results
from wandb_offline import read_offline_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
# Not a headline measure, so tests that do not look at figures do not spend time drawing them.
MEASURE = "average_l2_adaptive_rho0.1"


def run_record(
    name: str,
    *,
    model: str = "resnet18",
    lr: float = 0.1,
    sam_rho: float = 0.0,
    mixup_alpha: float = 0.0,
    augment: bool = False,
    seed: int = 0,
    status: str = "completed",
    metrics: Mapping[str, float] | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    hparams = {"model": model, "lr": lr, "sam_rho": sam_rho, "mixup_alpha": mixup_alpha, "augment": augment,
               "seed": seed}
    return make_record(name=name, status=status, seconds=1.0, wandb_id=None, hparams=hparams,
                       config=config or {}, metrics=metrics or {})


def error_metrics(train: float, test: float, c10c: float, **sharpness: float) -> dict[str, float]:
    metrics = {"final/train_err": train, "final/test_err": test, "c10c/err": c10c}
    metrics.update({f"sharpness/{name}": value for name, value in sharpness.items()})
    return metrics


def write_grid(root: Path, records: list[dict[str, Any]]) -> Path:
    for record in records:
        write_results(root / record["run"]["name"], record)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def cell(rows: list[dict[str, str]], **where: str) -> dict[str, str]:
    matches = [row for row in rows if all(row[key] == value for key, value in where.items())]
    assert len(matches) == 1, (where, matches)
    return matches[0]


def tau_a_eq4(t: list[float], s: list[float]) -> float:
    """The paper's Eq. 4 written out."""
    m = len(t)
    total = sum(math.copysign(1, t[i] - t[j]) * math.copysign(1, s[i] - s[j])
                for i in range(m) for j in range(i + 1, m))
    return 2 * total / (m * (m - 1))


def tau_b_by_counting(x: list[float], y: list[float]) -> float:
    """tau-b = (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)), counted pair by pair."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        ties_x += dx == 0
        ties_y += dy == 0
        if dx * dy > 0:
            concordant += 1
        elif dx * dy < 0:
            discordant += 1
    n0 = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((n0 - ties_x) * (n0 - ties_y))


# ----------------------------------------------------------------------------------------------------------------------
# kendall_tau
# ----------------------------------------------------------------------------------------------------------------------


def test_kendall_tau_without_ties_is_eq4() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(17, generator=generator).tolist()
    y = (torch.tensor(x) + torch.randn(17, generator=generator)).tolist()
    assert kendall_tau(x, y) == pytest.approx(tau_a_eq4(x, y), abs=1e-12)
    assert kendall_tau(x, x) == pytest.approx(1.0)
    assert kendall_tau(x, [-v for v in x]) == pytest.approx(-1.0)


def test_kendall_tau_with_ties_is_tau_b() -> None:
    x = [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0]
    y = [0.3, 0.1, 0.2, 0.2, 0.5, 0.4, 0.6]
    expected = tau_b_by_counting(x, y)
    assert kendall_tau(x, y) == pytest.approx(expected, abs=1e-12)
    assert expected != pytest.approx(tau_a_eq4(x, y))  # the ties matter here


def test_kendall_tau_undefined_cases() -> None:
    assert kendall_tau([1.0, 2.0], [2.0, 1.0]) is None  # fewer than 3 runs
    assert kendall_tau([1.0, 2.0], [2.0, 1.0], min_n=2) == pytest.approx(-1.0)
    assert kendall_tau([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) is None  # constant column
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1.0, 2.0, 3.0], [1.0, 2.0])


# ----------------------------------------------------------------------------------------------------------------------
# correlations.csv
# ----------------------------------------------------------------------------------------------------------------------


def test_known_ranks_give_plus_and_minus_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Sharpness rises with test error and falls with CIFAR-10-C error: tau = +1 and -1.
    records = [
        run_record(f"r{i}", lr=0.01 * (i + 1), metrics=error_metrics(0.0, 0.1 + 0.01 * i, 0.5 - 0.02 * i,
                                                                      **{MEASURE: 1.0 + i}))
        for i in range(6)
    ]
    # A metric that is not a sharpness measure must not become one.
    records[0]["metrics"]["sharpness_err_increase/" + MEASURE] = 0.3
    out = tmp_path / "out"
    assert main([str(write_grid(tmp_path / "grid", records)), "--out", str(out)]) == 0

    with (out / "correlations.csv").open() as handle:
        assert next(csv.reader(handle)) == list(CSV_COLUMNS)
    rows = read_csv(out / "correlations.csv")
    assert {row["measure"] for row in rows} == {MEASURE}
    test_row = cell(rows, model="resnet18", measure=MEASURE, target="test_err", subgroup="all")
    c10c_row = cell(rows, model="resnet18", measure=MEASURE, target="c10c_err", subgroup="all")
    assert (float(test_row["tau"]), test_row["n"]) == (pytest.approx(1.0), "6")
    assert (float(c10c_row["tau"]), c10c_row["n"]) == (pytest.approx(-1.0), "6")


def test_random_ranks_match_scipy(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    test_err = (torch.rand(15, generator=generator) * 0.3).tolist()
    c10c_err = (torch.rand(15, generator=generator) * 0.5).tolist()
    sharp = (torch.rand(15, generator=generator) * 10).tolist()
    records = [
        run_record(f"r{i}", lr=0.01 * (i + 1),
                   metrics=error_metrics(0.0, test_err[i], c10c_err[i], **{MEASURE: sharp[i]}))
        for i in range(15)
    ]
    out = tmp_path / "out"
    main([str(write_grid(tmp_path / "grid", records)), "--out", str(out)])
    rows = read_csv(out / "correlations.csv")
    for target, errors in (("test_err", test_err), ("c10c_err", c10c_err)):
        row = cell(rows, measure=MEASURE, target=target, subgroup="all")
        # Written with every digit, so the file matches scipy to the last bit.
        assert float(row["tau"]) == pytest.approx(kendalltau(sharp, errors).statistic, rel=1e-15)


def test_a_run_lacking_a_measure_is_left_out_of_that_measure_only(tmp_path: Path) -> None:
    records = [
        run_record(f"r{i}", lr=0.01 * (i + 1),
                   metrics=error_metrics(0.0, 0.1 * i, 0.2 * i, **{MEASURE: i, "worst_l2_adaptive_rho0.5": -i}))
        for i in range(5)
    ]
    del records[1]["metrics"]["sharpness/worst_l2_adaptive_rho0.5"]
    del records[2]["metrics"]["c10c/err"]
    records[3]["metrics"]["sharpness/" + MEASURE] = None  # a non-finite value is recorded as null
    rows = correlations(records)

    def n(measure: str, target: str) -> int:
        return cell_of(rows, measure=measure, target=target, subgroup="all")["n"]

    assert (n(MEASURE, "test_err"), n(MEASURE, "c10c_err")) == (4, 3)
    assert (n("worst_l2_adaptive_rho0.5", "test_err"), n("worst_l2_adaptive_rho0.5", "c10c_err")) == (4, 3)
    falling = cell_of(rows, measure="worst_l2_adaptive_rho0.5", target="test_err", subgroup="all")
    assert falling["tau"] == pytest.approx(-1)


def cell_of(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    matches = [row for row in rows if all(row[key] == value for key, value in where.items())]
    assert len(matches) == 1, (where, matches)
    return matches[0]


# ----------------------------------------------------------------------------------------------------------------------
# Training-error filter
# ----------------------------------------------------------------------------------------------------------------------


def test_training_error_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_errs = {"a": 0.0, "b": 0.01, "c": 0.0100001, "d": 0.5, "e": 0.003}
    records = [
        run_record(name, lr=0.01 * (i + 1), metrics=error_metrics(train, 0.1 * i, 0.2 * i, **{MEASURE: i}))
        for i, (name, train) in enumerate(train_errs.items())
    ]
    del records[4]["metrics"]["final/train_err"]  # "e" never measured its training error
    records.append(run_record("f", status="diverged", metrics={"final/train_err": 0.9}))
    out = tmp_path / "out"
    main([str(write_grid(tmp_path / "grid", records)), "--out", str(out)])

    summary = capsys.readouterr().out
    assert "6 results.json found, 6 readable, 5 completed" in summary
    assert "resnet18: 2 of 5 completed runs kept" in summary
    assert "3 dropped (2 with final/train_err > 0.01; 1 with no final/train_err)" in summary
    runs = {row["name"]: row for row in read_csv(out / "runs.csv")}
    assert set(runs) == {"a", "b", "c", "d", "e"}  # the diverged run is not a completed run
    assert {name for name, row in runs.items() if row["kept"] == "True"} == {"a", "b"}
    assert runs["c"]["drop_reason"] == "final/train_err > 0.01"
    assert runs["e"]["drop_reason"] == "no final/train_err"
    assert float(runs["d"]["final/train_err"]) == 0.5
    assert cell(read_csv(out / "correlations.csv"), target="test_err", subgroup="all")["n"] == "2"

    kept, dropped = split_by_train_err(records, max_train_err=0.6)
    assert {r["run"]["name"] for r in kept} == {"a", "b", "c", "d"}
    assert [r["run"]["name"] for r, _ in dropped] == ["e"]
    with pytest.raises(ValueError, match="max_train_err"):
        correlations(records, max_train_err=1.5)


# ----------------------------------------------------------------------------------------------------------------------
# Subgroups
# ----------------------------------------------------------------------------------------------------------------------


def test_subgroup_rows(tmp_path: Path) -> None:
    # (augment, mixup_alpha) -> number of runs; the mixup subgroup is "on" for any alpha > 0.
    sizes = {(False, 0.0): 4, (False, 0.5): 3, (True, 0.0): 2, (True, 0.2): 5}
    generator = torch.Generator().manual_seed(1)
    records = []
    for (augment, alpha), size in sizes.items():
        for i in range(size):
            test, c10c, sharp = torch.rand(3, generator=generator).tolist()
            records.append(run_record(f"aug{augment}_mix{alpha}_{i}", lr=0.01 * (i + 1), augment=augment,
                                      mixup_alpha=alpha, metrics=error_metrics(0.0, test, c10c, **{MEASURE: sharp})))
    out = tmp_path / "out"
    main([str(write_grid(tmp_path / "grid", records)), "--out", str(out)])
    rows = [row for row in read_csv(out / "correlations.csv") if row["target"] == "test_err"]

    assert [row["subgroup"] for row in rows if not row["subgroup"].startswith("granulated:")] == [
        "all", "augment=false,mixup=false", "augment=false,mixup=true", "augment=true,mixup=false",
        "augment=true,mixup=true",
    ]
    for (augment, alpha), size in sizes.items():
        label = f"augment={str(augment).lower()},mixup={str(alpha > 0).lower()}"
        row = cell(rows, subgroup=label)
        assert row["n"] == str(size)
        members = [r for r in records if r["hparams"]["augment"] == augment and r["hparams"]["mixup_alpha"] == alpha]
        if size < 3:
            assert row["tau"] == ""  # too few runs for a rank correlation: an empty cell, not a crash
        else:
            sharp = [r["metrics"]["sharpness/" + MEASURE] for r in members]
            test = [r["metrics"]["final/test_err"] for r in members]
            assert float(row["tau"]) == pytest.approx(kendalltau(sharp, test).statistic, rel=1e-12)
    assert cell(rows, subgroup="all")["n"] == "14"


# ----------------------------------------------------------------------------------------------------------------------
# Granulated tau
# ----------------------------------------------------------------------------------------------------------------------

# Test error per (sam_rho, mixup on) along lr = 0.1, 0.2, 0.4; sharpness rises with lr, rho and mixup.
GRANULATED_TEST_ERR = {
    (0.0, False): (0.10, 0.20, 0.30),  # rising with sharpness: tau +1
    (0.05, False): (0.35, 0.25, 0.15),  # falling: tau -1
    (0.0, True): (0.11, 0.21, 0.31),  # rising: tau +1
    (0.05, True): (0.12, 0.32, 0.22),  # ranks 1, 3, 2: (2 concordant - 1 discordant) / 3 = 1/3
}


def granulated_grid() -> list[dict[str, Any]]:
    records = []
    for (rho, mixup), errors in GRANULATED_TEST_ERR.items():
        for i, (lr, test) in enumerate(zip((0.1, 0.2, 0.4), errors)):
            sharp = i + 10 * (rho > 0) + 100 * mixup
            records.append(run_record(f"lr{lr}_rho{rho}_mix{mixup}", lr=lr, sam_rho=rho, mixup_alpha=0.5 * mixup,
                                      metrics=error_metrics(0.0, test, test, **{MEASURE: sharp})))
    # Another seed of the first configuration: it differs from every other run in the seed as well, so it shares a
    # group with none; were it grouped with the seed-0 lr sweep, the first lr tau would drop below 1.
    records.append(run_record("lr0.1_rho0.0_mixFalse_seed1", lr=0.1, seed=1,
                              metrics=error_metrics(0.0, 0.0, 0.0, **{MEASURE: 5.0})))
    return records


def test_granulated_tau_by_hand() -> None:
    result = granulated_tau(granulated_grid(), "sharpness/" + MEASURE, "final/test_err")
    # lr: the four sweeps above, (1 - 1 + 1 + 1/3) / 4.
    assert result["lr"] == (pytest.approx(1 / 3), 12)
    # sam_rho: pairs (rho 0.05 vs 0) at each (lr, mixup); err rises at lr 0.1 and 0.2, falls at 0.4, both mixups.
    assert result["sam_rho"] == (pytest.approx((1 + 1 - 1 + 1 + 1 - 1) / 6), 12)
    # mixup: pairs (on vs off) at each (lr, rho); rises except at (lr 0.1, rho 0.05): 0.12 < 0.35.
    assert result["mixup"] == (pytest.approx((1 + 1 + 1 - 1 + 1 + 1) / 6), 12)
    # augment is off everywhere: no pair differs in augment only.
    assert result["augment"] == (None, 0)
    assert result["mean"] == (pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3), 12)


def test_granulated_rows_in_correlations() -> None:
    rows = correlations(granulated_grid())
    got = {row["subgroup"]: (row["tau"], row["n"]) for row in rows if row["target"] == "c10c_err"}
    assert got["granulated:lr"] == (pytest.approx(1 / 3), 12)
    assert got["granulated:augment"] == (None, 0)
    assert got["granulated:mean"] == (pytest.approx(4 / 9), 12)


# ----------------------------------------------------------------------------------------------------------------------
# Tables and figures
# ----------------------------------------------------------------------------------------------------------------------


def test_measures_in_the_order_of_the_papers_tables() -> None:
    paper_order = [
        "average_l2_standard_rho0.05", "worst_l2_standard_rho0.25", "average_l2_adaptive_rho0.05",
        "average_l2_adaptive_rho0.1", "worst_l2_adaptive_rho0.25", "average_l2_adaptive_ln_rho0.05",
        "worst_l2_adaptive_ln_rho0.25", "average_linf_standard_rho0.1", "worst_linf_standard_rho0.0005",
        "average_linf_adaptive_rho0.1", "worst_linf_adaptive_rho0.001", "worst_linf_adaptive_rho0.002",
        "average_linf_adaptive_ln_rho0.1", "worst_linf_adaptive_ln_rho0.001",
    ]
    assert sorted(reversed(paper_order), key=measure_sort_key) == paper_order
    parts = parse_measure("worst_linf_adaptive_ln_rho0.002")
    assert (parts.kind, parts.norm, parts.adaptive, parts.logit_norm, parts.rho) == ("worst", "linf", True, True, 0.002)
    assert parse_measure("hessian_trace") is None


def test_tables_and_figures_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    headline = "worst_linf_adaptive_ln_rho0.002"
    records = [
        run_record(f"r{i}", lr=0.02 * 2**i, augment=i % 2 == 0,
                   metrics=error_metrics(0.0, 0.1 + 0.01 * i, 0.3 - 0.01 * i,
                                         **{headline: 0.5 + i, MEASURE: 0.1 * i, "worst_l2_standard_rho0.25": 1.0}))
        for i in range(6)
    ]
    out = tmp_path / "out"
    main([str(write_grid(tmp_path / "grid", records)), "--out", str(out), "--measure", f"sharpness/{MEASURE}"])

    expected = {f"fig{k}_resnet18_{m}.png" for k in (5, 6) for m in (headline, MEASURE)}
    assert {path.name for path in out.glob("fig*.png")} == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # The other ResNet-18 headline measure is absent from the data: a note, no crash, no file.
    assert "no figure for resnet18 worst_linf_adaptive_rho0.001" in capsys.readouterr().out

    table = (out / "tables.md").read_text()
    assert "| Sharpness | LogitNorm | ρ | τ CIFAR-10 [95% CI] | τ CIFAR-10-C [95% CI] | n |" in table
    # Perfectly ranked: every bootstrap sample with a defined tau has tau = +1 (or -1), so does the interval.
    assert "| Adaptive worst-case ℓ∞ | Yes | 0.002 | **1.00** [1.00, 1.00] | **-1.00** [-1.00, -1.00] | 6 |" in table
    # A constant measure has no rank correlation.
    assert "| Standard worst-case ℓ2 | No | 0.25 | – | – | 6 |" in table
    assert table.index("Adaptive avg-case ℓ2") < table.index("Adaptive worst-case ℓ∞")


def test_asam_runs_get_their_architectures_headline_measures_in_png_and_wandb_alike(tmp_path: Path) -> None:
    headline = "worst_linf_adaptive_ln_rho0.002"
    records = [
        run_record(f"r{i}", lr=0.02 * 2**i, sam_rho=0.05,
                   metrics=error_metrics(0.0, 0.1 + 0.01 * i, 0.3 - 0.01 * i, **{headline: 0.5 + i}))
        for i in range(4)
    ]
    for record in records:
        record["hparams"]["sam_adaptive"] = True
    out = tmp_path / "out"
    main([str(write_grid(tmp_path / "grid", records)), "--out", str(out)])

    assert {path.name for path in out.glob("fig*.png")} == {f"fig{k}_resnet18_asam_{headline}.png" for k in (5, 6)}
    assert [(model, measure) for model, measure, _ in scatter_runs(records)] == [("resnet18_asam", headline)]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_malformed_records_are_reported_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_grid(tmp_path / "grid", [
        run_record(f"good{i}", lr=0.01 * (i + 1), metrics=error_metrics(0.0, 0.1 * i, 0.1 * i, **{MEASURE: i}))
        for i in range(3)
    ])
    (root / "truncated").mkdir()
    (root / "truncated" / "results.json").write_text('{"run": {"status": "comp')
    bad_augment = run_record("bad_augment", metrics=error_metrics(0.0, 0.1, 0.1))
    bad_augment["hparams"]["augment"] = "yes"
    bad_metric = run_record("bad_metric", metrics=error_metrics(0.0, 0.1, 0.1))
    bad_metric["metrics"]["final/test_err"] = "0.1"
    no_metrics = run_record("no_metrics")
    del no_metrics["metrics"]
    for record in (bad_augment, bad_metric):
        write_results(root / record["run"]["name"], record)
    (root / "no_metrics").mkdir()
    (root / "no_metrics" / "results.json").write_text(json.dumps(no_metrics))

    records, skipped = load_runs(root)
    assert sorted(r["run"]["name"] for r in records) == ["good0", "good1", "good2"]
    assert {path.parent.name for path, _ in skipped} == {"truncated", "bad_augment", "bad_metric", "no_metrics"}

    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    output = capsys.readouterr()
    lines = [line for line in output.out.splitlines() if line.startswith("skipped ")]
    assert len(lines) == 4
    assert f"skipped {root / 'truncated' / 'results.json'}: not valid JSON" in output.out
    assert f"skipped {root / 'bad_augment' / 'results.json'}: hparams.augment is 'yes'" in output.out
    assert "metrics['final/test_err'] is '0.1'" in output.out
    assert "section 'metrics'" in output.out
    assert "Traceback" not in output.out + output.err
    assert cell(read_csv(tmp_path / "out" / "correlations.csv"), target="test_err", subgroup="all")["n"] == "3"


def test_empty_or_missing_root_exits_with_a_message(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(empty), "--out", str(tmp_path / "out")])
    assert f"no results.json under {empty}" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert f"{tmp_path / 'nowhere'} is not a folder" in str(exit_info.value.code)

    write_grid(tmp_path / "diverged", [run_record("d", status="diverged")])
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "diverged"), "--out", str(tmp_path / "out")])
    assert f"no completed run under {tmp_path / 'diverged'}" in str(exit_info.value.code)

    # The real command: a message on stderr and exit status 1.
    process = subprocess.run(
        [sys.executable, "-m", "lit_sharp.analysis", str(empty), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 1
    assert f"no results.json under {empty}" in process.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------------------------------


def test_wandb_target_from_config_or_folder(tmp_path: Path) -> None:
    configured = [run_record("a", config={"logger": {"project": "sharp", "group": "grid_resnet"}})]
    assert wandb_target(configured, tmp_path / "whatever") == ("sharp", "grid_resnet")
    assert wandb_target([run_record("b")], tmp_path / "my_grid") == ("lit_sharp", "my_grid")


def test_wandb_offline_run_holds_table_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    headline = "worst_linf_adaptive_rho0.001"
    records = [
        run_record(f"r{i}", lr=0.01 * (i + 1), config={"logger": {"group": "sharp_grid_7", "project": "sharp_proj"}},
                   metrics=error_metrics(0.0, 0.1 * i, 0.1 * i, **{headline: i}))
        for i in range(4)
    ]
    out = tmp_path / "out"
    assert main([str(write_grid(tmp_path / "grid", records)), "--out", str(out), "--wandb"]) == 0

    # W&B's service finishes writing the run's binary log when it is torn down, which the command's exit does.
    wandb.teardown()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    # The run's settings live in that log; the grid's group and project must be among them.
    (run_log,) = run_dir.glob("run-*.wandb")
    assert b"sharp_grid_7" in run_log.read_bytes() and b"sharp_proj" in run_log.read_bytes()
    (table_file,) = (run_dir / "files" / "media" / "table").glob("correlations_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(CSV_COLUMNS)
    assert len(table["data"]) == len(read_csv(out / "correlations.csv"))
    images = sorted(path.name for path in (run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 2 and images[0].startswith(f"fig5_resnet18_{headline}")
    assert all(path.read_bytes().startswith(PNG_MAGIC) for path in (run_dir / "files").rglob("*.png"))

    # Figures 5 and 6 as W&B plots on one table of the runs, with the columns to colour and hover by.
    logged = read_offline_run(run_dir)
    assert logged["group"] == "sharp_grid_7" and logged["job_type"] == "analysis"
    plots = {f"fig5/resnet18/{headline}/test_err": ("sharpness", "test_err"),
             f"fig5/resnet18/{headline}/c10c_err": ("sharpness", "c10c_err"),
             f"fig6/resnet18/{headline}": ("lr", "sharpness")}
    (row,) = [row for row in logged["history"] if "correlations/_type" in row]
    assert row["correlations/_type"] == row[f"runs/resnet18/{headline}/_type"] == "table-file"
    for key, (x, y) in plots.items():
        # A W&B plot is its table in the history and a Vega scatter panel over that table in the config.
        assert row[f"{key}_table/_type"] == "table-file"
        panel = logged["config"][f"_wandb/visualize/{key}"]["panel_config"]
        assert panel["panelDefId"].startswith("wandb/scatter") and panel["fieldSettings"] == {"x": x, "y": y}
    (runs_file,) = (run_dir / "files" / "media" / "table" / "runs" / "resnet18").glob(f"{headline}_*.table.json")
    runs_table = json.loads(runs_file.read_text())
    assert runs_table["columns"] == list(SCATTER_COLUMNS)
    assert sorted(runs_table["data"]) == sorted(
        [f"r{i}", "augment=false,mixup=false", 0.01 * (i + 1), float(i), 0.1 * i, 0.1 * i] for i in range(4))


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ----------------------------------------------------------------------------------------------------------------------


def test_bootstrap_taus_are_kendall_taus_of_the_resampled_lists() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=11).round(1)  # rounding makes ties in the data too
    y = (x + rng.normal(size=11)).round(1)
    weights = bootstrap_weights(11, 300, seed=5)
    assert weights.shape == (300, 11) and (weights.sum(axis=1) == 11).all()
    taus = bootstrap_taus(x, y, weights)
    for draws, tau in zip(weights, taus):
        picked = np.repeat(np.arange(11), draws)
        expected = kendalltau(x[picked], y[picked]).statistic
        if np.isnan(expected):
            assert np.isnan(tau)
        else:
            assert tau == pytest.approx(expected, abs=1e-12)


def test_bootstrap_ci_agrees_with_scipy_bootstrap() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=20)
    y = x + rng.normal(size=20)
    low, high = bootstrap_ci(x, y, resamples=4000, seed=0)
    reference = bootstrap((x, y), lambda a, b: kendalltau(a, b).statistic, paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", confidence_level=0.95, rng=np.random.default_rng(2))
    # Two independent sets of resamples: the endpoints agree up to Monte Carlo error (sd about 0.01 here).
    assert low == pytest.approx(reference.confidence_interval.low, abs=0.04)
    assert high == pytest.approx(reference.confidence_interval.high, abs=0.04)
    assert low < kendall_tau(list(x), list(y)) < high
    assert bootstrap_ci(x, y, resamples=4000, seed=0) == (low, high)  # seeded
    assert bootstrap_ci(x, y, resamples=0) is None
    assert bootstrap_ci([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) is None  # tau undefined: no interval


def test_correlations_csv_carries_intervals(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(4)
    records = [
        run_record(f"r{i}", lr=0.01 * (i + 1), augment=i % 2 == 0,
                   metrics=error_metrics(0.0, *torch.rand(2, generator=generator).tolist(),
                                         **{MEASURE: float(torch.rand(1, generator=generator))}))
        for i in range(16)
    ]
    grid = write_grid(tmp_path / "grid", records)
    main([str(grid), "--out", str(tmp_path / "a"), "--bootstrap", "200"])
    rows = read_csv(tmp_path / "a" / "correlations.csv")
    for row in rows:
        if row["subgroup"].startswith("granulated:"):
            assert row["ci_low"] == row["ci_high"] == ""
        else:
            assert float(row["ci_low"]) <= float(row["tau"]) <= float(row["ci_high"]), row
    main([str(grid), "--out", str(tmp_path / "b"), "--bootstrap", "200"])
    assert read_csv(tmp_path / "b" / "correlations.csv") == rows  # the same intervals on every run
    main([str(grid), "--out", str(tmp_path / "c"), "--bootstrap", "0"])
    assert all(row["ci_low"] == "" for row in read_csv(tmp_path / "c" / "correlations.csv"))
