"""The examples run as a user would run them, and do what they say."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_foreign_module_example_logs_a_sharpness_curve_to_csv(tmp_path: Path) -> None:
    # One thread: the example's work is tiny, and on a shared CPU several threads only wait for each other.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "foreign_module.py"), str(tmp_path / "logs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_csv,) = (tmp_path / "logs").rglob("metrics.csv")
    with metrics_csv.open() as file:
        rows = [row for row in csv.DictReader(file) if row["sharpness/worst_linf_adaptive_rho0.002"]]
    # One measurement per epoch, at the epoch's last step (512 examples in batches of 32: 16 steps per epoch).
    assert [(int(float(row["epoch"])), int(row["step"])) for row in rows] == [(e, 16 * (e + 1)) for e in range(5)]
    for row in rows:
        for spec in ("worst_linf_adaptive_rho0.002", "average_l2_adaptive_rho0.1"):
            assert float(row[f"sharpness/{spec}"]) > 0
        assert float(row["sharpness_cost/seconds"]) > 0
    printed = [line.split() for line in done.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [float(line[2]) for line in printed] == pytest.approx(
        [float(row["sharpness/worst_linf_adaptive_rho0.002"]) for row in rows], abs=1e-6
    )
