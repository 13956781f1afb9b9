"""Checkpoint files that a relaunch can trust: written atomically beside their target, the one before kept, and
checked before a run resumes from them.

Lightning's own writer stages the file in ``$TMPDIR`` and moves it; where ``$TMPDIR`` is another file system (usual on
clusters) the move is a copy over the checkpoint, which a kill or a full disk leaves truncated: the run's only
checkpoint is lost. :class:`AtomicCheckpointIO` writes through :mod:`lit_sharp.atomic_files` instead.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lit_sharp.atomic_files import atomic_write


def previous_of(path: Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``last.ckpt`` -> ``last.previous.ckpt``."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written to a temporary file in the checkpoint's own folder, flushed,
    fsynced and renamed; the checkpoint replaced is kept as :func:`previous_of` (a hard link, costing the disk space
    of one more checkpoint), so a relaunch has a fallback if the newest one proves unreadable."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        with atomic_write(path, "wb", previous=previous_of(path)) as handle:
            torch.save(checkpoint, handle)


def checkpoint_defect(path: Path) -> str | None:
    """Why ``path`` cannot be a complete checkpoint, or None when it reads back whole.

    ``torch.save`` files are zip archives with a CRC-32 per entry: every entry is read and its CRC checked (what a
    truncated or bit-flipped file fails), without unpickling anything.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"entry {bad} fails its CRC check" if bad is not None else None
