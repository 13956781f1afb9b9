"""Model weights from the checkpoint files the study meets: Lightning checkpoints, plain ``state_dict`` files and
the dictionaries of the paper's released code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lit_sharp.errors import ConfigError
from lit_sharp.models.convert import is_old_layout, old_layout_error


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` from any of the checkpoint files the study meets.

    Accepted: a Lightning checkpoint (``state_dict`` entry, ``model.`` prefix removed), a plain ``state_dict``, and
    the dictionaries of the paper's released code (``{"last": state_dict, "best": ...}``; like its
    ``eval_sharpness.py``, the ``last`` weights are taken). Files are read with ``weights_only=True``: a checkpoint
    from elsewhere can hold only tensors and plain containers, never code to run.

    Raises:
        ConfigError: the file is missing, unreadable, or holds no ``state_dict``.
        UserError: a ResNet checkpoint of lit_sharp's earlier key layout (the message says how to convert it).
    """
    if not path.is_file():
        raise ConfigError("ckpt_path", str(path), "no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a checkpoint torch can read safely
        raise ConfigError("ckpt_path", str(path), f"cannot be read as a checkpoint with weights_only=True "
                          f"({type(exc).__name__}: {exc})") from None
    state = _state_dict_in(loaded)
    if state is None:
        raise ConfigError("ckpt_path", str(path), "holds neither a Lightning checkpoint, a state_dict of tensors, "
                          "nor a {'last': state_dict} dictionary of the paper's code")
    if state and all(key.startswith("model.") for key in state):
        state = {key.removeprefix("model."): value for key, value in state.items()}
    if is_old_layout(state):
        raise old_layout_error(path)
    return dict(state)


def _state_dict_in(loaded: Any) -> Mapping[str, torch.Tensor] | None:
    """The tensors of a loaded checkpoint: its Lightning ``state_dict``, its ``last`` entry, or the file itself."""
    if not isinstance(loaded, Mapping):
        return None
    for key in ("state_dict", "last"):
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    return loaded if all(isinstance(value, torch.Tensor) for value in loaded.values()) else None
