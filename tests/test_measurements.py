"""Which callbacks measure, and which a Trainer gets (no training here)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from lit_sharp.measurements import is_measurement, measured_at, split_measures


class Measure(Callback):
    def __init__(self, every_n_epochs: int | None = None) -> None:
        self.every_n_epochs = every_n_epochs
        self.measure_at_end = True
        self.history: list[dict] = []
        self.results: dict[str, float] = {}

    def measure(self, model, datamodule, progress=True) -> dict[str, float]:
        return {"m": 1.0}


def test_measurements_go_to_the_run_and_only_scheduled_ones_also_to_the_trainer():
    plain, final, scheduled = Callback(), Measure(), Measure(every_n_epochs=2)
    measures, in_trainer = split_measures({"clock": plain, "final": final, "curve": scheduled})
    assert measures == {"final": final, "curve": scheduled}
    assert in_trainer == [plain, scheduled]
    assert final.measure_at_end is True and scheduled.measure_at_end is False  # the run takes the final measurement
    assert not is_measurement(plain) and is_measurement(final)


def test_a_scheduled_measurement_of_the_last_step_is_reused_and_an_older_one_is_not():
    scheduled = Measure(every_n_epochs=1)
    assert measured_at(scheduled, 10) is None
    scheduled.history = [{"step": 5}, {"step": 10}]
    scheduled.results = {"sharpness/x": 0.5}
    assert measured_at(scheduled, 10) == {"sharpness/x": 0.5}
    assert measured_at(scheduled, 12) is None
