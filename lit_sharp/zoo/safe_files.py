"""Reading downloaded weight files without running code from them, and the one error a bad file ends in.

A ``.pt`` file is a pickle: ``torch.load(..., weights_only=True)`` refuses any pickle that would call something other
than tensor constructors (``os.system`` included). A ``.npz`` file is a zip of arrays, opened with
``allow_pickle=False`` so that an object array cannot smuggle a pickle in.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lit_sharp.errors import DataError

#: The exceptions a missing, truncated, foreign or malicious file raises while it is read (never a bug of ours).
READ_ERRORS = (
    OSError, EOFError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError,
)


class ModelFileError(DataError):
    """A model file or zoo metadata file that is missing, truncated or not what the zoo releases."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {problem}; {fix}")


def require_file(path: Path, fix: str) -> Path:
    """Return ``path`` if it is a file, else raise :class:`ModelFileError` saying ``fix``."""
    if not path.is_file():
        raise ModelFileError(path, "no such file", fix)
    return path


def load_torch_state_dict(path: Path, fix: str) -> dict[str, Any]:
    """The state dict saved at ``path``, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        ModelFileError: the file is missing, truncated, not a PyTorch file, a pickle that would run code, or holds
            something else than a dict of tensors.
    """
    import torch

    require_file(path, fix)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as exc:
        raise ModelFileError(path, f"not a readable PyTorch state dict ({_first_line(exc)})", fix) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(path, "holds no state dict (a dict of tensors)", fix)
    return state


def npz_shapes(path: Path, fix: str) -> dict[str, tuple[int, ...]]:
    """Each array's shape in the ``.npz`` archive at ``path``, every array read once so that truncation shows.

    Raises:
        ModelFileError: the file is missing, truncated (a member fails its CRC or ends early), not a zip of arrays,
            or holds an object array (a pickle).
    """
    require_file(path, fix)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an archive of named arrays")
            return {key: archive[key].shape for key in archive.files}
    except READ_ERRORS as exc:
        raise ModelFileError(path, f"not a readable .npz archive ({_first_line(exc)})", fix) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
