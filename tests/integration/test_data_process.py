"""The data API of a real ``cachesvc serve`` process: the main rows once more
through the production wiring, and a 64 MiB PUT and GET in bounded memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.data_rig import MiB, fetch, write_file
from tests.support.content import pattern
from tests.support.servers import ServerProcess, running_cachesvc

LARGE = 64 * MiB
PIECE = MiB


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[ServerProcess]:
    root = tmp_path / "root"
    write_file(root / "f.bin", 1, 100_000)
    with running_cachesvc(
        str(root), ["--cache-size", "256MiB"], log_dir=tmp_path / "logs"
    ) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as sess:
        yield sess


def rss_anon(pid: int) -> int:
    """Anonymous resident memory of a process (the memory file's pages are shmem)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/pid/status")


async def test_main_rows(proc: ServerProcess, session: aiohttp.ClientSession) -> None:
    url = proc.url + "/files/f.bin"
    got = await fetch(session, "GET", url, headers={"Range": "bytes=10-19,50-59"})
    assert got.status == 206
    assert int(got.headers["Content-Length"]) == len(got.body)
    single = await fetch(session, "GET", url, headers={"Range": "bytes=-100"})
    assert single.body == pattern(1, 100_000 - 100, 100)
    etag = single.headers["ETag"]
    assert (await fetch(session, "HEAD", url)).headers["ETag"] == etag
    patched = await fetch(
        session, "PATCH", url, headers={"Content-Range": "bytes 0-3/*"}, data=b"WXYZ"
    )
    assert patched.status == 204
    assert patched.headers["ETag"] != etag
    assert (await fetch(session, "GET", url, headers={"Range": "bytes=0-3"})).body == b"WXYZ"
    assert (await fetch(session, "POST", url + "?fsync")).status == 204
    assert (await fetch(session, "GET", proc.url + "/files/nope")).status == 404
    assert (await fetch(session, "GET", proc.url + "/files/a/../f.bin")).status == 400
    assert (await fetch(session, "GET", proc.url + "/healthz")).status == 200
    assert "cachesvc.access" in proc.log()


async def test_large_put_and_get_in_bounded_memory(
    proc: ServerProcess, session: aiohttp.ClientSession
) -> None:
    url = proc.url + "/files/large.bin"
    before = rss_anon(proc.proc.pid)
    expected = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for pos in range(0, LARGE, PIECE):
            piece = pattern(9, pos, PIECE)
            expected.update(piece)
            yield piece

    put = await fetch(session, "PUT", url, data=body(), timeout=120)
    assert put.status == 201, put.body
    after_put = rss_anon(proc.proc.pid)
    got = hashlib.sha256()
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_length == LARGE
        async for chunk in resp.content.iter_chunked(PIECE):
            got.update(chunk)
    after_get = rss_anon(proc.proc.pid)
    assert got.hexdigest() == expected.hexdigest()
    # Neither body was held in the process's own (anonymous) memory.
    assert after_put - before < LARGE // 4, (before, after_put)
    assert after_get - before < LARGE // 4, (before, after_get)
