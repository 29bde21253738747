"""A data listener served for tests: the real app over a LocalOrigin in a temp
dir and a real MemoryFile, on uvloop in its own thread (as in production),
listening on 127.0.0.1 on a free port.

Tests talk to it over real sockets from pytest's loop. Content is a
function of (seed, offset), so any range can be checked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop
from aiohttp import web
from yarl import URL

from cachesvc.api.data import make_data_app
from cachesvc.api.fastconn import FastSite
from cachesvc.api.fastpath import FastReads
from cachesvc.api.inflight import InFlight
from cachesvc.api.listener import runner_options
from cachesvc.api.metrics import Metrics
from cachesvc.api.webrequest import STATE_KEY
from cachesvc.config import Config, HostPort
from cachesvc.core.cache import CacheOptions, FileCache
from cachesvc.core.memfile import MemoryFile
from cachesvc.origins.base import Origin
from cachesvc.origins.local import LocalOrigin
from tests.support.content import pattern
from tests.support.waiting import until

T = TypeVar("T")
KiB = 1 << 10
MiB = 1 << 20
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


def write_file(path: Path, seed: int, size: int) -> bytes:
    """Writes ``size`` bytes of stream ``seed`` to ``path`` and returns them."""
    data = pattern(seed, 0, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@dataclass
class DataServer:
    """A running data app; ``call`` runs a coroutine function on its loop."""

    root: Path
    config: Config
    cache_options: CacheOptions
    wrap_origin: Callable[[Origin], Origin] | None = None
    header_timeout: float = 30.0
    port: int = 0
    cache: FileCache | None = None
    site: FastSite | None = None
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: InFlight | None = None  # requests being handled, both paths
    local_origin: LocalOrigin | None = None  # under wrap_origin, if any
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="data server", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("data server did not start")
        if self._error is not None:
            raise RuntimeError("data server failed to start") from self._error

    def _run(self) -> None:
        try:
            uvloop.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.local_origin = LocalOrigin.open(str(self.root))
        origin: Origin = self.local_origin
        if self.wrap_origin is not None:
            origin = self.wrap_origin(origin)
        memfile = await MemoryFile.create()
        cache = FileCache(origin, memfile, self.cache_options)
        cache.start()
        self.cache = cache
        app = make_data_app(cache, self.config, self.metrics)
        # As in production (server.py): one count for both paths.
        in_flight = self.in_flight = InFlight()
        app.middlewares.insert(0, in_flight.middleware())
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=5.0,
            **runner_options(self.header_timeout),
        )
        await runner.setup()
        # The production listener: connections start on the fast read path.
        reads = FastReads(app[STATE_KEY], in_flight, idle_timeout=self.header_timeout)
        site = FastSite(runner, "127.0.0.1", 0, reads)
        await site.start()
        self.site = site
        self.port = runner.addresses[0][1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            site.close_idle()
            await runner.cleanup()
            await cache.close()
            await memfile.close()
            await origin.close()

    async def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Runs ``fn()`` on the server's loop and returns its result."""
        assert self._loop is not None

        async def run() -> T:
            return await fn()

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def mapped_bytes_settled(self, timeout: float = 10.0) -> int:
        """The cache's mapped bytes once they are 0, or after ``timeout``
        seconds: a stream cut short releases its mappings soon after."""
        assert self.cache is not None
        counters = self.cache.counters
        for _ in range(int(timeout / 0.02)):
            if not counters.mapped_bytes:
                break
            await asyncio.sleep(0.02)
        return counters.mapped_bytes

    async def answered(self) -> int:
        """Data requests answered so far, however they ended (the
        ``http_requests`` counter, read on the server's loop)."""

        async def count() -> int:
            return self._answered_now()

        return await self.call(count)

    def _answered_now(self) -> int:
        requests = next(iter(self.metrics.requests.collect()))
        return int(sum(sample.value for sample in requests.samples))

    async def idle(self, *, answered: int = 0, timeout: float = 10.0) -> None:
        """Waits until at least ``answered`` data requests have been answered,
        none is in flight (aiohttp's or the fast path's) and the origin runs
        no job: the server is idle by its own measures, so that a test may
        assert that something did not happen. Polled on the server's loop."""
        assert self.in_flight is not None and self.local_origin is not None
        in_flight, origin = self.in_flight, self.local_origin

        def quiet() -> bool:
            return (
                self._answered_now() >= answered
                and in_flight.count == 0
                and origin.stats()["jobs"] == 0
            )

        await self.call(lambda: until(quiet, "the data server idle", timeout), timeout + 5)

    def fast_connections(self) -> int:
        """Connections still on the fast read path (not handed to aiohttp)."""
        assert self.site is not None
        return len(self.site.connections)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                raise TimeoutError("data server did not stop")


def make_config(**overrides: Any) -> Config:
    values: dict[str, Any] = {
        "listen": HostPort("127.0.0.1", 0),
        "admin_listen": HostPort("127.0.0.1", 0),
        "cache_size": 256 * MiB,
        "max_partial_write": 8 * MiB,
    }
    values.update(overrides)
    return Config(**values)


@contextlib.contextmanager
def serving(
    root: Path,
    *,
    wrap_origin: Callable[[Origin], Origin] | None = None,
    cache_size: int = 256 * MiB,
    header_timeout: float = 30.0,
    **config: Any,
) -> Iterator[DataServer]:
    """Starts a DataServer over ``root`` and always stops it."""
    root.mkdir(parents=True, exist_ok=True)
    options = CacheOptions(
        cache_size=cache_size,
        max_dirty=cache_size // 2,
        readahead=4 * MiB,
        revalidate=3600.0,
        dirty_expire=3600.0,
    )
    server = DataServer(
        root, make_config(cache_size=cache_size, **config), options, wrap_origin, header_timeout
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Reply:
    """A response read whole."""

    status: int
    headers: Any  # CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    data: Any = None,
    timeout: float = 30.0,
) -> Reply:
    """One request; the URL is sent as given (no re-encoding or normalisation)."""
    async with asyncio.timeout(timeout):
        async with session.request(
            method, URL(url, encoded=True), headers=headers, data=data
        ) as resp:
            body = await resp.read()
            return Reply(resp.status, resp.headers, body)


async def raw_exchange(
    port: int, request: bytes, *, close_after: bool = True, timeout: float = 10.0
) -> bytes:
    """Sends raw bytes and returns the first response (head and body).

    With ``close_after`` the connection is closed for writing after the
    request, so a body shorter than announced ends there.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(request)
        await writer.drain()
        if close_after:
            writer.write_eof()
        async with asyncio.timeout(timeout):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                return exc.partial
            match = re.search(rb"\r\ncontent-length: *([0-9]+)\r\n", head, re.IGNORECASE)
            length = int(match[1]) if match else 0
            try:
                return head + await reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                return head + exc.partial
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
