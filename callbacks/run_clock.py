"""Wall time of a run across interruptions, carried in its checkpoints."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class RunClock(Callback):
    """Seconds a run has spent in training so far, summed over every process that worked on it.

    The running total goes into each checkpoint, so a run resumed after a crash or a preemption reports its whole
    cost, not just that of its last process.

    Example::

        clock = RunClock()
        Trainer(callbacks=[clock]).fit(module)
        clock.seconds
    """

    def __init__(self) -> None:
        self._earlier = 0.0
        self._started = time.monotonic()

    @property
    def seconds(self) -> float:
        """Seconds of earlier processes (from the checkpoint) plus those of this one."""
        return self._earlier + time.monotonic() - self._started

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Time of the interrupted process after its last checkpoint is lost with it; its work is redone and counted.
        self._earlier = float(state_dict["seconds"])
        self._started = time.monotonic()
