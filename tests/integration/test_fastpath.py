"""The fast read path against aiohttp's handler, over real sockets.

Every request is sent twice on raw connections: as is (the fast path may
answer it) and with one extra header (never simple, so aiohttp answers).
Both answers must be the same bytes but for ``Date``. Whether the fast path
kept a connection (it answered) or handed it to aiohttp is read from the
listener's set of fast connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachesvc.origins.base import Origin
from tests.integration.data_rig import DataServer, KiB, MiB, serving, write_file
from tests.support.origins import TestOrigin
from tests.support.waiting import until, until_stalled

SMALL = 10_000
LARGE = MiB + 300 * KiB  # above SMALL_BODY: streamed in one mapping
HUGE = 9 * MiB + 5  # streamed in several mappings
TIMEOUT = 10.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DataServer]:
    root = tmp_path / "root"
    write_file(root / "f.bin", 1, SMALL)
    write_file(root / "large.bin", 2, LARGE)
    write_file(root / "huge.bin", 5, HUGE)
    write_file(root / "d" / "a b.txt", 3, 100)
    write_file(root / "cold.bin", 4, SMALL)
    (root / "empty").write_bytes(b"")
    with serving(root, max_ranges=4) as srv:
        yield srv


@dataclass
class Answer:
    status_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def comparable(self) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        """Without Date, and with a multipart boundary (random) replaced."""
        headers = [(k, v) for k, v in self.headers if k != b"Date"]
        body = self.body
        _, _, boundary = (self.header(b"Content-Type") or b"").partition(b"boundary=")
        if boundary:
            headers = [(k, v.replace(boundary, b"B")) for k, v in headers]
            body = body.replace(boundary, b"B")
        return self.status_line, headers, body


class Connection:
    """One raw HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, method: str = "GET") -> Answer:
        async with asyncio.timeout(TIMEOUT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
            answer = Answer(lines[0], headers, b"")  # type: ignore[arg-type]
            length = int(answer.header(b"Content-Length") or 0)
            if method != "HEAD":
                answer.body = await self.reader.readexactly(length)
            return answer

    async def closed(self) -> bool:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read(1) == b""


@pytest.fixture
async def connect(server: DataServer) -> AsyncIterator[object]:
    opened: list[Connection] = []

    async def open_connection() -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        opened.append(Connection(reader, writer))
        return opened[-1]

    yield open_connection
    for connection in opened:
        connection.writer.close()


def request(method: str, target: str, *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def both_ways(
    server: DataServer, connect: object, method: str, target: str, *headers: str
) -> tuple[Answer, Answer, bool]:
    """The answer as is and through aiohttp, and whether the fast path kept
    the first connection."""
    fast = await connect()  # type: ignore[operator]
    await fast.send(request(method, target, *headers))
    first = await fast.answer(method)
    kept = server.fast_connections() >= 1
    slow = await connect()  # type: ignore[operator]
    await slow.send(request(method, target, *headers, "X-Not-Simple: 1"))
    second = await slow.answer(method)
    fast.writer.close()
    slow.writer.close()
    return first, second, kept


# (method, target, headers, answered by the fast path)
CASES = [
    ("GET", "/files/f.bin", (), True),
    ("HEAD", "/files/f.bin", (), True),
    ("GET", "/files/f.bin", ("Range: bytes=0-99",), True),
    ("GET", "/files/f.bin", ("Range: bytes=9990-20000",), True),
    ("GET", "/files/f.bin", ("Range: bytes=-10",), True),
    ("GET", "/files/f.bin", ("Range: bytes=100-",), True),
    ("GET", "/files/f.bin", ("range:  bytes = 5-6 ",), True),
    ("GET", "/files/f.bin", ("Range: bytes=0-0,2-3",), False),  # multipart
    ("GET", "/files/f.bin", ("Range: bytes=20000-",), False),  # 416
    ("GET", "/files/f.bin", ("Range: pages=1-2",), True),  # ignored: 200
    ("GET", "/files/f.bin", ("Range: bytes=5-1",), True),  # ignored: 200
    ("HEAD", "/files/f.bin", ("Range: bytes=0-99",), True),
    ("GET", "/files/empty", (), True),
    ("GET", "/files/empty", ("Range: bytes=0-5",), True),  # ignored: 200
    ("GET", "/files/d/a%20b.txt", ("Connection: keep-alive",), True),
    ("GET", "/files/large.bin", (), True),
    ("HEAD", "/files/large.bin", (), True),
    ("GET", "/files/large.bin", ("Range: bytes=0-4095",), True),
    ("GET", "/files/large.bin", ("Range: bytes=0-300000",), True),
    ("GET", "/files/large.bin", ("Range: bytes=0-1048575",), True),  # copied: SMALL_BODY
    ("GET", "/files/large.bin", ("Range: bytes=0-1048576",), True),  # streamed
    ("GET", "/files/huge.bin", (), True),
    ("GET", "/files/huge.bin", ("Range: bytes=1000-",), True),
    ("GET", "/files/huge.bin", ("Range: bytes=-5000000",), True),
    ("GET", "/files/nope", (), True),  # 404 from the origin
    ("HEAD", "/files/nope", (), True),
    ("GET", "/files/d/", (), False),
    ("GET", "/files/d", (), True),  # a directory without its slash: 404
    ("GET", "/files/../f.bin", (), False),
    ("GET", "/files/f.bin", ("If-None-Match: *",), False),
    ("GET", "/files/f.bin?x=1", (), False),
    ("HEAD", "/files/cold.bin", (), True),
]


@pytest.mark.parametrize(("method", "target", "headers", "fast"), CASES)
async def test_fast_answers_equal_aiohttp_answers(
    server: DataServer,
    connect: object,
    method: str,
    target: str,
    headers: tuple[str, ...],
    fast: bool,
) -> None:
    first, second, kept = await both_ways(server, connect, method, target, *headers)
    assert first.comparable() == second.comparable()
    assert first.header(b"Date") is not None
    assert kept == fast


async def test_cold_file_is_filled_without_leaving_the_fast_path(
    server: DataServer, connect: object
) -> None:
    connection = await connect()  # type: ignore[operator]
    for _ in range(2):  # a miss (filled in a task), then a hit
        await connection.send(request("GET", "/files/cold.bin", "Range: bytes=10-19"))
        answer = await connection.answer()
        assert answer.status_line == b"HTTP/1.1 206 Partial Content"
        assert answer.body == (server.root / "cold.bin").read_bytes()[10:20]
        assert server.fast_connections() == 1


async def test_pipelined_requests_keep_their_order_across_the_hand_off(
    server: DataServer, connect: object
) -> None:
    connection = await connect()  # type: ignore[operator]
    new = b"0123456789"
    await connection.send(
        request("GET", "/files/f.bin", "Range: bytes=0-9")  # hit or miss: fast
        + request("HEAD", "/files/cold.bin")
        + request("PUT", "/files/f.bin", "Content-Range: bytes 0-9/*", "Content-Length: 10")
        + new
        + request("GET", "/files/f.bin", "Range: bytes=0-9")  # after the hand-off
    )
    old = (server.root / "f.bin").read_bytes()[:10]
    first = await connection.answer()
    assert (first.status_line, first.body) == (b"HTTP/1.1 206 Partial Content", old)
    second = await connection.answer("HEAD")
    assert second.header(b"Content-Length") == str(SMALL).encode()
    third = await connection.answer()
    assert third.status_line == b"HTTP/1.1 204 No Content"
    fourth = await connection.answer()
    assert fourth.body == new
    assert fourth.header(b"ETag") != first.header(b"ETag")
    assert server.fast_connections() == 0


async def test_many_pipelined_answers_arrive_whole_and_in_order(
    server: DataServer, connect: object
) -> None:
    # More answers than the batch holds: written as they pile up, so the
    # transport's flow control applies while the client reads nothing.
    connection = await connect()  # type: ignore[operator]
    data = (server.root / "large.bin").read_bytes()
    ranges = [(i * 1000, i * 1000 + 200 * KiB - 1) for i in range(60)]
    await connection.send(
        b"".join(request("GET", "/files/large.bin", f"Range: bytes={a}-{b}") for a, b in ranges)
    )
    for a, b in ranges:
        answer = await connection.answer()
        assert answer.header(b"Content-Range") == f"bytes {a}-{b}/{LARGE}".encode()
        assert answer.body == data[a : b + 1]
    assert server.fast_connections() == 1


async def test_streamed_answers_keep_their_order_and_the_connection(
    server: DataServer, connect: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="cachesvc.access")
    connection = await connect()  # type: ignore[operator]
    huge = (server.root / "huge.bin").read_bytes()
    small = (server.root / "f.bin").read_bytes()
    await connection.send(
        request("GET", "/files/huge.bin")
        + request("GET", "/files/f.bin", "Range: bytes=0-9")
        + request("GET", "/files/huge.bin", "Range: bytes=5000000-")
        + request("HEAD", "/files/huge.bin")
    )
    # Read nothing until the server has stalled on us: the first body waits.
    await until_stalled(connection.writer.get_extra_info("socket"))
    assert (await connection.answer()).body == huge
    assert (await connection.answer()).body == small[:10]
    third = await connection.answer()
    assert third.header(b"Content-Range") == f"bytes 5000000-{HUGE - 1}/{HUGE}".encode()
    assert third.body == huge[5000000:]
    fourth = await connection.answer("HEAD")
    assert fourth.header(b"Content-Length") == str(HUGE).encode()
    assert server.fast_connections() == 1
    assert server.cache is not None and server.cache.counters.mapped_bytes == 0
    logged = [(r.status, r.bytes) for r in caplog.records if r.name == "cachesvc.access"]  # type: ignore[attr-defined]
    assert logged == [(200, HUGE), (206, 10), (206, HUGE - 5000000), (200, 0)]


async def test_a_client_leaving_does_not_break_a_shared_cold_read(tmp_path: Path) -> None:
    write_file(tmp_path / "root" / "big.bin", 6, 16 * MiB)
    data = (tmp_path / "root" / "big.bin").read_bytes()

    def slow(inner: Origin) -> Origin:
        return TestOrigin(inner, delay=0.2)

    with serving(tmp_path / "root", wrap_origin=slow) as server:
        connections = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            connections.append(Connection(reader, writer))
            await connections[-1].send(request("GET", "/files/big.bin"))
        leaving, staying = connections
        # Both streams wait for the same fills. One client reads the first
        # mapping's bytes and resets its connection: its stream, waiting for
        # the next fill, is cancelled once it writes again.
        async with asyncio.timeout(TIMEOUT):
            await leaving.reader.readuntil(b"\r\n\r\n")
            await leaving.reader.readexactly(4 * MiB)
        sock = leaving.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        leaving.writer.close()
        answer = await staying.answer()
        staying.writer.close()
    assert answer.status_line == b"HTTP/1.1 200 OK"
    assert answer.body == data


async def test_a_write_is_seen_by_the_next_fast_read(server: DataServer, connect: object) -> None:
    reader = await connect()  # type: ignore[operator]
    await reader.send(request("GET", "/files/f.bin", "Range: bytes=0-3"))
    before = await reader.answer()
    writer = await connect()  # type: ignore[operator]
    await writer.send(
        request("PATCH", "/files/f.bin", "Content-Range: bytes 0-3/*", "Content-Length: 4")
        + b"abcd"
    )
    assert (await writer.answer()).status_line == b"HTTP/1.1 204 No Content"
    await reader.send(request("GET", "/files/f.bin", "Range: bytes=0-3"))
    after = await reader.answer()
    assert after.body == b"abcd"
    assert after.header(b"ETag") != before.header(b"ETag")
    assert server.fast_connections() == 1


async def test_an_incomplete_head_goes_to_aiohttp(server: DataServer, connect: object) -> None:
    connection = await connect()  # type: ignore[operator]
    whole = request("GET", "/files/f.bin", "Range: bytes=0-9")
    await until(lambda: server.fast_connections() == 1, "the connection accepted", TIMEOUT)
    await connection.send(whole[:20])
    # The fast path hands the incomplete head to aiohttp before the rest comes.
    await until(lambda: server.fast_connections() == 0, "the hand-off to aiohttp", TIMEOUT)
    await connection.send(whole[20:])
    answer = await connection.answer()
    assert answer.body == (server.root / "f.bin").read_bytes()[:10]
    assert server.fast_connections() == 0


async def test_connection_close_is_honoured(server: DataServer, connect: object) -> None:
    connection = await connect()  # type: ignore[operator]
    await connection.send(request("GET", "/files/f.bin", "Connection: close"))
    answer = await connection.answer()
    assert answer.header(b"Connection") == b"close"
    assert len(answer.body) == SMALL
    assert await connection.closed()


async def test_idle_connections_are_closed(tmp_path: Path) -> None:
    write_file(tmp_path / "root" / "f.bin", 1, SMALL)
    with serving(tmp_path / "root", header_timeout=1.0) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        connection = Connection(reader, writer)
        await connection.send(request("GET", "/files/f.bin"))
        assert len((await connection.answer()).body) == SMALL
        started = asyncio.get_running_loop().time()
        assert await connection.closed()
        waited = asyncio.get_running_loop().time() - started
        assert 0.5 < waited < 5.0
        writer.close()


async def test_fast_answers_are_counted(server: DataServer, connect: object) -> None:
    connection = await connect()  # type: ignore[operator]
    for _ in range(3):
        await connection.send(request("GET", "/files/f.bin", "Range: bytes=0-9"))
        await connection.answer()
    await connection.send(request("HEAD", "/files/f.bin"))
    await connection.answer("HEAD")
    text = server.metrics.exposition().decode()
    assert 'cachesvc_http_requests_total{method="GET",status="206"} 3.0' in text
    assert 'cachesvc_http_requests_total{method="HEAD",status="200"} 1.0' in text


async def test_an_origin_error_is_answered_after_one_origin_call(tmp_path: Path) -> None:
    origins: list[TestOrigin] = []

    def counting(inner: Origin) -> Origin:
        origins.append(TestOrigin(inner))
        return origins[0]

    with serving(tmp_path / "root", wrap_origin=counting) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        connection = Connection(reader, writer)
        await connection.send(request("GET", "/files/missing.bin"))
        answer = await connection.answer()
        writer.close()
    assert answer.status_line == b"HTTP/1.1 404 Not Found"
    assert json.loads(answer.body)["error"] == "not_found"
    assert origins[0].calls["stat"] == 1
