"""Locks that hold on clusters: a run folder's lock, the data download lock, GPU slot locks.

Each lock is a kernel ``flock`` on ``<name>`` (released by the kernel when its process dies, however it dies) plus an
owner file ``<name>.owner`` (JSON: host, pid, start time) written while it is held and touched every
:data:`HEARTBEAT_SECONDS`. Readers such as ``grid status`` read the owner file and never take the lock, so they cannot
make a starting trainer believe its run is taken.

Some shared file systems (some NFS and Lustre mounts) refuse ``flock``. There, or with ``resources.lock_mode=file``, the
owner file alone is the lock, created with ``O_EXCL``. A lock left by a dead process is taken over: on the same host
when its pid no longer exists, from another host when its heartbeat is older than :data:`STALE_SECONDS` (a process
that is alive but frozen that long on another host loses its lock; that host's clock is not consulted, only the file's
modification time as the file server stamps it). Only one process may remove a stale owner file: the one that creates
``<name>.owner.takeover`` (``O_EXCL``), and only if the owner file still names the owner it judged stale, so two
processes taking over at once never both end up holding the lock.

A kernel lock can outlive its owner's pid: a process forked by the owner (a DataLoader worker) shares the lock until
it notices its parent is gone, within seconds. A run folder's lock whose owner is gone but that is still held is
retried for :data:`ORPHAN_WAIT_SECONDS` before the caller is told it is busy.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
ORPHAN_WAIT_SECONDS = 30.0
#: A takeover file older than this was left by a process that died while taking over (it takes milliseconds).
TAKEOVER_STALE_SECONDS = 60.0
MODES = ("auto", "flock", "file")
#: errno values of a file system that has no working flock.
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}
_warned_no_flock = False


class LockBusy(Exception):
    """The lock is held by another process; ``owner`` is what its owner file says (may be empty)."""

    def __init__(self, path: Path, owner: dict[str, Any]) -> None:
        self.path = path
        self.owner = owner
        super().__init__(f"{path} is held by {self.holder}")

    @property
    def holder(self) -> str:
        """``host:pid`` of the owner, with a note when that process is gone but the lock is still held."""
        if not self.owner:
            return "an unknown process"
        holder = f"{self.owner.get('host')}:{self.owner.get('pid')}"
        return holder if owner_alive(self.owner) else f"{holder} (gone; a process it started still holds the lock)"


def default_lock_dir() -> Path:
    """A per-user folder for machine-wide locks: ``$XDG_RUNTIME_DIR/lit_sharp`` or ``<tmp>/lit_sharp-<user>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "lit_sharp" if runtime and Path(runtime).is_dir() else \
        Path(tempfile.gettempdir()) / f"lit_sharp-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def owner_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".owner")


def read_owner(lock: Path) -> dict[str, Any]:
    """The owner record of ``lock`` (host, pid, started, and ``age``: seconds since its last heartbeat), or {}."""
    path = owner_path(lock)
    try:
        owner = json.loads(path.read_text())
        owner["age"] = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def owner_alive(owner: dict[str, Any], stale_seconds: float = STALE_SECONDS) -> bool:
    """Whether the process an owner record names may still hold its lock.

    Same host: its pid exists. Another host: its heartbeat is younger than ``stale_seconds``.
    """
    if not owner:
        return False
    if owner.get("host") == socket.gethostname():
        return _pid_exists(int(owner.get("pid", -1)))
    return float(owner.get("age", float("inf"))) < stale_seconds


def is_held(lock: Path, stale_seconds: float = STALE_SECONDS) -> bool:
    """Whether a live process holds ``lock``, judged from its owner file alone (takes no lock)."""
    return owner_alive(read_owner(lock), stale_seconds)


@contextmanager
def hold(lock: Path, *, mode: str = "auto", wait: float | None = 0, poll_seconds: float = 1.0,
         stale_seconds: float = STALE_SECONDS, on_wait: str | None = None, orphan_wait: float = 0.0) -> Iterator[None]:
    """Hold ``lock`` for the block.

    Args:
        lock: the lock file's path (its folder must exist).
        mode: ``flock`` (kernel lock), ``file`` (owner file alone, for file systems without flock) or ``auto``
            (flock, falling back to ``file`` with one warning where the file system refuses it).
        wait: seconds to wait for a held lock; 0 tries once, None waits for ever.
        poll_seconds: how often a waiting caller retries.
        stale_seconds: see :func:`owner_alive`.
        on_wait: logged once when the lock is found held and the caller waits.
        orphan_wait: seconds to wait at least for a lock that is still held after its owner died (e.g.
            :data:`ORPHAN_WAIT_SECONDS`; see the module docstring).

    Raises:
        LockBusy: the lock is still held after ``wait`` seconds.
        ValueError: an unknown ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"lock mode must be one of {MODES}, got {mode!r}")
    started = time.monotonic()
    logged = False
    while True:
        try:
            release = _try_acquire(lock, mode, stale_seconds)
            break
        except LockBusy as busy:
            orphaned = bool(busy.owner) and not owner_alive(busy.owner, stale_seconds)
            patience = orphan_wait if orphaned else 0.0
            if wait is not None and time.monotonic() - started >= max(wait, patience):
                raise
            if on_wait and not logged:
                log.info(on_wait)
                logged = True
            time.sleep(poll_seconds)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(owner_path(lock), stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        release()


def _try_acquire(lock: Path, mode: str, stale_seconds: float):
    if mode != "file":
        flock = FileLock(str(lock), timeout=0)
        try:
            flock.acquire()
        except Timeout:
            raise LockBusy(lock, read_owner(lock)) from None
        except (OSError, NotImplementedError) as exc:
            if mode == "flock" or (isinstance(exc, OSError) and exc.errno not in _NO_FLOCK):
                raise
            _warn_no_flock(lock, exc)
        else:
            _write_owner(owner_path(lock), exclusive=False)

            def release_flock() -> None:
                owner_path(lock).unlink(missing_ok=True)
                flock.release()

            return release_flock
    _acquire_owner_file(lock, stale_seconds)
    token = read_owner(lock).get("token")

    def release_file() -> None:
        if read_owner(lock).get("token") == token:  # never remove a lock another process took over
            owner_path(lock).unlink(missing_ok=True)

    return release_file


def _acquire_owner_file(lock: Path, stale_seconds: float) -> None:
    path = owner_path(lock)
    for _ in range(3):
        try:
            _write_owner(path, exclusive=True)
            return
        except FileExistsError:
            owner = read_owner(lock)
            if not owner:
                try:
                    if time.time() - path.stat().st_mtime <= 5:
                        raise LockBusy(lock, owner) from None  # being written now
                except FileNotFoundError:
                    continue  # released meanwhile
                owner = {"token": None}  # stays unreadable: its writer died mid-write
            elif owner_alive(owner, stale_seconds):
                raise LockBusy(lock, owner) from None
            _take_over(lock, owner)
    raise LockBusy(lock, read_owner(lock))


def _take_over(lock: Path, stale: dict[str, Any]) -> None:
    """Remove the owner file of ``lock`` if it still names the ``stale`` owner; one process at a time does this."""
    takeover = owner_path(lock).with_name(owner_path(lock).name + ".takeover")
    try:
        fd = os.open(takeover, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            if time.time() - takeover.stat().st_mtime > TAKEOVER_STALE_SECONDS:
                takeover.unlink(missing_ok=True)
        except OSError:
            pass
        raise LockBusy(lock, stale) from None
    os.close(fd)
    try:
        if read_owner(lock).get("token") == stale.get("token"):
            log.warning("taking over %s: its owner (pid %s on %s) is gone", lock, stale.get("pid"), stale.get("host"))
            owner_path(lock).unlink(missing_ok=True)
    finally:
        takeover.unlink(missing_ok=True)


def _write_owner(path: Path, *, exclusive: bool) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": os.urandom(8).hex()}
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "w") as handle:
        json.dump(owner, handle)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            os.utime(path)
        except OSError:
            pass


def _warn_no_flock(lock: Path, exc: BaseException) -> None:
    global _warned_no_flock
    if not _warned_no_flock:
        log.warning("the file system of %s refuses flock (%s); using owner files as locks (resources.lock_mode=file)",
                    lock.parent, exc)
        _warned_no_flock = True


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
