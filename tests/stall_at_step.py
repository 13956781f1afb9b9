"""A callback for tests that signal a running ``python train.py``: at a given step it writes a marker file (the
step) and then waits, up to a minute, for the test to send a signal, so that the signal lands at a known step."""

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StallAtStep(Callback):
    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(getattr(cb, "received", None) for cb in trainer.callbacks):
            time.sleep(0.02)
