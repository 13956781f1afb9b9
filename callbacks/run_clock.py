"""Wall time of a run across interruptions: every attempt's seconds, kept in the run folder and in its checkpoints."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

#: The run folder's record of each attempt's seconds, one JSON line per update: ``{"attempt": id, "seconds": s}``.
ATTEMPTS_FILE = "attempts.jsonl"
#: Seconds between two updates of the attempts file while training, at most; so a process killed outright (out of
#: memory, SIGKILL) loses at most this much of its time from the total.
RECORD_EVERY_SECONDS = 5.0


class RunClock(Callback):
    """Seconds a run has spent so far, summed over every process (attempt) that worked on it.

    ``seconds = sum over earlier attempts of their last recorded seconds + the time of this one``. With an attempts
    file, each attempt appends its own running time there (every :data:`RECORD_EVERY_SECONDS` of training, at each
    checkpoint and at each :meth:`record`), so the time an attempt spent after its last checkpoint counts too, even
    when the process was killed outright. Without one (or for a run folder from before that file), the running total
    stored in the checkpoint is the earlier attempts' time.

    Example::

        clock = RunClock(run_dir / ATTEMPTS_FILE)
        Trainer(callbacks=[clock]).fit(module)
        clock.record()  # the total, also written to the attempts file
    """

    def __init__(self, attempts_file: Path | None = None) -> None:
        self._file = attempts_file
        self._attempt = secrets.token_hex(4)
        earlier = read_attempts(attempts_file) if attempts_file is not None else {}
        self._from_file = bool(earlier)
        self._earlier = sum(earlier.values())
        self._started = time.monotonic()
        self._recorded = self._started

    @property
    def seconds(self) -> float:
        """Seconds of earlier attempts plus those of this one."""
        return self._earlier + time.monotonic() - self._started

    def record(self) -> float:
        """Write this attempt's seconds to the attempts file (when there is one); returns :attr:`seconds`."""
        now = time.monotonic()
        if self._file is not None:
            with self._file.open("a") as handle:
                handle.write(json.dumps({"attempt": self._attempt, "seconds": now - self._started}) + "\n")
        self._recorded = now
        return self._earlier + now - self._started

    @override
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if time.monotonic() - self._recorded >= RECORD_EVERY_SECONDS:
            self.record()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.record()}  # called as a checkpoint is written

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._from_file:
            return  # the attempts file counts every attempt, including what each did after its last checkpoint
        earlier = float(state_dict["seconds"])
        if self._file is not None:  # keep the checkpoint's total for the next attempts, as one earlier attempt
            with self._file.open("a") as handle:
                handle.write(json.dumps({"attempt": "before", "seconds": earlier}) + "\n")
        self._earlier = earlier


def read_attempts(path: Path) -> dict[str, float]:
    """Each attempt's last recorded seconds in an attempts file (a torn last line, from a kill, is skipped)."""
    attempts: dict[str, float] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return attempts
    for line in lines:
        try:
            entry = json.loads(line)
            attempts[str(entry["attempt"])] = float(entry["seconds"])
        except (ValueError, KeyError, TypeError):
            continue
    return attempts
