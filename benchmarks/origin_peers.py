"""The origin benchmark's own peers: a latency proxy and ``rclone serve http``.

The rest (nginx, cachesvc, :class:`~benchmarks.peers.Peer`, free ports,
bounded waits, stopping) comes from :mod:`benchmarks.peers`. nginx is the
origin there, with :data:`NGINX_AUTOINDEX` in its server block: rclone's
HTTP remote lists directories from the HTML autoindex.

:class:`LatencyProxy` is an HTTP/1.1-aware TCP proxy run in a child process
(so its forwarding shares an interpreter with neither the client nor the
server under test). It holds the first bytes of every request for a fixed
delay before forwarding them, like a distant origin, and counts the requests
and the response bytes passing through. Request bodies must carry a
``Content-Length`` (the benchmark's clients only read).

:func:`rclone_http_server` is a context manager that starts rclone on a free
127.0.0.1 port in its own session, waits (bounded) until the port opens,
yields a :class:`~benchmarks.peers.Peer` and stops rclone by PID (SIGTERM,
then SIGKILL of its process group). Its remote is given as a connection
string (no rclone config file).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import subprocess
from collections.abc import Iterator
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from benchmarks.peers import START_TIMEOUT, STOP_TIMEOUT, Peer, pinned
from tests.support.servers import free_port, stop_process, wait_for_port

RCLONE = shutil.which("rclone") or "/usr/bin/rclone"
NGINX_AUTOINDEX = "location / { autoindex on; }"
_READ_PIECE = 1 << 20


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
    cpus: set[int] | None,
) -> None:
    import uvloop

    if cpus is not None:
        os.sched_setaffinity(0, cpus)

    uvloop.run(_serve_proxy(port, upstream_port, delay, requests, sent, ready))


class LatencyProxy:
    """A child process proxying 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``,
    ``delay`` seconds before each request, on ``cpus`` (all when None)."""

    def __init__(self, upstream_port: int, delay: float, cpus: set[int] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.port = free_port()  # Immutable.
        # Shared with the child, which only increments them.
        self._requests: Synchronized[int] = ctx.Value("q", 0)
        self._sent: Synchronized[int] = ctx.Value("q", 0)
        ready = ctx.Event()
        self._process = ctx.Process(
            target=_proxy_main,
            args=(self.port, upstream_port, delay, self._requests, self._sent, ready, cpus),
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
def rclone_http_server(
    origin_url: str, cache_dir: Path, log_path: Path, *, cpus: str | None = None
) -> Iterator[Peer]:
    """``rclone serve http --vfs-cache-mode full`` of the HTTP remote ``origin_url``,
    under ``taskset -c cpus`` if given (Go then runs as many threads as CPUs)."""
    port = free_port()
    argv = [
        RCLONE, "serve", "http", f":http,url='{origin_url}':",
        "--addr", f"127.0.0.1:{port}",
        "--vfs-cache-mode", "full",
        "--cache-dir", str(cache_dir),
        "--log-level", "NOTICE",
    ]  # fmt: skip
    # No config file: the remote is given in full on the command line.
    env = {**os.environ, "RCLONE_CONFIG": str(log_path.with_suffix(".no-such-conf"))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            pinned(argv, cpus), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        # Only the port: an HTTP request would make rclone list the remote
        # before the cold pass, hiding those origin requests from it.
        wait_for_port(port, proc, START_TIMEOUT)
        yield Peer("rclone", f"http://127.0.0.1:{port}", "/", proc.pid)
    finally:
        stop_process(proc, timeout=STOP_TIMEOUT, group=True)
