"""HttpOrigin's range reads (cachesvc.origins.http.reads) against scripted
raw servers and nginx: body framings, connection reuse, cancellation, uvloop.

Everything listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from cachesvc.origins.base import OriginTimeout, OriginUnavailable
from cachesvc.origins.http import HttpOrigin
from tests.integration.nginx_fixture import nginx  # noqa: F401  (fixture)
from tests.integration.test_http_origin import (
    RawServer,
    Request,
    answer,
    content,
    raw_server,
    read,
)
from tests.support.waiting import until

KiB = 1024
MiB = 1024 * KiB


@contextlib.asynccontextmanager
async def scripted(
    handler: Callable[[str, asyncio.StreamWriter], Awaitable[bool]],
) -> AsyncIterator[RawServer]:
    """A raw server calling ``await handler(request_head, writer)`` per
    request; a handler returning False closes the connection."""

    async def on_request(request: Request, writer: asyncio.StreamWriter) -> bool:
        return await handler(request.head, writer)

    async with raw_server(on_request) as srv:
        yield srv


@contextlib.asynccontextmanager
async def origin_on(srv: RawServer, **options: Any) -> AsyncIterator[HttpOrigin]:
    """An HttpOrigin of ``srv``, closed after the block."""
    o = HttpOrigin(srv.url, **options)
    try:
        yield o
    finally:
        await o.close()


def range_of(head: str) -> tuple[int, int]:
    """The first and last byte a request's ``Range: bytes=a-b`` asks for."""
    for line in head.split("\r\n"):
        if line.lower().startswith("range:"):
            first, last = line.split("=", 1)[1].split("-")
            return int(first), int(last)
    raise AssertionError(f"no Range in {head!r}")


DATA = content(7, 300 * KiB)


async def test_chunked_answer_to_a_range_is_sliced() -> None:
    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer("200 OK", {"Transfer-Encoding": "chunked"}))
        for start in range(0, len(DATA), 70_001):
            piece = DATA[start : start + 70_001]
            writer.write(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
        writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        return True

    async with scripted(handler) as srv, origin_on(srv) as o:
        assert await read(o, "f", 100_000, 150_000) == DATA[100_000:250_000]
        assert await read(o, "f", 290_000, 50_000) == DATA[290_000:]


async def test_close_delimited_206() -> None:
    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        first, last = range_of(head)
        last = min(last, len(DATA) - 1)
        cr = f"bytes {first}-{last}/{len(DATA)}"
        writer.write(answer("206 Partial Content", {"Content-Range": cr}, DATA[first : last + 1]))
        return False

    async with scripted(handler) as srv:
        async with origin_on(srv) as o:
            assert await read(o, "f", 5, 200_000) == DATA[5:200_005]
            assert await read(o, "f", 250_000, 100_000) == DATA[250_000:]
        assert srv.connections == 2


def ranged(head: str, extra: dict[str, str] | None = None) -> bytes:
    first, last = range_of(head)
    last = min(last, len(DATA) - 1)
    headers = {
        "Content-Range": f"bytes {first}-{last}/{len(DATA)}",
        "Content-Length": str(last - first + 1),
        **(extra or {}),
    }
    return answer("206 Partial Content", headers, DATA[first : last + 1])


async def test_connections_are_reused_after_a_complete_body() -> None:
    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ranged(head))
        return True

    async with scripted(handler) as srv:
        async with origin_on(srv) as o:
            for offset in range(0, len(DATA), 64 * KiB):
                assert await read(o, "f", offset, 64 * KiB) == DATA[offset : offset + 64 * KiB]
        assert srv.connections == 1
        assert len(srv.requests) == 5


async def test_connection_close_is_honoured() -> None:
    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(ranged(head, {"Connection": "close"}))
        return True  # the client must close it

    async with scripted(handler) as srv:
        async with origin_on(srv) as o:
            assert await read(o, "f", 0, 10) == DATA[:10]
            assert await read(o, "f", 10, 10) == DATA[10:20]
        assert srv.connections == 2


async def test_idle_connection_closed_by_the_server_is_replaced_at_once() -> None:
    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(ranged(head))
        return False  # closes without saying so

    async with scripted(handler) as srv:
        async with origin_on(srv, retries=0) as o:
            assert await read(o, "f", 0, 10) == DATA[:10]
            # The server has closed it; polling lets the client's loop see the end.
            await until(lambda: srv.closed, "the server closing the connection")
            assert await read(o, "f", 10, 10) == DATA[10:20]
        assert srv.connections == 2


async def test_malformed_head_is_unavailable_and_not_retried() -> None:
    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Length 10\r\n\r\n0123456789")
        return True

    async with scripted(handler) as srv:
        async with origin_on(srv) as o:
            with pytest.raises(OriginUnavailable, match="malformed header"):
                await read(o, "f", 0, 10)
        assert len(srv.requests) == 1


async def test_stalled_body_times_out() -> None:
    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        whole = ranged(head)
        writer.write(whole[: len(whole) // 2])
        await writer.drain()
        await asyncio.sleep(3)  # the body stalls: read_timeout is under test
        return False

    async with scripted(handler) as srv:
        async with origin_on(srv, read_timeout=0.3, retries=1) as o:
            with pytest.raises(OriginTimeout, match="no bytes"):
                await read(o, "f", 0, 100_000)
        assert len(srv.requests) == 2


async def test_a_cancelled_read_writes_nothing_more_into_the_buffers() -> None:
    more = asyncio.Event()

    async def handler(head: str, writer: asyncio.StreamWriter) -> bool:
        whole = ranged(head)
        writer.write(whole[: len(whole) // 2])
        await writer.drain()
        await asyncio.wait_for(more.wait(), 5)
        writer.write(whole[len(whole) // 2 :])
        return True

    async with scripted(handler) as srv:
        o = HttpOrigin(srv.url)
        buf = bytearray(200_000)
        try:
            task = asyncio.create_task(o.read_into("f", 0, [memoryview(buf)]))
            await until(lambda: any(buf[90_000:99_000]), "the first half arriving")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            snapshot = bytes(buf)
            more.set()
            # The server has sent the second half (or found the connection
            # gone) and closed it: nothing more can arrive.
            await until(lambda: srv.closed, "the server closing the connection")
            assert bytes(buf) == snapshot
            assert not any(buf[110_000:])
            assert await read(o, "f", 0, 1000) == DATA[:1000]  # on a new connection
        finally:
            await o.close()
        assert srv.connections == 2


def test_cold_read_under_uvloop(tmp_path: Path, nginx: Callable[..., int]) -> None:  # noqa: F811
    """cachesvc runs on uvloop, whose transports call the protocol differently."""
    data = content(9, 3 * MiB + 5)
    (tmp_path / "f").write_bytes(data)
    url = f"http://127.0.0.1:{nginx(tmp_path)}/"

    async def main() -> None:
        o = HttpOrigin(url)
        try:
            st = await o.stat("f")
            buf = bytearray(len(data) + 100)
            views = [memoryview(buf)[: MiB + 1], memoryview(buf)[MiB + 1 :]]
            assert await o.read_into("f", 0, views, st.etag) == len(data)
            assert bytes(buf[: len(data)]) == data
            assert await read(o, "f", MiB, 100, st.etag) == data[MiB : MiB + 100]
        finally:
            await o.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# ------------------------------------------------------------------ https


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (make test installs it as root)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def _serve_ranges(head: str, writer: asyncio.StreamWriter) -> bool:
    first, last = range_of(head)
    last = min(last, len(DATA) - 1)
    headers = {"Content-Range": f"bytes {first}-{last}/{len(DATA)}"}
    headers["Content-Length"] = str(last - first + 1)
    writer.write(answer("206 Partial Content", headers, DATA[first : last + 1]))
    return True


def _tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


async def test_https_range_reads_verify_the_certificate(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client trusts the default CA store, which SSL_CERT_FILE replaces.
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))

    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        return await _serve_ranges(request.head, writer)

    async with raw_server(handler, tls=_tls(certificate)) as srv:
        assert srv.url.startswith("https://")
        async with origin_on(srv) as o:
            assert await read(o, "f", 1000, 100_000) == DATA[1000:101_000]
            assert await read(o, "f", 200_000, 10) == DATA[200_000:200_010]
        assert srv.connections == 1  # kept alive over TLS
        assert "Host: 127.0.0.1:" in srv.requests[0].head


async def test_https_with_an_untrusted_certificate_fails_cleanly(
    certificate: tuple[Path, Path],
) -> None:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        return await _serve_ranges(request.head, writer)

    async with raw_server(handler, tls=_tls(certificate)) as srv:
        async with origin_on(srv, retries=0) as o:
            with pytest.raises(OriginUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
                await read(o, "f", 0, 10)
        assert not srv.requests  # nothing was sent over an unverified connection
