"""Lifecycle of the real ``cachesvc serve`` process: graceful shutdown writes
dirty data back (exit 0), ``kill -9`` loses nothing that an fsync returned,
a shutdown whose write-back fails exits non-zero naming the file, in-flight
requests finish within ``--shutdown-grace`` (and no longer), and the
``make run`` defaults serve ``./data``.

The failing origin is made two ways, both refusing the write-back in the
kernel rather than in a test double:

- *disk full*: the origin lives on a 1 MiB tmpfs. The origin file is sparse,
  so caching it allocates nothing there; once the tmpfs has been filled,
  writing the dirty page back needs a new block and fails with ENOSPC.
  Needs the privilege to mount (root in CI and in the dev container);
  skipped, saying why, without it.
- *file size limit*: ``RLIMIT_FSIZE`` of the running server is lowered with
  ``prlimit`` below the offset of the dirty bytes, so the write-back's
  ``pwrite`` fails with EFBIG (CPython ignores SIGXFSZ). Needs no privilege.
  The memory file is not affected: it is written through its mapping and
  only grows past its first chunk under a much larger load.

Permission bits would not do: the tests may run as root.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachesvc.origins.local.paths import is_temp_name
from tests.support.content import pattern
from tests.support.servers import (
    ServerProcess,
    free_port,
    running_cachesvc,
    start_cachesvc,
    wait_for_http,
)
from tests.support.waiting import wait_stalled, wait_until

KiB = 1 << 10
MiB = 1 << 20
STOP_TIMEOUT = 30.0
# Background write-back must not beat the shutdown to the dirty data.
NO_DAEMON = ["--dirty-expire", "1h"]


def call(
    method: str, url: str, *, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def cache_range(server: ServerProcess, path: str, first: int, last: int) -> None:
    status, _ = call(
        "GET", f"{server.url}/files/{path}", headers={"Range": f"bytes={first}-{last}"}
    )
    assert status == 206


def partial_put(
    server: ServerProcess, path: str, offset: int, data: bytes, query: str = ""
) -> None:
    status, body = call(
        "PUT",
        f"{server.url}/files/{path}{query}",
        headers={"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"},
        data=data,
    )
    assert status == 204, body


def dirty_bytes(server: ServerProcess) -> int:
    status, body = call("GET", f"{server.admin_url}/admin/stats")
    assert status == 200
    return int(json.loads(body)["memory"]["dirty_bytes"])


def test_sigterm_writes_dirty_data_back_and_exits_0(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    (root / "a.bin").write_bytes(pattern(1, 0, 256 * KiB))
    (root / "tail.bin").write_bytes(pattern(2, 0, 10_000))
    server = start_cachesvc(str(root), NO_DAEMON, log_dir=tmp_path / "logs")
    try:
        cache_range(server, "a.bin", 0, 65535)
        partial_put(server, "a.bin", 1000, b"A" * 2000)
        # The last cached page has room past the end: the file grows in the cache.
        cache_range(server, "tail.bin", 0, 9999)
        partial_put(server, "tail.bin", 9000, b"T" * 2000)
        assert dirty_bytes(server) == 4000
        # Only in the cache so far.
        assert (root / "a.bin").read_bytes() == pattern(1, 0, 256 * KiB)
        assert (root / "tail.bin").stat().st_size == 10_000
    finally:
        status = server.stop(signal.SIGTERM, STOP_TIMEOUT)
    assert status == 0, server.log()
    expected = bytearray(pattern(1, 0, 256 * KiB))
    expected[1000:3000] = b"A" * 2000
    assert (root / "a.bin").read_bytes() == expected
    assert (root / "tail.bin").read_bytes() == pattern(2, 0, 9000) + b"T" * 2000
    assert "all data written back" in server.log()


def test_kill_9_after_fsync_keeps_the_data(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    (root / "a.bin").write_bytes(pattern(3, 0, 128 * KiB))
    server = start_cachesvc(str(root), NO_DAEMON, log_dir=tmp_path / "logs")
    try:
        cache_range(server, "a.bin", 0, 131071)
        partial_put(server, "a.bin", 4096, b"F" * 4096)
        assert (root / "a.bin").read_bytes()[4096:8192] == pattern(3, 4096, 4096)
        status, _ = call("POST", f"{server.url}/files/a.bin?fsync")
        assert status == 204
        # A write with ?sync=1 is durable when it returns, too.
        partial_put(server, "a.bin", 65536, b"S" * 100, "?sync=1")
        # Dirty only in the cache: this one is lost by kill -9, by design.
        partial_put(server, "a.bin", 100_000, b"L" * 10)
    finally:
        server.kill()
    assert server.proc.returncode == -signal.SIGKILL
    data = (root / "a.bin").read_bytes()
    assert data[4096:8192] == b"F" * 4096
    assert data[65536:65636] == b"S" * 100
    assert data[100_000:100_010] == pattern(3, 100_000, 10)


@contextlib.contextmanager
def full_tmpfs(mountpoint: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``mountpoint``; skips the test if it cannot be mounted."""
    mountpoint.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("disk-full origin needs mount(8)")
    if result.returncode != 0:
        pytest.skip(f"disk-full origin needs to mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        umount = subprocess.run(["umount", str(mountpoint)], timeout=10, check=False)
        if umount.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=10, check=False)


def fill_filesystem(directory: Path) -> None:
    """Writes a file in ``directory`` until the filesystem is full."""
    chunk = b"\xaa" * (64 * KiB)
    with open(directory / "filler", "wb", buffering=0) as filler:
        while True:
            try:
                filler.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return


@pytest.mark.parametrize("refusal", ["disk-full", "file-size-limit"])
def test_sigterm_with_an_origin_refusing_writes_exits_nonzero_naming_the_file(
    tmp_path: Path, refusal: str
) -> None:
    with contextlib.ExitStack() as stack:
        if refusal == "disk-full":
            root = stack.enter_context(full_tmpfs(tmp_path / "mnt")) / "origin"
            offset, size = 8192, 256 * KiB
        else:
            root = tmp_path / "origin"
            offset, size = 3 * MiB, 4 * MiB
        root.mkdir()
        for name in ("stuck.bin", "fine.bin"):
            with open(root / name, "wb") as sparse:
                sparse.truncate(size)  # holes: caching it allocates nothing
        server = start_cachesvc(str(root), NO_DAEMON, log_dir=tmp_path / "logs")
        try:
            cache_range(server, "stuck.bin", offset, offset + 65535)
            partial_put(server, "stuck.bin", offset + 100, b"X" * 5000)
            if refusal == "disk-full":
                fill_filesystem(root.parent)
            else:
                limit = 2 * MiB
                resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
            # A file with nothing dirty is not a failure.
            cache_range(server, "fine.bin", 0, 4095)
            assert dirty_bytes(server) == 5000
        finally:
            status = server.stop(signal.SIGTERM, STOP_TIMEOUT)
        log = server.log()
        assert status not in (0, None), log
        assert status > 0, f"killed by signal {-status}:\n{log}"
        failure = f"could not write back stuck.bin ([{offset + 100}, {offset + 5100}))"
        assert failure in log
        assert not [line for line in log.splitlines() if "write back fine.bin" in line]
        assert "1 file(s) not written back" in log
        # Nothing half-done: the origin file still reads as it was.
        with open(root / "stuck.bin", "rb") as origin_file:
            origin_file.seek(offset)
            assert origin_file.read(65536) == bytes(65536)


def start_upload(
    server: ServerProcess, path: str, total: int, first: bytes
) -> http.client.HTTPConnection:
    """Sends the headers of a ``total``-byte PUT and ``first`` of its body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("PUT", f"/files/{path}")
    conn.putheader("Content-Length", str(total))
    conn.endheaders()
    conn.send(first)
    return conn


def wait_for_upload(root: Path, name: str, timeout: float = 10.0) -> None:
    """Waits until the origin holds a temporary file for ``name``: the PUT's
    handler is running and streams the body to the origin."""

    def uploading() -> bool:
        return any(is_temp_name(p.name) and p.name.startswith(f".{name}") for p in root.iterdir())

    wait_until(uploading, bool, timeout, f"an upload of {name} reaching the origin")


def wait_for_log(server: ServerProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log()}"
        time.sleep(0.05)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    body = pattern(4, 0, 512 * KiB)
    server = start_cachesvc(str(root), ["--shutdown-grace", "20s"], log_dir=tmp_path / "logs")
    conn = start_upload(server, "upload.bin", len(body), body[: 100 * KiB])
    try:
        wait_for_upload(root, "upload.bin")
        server.proc.send_signal(signal.SIGTERM)
        wait_for_log(server, "signal received")
        # No new connections on either listener: the server now waits for the
        # request in flight, which goes on.
        wait_until(
            lambda: refused(server.port) and refused(server.admin_port),
            bool, 5, "both listeners closed after SIGTERM",
        )  # fmt: skip
        assert server.proc.poll() is None, server.log()
        started = time.monotonic()
        conn.send(body[100 * KiB :])
        response = conn.getresponse()
        assert response.status == 201, response.read()
        response.read()
        # The answer closes the connection: the server is going away.
        assert response.getheader("Connection", "").lower() == "close" or response.will_close
        server.proc.wait(timeout=STOP_TIMEOUT)
        # Well before the grace period ran out.
        assert time.monotonic() - started < 10
    finally:
        conn.close()
        status = server.stop(signal.SIGKILL, 5)
    assert status == 0, server.log()
    assert (root / "upload.bin").read_bytes() == body
    assert "grace period" not in server.log()


def test_shutdown_grace_bounds_a_stuck_request(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    server = start_cachesvc(str(root), ["--shutdown-grace", "1s"], log_dir=tmp_path / "logs")
    conn = start_upload(server, "stuck.bin", MiB, b"x" * KiB)
    try:
        wait_for_upload(root, "stuck.bin")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=STOP_TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        conn.close()
        status = server.stop(signal.SIGKILL, 5)
    assert status == 0, server.log()
    assert 1 <= elapsed < 8, elapsed
    assert "1 request(s) still running after the 1s grace period" in server.log()
    # The unfinished full PUT changed nothing.
    assert not (root / "stuck.bin").exists()


@pytest.mark.parametrize("extra", ["", "X-Not-Simple: 1\r\n"], ids=["fast", "aiohttp"])
def test_shutdown_grace_bounds_a_download_nobody_reads(tmp_path: Path, extra: str) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    (root / "big.bin").write_bytes(pattern(5, 0, 32 * MiB))
    server = start_cachesvc(str(root), ["--shutdown-grace", "1s"], log_dir=tmp_path / "logs")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(f"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
            assert conn.recv(64).startswith(b"HTTP/1.1 200 ")
            wait_stalled(conn)  # nobody reads: the body fills the socket buffers
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(timeout=STOP_TIMEOUT)
            elapsed = time.monotonic() - started
    finally:
        status = server.stop(signal.SIGKILL, 5)
    log = server.log()
    assert status == 0, log
    assert 1 <= elapsed < 8, elapsed
    assert "1 request(s) still running after the 1s grace period" in log
    assert "Traceback" not in log and "ERROR" not in log, log
    # Cancelled, and its mappings released, before the cache closed.
    assert "exported views" not in log, log
    assert log.index("GET /files/big.bin 499") < log.index("shutdown complete"), log


def test_make_run_defaults_serve_data_in_the_working_directory(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    env["CACHESVC_LOCK_CHECK"] = os.environ.get("CACHESVC_LOCK_CHECK", "")
    argv = [
        sys.executable, "-m", "cachesvc", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin_port}",
    ]  # fmt: skip
    log_path = tmp_path / "cachesvc.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = ServerProcess(proc, port, admin_port, log_path, argv)
    try:
        wait_for_http(f"{server.url}/healthz", 30, proc)
        wait_for_http(f"{server.admin_url}/healthz", 30, proc)
        assert (tmp_path / "data").is_dir()
        status, _ = call("PUT", f"{server.url}/files/hello.txt", data=b"hello\n")
        assert status == 201
        assert (tmp_path / "data" / "hello.txt").read_bytes() == b"hello\n"
        assert call("GET", f"{server.url}/files/hello.txt") == (200, b"hello\n")
        assert call("GET", f"{server.admin_url}/readyz")[0] == 200
        banner = next(line for line in server.log().splitlines() if "serving" in line)
        assert f"http://127.0.0.1:{port}" in banner
        assert f"admin http://127.0.0.1:{admin_port}" in banner
        assert str(tmp_path / "data") in banner and "cache size" in banner
    finally:
        # Ctrl-C in `make run`.
        status = server.stop(signal.SIGINT, STOP_TIMEOUT)
    assert status == 0, server.log()


def test_running_cachesvc_stops_the_process(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    with running_cachesvc(str(root), log_dir=tmp_path / "logs") as server:
        assert call("GET", f"{server.admin_url}/healthz")[0] == 200
    assert server.proc.returncode == 0
    assert refused(server.port) and refused(server.admin_port)
