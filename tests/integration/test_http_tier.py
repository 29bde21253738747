"""HTTP origins through real ``cachesvc serve`` processes.

A cache tier: a lower ``cachesvc serve --origin <dir>`` and an upper
``cachesvc serve --origin http://<lower>/files/ --http-origin-writes
--revalidate 1s``; writes through the upper end on the lower tier's disk
after ``POST ?fsync`` on the upper, reads through the upper see files made on
the lower's disk, and a change made through the lower shows through the upper
once the revalidation interval has passed.

A read-only HTTP origin: an upper process over nginx (a cold sequential read
of 16 MiB; writes refused with 405) and over a tiny raw HTTP server that
dies mid-body (the client gets a 5xx quickly; once the origin is fixed the
same request gets the right bytes, so nothing wrong was cached).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.integration.nginx_fixture import nginx  # noqa: F401  (fixture)
from tests.support.content import pattern
from tests.support.servers import ServerProcess, running_cachesvc, start_cachesvc

KiB = 1 << 10
MiB = 1 << 20
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class Tier:
    lower: ServerProcess
    upper: ServerProcess
    root: Path  # the lower tier's origin directory

    def upper_url(self, path: str) -> str:
        return f"{self.upper.url}/files/{path}"

    def lower_url(self, path: str) -> str:
        return f"{self.lower.url}/files/{path}"


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    root = tmp_path_factory.mktemp("lower-origin")
    logs = tmp_path_factory.mktemp("tier-logs")
    with running_cachesvc(str(root), log_dir=logs) as lower:
        origin = f"http://127.0.0.1:{lower.port}/files/"
        args = ["--http-origin-writes", "--revalidate", "1s"]
        with running_cachesvc(origin, args, log_dir=logs) as upper:
            yield Tier(lower, upper, root)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as session:
        yield session


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers.get("ETag", "")


async def put_range(http: aiohttp.ClientSession, url: str, offset: int, data: bytes) -> int:
    headers = {"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"}
    async with http.put(url, data=data, headers=headers) as resp:
        assert resp.status in (201, 204), await resp.text()
        return resp.status


async def post(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url) as resp:
        return resp.status


# -- the cachesvc -> cachesvc tier ------------------------------------------------------


async def test_reads_through_the_upper_tier(tier: Tier, http: aiohttp.ClientSession) -> None:
    data = pattern(1, 0, MiB + 77)
    (tier.root / "read").mkdir()
    (tier.root / "read" / "file.bin").write_bytes(data)
    url = tier.upper_url("read/file.bin")

    status, body, etag = await get(http, url, {"Range": "bytes=1000-1999"})
    assert (status, body) == (206, data[1000:2000])
    status, body, etag2 = await get(http, url)
    assert (status, body) == (200, data)
    assert etag and etag == etag2
    async with http.head(url) as resp:
        assert resp.headers["Content-Length"] == str(len(data))
    assert (await get(http, tier.upper_url("read/missing.bin")))[0] == 404


async def test_writes_through_the_upper_land_on_the_lower_disk_after_fsync(
    tier: Tier, http: aiohttp.ClientSession
) -> None:
    disk = tier.root / "written.bin"
    model = bytearray(pattern(2, 0, 700 * KiB + 5))
    disk.write_bytes(model)
    url = tier.upper_url("written.bin")

    # Cache the first pages in the upper tier, then write on them (write-back
    # there), on a gap (written through to the lower tier) and past the end.
    status, body, _ = await get(http, url, {"Range": "bytes=0-8191"})
    assert (status, body) == (206, bytes(model[:8192]))
    writes = [(100, b"on cached pages"), (500 * KiB, pattern(3, 0, 10 * KiB))]
    writes.append((len(model) + 3, b"past the end"))
    for offset, data in writes:
        await put_range(http, url, offset, data)
        model.extend(bytes(max(0, offset - len(model))))  # a hole reads as zeros
        model[offset : offset + len(data)] = data
    assert (await get(http, url))[1] == bytes(model)
    # Dirty in the upper tier, so not on the lower tier's disk yet.
    assert disk.read_bytes()[100:115] != b"on cached pages"

    assert await post(http, url + "?fsync") == 204
    assert disk.read_bytes() == bytes(model)
    assert (await get(http, tier.lower_url("written.bin")))[1] == bytes(model)


async def test_whole_put_and_delete_through_the_upper(
    tier: Tier, http: aiohttp.ClientSession
) -> None:
    data = pattern(4, 0, 300 * KiB)
    url = tier.upper_url("new/dir/whole.bin")
    async with http.put(url, data=data) as resp:
        assert resp.status == 201, await resp.text()
    assert (tier.root / "new" / "dir" / "whole.bin").read_bytes() == data
    assert (await get(http, url))[1] == data
    async with http.delete(url) as resp:
        assert resp.status == 204, await resp.text()
    assert not (tier.root / "new" / "dir" / "whole.bin").exists()
    assert (await get(http, url))[0] == 404


async def test_upper_revalidates_after_a_change_on_the_lower(
    tier: Tier, http: aiohttp.ClientSession
) -> None:
    old, new = pattern(5, 0, 200 * KiB), pattern(6, 0, 150 * KiB + 3)
    (tier.root / "changing.bin").write_bytes(old)
    url = tier.upper_url("changing.bin")
    status, body, old_etag = await get(http, url)
    validated = time.monotonic()
    assert (status, body) == (200, old)

    # Change it through the lower tier (which caches it too).
    async with http.put(tier.lower_url("changing.bin"), data=new) as resp:
        assert resp.status == 204, await resp.text()
    status, body, _ = await get(http, url)
    if time.monotonic() - validated < 0.8:  # still inside --revalidate 1s
        assert body == old, "the upper tier should serve its cached copy"

    # The timer under test: --revalidate 1s must pass before the upper asks
    # the lower again (it asks on the next read, not by itself).
    await asyncio.sleep(max(0.0, validated + 1.2 - time.monotonic()))
    status, body, etag = await get(http, url)
    assert (status, body) == (200, new)
    assert etag != old_etag


# -- read-only HTTP origins -------------------------------------------------------------


async def test_cold_sequential_read_through_nginx(
    tmp_path: Path,
    nginx: Callable[..., int],  # noqa: F811
    http: aiohttp.ClientSession,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = pattern(7, 0, 16 * MiB)
    (root / "big.bin").write_bytes(data)
    origin = f"http://127.0.0.1:{nginx(root)}/"
    with running_cachesvc(origin, log_dir=tmp_path / "logs") as upper:
        url = f"{upper.url}/files/big.bin"
        received = bytearray()
        async with http.get(url) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(MiB):
                received += chunk
        assert received == data
        status, body, _ = await get(http, url, {"Range": "bytes=9999999-10000999"})
        assert (status, body) == (206, data[9999999:10001000])

        async with http.put(url, data=b"x") as resp:
            assert resp.status == 405
            error = await resp.json()
        assert error["error"] and "--http-origin-writes" in error["message"]
        assert (root / "big.bin").read_bytes()[:1] == data[:1]


class FlakyOrigin:
    """A tiny HTTP/1.1 origin serving one file; while ``broken``, every GET body
    stops halfway and the connection is closed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.broken = True
        self.gets = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FlakyOrigin:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                await self._answer(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method = lines[0].split(" ")[0]
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            start, end = 0, len(self.data)
            status = "200 OK"
            extra = ""
            if "range" in headers:
                first, _, last = headers["range"].removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) + 1, len(self.data))
                status = "206 Partial Content"
                extra = f"Content-Range: bytes {start}-{end - 1}/{len(self.data)}\r\n"
            writer.write(
                (
                    f"HTTP/1.1 {status}\r\nContent-Length: {end - start}\r\n"
                    f'ETag: "v1"\r\nAccept-Ranges: bytes\r\n{extra}\r\n'
                ).encode()
            )
            if method == "GET":
                self.gets += 1
                if self.broken:
                    writer.write(self.data[start : start + (end - start) // 2])
                    await writer.drain()
                    return
                writer.write(self.data[start:end])
            await writer.drain()


async def test_origin_dying_mid_read(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    data = pattern(8, 0, 200 * KiB + 11)
    async with FlakyOrigin(data) as origin:
        url_origin = f"http://127.0.0.1:{origin.port}/"
        with running_cachesvc(url_origin, log_dir=tmp_path / "logs") as upper:
            url = f"{upper.url}/files/f.bin"
            started = time.monotonic()
            async with http.get(url) as resp:
                assert resp.status >= 500
                error = await resp.json()
            assert time.monotonic() - started < 10
            assert error["error"]
            assert origin.gets >= 1

            origin.broken = False
            status, body, _ = await get(http, url)
            assert (status, body) == (200, data)
            status, body, _ = await get(http, url, {"Range": "bytes=5000-5099"})
            assert (status, body) == (206, data[5000:5100])


async def test_fsync_fails_when_the_lower_tier_lost_unsynced_writes(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # The lower caches the file, the upper writes to a range it has not
    # cached (so the write goes straight to the lower, dirty in its memory),
    # then the lower is killed and restarted: the write is gone, and the
    # upper's fsync must say so instead of succeeding.
    root = tmp_path / "lower"
    root.mkdir()
    (root / "f.bin").write_bytes(b"A" * MiB)
    logs = tmp_path / "logs"
    lower = start_cachesvc(str(root), log_dir=logs)
    try:
        assert (await get(http, f"{lower.url}/files/f.bin"))[0] == 200
        origin = f"http://127.0.0.1:{lower.port}/files/"
        with running_cachesvc(origin, ["--http-origin-writes"], log_dir=logs) as upper:
            url = f"{upper.url}/files/f.bin"
            assert (await get(http, url, {"Range": "bytes=0-4095"}))[0] == 206
            await put_range(http, url, 600_000, b"B" * 100)
            lower.kill()
            lower = start_cachesvc(
                str(root), log_dir=logs, port=lower.port, admin_port=lower.admin_port
            )
            async with http.post(url + "?fsync") as resp:
                assert resp.status == 502
                assert "restarted" in (await resp.json())["message"]
            # Reported once; later writes are verified against the new instance.
            await put_range(http, url, 700_000, b"C" * 100)
            assert await post(http, url + "?fsync") == 204
            assert (root / "f.bin").read_bytes()[700_000:700_100] == b"C" * 100
    finally:
        lower.stop()
