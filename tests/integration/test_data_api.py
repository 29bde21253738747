"""The data API's reads over real sockets: GET/HEAD, ranges, multipart, 416,
preconditions, ETags, listings, health, access log and metrics.

The server is the real app on uvloop in its own thread (data_rig); files are
a function of (seed, offset).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from cachesvc.api import streaming
from tests.integration.data_rig import (
    DataServer,
    KiB,
    MiB,
    Reply,
    fetch,
    serving,
    write_file,
)
from tests.support.content import pattern
from tests.support.waiting import until_stalled

SIZE = 10_000
BIG = 3 * MiB + 12_345  # streamed in several chunks


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DataServer]:
    root = tmp_path / "root"
    write_file(root / "f.bin", 1, SIZE)
    write_file(root / "big.bin", 2, BIG)
    write_file(root / "dir" / "sub" / "g.txt", 3, 100)
    (root / "empty").write_bytes(b"")
    with serving(root, max_ranges=4) as srv:
        yield srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as sess:
        yield sess


async def get(
    session: aiohttp.ClientSession, server: DataServer, path: str, **headers: str
) -> Reply:
    return await fetch(session, "GET", server.url + path, headers=headers)


async def head(
    session: aiohttp.ClientSession, server: DataServer, path: str, **headers: str
) -> Reply:
    return await fetch(session, "HEAD", server.url + path, headers=headers)


def _h(**headers: str) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in headers.items()}


def assert_file_headers(reply: Reply, length: int) -> None:
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert re.fullmatch(r'"[!#-~]+"', reply.headers["ETag"]), reply.headers["ETag"]
    assert email.utils.parsedate_to_datetime(reply.headers["Last-Modified"]) is not None
    assert int(reply.headers["Content-Length"]) == length
    assert "Content-Encoding" not in reply.headers


# ---------------------------------------------------------------------------
# Whole files


async def test_get_whole_file(server: DataServer, session: aiohttp.ClientSession) -> None:
    reply = await get(session, server, "/files/f.bin")
    assert reply.status == 200
    assert reply.body == pattern(1, 0, SIZE)
    assert_file_headers(reply, SIZE)
    assert "Content-Range" not in reply.headers
    assert reply.headers["Content-Type"] == "application/octet-stream"
    text = await get(session, server, "/files/dir/sub/g.txt")
    assert text.headers["Content-Type"].startswith("text/plain")


# Headers that send a request down each read path: the fast path takes a
# plain GET; any other header makes it aiohttp's (see api/http/simple.py).
READ_PATHS = {"fast": {}, "aiohttp": {"X-Not-Simple": "1"}}


@pytest.fixture(params=sorted(READ_PATHS))
def via(request: pytest.FixtureRequest) -> dict[str, str]:
    """The headers choosing one read path."""
    return READ_PATHS[request.param]


async def test_get_large_file_streamed(
    server: DataServer, session: aiohttp.ClientSession, via: dict[str, str]
) -> None:
    reply = await get(session, server, "/files/big.bin", **via)
    assert reply.status == 200
    assert_file_headers(reply, BIG)
    assert reply.body == pattern(2, 0, BIG)
    # Every mapping was released once the bytes were sent.
    assert server.cache is not None
    assert server.cache.counters.mapped_bytes == 0


async def test_head_has_get_headers(server: DataServer, session: aiohttp.ClientSession) -> None:
    for path in ("/files/f.bin", "/files/big.bin", "/files/empty"):
        got, headed = await get(session, server, path), await head(session, server, path)
        assert headed.status == got.status == 200
        assert headed.body == b""
        for name in ("ETag", "Last-Modified", "Content-Length", "Accept-Ranges", "Content-Type"):
            assert headed.headers[name] == got.headers[name], (path, name)
    ranged = await head(session, server, "/files/f.bin", Range="bytes=10-19")
    assert ranged.status == 206
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{SIZE}"
    assert ranged.headers["Content-Length"] == "10"
    assert ranged.body == b""


async def test_missing_file_is_404_json(server: DataServer, session: aiohttp.ClientSession) -> None:
    for path in ("/files/nope", "/files/dir", "/files/dir/sub", "/files/nodir/x"):
        reply = await get(session, server, path)
        assert reply.status == 404, path
        assert reply.json()["error"] == "not_found"
        assert set(reply.json()) == {"error", "message"}


async def test_empty_file_ignores_range(server: DataServer, session: aiohttp.ClientSession) -> None:
    reply = await get(session, server, "/files/empty", Range="bytes=0-10")
    assert reply.status == 200
    assert reply.body == b""
    assert_file_headers(reply, 0)


# ---------------------------------------------------------------------------
# Ranges


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=10-19", 10, 20),
        ("bytes=9990-", 9990, SIZE),
        ("bytes=-10", SIZE - 10, SIZE),
        ("bytes=-20000", 0, SIZE),
        ("bytes=9995-20000", 9995, SIZE),
        ("BYTES=1-2", 1, 3),
        ("bytes= 5 - 9 ", 5, 10),
        ("bytes=0-4,5-9", 0, 10),  # adjacent: coalesced
        ("bytes=0-9,3-5", 0, 10),  # overlapping: coalesced
        ("bytes=20000-,10-19", 10, 20),  # the unsatisfiable one is dropped
    ],
)
async def test_single_range(
    server: DataServer, session: aiohttp.ClientSession, header: str, start: int, end: int
) -> None:
    reply = await get(session, server, "/files/f.bin", Range=header)
    assert reply.status == 206, reply.body[:200]
    assert reply.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert_file_headers(reply, end - start)
    assert reply.body == pattern(1, start, end - start)


async def test_large_range_across_chunks(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    start, end = MiB - 5, 3 * MiB + 7
    reply = await get(session, server, "/files/big.bin", Range=f"bytes={start}-{end - 1}")
    assert reply.status == 206
    assert reply.headers["Content-Range"] == f"bytes {start}-{end - 1}/{BIG}"
    assert reply.body == pattern(2, start, end - start)


def parse_multipart(reply: Reply) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part, checking the framing exactly."""
    match = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", reply.headers["Content-Type"])
    assert match is not None, reply.headers["Content-Type"]
    delimiter = b"--" + match[1].encode()
    body = reply.body
    assert body.startswith(delimiter + b"\r\n")
    assert body.endswith(b"\r\n" + delimiter + b"--\r\n")
    parts = []
    for raw in body[: -len(delimiter) - 6].split(b"\r\n" + delimiter + b"\r\n"):
        raw = raw.removeprefix(delimiter + b"\r\n")
        head_block, _, data = raw.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head_block.split(b"\r\n"))
        parts.append((fields[b"Content-Range"].decode(), data))
    return parts


@pytest.mark.parametrize(
    ("path", "seed", "size", "header", "ranges"),
    [
        ("/files/f.bin", 1, SIZE, "bytes=0-9,20-29", [(0, 10), (20, 30)]),
        ("/files/f.bin", 1, SIZE, "bytes=-5, 100-199, 0-0", [(0, 1), (100, 200), (SIZE - 5, SIZE)]),
        ("/files/big.bin", 2, BIG, f"bytes=0-99,{MiB}-{2 * MiB + 99}",
         [(0, 100), (MiB, 2 * MiB + 100)]),
    ],
)  # fmt: skip
async def test_multipart_ranges(
    server: DataServer,
    session: aiohttp.ClientSession,
    path: str,
    seed: int,
    size: int,
    header: str,
    ranges: list[tuple[int, int]],
) -> None:
    reply = await get(session, server, path, Range=header)
    assert reply.status == 206
    assert "Content-Range" not in reply.headers
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    parts = parse_multipart(reply)
    assert [cr for cr, _ in parts] == [f"bytes {a}-{b - 1}/{size}" for a, b in ranges]
    for (a, b), (_, data) in zip(ranges, parts, strict=True):
        assert data == pattern(seed, a, b - a)
    headed = await head(session, server, path, Range=header)
    assert headed.headers["Content-Length"] == reply.headers["Content-Length"]


@pytest.mark.parametrize(
    "header",
    [
        f"bytes={SIZE}-",
        f"bytes={SIZE}-{SIZE + 10}",
        "bytes=-0",
        "bytes=99999999999999999999999-",
        "bytes=0-0,2-2,4-4,6-6,8-8",  # five ranges, more than --max-ranges 4
    ],
)
async def test_unsatisfiable_range(
    server: DataServer, session: aiohttp.ClientSession, header: str
) -> None:
    reply = await get(session, server, "/files/f.bin", Range=header)
    assert reply.status == 416
    assert reply.headers["Content-Range"] == f"bytes */{SIZE}"
    assert reply.json()["error"] == "range_not_satisfiable"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=5-2",
        "bytes=abc",
        "items=0-1",
        "bytes=+1-2",
        "bytes=1_0-20",
        "bytes=\u0663-4",  # ARABIC-INDIC DIGIT THREE
        "bytes=0x10-20",
        "bytes 0-1",
        "bytes=",
    ],
)
async def test_invalid_range_is_ignored(
    server: DataServer, session: aiohttp.ClientSession, header: str
) -> None:
    reply = await fetch(
        session,
        "GET",
        server.url + "/files/f.bin",
        headers={"Range": header.encode("utf-8").decode("latin-1")},
    )
    assert reply.status == 200
    assert "Content-Range" not in reply.headers
    assert reply.body == pattern(1, 0, SIZE)


# ---------------------------------------------------------------------------
# ETags and preconditions


async def test_etag_stable_across_reads(server: DataServer, session: aiohttp.ClientSession) -> None:
    tags = {
        (await get(session, server, "/files/f.bin")).headers["ETag"],
        (await head(session, server, "/files/f.bin")).headers["ETag"],
        (await get(session, server, "/files/f.bin", Range="bytes=1-2")).headers["ETag"],
        (await get(session, server, "/files/f.bin", Range="bytes=1-2,5-6")).headers["ETag"],
        (await get(session, server, "/files/f.bin")).headers["ETag"],
    }
    assert len(tags) == 1
    other = (await get(session, server, "/files/big.bin")).headers["ETag"]
    assert other not in tags


async def test_conditional_reads(server: DataServer, session: aiohttp.ClientSession) -> None:
    first = await get(session, server, "/files/f.bin")
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    past = email.utils.formatdate(time.time() - 86400 * 365, usegmt=True)
    future = email.utils.formatdate(time.time() + 86400, usegmt=True)
    cases: list[tuple[dict[str, str], int]] = [
        ({"If-None-Match": etag}, 304),
        ({"If-None-Match": f'"other", {etag}'}, 304),
        ({"If-None-Match": f"W/{etag}"}, 304),  # weak comparison
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"other"'}, 200),
        ({"If-Match": etag}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"If-Match": f"W/{etag}"}, 412),  # strong comparison
        ({"If-Modified-Since": modified}, 304),
        ({"If-Modified-Since": future}, 304),
        ({"If-Modified-Since": past}, 200),
        ({"If-Modified-Since": "garbage"}, 200),
        ({"If-Unmodified-Since": past}, 412),
        ({"If-Unmodified-Since": future}, 200),
        # If-None-Match takes precedence over If-Modified-Since.
        ({"If-None-Match": '"other"', "If-Modified-Since": future}, 200),
        # If-Match takes precedence over If-Unmodified-Since.
        ({"If-Match": etag, "If-Unmodified-Since": past}, 200),
    ]
    for headers, status in cases:
        for method in ("GET", "HEAD"):
            reply = await fetch(session, method, server.url + "/files/f.bin", headers=headers)
            assert reply.status == status, (method, headers, reply.body)
            if status == 304:
                assert reply.headers["ETag"] == etag
                assert reply.body == b""
            if status == 200 and method == "GET":
                assert reply.body == first.body


async def test_if_range(server: DataServer, session: aiohttp.ClientSession) -> None:
    first = await get(session, server, "/files/f.bin")
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    cases = [(etag, 206), ('"other"', 200), (f"W/{etag}", 200), (modified, 206)]
    cases.append((email.utils.formatdate(time.time() - 86400 * 365, usegmt=True), 200))
    for value, status in cases:
        reply = await get(session, server, "/files/f.bin", Range="bytes=0-9", **_h(If_Range=value))
        assert reply.status == status, value
        expected = pattern(1, 0, 10) if status == 206 else pattern(1, 0, SIZE)
        assert reply.body == expected


# ---------------------------------------------------------------------------
# Listings and health


async def test_listing_json(server: DataServer, session: aiohttp.ClientSession) -> None:
    reply = await get(session, server, "/files/", Accept="application/json")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    entries = reply.json()
    assert [e["name"] for e in entries] == ["dir", "big.bin", "empty", "f.bin"]
    assert entries[0] == {"name": "dir", "type": "directory", "mtime": entries[0]["mtime"]}
    by_name = {e["name"]: e for e in entries}
    assert by_name["f.bin"]["type"] == "file"
    assert by_name["f.bin"]["size"] == SIZE
    assert email.utils.parsedate_to_datetime(by_name["f.bin"]["mtime"]) is not None
    nested = await get(session, server, "/files/dir/sub/", Accept="application/json")
    assert [(e["name"], e["size"]) for e in nested.json()] == [("g.txt", 100)]


async def test_listing_html_escapes_names(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    odd = "<b>&\"'x y.txt"
    (server.root / "dir" / odd).write_bytes(b"12345")
    reply = await get(session, server, "/files/dir/")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    page = reply.body.decode()
    assert "<b>&" not in page
    assert "&lt;b&gt;&amp;&quot;&#x27;x y.txt" in page
    assert 'href="%3Cb%3E%26%22%27x%20y.txt"' in page
    assert 'href="sub/"' in page
    # The link works.
    linked = await get(session, server, "/files/dir/%3Cb%3E%26%22%27x%20y.txt")
    assert linked.body == b"12345"


async def test_listing_errors(server: DataServer, session: aiohttp.ClientSession) -> None:
    assert (await get(session, server, "/files/nodir/")).status == 404
    assert (await get(session, server, "/files/f.bin/")).status == 404
    headed = await head(session, server, "/files/dir/", Accept="application/json")
    assert headed.status == 200
    assert headed.body == b""
    assert int(headed.headers["Content-Length"]) > 0


async def test_healthz(server: DataServer, session: aiohttp.ClientSession) -> None:
    reply = await get(session, server, "/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}


async def test_wrong_method(server: DataServer, session: aiohttp.ClientSession) -> None:
    reply = await fetch(session, "OPTIONS", server.url + "/files/f.bin")
    assert reply.status == 405
    assert "PUT" in reply.headers["Allow"]
    listing = await fetch(session, "PUT", server.url + "/files/dir/", data=b"x")
    assert listing.status == 405
    assert listing.headers["Allow"] == "GET, HEAD"


# ---------------------------------------------------------------------------
# Access log and metrics


async def test_access_log_and_metrics(
    server: DataServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachesvc.access")
    assert (await get(session, server, "/files/big.bin", Range="bytes=0-99")).status == 206
    assert (await get(session, server, "/files/big.bin", Range="bytes=0-99")).status == 206
    assert (await get(session, server, "/files/nope")).status == 404
    assert (await fetch(session, "PROPFIND", server.url + "/files/f.bin")).status == 405
    records = [r for r in caplog.records if r.name == "cachesvc.access"]
    assert len(records) == 4
    fields = [(r.method, r.path, r.status, r.bytes, r.cache) for r in records]  # type: ignore[attr-defined]
    assert fields[0] == ("GET", "/files/big.bin", 206, 100, "miss")
    assert fields[1] == ("GET", "/files/big.bin", 206, 100, "hit")
    assert fields[2][2:] == (404, fields[2][3], "-")
    assert fields[3][0] == "OTHER"
    assert all(r.duration >= 0 for r in records)  # type: ignore[attr-defined]
    text = server.metrics.exposition().decode()
    assert 'cachesvc_http_requests_total{method="GET",status="206"} 2.0' in text
    assert 'cachesvc_http_requests_total{method="OTHER",status="405"} 1.0' in text
    assert 'cachesvc_http_request_duration_seconds_count{method="GET"} 3.0' in text


async def test_many_small_reads_hold_no_mappings(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    for offset in range(0, BIG - 4 * KiB, 97 * KiB):
        reply = await get(
            session, server, "/files/big.bin", Range=f"bytes={offset}-{offset + 4095}"
        )
        assert reply.body == pattern(2, offset, 4096)
    assert server.cache is not None
    assert server.cache.counters.mapped_bytes == 0


# ---------------------------------------------------------------------------
# Streams cut short

HUGE = 32 * MiB  # more than the socket buffers hold


async def patch_on_the_side(server: DataServer, path: str, offset: int, data: bytes) -> None:
    """A PATCH from a client of its own, while the test's session is reading."""
    async with aiohttp.ClientSession() as writer:
        patched = await fetch(
            writer,
            "PATCH",
            server.url + path,
            headers={"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"},
            data=data,
        )
    assert patched.status == 204


async def test_client_going_away_releases_mappings(
    server: DataServer, session: aiohttp.ClientSession, via: dict[str, str]
) -> None:
    write_file(server.root / "huge.bin", 5, HUGE)
    resp = await session.get(server.url + "/files/huge.bin", headers=via)
    assert resp.status == 200
    assert await resp.content.readexactly(MiB) == pattern(5, 0, MiB)
    resp.close()  # drops the connection mid-body
    assert await server.mapped_bytes_settled() == 0
    assert (await get(session, server, "/files/f.bin")).status == 200


async def test_file_changed_mid_stream_aborts(
    server: DataServer,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    via: dict[str, str],
) -> None:
    write_file(server.root / "huge.bin", 5, HUGE)
    resp = await session.get(server.url + "/files/huge.bin", headers=via)
    try:
        assert resp.status == 200
        assert await resp.content.readexactly(MiB) == pattern(5, 0, MiB)
        await patch_on_the_side(server, "/files/huge.bin", HUGE - 4, b"NEW!")
        # The rest never arrives whole: the client sees a broken body, never
        # a mix of old bytes and "NEW!" at the end.
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(30):
                while await resp.content.read(MiB):
                    pass
    finally:
        resp.close()
    fresh = await get(session, server, "/files/huge.bin", Range="bytes=-4")
    assert fresh.body == b"NEW!"


async def test_writes_elsewhere_leave_a_stream_alone(
    server: DataServer, session: aiohttp.ClientSession, via: dict[str, str]
) -> None:
    # A download of the first half goes on while the second half is written
    # and the file grows: its bytes and ETag stay those of the version it began with.
    write_file(server.root / "huge.bin", 5, HUGE)
    half = HUGE // 2
    headers = {"Range": f"bytes=0-{half - 1}", **via}
    async with session.get(server.url + "/files/huge.bin", headers=headers) as resp:
        assert resp.status == 206
        etag = resp.headers["ETag"]
        received = bytearray(await resp.content.readexactly(MiB))
        for offset in (half, HUGE - 3, HUGE + 5):
            await patch_on_the_side(server, "/files/huge.bin", offset, b"NEW!")
        received += await resp.content.read()
    assert received == pattern(5, 0, half)
    after = await head(session, server, "/files/huge.bin")
    assert after.headers["ETag"] != etag
    assert int(after.headers["Content-Length"]) == HUGE + 9


async def test_a_slow_client_gets_the_whole_body(
    server: DataServer, session: aiohttp.ClientSession, via: dict[str, str]
) -> None:
    # The client stops reading near the end: the server's last writes wait
    # in the transport, and the stream waits for them to be sent before it
    # lets the mappings go.
    write_file(server.root / "huge.bin", 5, HUGE)
    received = bytearray()
    async with session.get(server.url + "/files/huge.bin", headers=via) as resp:
        assert resp.status == 200
        while len(received) < HUGE - 8 * MiB:
            received += await resp.content.read(MiB)
        # Read nothing more until the server has stalled on us (the client
        # pausing is the behaviour under test; the stall ends the pause).
        assert resp.connection is not None and resp.connection.transport is not None
        await until_stalled(resp.connection.transport.get_extra_info("socket"))
        while chunk := await resp.content.read(MiB):
            received += chunk
    assert received == pattern(5, 0, HUGE)
    assert await server.mapped_bytes_settled() == 0


async def test_a_client_that_reads_nothing_is_cut_off(
    server: DataServer, via: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "SEND_IDLE_TIMEOUT", 0.5)
    write_file(server.root / "huge.bin", 5, HUGE)
    answered = await server.answered()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in via.items())
        writer.write(f"GET /files/huge.bin HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        await writer.drain()
        # Read nothing until the server has given up on the answer (the send
        # timeout under test) and is idle again.
        await server.idle(answered=answered + 1, timeout=20 * streaming.SEND_IDLE_TIMEOUT)
        received = 0
        async with asyncio.timeout(30):
            while chunk := await reader.read(MiB):
                received += len(chunk)
        assert 0 < received < HUGE  # the connection was closed mid-body
    finally:
        writer.close()
    assert await server.mapped_bytes_settled() == 0
