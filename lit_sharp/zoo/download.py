"""Fetching a zoo's public files over HTTP(S): resumable, size- and checksum-checked, with a progress bar.

A file is written to ``<dest>.part`` and renamed to ``<dest>`` only once complete, so a file under its final name is
always whole. A transfer that stops early keeps its ``.part``; the next attempt asks for the rest with an HTTP
``Range`` header (a server that ignores it sends the whole file again, which then replaces the ``.part``). The size
announced by the server (``Content-Length``, or the total of ``Content-Range``) is checked, and so is the MD5 that
Google Cloud Storage sends in ``x-goog-hash``; GitHub releases send no checksum.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from lit_sharp.errors import UserError

CHUNK = 1 << 20
USER_AGENT = "lit_sharp-zoo-download"
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+)")


class DownloadError(UserError):
    """A file that could not be fetched: the message names the URL and what to do."""


class _Incomplete(Exception):
    """The transfer ended before the announced size; the ``.part`` holds what arrived."""

    def __init__(self, received: int, total: int | None) -> None:
        super().__init__(f"{received} of {total if total is not None else '?'} bytes")
        self.received = received
        self.total = total


class Downloadable(Protocol):
    """A zoo source, as far as fetching its files goes (see :mod:`lit_sharp.zoo.sources`)."""

    zoo: str

    def metadata_files(self) -> list[tuple[str, str]]: ...

    def names(self, root: Path) -> list[str]: ...

    def file_name(self, name: str) -> str: ...

    def url(self, name: str) -> str: ...


def download_file(url: str, dest: Path, *, retries: int = 3, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch ``url`` into ``dest`` unless ``dest`` exists; resume an earlier ``.part``; return ``dest``.

    Args:
        url: the file's address.
        dest: where the complete file goes (its folder is created).
        retries: how many times a transfer that stops early is resumed before giving up.
        timeout: seconds without data before a connection counts as stopped.
        progress: draw a tqdm bar.

    Raises:
        DownloadError: the URL cannot be reached, answers with an HTTP error, keeps stopping early (the ``.part``
            stays for the next run), or sends a file whose size or checksum is wrong (the ``.part`` is removed).
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, progress)
            break
        except _Incomplete as stop:
            if attempt == retries:
                raise DownloadError(
                    f"{url}: the transfer stopped at {stop}, {retries + 1} times; {part} keeps what arrived: run "
                    "the same command again to resume") from None
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> None:
    start = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and start:
            return _check_unsatisfiable_range(part, exc.headers.get("Content-Range"))
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the address (is the release still "
                            "online?)") from None
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url} ({reason}); check the network connection and run the command "
                            "again") from None
    with response:
        start, total = _resume_point(response, start)
        md5 = _md5_of(response.headers.get_all("x-goog-hash") or [])
        _stream(response, part, start, total, progress)
    received = part.stat().st_size
    if total is not None and received < total:
        raise _Incomplete(received, total)
    if total is not None and received > total:
        part.unlink()
        raise DownloadError(f"{url}: received {received} bytes but the server announced {total}; the partial file "
                            "was removed: run the command again")
    if md5 is not None and _file_md5(part) != md5:
        part.unlink()
        raise DownloadError(f"{url}: the file's MD5 differs from the server's (x-goog-hash); the corrupt file was "
                            "removed: run the command again")


def _resume_point(response: http.client.HTTPResponse, start: int) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's total size, from the status and headers."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or match.group(1) is None or int(match.group(1)) != start:
            raise DownloadError(f"{response.url}: asked for bytes from {start}, the server answered with range "
                                f"{response.headers.get('Content-Range')!r}; delete the .part file and run again")
        return start, int(match.group(2))
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _stream(response: http.client.HTTPResponse, part: Path, start: int, total: int | None, progress: bool) -> None:
    # http.client's read(n) returns b"" when the server closes early; the size check afterwards catches it.
    with part.open("ab" if start else "wb") as out, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name.removesuffix(".part"),
        disable=not progress, leave=False,
    ) as bar:
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException):
            pass  # a reset or timeout mid-body: what arrived is kept, and the size check asks for the rest


def _check_unsatisfiable_range(part: Path, content_range: str | None) -> None:
    """A 416 answer: the ``.part`` already holds the whole file (renamed after this) or more (removed)."""
    match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if match is not None and int(match.group(2)) == part.stat().st_size:
        return
    part.unlink()
    raise _Incomplete(0, int(match.group(2)) if match else None)


def _md5_of(hash_headers: Sequence[str]) -> bytes | None:
    for header in hash_headers:
        for item in header.split(","):
            kind, _, value = item.strip().partition("=")
            if kind == "md5":
                return base64.b64decode(value)
    return None


def _file_md5(path: Path) -> bytes:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.digest()


def download_zoo(source: Downloadable, root: Path, *, only: int | None = None, retries: int = 3,
                 progress: bool = True) -> list[Path]:
    """Fetch a zoo's metadata, then its model files (the first ``only`` of them), into ``root``.

    Files already complete under ``root`` are skipped, so the command can be rerun after any failure.

    Returns:
        The paths of the metadata and model files, in the order fetched.
    """
    fetched = [download_file(url, root / name, retries=retries, progress=progress)
               for url, name in source.metadata_files()]
    names = source.names(root)
    for count, name in enumerate(names[:only] if only is not None else names, start=1):
        if progress:
            tqdm.write(f"[{count}/{len(names)}] {source.file_name(name)}")
        fetched.append(download_file(source.url(name), root / source.file_name(name), retries=retries,
                                     progress=progress))
    return fetched
