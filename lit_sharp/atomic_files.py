"""Files that are whole or absent: every file a relaunch reads is written through here.

A file is written to a temporary file in its own folder, flushed, ``fsync``-ed and renamed over its name, then the
folder is ``fsync``-ed so the rename itself survives a power cut. A rename within one file system is atomic, so a
process killed at any point (or a full disk) leaves the previous file or none, never a truncated one. ``$TMPDIR`` is
never used: where it lies on another file system, "write there, then move" is a copy over the target, which a kill
leaves half-done.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: Path | str, mode: str = "w", *, previous: Path | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for the block; on success it replaces ``path`` atomically.

    Args:
        path: the file to write (its folder is created if needed).
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        previous: where the file being replaced is kept (a hard link, so no copy is made) once the new one is
            complete; it is itself replaced at the next write. None keeps nothing.

    Raises:
        Exception: whatever the block raises; ``path`` is then left as it was and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None and path.is_file():
            _keep(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: Path | str, obj: Any, **dump_kwargs: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``dump_kwargs`` go to :func:`json.dump`) and return the path."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, **dump_kwargs)
    return Path(path)


def write_with(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically with ``write(handle)`` on a binary handle (e.g. ``torch.save``) and return it."""
    with atomic_write(path, "wb") as handle:
        write(handle)
    return Path(path)


def create_exclusive(path: Path | str, text: str) -> None:
    """Create ``path`` holding ``text`` only if no file has that name: whole, or not at all.

    The content is written to a temporary file first and hard-linked to ``path``; ``link`` fails when the name
    exists, so two processes racing for the name cannot both win, and a reader never sees an empty file.

    Raises:
        FileExistsError: ``path`` exists.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive creation, then the content
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as handle:
                handle.write(text)
    finally:
        Path(tmp).unlink(missing_ok=True)
    sync_folder(path.parent)


def _keep(path: Path, previous: Path) -> None:
    link = previous.with_name(f".{previous.name}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        return  # no hard links here: only the newest file is kept
    os.replace(link, previous)


def sync_folder(folder: Path | str) -> None:
    """``fsync`` a folder, so that a rename into it is on disk (a no-op where the file system refuses it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on folders; their renames are synchronous anyway
    finally:
        os.close(fd)
