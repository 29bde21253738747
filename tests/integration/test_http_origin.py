"""HttpOrigin against a real nginx, scripted raw HTTP servers and a real cachesvc tier.

File content is a function of its seed, so any range can be checked.
Everything listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from cachesvc.origins.base import (
    DirEntry,
    OriginConflict,
    OriginNotFound,
    OriginPermissionDenied,
    OriginTimeout,
    OriginUnavailable,
    OriginUnsupported,
)
from cachesvc.origins.http.origin import READ_ONLY_MESSAGE, HttpOrigin
from tests.integration.nginx_fixture import nginx  # noqa: F401  (fixture)
from tests.support.servers import ServerProcess, running_cachesvc

KiB = 1024
MiB = 1024 * KiB
BIG_SIZE = MiB + 123
TOKEN = "t0k"


@functools.cache
def _stream(seed: int) -> bytes:
    return random.Random(seed).randbytes(4 * MiB)


def content(seed: int, size: int) -> bytes:
    """The first ``size`` bytes of file content number ``seed`` (any prefix agrees)."""
    return _stream(seed)[:size]


def nginx_etag(path: Path) -> str:
    st = path.stat()
    return f'"{int(st.st_mtime):x}-{st.st_size:x}"'


@dataclass
class Served:
    root: Path
    url: str


@pytest.fixture
def served(tmp_path: Path, nginx: Callable[..., int]) -> Served:  # noqa: F811
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "big.bin").write_bytes(content(1, BIG_SIZE))
    (root / "small.txt").write_bytes(b"hello, origin")
    (root / "empty").write_bytes(b"")
    (root / "sub" / "x y%ü#?.bin").write_bytes(content(2, 5000))
    return Served(root, f"http://127.0.0.1:{nginx(root)}/")


@pytest.fixture
async def origin(served: Served) -> AsyncIterator[HttpOrigin]:
    o = HttpOrigin(served.url)
    yield o
    await o.close()


async def read(
    o: HttpOrigin, path: str, offset: int, length: int, etag: str | None = None
) -> bytes:
    buf = bytearray(length)
    n = await o.read_into(path, offset, [memoryview(buf)], etag)
    return bytes(buf[:n])


# ------------------------------------------------------------------ nginx


async def test_stat(origin: HttpOrigin, served: Served) -> None:
    st = await origin.stat("big.bin")
    assert st.size == BIG_SIZE
    assert st.etag == nginx_etag(served.root / "big.bin")
    assert st.mtime == int((served.root / "big.bin").stat().st_mtime)
    assert st.is_file
    assert (await origin.stat("empty")).size == 0


async def test_read_full_partial_and_eof(origin: HttpOrigin) -> None:
    data = content(1, BIG_SIZE)
    assert await read(origin, "small.txt", 0, 13) == b"hello, origin"
    assert await read(origin, "big.bin", 12345, 1000) == data[12345:13345]
    # Short at end of file, empty at and past it.
    assert await read(origin, "big.bin", BIG_SIZE - 10, 4096) == data[-10:]
    assert await read(origin, "big.bin", BIG_SIZE, 4096) == b""
    assert await read(origin, "big.bin", BIG_SIZE + 5000, 10) == b""
    assert await read(origin, "empty", 0, 100) == b""


async def test_read_into_several_buffers(origin: HttpOrigin) -> None:
    data = content(1, BIG_SIZE)
    bufs = [bytearray(n) for n in (3, 0, 4096, 17)]
    n = await origin.read_into("big.bin", 999, [memoryview(b) for b in bufs])
    assert n == 3 + 4096 + 17
    assert b"".join(bufs) == data[999 : 999 + n]


async def test_cold_sequential_read_in_64k_pieces(origin: HttpOrigin) -> None:
    st = await origin.stat("big.bin")
    pieces = []
    offset = 0
    while True:
        piece = await read(origin, "big.bin", offset, 64 * KiB, st.etag)
        if not piece:
            break
        pieces.append(piece)
        offset += len(piece)
    assert b"".join(pieces) == content(1, BIG_SIZE)


async def test_etag_pin_detects_a_changed_file(origin: HttpOrigin, served: Served) -> None:
    st = await origin.stat("big.bin")
    assert await read(origin, "big.bin", 0, 10, st.etag) == content(1, 10)
    path = served.root / "big.bin"
    path.write_bytes(content(3, BIG_SIZE))
    os.utime(path, (st.mtime + 100, st.mtime + 100))
    with pytest.raises(OriginConflict):
        await read(origin, "big.bin", 0, 10, st.etag)
    assert await read(origin, "big.bin", 0, 10) == content(3, 10)


async def test_origin_that_ignores_range(tmp_path: Path, nginx: Callable[..., int]) -> None:  # noqa: F811
    data = content(4, 300 * KiB)
    (tmp_path / "f").write_bytes(data)
    o = HttpOrigin(f"http://127.0.0.1:{nginx(tmp_path, 'max_ranges 0;')}")
    try:
        st = await o.stat("f")
        assert await read(o, "f", 100_000, 5000, st.etag) == data[100_000:105_000]
        assert await read(o, "f", len(data) - 7, 100, st.etag) == data[-7:]
        assert await read(o, "f", len(data) + 1, 100, st.etag) == b""
    finally:
        await o.close()


async def test_missing_paths_and_directories(origin: HttpOrigin) -> None:
    with pytest.raises(OriginNotFound):
        await origin.stat("nope.bin")
    with pytest.raises(OriginNotFound):
        await read(origin, "nope.bin", 0, 10)
    with pytest.raises(OriginNotFound):
        await origin.stat("sub")
    with pytest.raises(OriginNotFound):
        await origin.list_dir("nope")
    with pytest.raises(OriginPermissionDenied):
        await origin.stat("sub/../big.bin")


async def test_names_are_percent_encoded(origin: HttpOrigin) -> None:
    assert (await origin.stat("sub/x y%ü#?.bin")).size == 5000
    assert await read(origin, "sub/x y%ü#?.bin", 4990, 100) == content(2, 5000)[4990:]


async def test_list_dir(origin: HttpOrigin, served: Served) -> None:
    entries = {e.name: e for e in await origin.list_dir("")}
    assert set(entries) == {"big.bin", "small.txt", "empty", "sub"}
    assert entries["big.bin"] == DirEntry(
        "big.bin", False, BIG_SIZE, int((served.root / "big.bin").stat().st_mtime)
    )
    assert entries["sub"].is_dir
    sub = await origin.list_dir("sub")
    assert sorted((e.name, e.is_dir, e.size) for e in sub) == [
        ("deeper", True, 0),
        ("x y%ü#?.bin", False, 5000),
    ]
    assert await origin.list_dir("sub/deeper") == []


async def test_check_and_description() -> None:
    o = HttpOrigin("http://user:secret@127.0.0.1:1/prefix")
    assert o.description == "http://127.0.0.1:1/prefix/"
    with pytest.raises(OriginUnavailable):
        await o.check()
    await o.close()


async def test_check_reachable(origin: HttpOrigin) -> None:
    await origin.check()


async def test_read_only_writes_are_unsupported(origin: HttpOrigin) -> None:
    caps = origin.capabilities
    assert not (caps.writable or caps.partial_writes or caps.durable_sync)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    async def changed(offset: int, length: int) -> bytes:
        return bytes(length)

    calls: list[Awaitable[object]] = [
        origin.write_from("small.txt", 0, [memoryview(b"x")]),
        origin.set_size("small.txt", 1),
        origin.allocate("small.txt", 0, 100),
        origin.sync("small.txt"),
        origin.rewrite("small.txt", 1, [(0, 1)], changed),
        origin.replace("small.txt", chunks()),
        origin.create("new.txt"),
        origin.remove("small.txt"),
    ]
    for call in calls:
        with pytest.raises(OriginUnsupported, match="--http-origin-writes"):
            await call
    assert "--http-origin-writes" in READ_ONLY_MESSAGE


# ------------------------------------------------------ scripted raw servers


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    head: str  # as received, up to and including the blank line


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]
"""Writes the answer; returns False to close the connection."""


@dataclass
class RawServer:
    url: str
    requests: list[Request] = field(default_factory=list)
    connections: int = 0  # accepted so far
    closed: int = 0  # closed by the server so far (its last bytes sent or refused)


@contextlib.asynccontextmanager
async def raw_server(
    handler: Handler, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[RawServer]:
    """A minimal HTTP/1.1 server (https with ``tls``) whose answers the test
    scripts byte by byte."""
    box: list[RawServer] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        box[0].connections += 1
        try:
            while True:
                async with asyncio.timeout(10):
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                line, *fields = head.split("\r\n")[:-2]
                method, target, _ = line.split(" ")
                headers = {
                    k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)
                }
                request = Request(method, target, headers, head)
                box[0].requests.append(request)
                if not await handler(request, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            box[0].closed += 1

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    box.append(RawServer(f"{'https' if tls else 'http'}://127.0.0.1:{port}/"))
    try:
        yield box[0]
    finally:
        server.close()
        await server.wait_closed()


def answer(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.mark.parametrize("status", ["206 Partial Content", "200 OK"])
async def test_origin_dying_mid_read_is_unavailable(status: str) -> None:
    async def handler(req: Request, writer: asyncio.StreamWriter) -> bool:
        head = {"Content-Length": str(MiB)}
        if status.startswith("206"):
            head["Content-Range"] = f"bytes 0-{MiB - 1}/{MiB}"
        writer.write(answer(status, head, b"x" * 1000))
        await writer.drain()
        return False

    async with raw_server(handler) as srv:
        o = HttpOrigin(srv.url, read_timeout=2.0, retries=2)
        try:
            started = time.monotonic()
            with pytest.raises(OriginUnavailable):
                await read(o, "f", 0, MiB)
            assert time.monotonic() - started < 5
        finally:
            await o.close()
        assert len(srv.requests) == 3  # the first try and two retries


@pytest.mark.parametrize(
    "content_range",
    [
        None,
        "bytes 10-19/100",
        "bytes 5-9/100",
        "bytes 0-50/100",
        "bytes 0-9/5",
        "bytes 0-9",
        "items 0-9/100",
    ],
)
async def test_206_with_wrong_content_range_is_unavailable(content_range: str | None) -> None:
    async def handler(req: Request, writer: asyncio.StreamWriter) -> bool:
        head = {"Content-Length": "10"}
        if content_range is not None:
            head["Content-Range"] = content_range
        writer.write(answer("206 Partial Content", head, b"0123456789"))
        return True

    async with raw_server(handler) as srv:
        o = HttpOrigin(srv.url)
        try:
            with pytest.raises(OriginUnavailable, match=r"Content-Range|another range"):
                await read(o, "f", 0, 10)
        finally:
            await o.close()
        assert len(srv.requests) == 1  # an unusable answer is not retried


async def test_503_is_retried_then_unavailable() -> None:
    async def handler(req: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer("503 Service Unavailable", {"Content-Length": "4"}, b"busy"))
        return True

    async with raw_server(handler) as srv:
        o = HttpOrigin(srv.url, retries=2)
        try:
            with pytest.raises(OriginUnavailable, match="503: busy"):
                await read(o, "f", 0, 10)
        finally:
            await o.close()
        assert [r.method for r in srv.requests] == ["GET"] * 3


async def test_timeout_is_origin_timeout() -> None:
    async def handler(req: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)  # an origin that does not answer: read_timeout is under test
        return False

    async with raw_server(handler) as srv:
        o = HttpOrigin(srv.url, read_timeout=0.3, retries=0)
        try:
            with pytest.raises(OriginTimeout):
                await o.stat("f")
        finally:
            await o.close()


async def test_head_refused_falls_back_to_a_one_byte_get() -> None:
    async def handler(req: Request, writer: asyncio.StreamWriter) -> bool:
        if req.method == "HEAD":
            writer.write(answer("405 Method Not Allowed", {"Content-Length": "0"}))
        else:
            head = {
                "Content-Length": "1",
                "Content-Range": "bytes 0-0/12345",
                "ETag": '"v1"',
                "Last-Modified": "Sun, 06 Nov 1994 08:49:37 GMT",
            }
            writer.write(answer("206 Partial Content", head, b"a"))
        return True

    async with raw_server(handler) as srv:
        o = HttpOrigin(srv.url)
        try:
            st = await o.stat("dir/f")
        finally:
            await o.close()
        assert (st.size, st.etag, st.mtime) == (12345, '"v1"', 784111777.0)
        assert [(r.method, r.target, r.headers.get("range")) for r in srv.requests] == [
            ("HEAD", "/dir/f", None),
            ("GET", "/dir/f", "bytes=0-0"),
        ]


async def test_weak_etag_pins_with_if_unmodified_since() -> None:
    modified = "Sun, 06 Nov 1994 08:49:37 GMT"

    async def handler(req: Request, writer: asyncio.StreamWriter) -> bool:
        head = {"ETag": 'W/"weak"', "Last-Modified": modified, "Content-Length": "10"}
        if req.method == "HEAD":
            writer.write(answer("200 OK", head))
        else:
            head["Content-Range"] = "bytes 2-5/10"
            head["Content-Length"] = "4"
            writer.write(answer("206 Partial Content", head, b"2345"))
        return True

    async with raw_server(handler) as srv:
        o = HttpOrigin(srv.url)
        try:
            st = await o.stat("f")
            assert st.etag == f"lm:10:{modified}"
            assert await read(o, "f", 2, 4, st.etag) == b"2345"
            with pytest.raises(OriginConflict):  # the answer says the size changed
                await read(o, "f", 2, 4, f"lm:11:{modified}")
        finally:
            await o.close()
        assert srv.requests[1].headers["if-unmodified-since"] == modified
        assert "if-match" not in srv.requests[1].headers


# ------------------------------------------------------ a real cachesvc tier


@dataclass
class Lower:
    """A ``cachesvc serve`` over a directory, taking writes with a token."""

    server: ServerProcess
    root: Path

    def origin(self, token: str | None = TOKEN) -> HttpOrigin:
        return HttpOrigin(f"{self.server.url}/files", writes=True, token=token)

    async def served(self, path: str) -> bytes | None:
        """The file as the lower tier serves it (its cache included); None if missing."""
        async with aiohttp.ClientSession() as http:
            url = f"{self.server.url}/files/{path}"
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if resp.status == 404:
                    return None
                assert resp.status == 200, await resp.text()
                return await resp.read()


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lower]:
    root = tmp_path_factory.mktemp("lower-root")
    logs = tmp_path_factory.mktemp("lower-logs")
    with running_cachesvc(str(root), ["--write-token", TOKEN], log_dir=logs) as server:
        yield Lower(server, root)


@pytest.fixture
async def tier(lower: Lower) -> AsyncIterator[tuple[Lower, HttpOrigin]]:
    o = lower.origin()
    try:
        yield lower, o
    finally:
        await o.close()


async def test_tier_partial_writes(tier: tuple[Lower, HttpOrigin]) -> None:
    lower, o = tier
    caps = o.capabilities
    assert caps.writable and caps.partial_writes and caps.durable_sync
    st = await o.create("d/new")
    assert st.size == 0 and await lower.served("d/new") == b""
    assert await o.create("d/new") == await o.stat("d/new")  # exists: left alone
    parts = [memoryview(b"abc"), memoryview(b""), memoryview(b"defg")]
    assert await o.write_from("d/new", 2, parts) == 7
    assert await lower.served("d/new") == b"\0\0abcdefg"
    assert await o.write_from("d/new", 0, [memoryview(b"XY")]) == 2
    await o.set_size("d/new", 5)
    assert await lower.served("d/new") == b"XYabc"
    await o.allocate("d/new", 3, 7)
    assert await lower.served("d/new") == b"XYabc" + bytes(5)
    await o.allocate("d/new", 0, 4)  # never shrinks
    assert (await o.stat("d/new")).size == 10
    await o.sync("d/new")
    assert (lower.root / "d" / "new").read_bytes() == b"XYabc" + bytes(5)
    await o.remove("d/new")
    assert await lower.served("d/new") is None
    assert not (lower.root / "d" / "new").exists()
    with pytest.raises(OriginNotFound):
        await o.remove("d/new")


async def test_tier_writes_need_the_token(lower: Lower) -> None:
    (lower.root / "guarded").write_bytes(b"unchanged")
    for token in (None, "wrong"):
        o = lower.origin(token)
        try:
            with pytest.raises(OriginPermissionDenied):
                await o.write_from("guarded", 0, [memoryview(b"X")])
            with pytest.raises(OriginPermissionDenied):
                await o.remove("guarded")
            assert await read(o, "guarded", 0, 100) == b"unchanged"  # reads need none
        finally:
            await o.close()
    assert await lower.served("guarded") == b"unchanged"


async def test_tier_replace_and_rewrite(tier: tuple[Lower, HttpOrigin]) -> None:
    lower, o = tier
    old = content(5, 3 * MiB + 10)

    async def chunks(fail: bool = False) -> AsyncIterator[bytes]:
        for i in range(0, len(old), MiB):
            yield old[i : i + MiB]
            if fail:
                raise KeyError("source broke")

    st = await o.replace("r", chunks())
    assert (lower.root / "r").read_bytes() == old and st.size == len(old)
    with pytest.raises(KeyError, match="source broke"):
        await o.replace("r", chunks(fail=True))
    assert (lower.root / "r").read_bytes() == old
    assert await lower.served("r") == old

    new_size = len(old) + 5
    changed = [(5, 10), (MiB - 1, 2 * MiB + 1), (len(old) + 2, new_size)]

    async def read_changed(offset: int, length: int) -> bytes:
        return bytes((offset + i) % 251 for i in range(length))

    st = await o.rewrite("r", new_size, changed, read_changed)
    expected = bytearray(old) + bytes(5)
    for start, end in changed:
        expected[start:end] = await read_changed(start, end - start)
    assert st.size == new_size
    assert await lower.served("r") == expected
    await o.sync("r")
    assert (lower.root / "r").read_bytes() == expected

    # A rewrite based on a version that is no longer there writes nothing.
    with pytest.raises(OriginConflict):
        await o.rewrite("r", 10, [(0, 10)], read_changed, base_etag=st.etag + "x")
    assert await lower.served("r") == expected
