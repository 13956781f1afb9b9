"""The entry of one run: ``run(cfg)`` checks the config, then trains or evaluates.

``train.py`` (and ``python -m lit_sharp``) calls it once per run; tests call it directly. ``mode=train`` (the default)
trains and measures the run the config describes (:func:`lit_sharp.training.train`); ``mode=eval ckpt_path=PATH``
measures an existing checkpoint (:func:`lit_sharp.evaluate.evaluate`); ``mode=zoo`` measures a pretrained model of a
zoo (:func:`lit_sharp.zoo.run.measure_zoo_model`, set by the ``zoo_*`` experiments). A run folder is
``<paths.root>/<name>/<run name>`` (:mod:`lit_sharp.run_folder`); :func:`run_dir_of` gives it for a config.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lit_sharp.config import resolve_auto, validate
from lit_sharp.console import quiet_library_noise
from lit_sharp.evaluate import evaluate
from lit_sharp.run_folder import run_dir_of
from lit_sharp.training import train
from lit_sharp.zoo.run import measure_zoo_model

__all__ = ["run", "run_dir_of"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, then train and measure one model (or, with ``mode=eval``, measure a checkpoint).

    A run whose folder already holds a finished run is skipped; one with a checkpoint resumes.

    Returns:
        The run's ``results.json`` record. When another process holds the run folder's lock (two launches of one
        grid), nothing is trained and the returned record is ``{"run": {"name": ..., "status": "running"}}``.

    Raises:
        UserError: a bad config or missing data.
    """
    validate(cfg)
    quiet_library_noise()
    cfg = resolve_auto(cfg)
    if cfg.mode == "eval":
        return evaluate(cfg)
    if cfg.mode == "zoo":
        return measure_zoo_model(cfg)
    return train(cfg)
