"""The memory benchmarks' HTTP client: reads replayed by concurrent clients.

:func:`replay` sends a list of :class:`~benchmarks.traces.Read` s as
``GET`` + ``Range: bytes=a-b`` over one aiohttp session with ``clients``
keep-alive connections. The clients take the reads in list order from one
shared position, so the server sees the trace's order give or take the
reads in flight; reads of one stream (``Read.stream >= 0``) additionally
wait for the stream's previous read to finish, so a streamed file reaches
the server strictly in order. (No deadlock: a read waits only for an
earlier read of its stream, which some client took before it.)

Every answer must be ``206`` with exactly the range's bytes; an optional
``verify(read, offset, chunk)`` callback checks the content of each chunk as
it arrives. Any other answer raises :class:`ReplayError`: a benchmark's
figures mean nothing over failed reads.

:func:`own_cpus` pins the benchmark process (the load generator) to some
CPUs while a run lasts; the server is pinned with ``taskset``
(:func:`benchmarks.peers.pinned`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import aiohttp

from benchmarks.traces import Read

CLIENTS = 8
READ_CHUNK = 1 << 20
REQUEST_TIMEOUT = 300.0  # seconds for one read, body included

Verify = Callable[[Read, int, bytes], None]  # (read, offset of chunk, chunk); raises if wrong


class ReplayError(RuntimeError):
    """A read got an answer other than its 206 and its bytes."""


@dataclass(frozen=True)
class ReplayResult:
    requests: int
    bytes: int  # body bytes received
    seconds: float


def session(clients: int = CLIENTS) -> aiohttp.ClientSession:
    """A session of at most ``clients`` keep-alive connections."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients, limit_per_host=clients),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        auto_decompress=False,
    )


async def _read_one(
    http: aiohttp.ClientSession, url: str, read: Read, verify: Verify | None
) -> int:
    headers = {"Range": f"bytes={read.offset}-{read.offset + read.length - 1}"}
    async with http.get(url, headers=headers) as resp:
        if resp.status != 206:
            body = (await resp.read())[:200]
            raise ReplayError(f"GET {url} {headers['Range']}: {resp.status} {body!r}")
        got = 0
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            if verify is not None:
                verify(read, read.offset + got, chunk)
            got += len(chunk)
    if got != read.length:
        raise ReplayError(f"GET {url} {headers['Range']}: {got} bytes, expected {read.length}")
    return got


async def replay(
    http: aiohttp.ClientSession,
    urls: Sequence[str],
    reads: Sequence[Read],
    *,
    clients: int = CLIENTS,
    verify: Verify | None = None,
) -> ReplayResult:
    """Sends ``reads`` (``urls[read.file]`` names each file) from ``clients``
    concurrent clients; returns counts and the wall time."""
    position = 0
    received = 0
    # For each stream, the completion of its most recently taken read.
    last_of_stream: dict[int, asyncio.Event] = {}

    async def client() -> None:
        nonlocal position, received
        while position < len(reads):
            read = reads[position]
            position += 1
            done: asyncio.Event | None = None
            if read.stream >= 0:
                before = last_of_stream.get(read.stream)
                done = last_of_stream[read.stream] = asyncio.Event()
                if before is not None:
                    await before.wait()
            try:
                got = await _read_one(http, urls[read.file], read, verify)
            finally:
                if done is not None:
                    done.set()
            received += got  # not `received += await ...`: that loses updates

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(client())
    return ReplayResult(len(reads), received, time.perf_counter() - start)


@contextlib.contextmanager
def own_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Runs this process on ``cpus`` (those of them it may use) while entered;
    its previous affinity is restored after. None or no usable CPU: unchanged."""
    before = os.sched_getaffinity(0)
    wanted = (cpus & before) if cpus else set()
    if wanted:
        os.sched_setaffinity(0, wanted)
    try:
        yield
    finally:
        if wanted:
            os.sched_setaffinity(0, before)
