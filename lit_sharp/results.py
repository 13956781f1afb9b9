"""The per-run record, ``<run dir>/results.json`` (docs/design.md): write it, read it, find it.

The file is the source of truth for grids (which runs to skip) and for the analysis, so it is written atomically
(:mod:`lit_sharp.atomic_files`): a run killed while writing leaves the previous file or none, never half a file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lit_sharp.atomic_files import write_json

RESULTS_FILE = "results.json"
STATUSES = ("completed", "diverged", "failed")
HPARAM_KEYS = ("model", "lr", "sam_rho", "mixup_alpha", "augment", "seed")
#: A pretrained model of a zoo (``mode=zoo``) records its zoo and name; the rest of its ``hparams`` is its own
#: training hyperparameters from the zoo's metadata.
ZOO_HPARAM_KEYS = ("zoo", "model")


class ResultsError(ValueError):
    """A ``results.json`` that cannot be read or does not have the contracted shape."""

    def __init__(self, path: Path | str, why: str) -> None:
        self.path = Path(path)
        self.why = why
        super().__init__(f"{self.path}: {why}")


def make_record(
    *,
    name: str,
    status: str,
    seconds: float,
    wandb_id: str | None,
    hparams: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
    error: str | None = None,
) -> dict[str, Any]:
    """Build a record in the contracted layout.

    Args:
        name: the run name (derived from the hyperparameters).
        status: one of ``completed``, ``diverged``, ``failed``.
        seconds: wall time of the run.
        wandb_id: the W&B run id, or None without W&B.
        hparams: ``model, lr, sam_rho, mixup_alpha, augment, seed``; for a zoo model ``zoo, model`` and its own
            hyperparameters.
        config: the whole resolved config; nested mappings are flattened to dotted keys.
        metrics: metric name -> value (errors as fractions in [0, 1]).
        error: for ``failed`` and ``diverged`` runs, what went wrong.

    Raises:
        ValueError: an unknown status or missing hyperparameters.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    missing = [key for key in (ZOO_HPARAM_KEYS if "zoo" in hparams else HPARAM_KEYS) if key not in hparams]
    if missing:
        raise ValueError(f"hparams lack {missing}")
    run: dict[str, Any] = {"name": name, "status": status, "seconds": float(seconds), "wandb_id": wandb_id}
    if error is not None:
        run["error"] = error
    return {
        "run": run,
        "hparams": dict(hparams),
        "config": flatten(config),
        "metrics": json_metrics(metrics),
    }


def json_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Metrics as JSON numbers: JSON has no NaN/inf, so a non-finite value is recorded as null."""
    return {key: float(value) if math.isfinite(float(value)) else None for key, value in metrics.items()}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``{"a.b.c": value}``; lists and scalars are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def write_results(run_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """Write ``record`` to ``run_dir/results.json`` atomically and return the path."""
    return write_json(Path(run_dir) / RESULTS_FILE, record, indent=2, sort_keys=False, default=str)


def read_results(path: Path | str) -> dict[str, Any]:
    """Read and check one ``results.json``.

    Args:
        path: the file, or the run folder holding it.

    Raises:
        ResultsError: the file is missing, not JSON, or lacks the ``run``/``hparams``/``metrics`` sections.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(path, f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ResultsError(path, "top level is not a JSON object")
    for section in ("run", "hparams", "metrics"):
        if not isinstance(record.get(section), dict):
            raise ResultsError(path, f"missing or malformed section {section!r}")
    status = record["run"].get("status")
    if status not in STATUSES:
        raise ResultsError(path, f"run.status is {status!r}, expected one of {STATUSES}")
    return record


def find_results(root: Path | str) -> Iterator[Path]:
    """Every ``results.json`` below ``root``, in sorted order (W&B's own folders are skipped)."""
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        if "wandb" not in path.relative_to(root).parts:
            yield path


def run_status(run_dir: Path | str) -> str | None:
    """The recorded status of the run in ``run_dir``, or None when it has no readable record."""
    try:
        return read_results(run_dir)["run"]["status"]
    except ResultsError:
        return None


def mixup_on(hparams: Mapping[str, Any]) -> bool:
    """Whether a run trained with mixup: ``mixup_alpha > 0``."""
    return float(hparams["mixup_alpha"]) > 0


def subgroup_of(hparams: Mapping[str, Any]) -> str:
    """The augment x mixup subgroup of a run, ``augment=<true|false>,mixup=<true|false>``: one name for the W&B tags
    and the analysis."""
    return f"augment={str(bool(hparams['augment'])).lower()},mixup={str(mixup_on(hparams)).lower()}"
