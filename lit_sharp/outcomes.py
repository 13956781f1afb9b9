"""A grid job's ``outcome.json`` in its Hydra job folder, and the end-of-grid summary read from a launch's outcomes.

Every job of a grid launch leaves one: the job itself (:mod:`lit_sharp.cli`), or its launcher for a job that died
without a word (:mod:`lit_sharp.launchers`). Its fields: ``status`` (a run status, ``refused``, or ``running`` for a
run another live process holds), ``error`` (why), ``run`` (the run folder's name) and ``overrides``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

OUTCOME_FILE = "outcome.json"
#: Outcomes of a job whose run needs nothing more.
FINISHED = ("completed", "diverged")
#: How the count line names each kind of unfinished outcome, in its order ("failed" always shows).
KINDS = {"failed": "failed", "refused": "refused", "running": "held by another process"}


def run_name_of(cfg: DictConfig) -> str | None:
    """The folder name of the run a job's config describes, or None for a config too broken to name one."""
    from lit_sharp.run_folder import run_dir_of  # here: it imports torch, which a launcher need not load

    try:
        return run_dir_of(cfg).name
    except Exception:  # noqa: BLE001 - a config too broken to name its run; the outcome's overrides still say which
        return None


def write_outcome(job_dir: Path, status: str, error: str | None, run_name: str | None, overrides: list[str]) -> None:
    """Write a job's ``outcome.json`` (status, error, run folder name, overrides) into its Hydra job folder."""
    outcome = {"status": status, "error": error, "run": run_name, "overrides": overrides}
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / OUTCOME_FILE).write_text(json.dumps(outcome, indent=2))


def read_outcomes(sweep_dir: Path) -> list[dict[str, Any]]:
    """The outcome of every job of a grid launch (its sweep folder)."""
    outcomes = []
    for path in sorted(Path(sweep_dir).glob(f"*/{OUTCOME_FILE}")):
        try:
            outcomes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            outcomes.append({"status": "failed", "error": f"unreadable {path}"})
    return outcomes


def failure_line(outcomes: list[dict[str, Any]], n_jobs: int) -> str | None:
    """One line counting the jobs of a grid launch whose run did not finish, by kind, or None when all finished."""
    counts = Counter(str(outcome["status"]) for outcome in outcomes if outcome["status"] not in FINISHED)
    silent = max(n_jobs - len(outcomes), 0)
    if not counts and not silent:
        return None
    kinds = [kind for kind in KINDS if kind == "failed" or counts[kind]] + sorted(set(counts) - set(KINDS))
    parts = [f"{counts[kind]} {KINDS.get(kind, kind)}" for kind in kinds] + \
        ([f"{silent} ended without an outcome"] if silent else [])
    return f"error: {sum(counts.values()) + silent} of {n_jobs} runs did not finish ({', '.join(parts)})"


def unfinished_lines(outcomes: list[dict[str, Any]]) -> list[str]:
    """One line per unfinished run: its folder name (or its overrides) and why, e.g. ``  <run>: running: held by
    host:pid``."""
    lines = []
    for outcome in outcomes:
        if outcome["status"] in FINISHED:
            continue
        who = outcome.get("run") or " ".join(outcome.get("overrides") or []) or "?"
        why = " ".join(str(outcome.get("error") or "no reason recorded").split())
        lines.append(f"  {who}: {outcome['status']}: {why}")
    return lines
