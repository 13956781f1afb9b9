"""The zoo downloader against a real HTTP server on 127.0.0.1 serving a temporary folder (``http.server`` with Range
support): whole files, transfers cut short and resumed, a server that ignores Range, size and checksum checks, HTTP
errors and a refused connection, and ``python -m lit_sharp.zoo download`` fetching a zoo's metadata and models."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from zoo_files import distractor_rows, write_hparam_info, write_index, zoo_rows

from lit_sharp.zoo import sources
from lit_sharp.zoo.__main__ import main as zoo_main
from lit_sharp.zoo.augreg import AugRegZoo
from lit_sharp.zoo.clip_soups import ClipSoupsZoo
from lit_sharp.zoo.download import DownloadError, download_file, download_zoo


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves the server's folder with ``Range: bytes=N-`` support; the server's attributes inject faults."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/redirect/"):  # as GitHub sends release assets to its storage host
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not server.ignore_range:
            start, status = int(match.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if server.md5 is not None:
            self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={server.md5(data)}")
        self.end_headers()
        if server.cuts > 0:  # announce the whole body, send part of it, hang up
            server.cuts -= 1
            body = body[: max(1, len(body) // 3)]
        self.wfile.write(body)


@pytest.fixture()
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: RangeHandler(*a, directory=str(served)))
    httpd.requests, httpd.ignore_range, httpd.md5, httpd.cuts = [], False, None, 0
    httpd.folder = served
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _payload(server, name: str = "weights.bin", size: int = 300_001) -> bytes:
    data = os.urandom(size)
    (server.folder / name).write_bytes(data)
    return data


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_whole_file_and_existing_file_is_kept(server, tmp_path):
    data = _payload(server)
    dest = tmp_path / "out" / "weights.bin"
    assert download_file(f"{server.url}/weights.bin", dest, progress=False) == dest
    assert dest.read_bytes() == data and not dest.with_name("weights.bin.part").exists()
    download_file(f"{server.url}/weights.bin", dest, progress=False)
    assert len(server.requests) == 1  # a complete file is not fetched again


def test_interrupted_transfer_resumes_on_the_next_run(server, tmp_path):
    data = _payload(server)
    server.cuts = 1
    dest = tmp_path / "weights.bin"
    with pytest.raises(DownloadError) as stopped:
        download_file(f"{server.url}/weights.bin", dest, retries=0, progress=False)
    message = str(stopped.value)
    assert f"{server.url}/weights.bin" in message and "run the same command again to resume" in message
    assert "\n" not in message and not dest.exists()
    part = tmp_path / "weights.bin.part"
    kept = part.stat().st_size
    assert 0 < kept < len(data) and part.read_bytes() == data[:kept]

    download_file(f"{server.url}/weights.bin", dest, retries=0, progress=False)
    assert server.requests[-1] == ("/weights.bin", f"bytes={kept}-")
    assert dest.read_bytes() == data and not part.exists()


def test_resume_through_a_redirect(server, tmp_path):
    data = _payload(server)
    server.cuts = 1
    dest = tmp_path / "weights.bin"
    with pytest.raises(DownloadError):
        download_file(f"{server.url}/redirect/weights.bin", dest, retries=0, progress=False)
    kept = (tmp_path / "weights.bin.part").stat().st_size
    download_file(f"{server.url}/redirect/weights.bin", dest, retries=0, progress=False)
    assert server.requests[-2:] == [("/redirect/weights.bin", f"bytes={kept}-"), ("/weights.bin", f"bytes={kept}-")]
    assert dest.read_bytes() == data


def test_stopped_transfers_resume_within_one_run(server, tmp_path):
    data = _payload(server)
    server.cuts = 2
    dest = download_file(f"{server.url}/weights.bin", tmp_path / "weights.bin", retries=2, progress=False)
    assert dest.read_bytes() == data
    assert [rng for _, rng in server.requests][0] is None
    assert all(rng is not None for _, rng in server.requests[1:]) and len(server.requests) == 3


def test_size_mismatch_after_all_retries_keeps_the_part(server, tmp_path):
    data = _payload(server)
    server.cuts = 10
    with pytest.raises(DownloadError, match=rf"stopped at \d+ of {len(data)} bytes, 2 times"):
        download_file(f"{server.url}/weights.bin", tmp_path / "weights.bin", retries=1, progress=False)
    assert (tmp_path / "weights.bin.part").is_file() and not (tmp_path / "weights.bin").exists()


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    data = _payload(server)
    (tmp_path / "weights.bin.part").write_bytes(b"stale bytes of another version")
    server.ignore_range = True
    dest = download_file(f"{server.url}/weights.bin", tmp_path / "weights.bin", progress=False)
    assert server.requests[0][1] == "bytes=30-" and dest.read_bytes() == data


def test_part_holding_the_whole_file_is_finished(server, tmp_path):
    data = _payload(server)
    (tmp_path / "weights.bin.part").write_bytes(data)
    dest = download_file(f"{server.url}/weights.bin", tmp_path / "weights.bin", progress=False)
    assert dest.read_bytes() == data and server.requests == [("/weights.bin", f"bytes={len(data)}-")]


def test_checksum_is_checked(server, tmp_path):
    data = _payload(server)
    server.md5 = _md5_b64
    server.cuts = 1  # the MD5 covers the whole file, also after a resume
    assert download_file(f"{server.url}/weights.bin", tmp_path / "a.bin", progress=False).read_bytes() == data
    server.md5 = lambda body: _md5_b64(body + b"x")
    with pytest.raises(DownloadError, match="MD5 differs") as corrupt:
        download_file(f"{server.url}/weights.bin", tmp_path / "b.bin", progress=False)
    assert f"{server.url}/weights.bin" in str(corrupt.value)
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()


def test_http_error_and_refused_connection_name_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/missing\.bin: HTTP 404"):
        download_file(f"{server.url}/missing.bin", tmp_path / "missing.bin", progress=False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/index.csv"
    with pytest.raises(DownloadError) as offline:
        download_file(url, tmp_path / "index.csv", progress=False)
    message = str(offline.value)
    assert message.startswith(f"cannot reach {url} (") and "Connection refused" in message and "\n" not in message


def test_augreg_zoo_download_fetches_index_then_its_models(server, tmp_path):
    rows = zoo_rows("i1k")[:3] + zoo_rows("i21k")[:2] + distractor_rows()
    write_index(server.folder / "index.csv", rows)
    for row in rows:
        (server.folder / f"{row['adapt_filename']}.npz").write_bytes(row["adapt_filename"].encode())
    zoo = AugRegZoo("augreg_in21k", ds="i21k", timm_tag="augreg_in21k_ft_in1k", base_url=server.url)
    root = tmp_path / "zoo"
    first = download_zoo(zoo, root, only=1, progress=False)
    wanted = sorted(str(row["adapt_filename"]) for row in zoo_rows("i21k")[:2])
    assert first == [root / "index.csv", root / f"{wanted[0]}.npz"]
    download_zoo(zoo, root, progress=False)
    assert sorted(p.name for p in root.iterdir()) == sorted(["index.csv"] + [f"{n}.npz" for n in wanted])
    assert (root / f"{wanted[1]}.npz").read_text() == wanted[1]


def test_download_command_for_the_soups(server, tmp_path, monkeypatch, capsys):
    write_hparam_info(server.folder / "hparam_info.json")
    (server.folder / "releases").mkdir()
    for i in range(2):
        (server.folder / "releases" / f"model_{i}.pt").write_bytes(bytes([i]) * 1000)
    local = ClipSoupsZoo(release_url=f"{server.url}/releases", hparams_url=f"{server.url}/hparam_info.json")
    monkeypatch.setitem(sources.ZOOS, "clip_soups", local)
    root = tmp_path / "soups"
    assert zoo_main(["download", "clip_soups", "--to", str(root), "--only", "2"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["hparam_info.json", "model_0.pt", "model_1.pt"]
    assert (root / "model_1.pt").read_bytes() == bytes([1]) * 1000
    assert "clip_soups: 3 files" in capsys.readouterr().out

    assert zoo_main(["download", "clip_soups", "--to", str(root), "--only", "3"]) == 2  # model_2 is not served
    err = capsys.readouterr().err
    assert err == f"error: {server.url}/releases/model_2.pt: HTTP 404 Not Found; check the address (is the release " \
                  "still online?)\n"


def test_release_urls():
    """The addresses the real zoos are fetched from (the public AugReg bucket, the soups' GitHub release)."""
    augreg = sources.ZOOS["augreg_in1k"]
    name = "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224"
    assert augreg.url(name) == f"https://storage.googleapis.com/vit_models/augreg/{name}.npz"
    assert augreg.metadata_files() == [("https://storage.googleapis.com/vit_models/augreg/index.csv", "index.csv")]
    soups = sources.ZOOS["clip_soups"]
    assert soups.url("model_71") == "https://github.com/mlfoundations/model-soups/releases/download/v0.0.2/model_71.pt"
    assert soups.metadata_files() == [
        ("https://raw.githubusercontent.com/mlfoundations/model-soups/main/hparam_info.json", "hparam_info.json")]
