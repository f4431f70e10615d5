"""``reclora-ds download``: checksummed, resumable, atomic downloads, against a local HTTP server.

The server (``http.server`` in a thread on 127.0.0.1) serves zip archives built from the test fixtures
(``tests/fixtures/ml-1m-sample``, the bundled ``ml-latest-small``), answers ``Range`` requests with 206, can
cut a response short after N bytes (while announcing the whole length), and can send slowly (for a kill in
the middle). The command gets the server through ``--base-url`` / ``$RECLORA_DOWNLOAD_BASE_URL`` and the
archive's md5 through ``--md5`` or the served ``<archive>.md5``: the documented settings for mirrors.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reclora_ds.commands.download import main as download_main
from reclora_ds.data.prepare import bundled_dataset
from reclora_ds.download import BASE_URL_ENV, MARKER_FILE, SOURCES
from tests.launch import clean_env

FIXTURES = Path(__file__).parent / "fixtures"


def build_zip(folder: Path, top: str) -> bytes:
    """A zip of ``folder``'s files under one top folder ``top/``, as GroupLens packs its archives."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{top}/", b"")
        for path in sorted(folder.iterdir()):
            if path.is_file():
                archive.write(path, f"{top}/{path.name}")
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass
class Server:
    """What the test server serves, how, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before closing (once)
    delay_s: float = 0.0  # per 1 KiB chunk
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header)
    url: str = ""


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path = self.path.lstrip("/")
            server.requests.append((path, self.headers.get("Range", "")))
            data = server.files.get(path)
            if data is None:
                self.send_error(404)
                return
            start = 0
            match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", f'"{md5(data)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            body = data[start:]
            cut = server.cut_after.pop(path, None)
            if cut is not None:
                body = body[:cut]
            for i in range(0, len(body), 1024):
                self.wfile.write(body[i : i + 1024])
                if server.delay_s:
                    time.sleep(server.delay_s)
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/movielens"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def ml1m_zip() -> bytes:
    return build_zip(FIXTURES / "ml-1m-sample", "ml-1m")


def serve(server: Server, name: str, data: bytes, published_md5: str | None = None) -> None:
    archive = SOURCES[name].archive
    server.files[f"movielens/{archive}"] = data
    if published_md5 is not None:
        server.files[f"movielens/{archive}.md5"] = f"MD5 ({archive}) = {published_md5}\n".encode()


def run(server: Server, to: Path, name: str = "ml-1m", *extra: str) -> int:
    return download_main([name, "--to", str(to), "--base-url", server.url, *extra])


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_success_extracts_the_files_checks_them_and_leaves_no_temporaries(server, ml1m_zip, tmp_path, capsys):
    serve(server, "ml-1m", ml1m_zip)
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 0
    dest = tmp_path / "ml-1m"
    for name in ("movies.dat", "ratings.dat", "users.dat", "README"):  # the top folder ml-1m/ is dropped
        assert (dest / name).read_bytes() == (FIXTURES / "ml-1m-sample" / name).read_bytes()
    assert listing(tmp_path) == ["ml-1m", f"ml-1m/{MARKER_FILE}", "ml-1m/README", "ml-1m/movies.dat",
                                 "ml-1m/ratings.dat", "ml-1m/users.dat"]  # fmt: skip
    assert md5(ml1m_zip) in capsys.readouterr().out


def test_published_md5_beside_the_archive_is_used_when_none_is_pinned(server, tmp_path, monkeypatch):
    """ml-latest-small has no pinned md5: the served ``.md5`` (GroupLens' format) is read; the base URL
    comes from the environment variable."""
    data = build_zip(bundled_dataset("ml-latest-small"), "ml-latest-small")
    serve(server, "ml-latest-small", data, published_md5=md5(data))
    monkeypatch.setenv(BASE_URL_ENV, server.url)
    assert download_main(["ml-latest-small", "--to", str(tmp_path)]) == 0
    assert (tmp_path / "ml-latest-small" / "ratings.csv").stat().st_size == (
        bundled_dataset("ml-latest-small") / "ratings.csv"
    ).stat().st_size
    assert ("movielens/ml-latest-small.zip.md5", "") in server.requests


def test_pinned_md5_is_checked_against_the_real_archive_name(server, ml1m_zip, tmp_path, capsys):
    """Without --md5 the pinned GroupLens checksum applies: a fixture archive does not match it."""
    serve(server, "ml-1m", ml1m_zip)
    assert run(server, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checksum mismatch" in err and SOURCES["ml-1m"].md5 in err
    assert listing(tmp_path) == []  # the mismatching bytes are deleted, nothing extracted


def test_resume_after_a_truncated_transfer(server, ml1m_zip, tmp_path, capsys):
    serve(server, "ml-1m", ml1m_zip)
    cut = len(ml1m_zip) // 3
    server.cut_after["movielens/ml-1m.zip"] = cut
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cut short" in err and "again to resume" in err
    assert not (tmp_path / "ml-1m").exists()  # only hidden temporaries
    assert (tmp_path / ".ml-1m.zip.part").stat().st_size == cut
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 0
    assert server.requests[-1] == ("movielens/ml-1m.zip", f"bytes={cut}-")  # asked only for the rest
    assert "resumed after" in capsys.readouterr().out
    assert (tmp_path / "ml-1m" / "ratings.dat").read_bytes() == (
        FIXTURES / "ml-1m-sample" / "ratings.dat"
    ).read_bytes()
    assert not [p for p in listing(tmp_path) if p.startswith(".")]


def test_checksum_mismatch_is_an_error_and_leaves_nothing(server, ml1m_zip, tmp_path, capsys):
    corrupt = bytearray(ml1m_zip)
    corrupt[len(corrupt) // 2] ^= 0xFF  # one flipped byte in transit
    serve(server, "ml-1m", bytes(corrupt))
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checksum mismatch" in err and md5(bytes(corrupt)) in err
    assert listing(tmp_path) == []


def test_truncated_zip_with_a_matching_checksum_is_an_error(server, ml1m_zip, tmp_path, capsys):
    """The publisher's archive itself is truncated (its md5 matches what was published): extraction fails,
    nothing that looks complete is left."""
    truncated = ml1m_zip[: len(ml1m_zip) - 200]  # the central directory is gone
    serve(server, "ml-1m", truncated)
    assert run(server, tmp_path, "ml-1m", "--md5", md5(truncated)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a readable zip archive" in err
    assert listing(tmp_path) == []


def test_an_existing_folder_that_is_not_a_download_is_refused(server, ml1m_zip, tmp_path, capsys):
    serve(server, "ml-1m", ml1m_zip)
    mine = tmp_path / "ml-1m"
    mine.mkdir()
    (mine / "ratings.dat").write_text("my own edited ratings\n")
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {mine}: exists and is not a reclora-ds download")
    assert (mine / "ratings.dat").read_text() == "my own edited ratings\n"
    assert server.requests == []  # refused before any transfer


def test_an_earlier_download_with_changed_files_is_refused(server, ml1m_zip, tmp_path, capsys):
    serve(server, "ml-1m", ml1m_zip)
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 0
    edited = tmp_path / "ml-1m" / "users.dat"
    edited.write_text("edited by the user\n")
    # another expected md5 would replace an intact earlier download; a changed one is refused
    assert run(server, tmp_path, "ml-1m", "--md5", "0" * 32) == 2
    assert "files changed since (users.dat)" in capsys.readouterr().err
    assert edited.read_text() == "edited by the user\n"


def test_rerun_is_a_no_op(server, ml1m_zip, tmp_path, capsys):
    serve(server, "ml-1m", ml1m_zip)
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 0
    stamp = {p: (tmp_path / p).stat().st_mtime_ns for p in listing(tmp_path)}
    asked = len(server.requests)
    capsys.readouterr()
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 0
    assert "already downloaded" in capsys.readouterr().out
    assert len(server.requests) == asked  # no transfer
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in listing(tmp_path)} == stamp


def test_kill_in_the_middle_leaves_nothing_complete_looking_and_the_rerun_resumes(server, ml1m_zip, tmp_path):
    """``kill -9`` of the command while it downloads (the server sends slowly): no ``ml-1m`` folder, only
    the hidden partial file; the same command then finishes from where the transfer stopped."""
    serve(server, "ml-1m", ml1m_zip)
    server.delay_s = 0.02  # about 50 KiB/s: several seconds for the archive
    command = [sys.executable, "-m", "reclora_ds.commands.download", "ml-1m", "--to", str(tmp_path),
               "--base-url", server.url, "--md5", md5(ml1m_zip)]  # fmt: skip
    proc = subprocess.Popen(command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = tmp_path / ".ml-1m.zip.part"
    deadline = time.monotonic() + 60
    while (not part.exists() or part.stat().st_size < 20_000) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "ml-1m").exists()
    assert all(p.startswith(".") for p in listing(tmp_path)), listing(tmp_path)
    have = part.stat().st_size
    assert 0 < have < len(ml1m_zip)
    server.delay_s = 0.0
    assert subprocess.run(command, env=clean_env(), capture_output=True).returncode == 0
    assert server.requests[-1] == ("movielens/ml-1m.zip", f"bytes={have}-")
    assert (tmp_path / "ml-1m" / "movies.dat").read_bytes() == (
        FIXTURES / "ml-1m-sample" / "movies.dat"
    ).read_bytes()
    assert not [p for p in listing(tmp_path) if p.startswith(".")]


def test_a_zip_with_unsafe_member_names_is_refused(server, tmp_path, capsys):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-1m/ratings.dat", b"1::1::5::1\n")
        archive.writestr("../escape.txt", b"outside")
    data = buffer.getvalue()
    serve(server, "ml-1m", data)
    assert run(server, tmp_path / "data", "ml-1m", "--md5", md5(data)) == 2
    assert "unsafe member name" in capsys.readouterr().err
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "data" / "ml-1m").exists()


def test_unreachable_server_and_missing_archive_are_errors(server, tmp_path, capsys):
    assert run(server, tmp_path, "ml-1m", "--md5", "0" * 32) == 2  # nothing served: HTTP 404
    assert "HTTP 404" in capsys.readouterr().err
    assert (
        download_main(["ml-1m", "--to", str(tmp_path), "--base-url", "http://127.0.0.1:9", "--md5", "0" * 32])
        == 2
    )
    assert "cannot connect" in capsys.readouterr().err
    assert listing(tmp_path) == []


def test_goodreads_prints_where_to_get_the_files(capsys):
    assert download_main(["goodreads"]) == 0
    out = capsys.readouterr().out
    assert "mengtingwan.github.io/data/goodreads.html" in out and "Nothing was downloaded" in out


def test_a_partial_file_that_is_already_whole_is_used_as_is(server, ml1m_zip, tmp_path):
    """A run killed after the last byte but before extracting: the resume request gets 416 (nothing left
    to send) and the archive is verified and extracted from the partial file."""
    serve(server, "ml-1m", ml1m_zip)
    server.cut_after["movielens/ml-1m.zip"] = 1000
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 2
    (tmp_path / ".ml-1m.zip.part").write_bytes(ml1m_zip)  # as if the rest had arrived before the kill
    assert run(server, tmp_path, "ml-1m", "--md5", md5(ml1m_zip)) == 0
    assert server.requests[-1] == ("movielens/ml-1m.zip", f"bytes={len(ml1m_zip)}-")
    assert (tmp_path / "ml-1m" / "users.dat").read_bytes() == (
        FIXTURES / "ml-1m-sample" / "users.dat"
    ).read_bytes()
