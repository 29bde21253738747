"""The processes of the origin benchmark: nginx, a latency proxy, cachesvc, rclone.

Self-contained on purpose (no import of :mod:`benchmarks.peers`, which the
load benchmarks own): :func:`nginx_server` (one worker, sendfile, HTML
autoindex, which rclone's HTTP remote lists), :func:`cachesvc_server` and
:func:`rclone_http_server` are context managers that start one process on a
free 127.0.0.1 port, wait (bounded) until it answers, yield a :class:`Peer`
and stop it by PID (SIGTERM, or SIGQUIT for nginx; then SIGKILL of its
process group).

:class:`LatencyProxy` is an HTTP/1.1-aware TCP proxy run in a child process
(so its forwarding shares an interpreter with neither the client nor the
server under test). It holds the first bytes of every request for a fixed
delay before forwarding them, like a distant origin, and counts the requests
and the response bytes passing through. Request bodies must carry a
``Content-Length`` (the benchmark's clients only read).

rclone's remote is given as a connection string (no rclone config file).
Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
RCLONE = shutil.which("rclone") or "/usr/bin/rclone"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
_READ_PIECE = 1 << 20

_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ autoindex on; }}
    }}
}}
"""


@dataclass(frozen=True)
class Peer:
    """A running server: base URL, where files are (``url + prefix``), main PID. Immutable."""

    name: str
    url: str
    prefix: str
    pid: int

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def file_url(self, path: str) -> str:
        return f"{self.url}{self.prefix}{path}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    """Polls ``url`` until it answers with a status below 500."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
            last = exc
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    """Returns once 127.0.0.1:``port`` accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Sends ``sig``; SIGKILLs the process group after STOP_TIMEOUT. Always reaps.

    Every process here is started in its own session, so its group is its own.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # e.g. an orphaned nginx worker


def _start(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


@contextlib.contextmanager
def nginx_server(root: Path) -> Iterator[Peer]:
    """nginx serving ``root`` at ``/``."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as work:
        port = free_port()
        conf = Path(work) / "nginx.conf"
        # As root, the worker would run as 'nobody', which may not read root.
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        conf.write_text(_NGINX_CONF.format(user=user, work=work, port=port, root=root.resolve()))
        argv = [NGINX, "-p", work, "-c", str(conf), "-e", f"{work}/error.log"]
        proc = _start(argv, Path(work) / "out.log")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/", proc)
            yield Peer("nginx", url, "/", proc.pid)
        finally:
            stop_process(proc, signal.SIGQUIT)


@contextlib.contextmanager
def cachesvc_server(origin: str, args: Sequence[str], log_path: Path) -> Iterator[Peer]:
    """``python -m cachesvc serve --origin origin *args`` on free 127.0.0.1 ports."""
    port, admin_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "cachesvc", "serve",
        "--origin", origin,
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin_port}",
        *args,
    ]  # fmt: skip
    proc = _start(argv, log_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", proc)
        yield Peer("cachesvc", url, "/files/", proc.pid)
    finally:
        stop_process(proc)


async def _forward_requests(
    client: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
    delay: float,
    requests: Synchronized[int],
) -> None:
    """Client -> origin: each request's head (and Content-Length body), after ``delay``."""
    while True:
        try:
            head = await client.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding":
                raise ConnectionError("chunked request bodies are not supported")
        with requests.get_lock():
            requests.value += 1
        await asyncio.sleep(delay)
        upstream.write(head)
        while length:
            chunk = await client.read(min(length, _READ_PIECE))
            if not chunk:
                return
            upstream.write(chunk)
            length -= len(chunk)
        await upstream.drain()


async def _forward_responses(
    upstream: asyncio.StreamReader, client: asyncio.StreamWriter, sent: Synchronized[int]
) -> None:
    """Origin -> client, unchanged."""
    while chunk := await upstream.read(_READ_PIECE):
        client.write(chunk)
        with sent.get_lock():
            sent.value += len(chunk)
        await client.drain()


async def _serve_proxy(
    port: int,
    upstream_port: int,
    delay: float,
    requests: Synchronized[int],
    sent: Synchronized[int],
    ready: multiprocessing.synchronize.Event,
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            writer.close()
            return
        tasks = [
            asyncio.create_task(_forward_requests(reader, up_writer, delay, requests)),
            asyncio.create_task(_forward_responses(up_reader, writer, sent)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            up_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=64 << 10)
    ready.set()
    async with server:
        await server.serve_forever()


def _proxy_main(
    port: int,
    upstream_port: int,
    delay: float,
    requests: Synchronized[int],
    sent: Synchronized[int],
    ready: multiprocessing.synchronize.Event,
) -> None:
    import uvloop

    uvloop.run(_serve_proxy(port, upstream_port, delay, requests, sent, ready))


class LatencyProxy:
    """A child process proxying 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``,
    ``delay`` seconds before each request."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.port = free_port()  # Immutable.
        # Shared with the child, which only increments them.
        self._requests: Synchronized[int] = ctx.Value("q", 0)
        self._sent: Synchronized[int] = ctx.Value("q", 0)
        ready = ctx.Event()
        self._process = ctx.Process(
            target=_proxy_main,
            args=(self.port, upstream_port, delay, self._requests, self._sent, ready),
            daemon=True,
        )
        self._process.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError("the latency proxy did not start")

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def requests(self) -> int:
        """Requests forwarded since the last reset()."""
        return int(self._requests.value)

    @property
    def response_bytes(self) -> int:
        """Response bytes (headers included) forwarded since the last reset()."""
        return int(self._sent.value)

    def reset(self) -> None:
        with self._requests.get_lock():
            self._requests.value = 0
        with self._sent.get_lock():
            self._sent.value = 0

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(STOP_TIMEOUT)


def rclone_version() -> str:
    done = subprocess.run(
        [RCLONE, "version"], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.splitlines()[0].strip()


@contextlib.contextmanager
def rclone_http_server(origin_url: str, cache_dir: Path, log_path: Path) -> Iterator[Peer]:
    """``rclone serve http --vfs-cache-mode full`` of the HTTP remote ``origin_url``."""
    port = free_port()
    argv = [
        RCLONE, "serve", "http", f":http,url='{origin_url}':",
        "--addr", f"127.0.0.1:{port}",
        "--vfs-cache-mode", "full",
        "--cache-dir", str(cache_dir),
        "--log-level", "NOTICE",
    ]  # fmt: skip
    # No config file: the remote is given in full on the command line.
    env = {"RCLONE_CONFIG": str(log_path.with_suffix(".no-such-conf"))}
    proc = _start(argv, log_path, env)
    try:
        # Only the port: an HTTP request would make rclone list the remote
        # before the cold pass, hiding those origin requests from it.
        wait_for_port(port, proc)
        yield Peer("rclone", f"http://127.0.0.1:{port}", "/", proc.pid)
    finally:
        stop_process(proc)
