"""The data API's writes over real sockets: full and partial PUT, PATCH
(Content-Range and SabreDAV), truncate, fsync, ?sync=1, DELETE, ETag
changes, preconditions on writes, 413/415, and all-or-nothing bodies.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from cachesvc.origins.base import Capabilities, Origin
from tests.integration.data_rig import (
    DataServer,
    MiB,
    Reply,
    fetch,
    raw_exchange,
    serving,
    write_file,
)
from tests.support.content import pattern

SIZE = 10_000
SABRE = "application/x-sabredav-partialupdate"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DataServer]:
    root = tmp_path / "root"
    write_file(root / "f.bin", 1, SIZE)
    (root / "ten").write_bytes(b"1234567890")
    with serving(root, max_partial_write=1 * MiB) as srv:
        yield srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as sess:
        yield sess


async def req(
    session: aiohttp.ClientSession,
    server: DataServer,
    method: str,
    path: str,
    data: object = None,
    **headers: str,
) -> Reply:
    fixed = {k.replace("_", "-"): v for k, v in headers.items()}
    return await fetch(session, method, server.url + path, headers=fixed, data=data)


async def body_of(session: aiohttp.ClientSession, server: DataServer, path: str) -> bytes:
    reply = await req(session, server, "GET", path)
    assert reply.status == 200, reply.body
    return reply.body


async def etag_of(session: aiohttp.ClientSession, server: DataServer, path: str) -> str:
    return str((await req(session, server, "HEAD", path)).headers["ETag"])


# ---------------------------------------------------------------------------
# Full PUT


async def test_put_creates_with_parents_then_replaces(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    created = await req(session, server, "PUT", "/files/a/b/c.bin", data=b"first")
    assert created.status == 201
    assert created.headers["ETag"] == await etag_of(session, server, "/files/a/b/c.bin")
    assert (server.root / "a" / "b" / "c.bin").read_bytes() == b"first"
    replaced = await req(session, server, "PUT", "/files/a/b/c.bin", data=b"second!")
    assert replaced.status == 204
    assert replaced.headers["ETag"] != created.headers["ETag"]
    assert await body_of(session, server, "/files/a/b/c.bin") == b"second!"
    assert replaced.headers["ETag"] == await etag_of(session, server, "/files/a/b/c.bin")


async def test_put_streams_chunked_body(server: DataServer, session: aiohttp.ClientSession) -> None:
    size = 5 * MiB + 3

    async def chunks() -> AsyncIterator[bytes]:
        for pos in range(0, size, MiB):
            yield pattern(7, pos, min(MiB, size - pos))

    reply = await req(session, server, "PUT", "/files/streamed.bin", data=chunks())
    assert reply.status == 201
    assert (server.root / "streamed.bin").read_bytes() == pattern(7, 0, size)
    assert await body_of(session, server, "/files/streamed.bin") == pattern(7, 0, size)


async def test_put_preconditions(server: DataServer, session: aiohttp.ClientSession) -> None:
    exists = await req(session, server, "PUT", "/files/f.bin", b"x", If_None_Match="*")
    assert exists.status == 412
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, SIZE)
    new = await req(session, server, "PUT", "/files/new.bin", b"", If_None_Match="*")
    assert new.status == 201
    assert (server.root / "new.bin").read_bytes() == b""
    stale = await req(session, server, "PUT", "/files/f.bin", b"x", If_Match='"stale"')
    assert stale.status == 412
    missing = await req(session, server, "PUT", "/files/nope", b"x", If_Match='"x"')
    assert missing.status == 412
    assert not (server.root / "nope").exists()
    etag = await etag_of(session, server, "/files/f.bin")
    fresh = await req(session, server, "PUT", "/files/f.bin", b"x", If_Match=etag)
    assert fresh.status == 204


# ---------------------------------------------------------------------------
# Partial writes


async def test_partial_put(server: DataServer, session: aiohttp.ClientSession) -> None:
    before = await etag_of(session, server, "/files/f.bin")
    reply = await req(
        session, server, "PUT", "/files/f.bin", b"ABCDEFGHIJ", Content_Range="bytes 10-19/*"
    )
    assert reply.status == 204
    assert "ETag" not in reply.headers
    expected = bytearray(pattern(1, 0, SIZE))
    expected[10:20] = b"ABCDEFGHIJ"
    assert await body_of(session, server, "/files/f.bin") == expected
    assert await etag_of(session, server, "/files/f.bin") != before
    # curl -T sends the upload size after the slash: accepted and ignored.
    curl_style = await req(
        session, server, "PUT", "/files/f.bin", b"zz", Content_Range="bytes 0-1/123456"
    )
    assert curl_style.status == 204
    assert (await body_of(session, server, "/files/f.bin"))[:2] == b"zz"


async def test_partial_put_creates_sparse_file(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    reply = await req(
        session, server, "PUT", "/files/new/sparse", b"xyz", Content_Range="bytes 5-7/*"
    )
    assert reply.status == 201
    assert await body_of(session, server, "/files/new/sparse") == b"\0" * 5 + b"xyz"


@pytest.mark.parametrize(
    "header",
    ["bytes 5-2/*", "bytes=0-1/*", "bytes 0-1", "bytes */10", "bytes +0-1/*", "items 0-1/*"],
)
async def test_partial_put_bad_content_range(
    server: DataServer, session: aiohttp.ClientSession, header: str
) -> None:
    reply = await req(session, server, "PUT", "/files/f.bin", b"ab", Content_Range=header)
    assert reply.status == 400
    assert reply.json()["error"] == "bad_range"
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, SIZE)


async def test_partial_length_mismatch_applies_nothing(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    before = await etag_of(session, server, "/files/f.bin")
    for body in (b"short", b"much too long!!"):
        for method in ("PUT", "PATCH"):
            reply = await req(
                session, server, method, "/files/f.bin", body, Content_Range="bytes 0-9/*"
            )
            assert reply.status == 400, (method, body)
    assert await body_of(session, server, "/files/f.bin") == pattern(1, 0, SIZE)
    assert await etag_of(session, server, "/files/f.bin") == before


async def test_patch_content_range(server: DataServer, session: aiohttp.ClientSession) -> None:
    before = await etag_of(session, server, "/files/f.bin")
    reply = await req(
        session,
        server,
        "PATCH",
        "/files/f.bin",
        b"HELLO",
        Content_Range=f"bytes {SIZE}-{SIZE + 4}/*",
    )
    assert reply.status == 204
    assert reply.headers["ETag"] != before
    assert reply.headers["ETag"] == await etag_of(session, server, "/files/f.bin")
    assert await body_of(session, server, "/files/f.bin") == pattern(1, 0, SIZE) + b"HELLO"
    missing = await req(session, server, "PATCH", "/files/nope", b"x", Content_Range="bytes 0-0/*")
    assert missing.status == 404
    no_range = await req(session, server, "PATCH", "/files/f.bin", b"x")
    assert no_range.status == 400


@pytest.mark.parametrize(
    ("update_range", "body", "expected"),
    [
        # SabreDAV's own examples, on "1234567890".
        ("bytes=0-3", b"ABCD", b"ABCD567890"),
        ("bytes=3-", b"ABCD", b"123ABCD890"),
        ("bytes=-2", b"ABCD", b"12345678ABCD"),
        ("append", b"ABCD", b"1234567890ABCD"),
        ("APPEND", b"", b"1234567890"),
        ("bytes=12-", b"AB", b"1234567890\0\0AB"),
    ],
)
async def test_patch_sabredav(
    server: DataServer,
    session: aiohttp.ClientSession,
    update_range: str,
    body: bytes,
    expected: bytes,
) -> None:
    reply = await req(
        session,
        server,
        "PATCH",
        "/files/ten",
        body,
        Content_Type=SABRE,
        X_Update_Range=update_range,
    )
    assert reply.status == 204, reply.body
    assert await body_of(session, server, "/files/ten") == expected


@pytest.mark.parametrize("update_range", ["bytes=-11", "bytes=5-2", "bytes 0-1", "prepend", None])
async def test_patch_sabredav_bad_range(
    server: DataServer, session: aiohttp.ClientSession, update_range: str | None
) -> None:
    headers = {"Content-Type": SABRE}
    if update_range is not None:
        headers["X-Update-Range"] = update_range
    reply = await fetch(session, "PATCH", server.url + "/files/ten", headers=headers, data=b"ab")
    assert reply.status == 400
    assert (server.root / "ten").read_bytes() == b"1234567890"


async def test_partial_write_too_large(server: DataServer, session: aiohttp.ClientSession) -> None:
    big = io.BytesIO(b"x" * (MiB + 1))
    declared = await req(
        session, server, "PUT", "/files/f.bin", big, Content_Range=f"bytes 0-{MiB}/*"
    )
    assert declared.status == 413

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * (MiB // 2)

    streamed = await req(
        session,
        server,
        "PATCH",
        "/files/ten",
        chunked(),
        Content_Type=SABRE,
        X_Update_Range="append",
    )
    assert streamed.status == 413
    assert (server.root / "ten").read_bytes() == b"1234567890"
    assert await body_of(session, server, "/files/f.bin") == pattern(1, 0, SIZE)


# ---------------------------------------------------------------------------
# POST, DELETE, sync


async def test_truncate(server: DataServer, session: aiohttp.ClientSession) -> None:
    etags = {await etag_of(session, server, "/files/f.bin")}
    shrink = await req(session, server, "POST", "/files/f.bin?truncate=100")
    assert shrink.status == 204
    etags.add(shrink.headers["ETag"])
    assert await body_of(session, server, "/files/f.bin") == pattern(1, 0, 100)
    grow = await req(session, server, "POST", "/files/f.bin?truncate=200&sync=1")
    assert grow.status == 204
    etags.add(grow.headers["ETag"])
    assert await body_of(session, server, "/files/f.bin") == pattern(1, 0, 100) + bytes(100)
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, 100) + bytes(100)
    same_size = await req(session, server, "POST", "/files/f.bin?truncate=200")
    etags.add(same_size.headers["ETag"])
    assert len(etags) == 4  # every truncate changes the ETag
    missing = await req(session, server, "POST", "/files/nope?truncate=0")
    assert missing.status == 404


@pytest.mark.parametrize(
    "query",
    ["truncate=", "truncate=-1", "truncate=+5", "truncate=1_0", "truncate=%D9%A3", "truncate=1e3",
     "truncate=99999999999999999999", "truncate=1&truncate=2", "sync=maybe&fsync", ""],
)  # fmt: skip
async def test_post_bad_parameters(
    server: DataServer, session: aiohttp.ClientSession, query: str
) -> None:
    reply = await req(session, server, "POST", f"/files/f.bin?{query}")
    assert reply.status == 400
    assert set(reply.json()) == {"error", "message"}
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, SIZE)


async def test_fsync_and_sync_writes(server: DataServer, session: aiohttp.ClientSession) -> None:
    synced = await req(
        session, server, "PUT", "/files/f.bin?sync=1", b"SYNC", Content_Range="bytes 0-3/*"
    )
    assert synced.status == 204
    # Durable at the origin before the response: the file itself has it.
    assert (server.root / "f.bin").read_bytes()[:4] == b"SYNC"
    lazy = await req(session, server, "PUT", "/files/f.bin", b"LAZY", Content_Range="bytes 4-7/*")
    assert lazy.status == 204
    fsync = await req(session, server, "POST", "/files/f.bin?fsync")
    assert fsync.status == 204
    assert (server.root / "f.bin").read_bytes()[:8] == b"SYNCLAZY"
    assert server.cache is not None
    assert server.cache.counters.dirty_bytes == 0
    bad = await req(
        session, server, "PUT", "/files/f.bin?sync=2", b"x", Content_Range="bytes 0-0/*"
    )
    assert bad.status == 400


async def test_delete(server: DataServer, session: aiohttp.ClientSession) -> None:
    assert (await req(session, server, "GET", "/files/f.bin")).status == 200
    stale = await req(session, server, "DELETE", "/files/f.bin", If_Match='"stale"')
    assert stale.status == 412
    reply = await req(session, server, "DELETE", "/files/f.bin")
    assert reply.status == 204
    assert not (server.root / "f.bin").exists()
    assert (await req(session, server, "GET", "/files/f.bin")).status == 404
    assert (await req(session, server, "DELETE", "/files/f.bin")).status == 404


async def test_every_write_changes_etag(server: DataServer, session: aiohttp.ClientSession) -> None:
    path = "/files/f.bin"
    seen = [await etag_of(session, server, path)]
    steps: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("PUT", path, b"a", {"Content-Range": "bytes 0-0/*"}),
        ("PATCH", path, b"b", {"Content-Range": "bytes 1-1/*"}),
        ("PATCH", path, b"c", {"Content-Type": SABRE, "X-Update-Range": "append"}),
        ("POST", path + "?truncate=50", b"", {}),
        ("PUT", path, b"whole", {}),
        ("PUT", path, b"whole", {}),  # same bytes again: still a new version
    ]
    for method, url, data, headers in steps:
        reply = await fetch(session, method, server.url + url, headers=headers, data=data)
        assert reply.status in (201, 204), (method, reply.body)
        etag = await etag_of(session, server, path)
        assert etag not in seen, (method, url)
        assert await etag_of(session, server, path) == etag  # stable across reads
        seen.append(etag)


# ---------------------------------------------------------------------------
# Refused bodies and read-only origins


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": "Multipart/Mixed; boundary=x"},
        {"Content-Encoding": "gzip"},
        {"Content-Encoding": "identity, br"},
    ],
)
async def test_coded_or_multipart_bodies_refused(
    server: DataServer, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    for extra in ({}, {"Content-Range": "bytes 0-1/*"}):
        reply = await fetch(
            session, "PUT", server.url + "/files/f.bin", headers={**headers, **extra}, data=b"ab"
        )
        assert reply.status == 415
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, SIZE)


class ReadOnly:
    """A LocalOrigin that says it cannot write (like an HTTP origin without writes)."""

    def __init__(self, inner: Origin) -> None:
        self._inner = inner

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(writable=False, partial_writes=False, durable_sync=False)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


async def test_read_only_origin_refuses_writes(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    write_file(tmp_path / "f.bin", 1, 100)
    with serving(tmp_path, wrap_origin=ReadOnly) as srv:  # type: ignore[arg-type]
        for method, headers in (
            ("PUT", {}),
            ("PUT", {"Content-Range": "bytes 0-0/*"}),
            ("PATCH", {"Content-Range": "bytes 0-0/*"}),
            ("POST", {}),
            ("DELETE", {}),
        ):
            reply = await fetch(
                session, method, srv.url + "/files/f.bin?truncate=1", headers=headers, data=b"x"
            )
            assert reply.status == 405, method
            assert "read-only" in reply.json()["message"]
        assert (await fetch(session, "GET", srv.url + "/files/f.bin")).body == pattern(1, 0, 100)


# ---------------------------------------------------------------------------
# Bodies that end early


async def test_partial_body_ending_early_applies_nothing(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    before = await etag_of(session, server, "/files/f.bin")
    answered = await server.answered()
    for head in (
        "PUT /files/f.bin HTTP/1.1\r\nContent-Range: bytes 0-99/*\r\n",
        f"PATCH /files/f.bin HTTP/1.1\r\nContent-Type: {SABRE}\r\nX-Update-Range: bytes=0-99\r\n",
        "PUT /files/created HTTP/1.1\r\nContent-Range: bytes 0-99/*\r\n",
    ):
        request = f"{head}Host: x\r\nContent-Length: 100\r\n\r\n".encode() + b"Q" * 40
        await raw_exchange(server.port, request)
    # All three answered and nothing left running: nothing can apply later.
    await server.idle(answered=answered + 3)
    assert await body_of(session, server, "/files/f.bin") == pattern(1, 0, SIZE)
    assert await etag_of(session, server, "/files/f.bin") == before
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, SIZE)
    assert not (server.root / "created").exists()


async def test_interrupted_full_put_keeps_old_content(
    server: DataServer, session: aiohttp.ClientSession
) -> None:
    size = 3 * MiB
    answered = await server.answered()
    request = (
        f"PUT /files/f.bin HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
        + b"N" * (size // 2)
    )
    await raw_exchange(server.port, request)
    # Answered, and the temporary file's removal (an origin job) done.
    await server.idle(answered=answered + 1)
    assert await body_of(session, server, "/files/f.bin") == pattern(1, 0, SIZE)
    assert sorted(p.name for p in server.root.iterdir()) == ["f.bin", "ten"]  # no temp files
    # And the service still works.
    assert (await req(session, server, "PUT", "/files/f.bin", b"ok")).status == 204
    assert await body_of(session, server, "/files/f.bin") == b"ok"


async def test_slow_body_times_out(
    server: DataServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cachesvc.api.writes.BODY_IDLE_TIMEOUT", 0.3)
    request = b"PUT /files/f.bin HTTP/1.1\r\nHost: x\r\nContent-Range: bytes 0-9/*\r\n"
    request += b"Content-Length: 10\r\n\r\n12345"
    answer = await raw_exchange(server.port, request, close_after=False, timeout=10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert (server.root / "f.bin").read_bytes() == pattern(1, 0, SIZE)
