"""The data API's security rules over real sockets: path rules, symlink
escapes, write authorization, header deadline, and serving on after bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from cachesvc.config import HostPort
from tests.integration.data_rig import (
    DataServer,
    Reply,
    fetch,
    raw_exchange,
    serving,
    write_file,
)
from tests.support.content import pattern

SIZE = 1000
TOKEN = "s3cret-token"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write_file(root / "f.bin", 1, SIZE)
    write_file(root / "dir" / "g.bin", 2, SIZE)
    return root


@pytest.fixture
def server(root: Path) -> Iterator[DataServer]:
    with serving(root) as srv:
        yield srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as sess:
        yield sess


async def still_serving(session: aiohttp.ClientSession, server: DataServer) -> None:
    reply = await fetch(session, "GET", server.url + "/files/f.bin")
    assert reply.status == 200
    assert reply.body == pattern(1, 0, SIZE)


# ---------------------------------------------------------------------------
# Paths

BAD_PATHS = [
    "/files/dir/../f.bin",
    "/files/../f.bin",
    "/files/./f.bin",
    "/files/dir/.",
    "/files/dir/..",
    "/files/%2e%2e/f.bin",
    "/files/dir%2Fg.bin",
    "/files/dir%2fg.bin",
    "/files/dir%5Cg.bin",
    "/files/dir\\g.bin",
    "/files/f.bin%00",
    "/files/a%0Ab",
    "/files/a%1Fb",
    "/files/a%7Fb",
    "/files/a%C2%85b",  # U+0085, a C1 control character
    "/files/%FF",
    "/files/%C0%AF",  # overlong "/"
    "/files/%ED%A0%80",  # a UTF-16 surrogate
    "/files/dir//g.bin",
    "/files/" + "a" * 4097,
    "/files/" + "a" * 4095 + "%C3%A9",  # 4097 bytes once decoded
]


@pytest.mark.parametrize("path", BAD_PATHS)
async def test_bad_paths_are_400(
    server: DataServer, session: aiohttp.ClientSession, path: str
) -> None:
    for method, data in (("GET", None), ("HEAD", None), ("PUT", b"x"), ("DELETE", None)):
        reply = await fetch(session, method, server.url + path, data=data)
        assert reply.status == 400, (method, path, reply.body)
        if method != "HEAD":
            assert reply.json()["error"] == "bad_path"
    assert sorted(p.name for p in server.root.iterdir()) == ["dir", "f.bin"]
    await still_serving(session, server)


async def test_longest_path_is_fine(server: DataServer, session: aiohttp.ClientSession) -> None:
    name = "d/" * 100 + "x" * 200  # well under 4096 bytes
    reply = await fetch(session, "PUT", f"{server.url}/files/{name}", data=b"deep")
    assert reply.status == 201
    assert (server.root / name).read_bytes() == b"deep"


async def test_unicode_names(server: DataServer, session: aiohttp.ClientSession) -> None:
    reply = await fetch(session, "PUT", server.url + "/files/%C3%A9t%C3%A9%20%E2%9C%93", data=b"u")
    assert reply.status == 201
    assert (server.root / "\u00e9t\u00e9 \u2713").read_bytes() == b"u"
    listing = await fetch(
        session, "GET", server.url + "/files/", headers={"Accept": "application/json"}
    )
    assert "\u00e9t\u00e9 \u2713" in [e["name"] for e in listing.json()]


async def test_symlink_escape_same_answer_whether_target_exists(
    server: DataServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"top secret")
    missing = tmp_path / "missing"
    link = server.root / "link"
    dir_link = server.root / "dirlink"
    answers: list[tuple[int, bytes]] = []
    for target_dir in (outside, missing):  # the second does not exist
        for path in (link, dir_link):
            if path.is_symlink():
                path.unlink()
        os.symlink(target_dir / "secret", link)
        os.symlink(target_dir, dir_link)
        for url in ("/files/link", "/files/dirlink/secret", "/files/dirlink/"):
            reply = await fetch(session, "GET", server.url + url)
            assert reply.status in (403, 404), url
            assert b"top secret" not in reply.body
            answers.append((reply.status, reply.body))
            written = await fetch(session, "PUT", server.url + url.rstrip("/"), data=b"pwned")
            assert written.status in (403, 404), url
            answers.append((written.status, written.body))
    # Same statuses and bodies for the existing and the missing target.
    assert answers[:6] == answers[6:]
    assert secret.read_bytes() == b"top secret"
    assert not missing.exists()
    await still_serving(session, server)


# ---------------------------------------------------------------------------
# Write authorization

WRITES: list[tuple[str, str, dict[str, str], bytes | None]] = [
    ("PUT", "/files/f.bin", {}, b"new"),
    ("PUT", "/files/f.bin", {"Content-Range": "bytes 0-2/*"}, b"new"),
    ("PATCH", "/files/f.bin", {"Content-Range": "bytes 0-2/*"}, b"new"),
    ("POST", "/files/f.bin?truncate=3", {}, None),
    ("POST", "/files/f.bin?fsync", {}, None),
    ("DELETE", "/files/f.bin", {}, None),
]


async def _writes(
    session: aiohttp.ClientSession, url: str, extra: dict[str, str] | None = None
) -> list[Reply]:
    replies = []
    for method, path, headers, data in WRITES:
        hdrs = {**headers, **(extra or {})}
        replies.append(await fetch(session, method, url + path, headers=hdrs, data=data))
    return replies


async def test_read_only(root: Path, session: aiohttp.ClientSession) -> None:
    with serving(root, read_only=True) as srv:
        for reply in await _writes(session, srv.url):
            assert reply.status == 403
            assert reply.json()["error"] == "read_only"
        assert (root / "f.bin").read_bytes() == pattern(1, 0, SIZE)
        assert (await fetch(session, "GET", srv.url + "/files/f.bin")).status == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"bearer {TOKEN}x", f"Basic {TOKEN}", f"Bearer{TOKEN}"],
)
async def test_write_token_required(
    root: Path, session: aiohttp.ClientSession, authorization: str | None
) -> None:
    with serving(root, write_token=TOKEN) as srv:
        extra = {} if authorization is None else {"Authorization": authorization}
        for reply in await _writes(session, srv.url, extra):
            assert reply.status == 401
            assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert (root / "f.bin").read_bytes() == pattern(1, 0, SIZE)
        # Reads need no token.
        assert (await fetch(session, "GET", srv.url + "/files/f.bin")).status == 200


# RFC 9110 section 11: the scheme is case-insensitive and 1*SP may follow it.
@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN}"]
)
async def test_write_token_accepted(
    root: Path, session: aiohttp.ClientSession, authorization: str
) -> None:
    # The listener's address in the configuration is not loopback: the token
    # is what allows writes.
    with serving(root, write_token=TOKEN, listen=HostPort("0.0.0.0", 0)) as srv:
        replies = await _writes(session, srv.url, {"Authorization": authorization})
        assert [r.status for r in replies] == [204, 204, 204, 204, 204, 204]
        assert not (root / "f.bin").exists()


async def test_non_loopback_without_token(root: Path, session: aiohttp.ClientSession) -> None:
    with serving(root, listen=HostPort("0.0.0.0", 0)) as srv:
        for reply in await _writes(session, srv.url):
            assert reply.status == 403
            assert "--write-token" in reply.json()["message"]
        assert (root / "f.bin").read_bytes() == pattern(1, 0, SIZE)
    with serving(root, listen=HostPort("0.0.0.0", 0), allow_anonymous_writes=True) as srv:
        replies = await _writes(session, srv.url)
        assert [r.status for r in replies] == [204, 204, 204, 204, 204, 204]


# ---------------------------------------------------------------------------
# Slow clients and garbage


async def test_header_deadline_closes_slow_clients(root: Path) -> None:
    with serving(root, header_timeout=0.5) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            writer.write(b"GET /files/f.bin HTTP/1.1\r\nHost: x\r\n")  # never finished
            await writer.drain()
            async with asyncio.timeout(10):
                # The server closes the connection (EOF) within the deadline.
                assert await reader.read() == b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


GARBAGE = [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET /files/f.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=\xff\xfe\r\n\r\n",
    b"GET /files/f.bin HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET http://evil/files/../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /files/f.bin HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"PUT /files/f.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
    b"\r\n\r\nabc",
    b"PUT /files/f.bin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /files/f.bin?truncate=%FF HTTP/1.1\r\nHost: x\r\n\r\n",
    b'GET /files/f.bin HTTP/1.1\r\nHost: x\r\nIf-Match: "unterminated\r\n\r\n',
    b"GET /files/f.bin HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: Mon, 99 Foo 99999 99:99:99"
    b"\r\n\r\n",
]


async def test_service_survives_garbage(server: DataServer, session: aiohttp.ClientSession) -> None:
    for request in GARBAGE:
        answer = await raw_exchange(server.port, request)
        assert not answer.startswith(b"HTTP/1.1 500"), (request, answer[:200])
        await still_serving(session, server)
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, SIZE)
