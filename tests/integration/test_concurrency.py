"""Many clients at once against one data server over a local directory.

Writers patch disjoint regions of one file (each checks its own region as
it goes), readers download the whole file and are cut off at random, and
other readers check whole downloads and slices of a second file that no
one writes, while readers of it are cut off too (they share its fills). At the
end, after one fsync, the file on the origin equals the model the writers
kept, and no mapping or dirty byte is left. Seeded, so a failure repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from cachesvc.origins.base import Origin
from tests.integration.data_rig import DataServer, KiB, MiB, serving, write_file
from tests.support.origins import TestOrigin

REGIONS = 8
REGION = 512 * KiB
STABLE_SIZE = 12 * MiB
TIMEOUT = aiohttp.ClientTimeout(total=60)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DataServer]:
    root = tmp_path / "root"
    write_file(root / "written.bin", 1, REGIONS * REGION)
    write_file(root / "stable.bin", 2, STABLE_SIZE)

    def slow(inner: Origin) -> Origin:  # fills overlap with the clients' comings and goings
        return TestOrigin(inner, delay=0.01)

    # A cache smaller than the files: evictions run meanwhile.
    with serving(root, wrap_origin=slow, cache_size=8 * MiB) as srv:
        yield srv


async def writer(
    http: aiohttp.ClientSession, url: str, region: int, model: bytearray, rng: random.Random
) -> None:
    low, high = region * REGION, (region + 1) * REGION
    for _ in range(12):
        start = rng.randrange(low, high)
        data = rng.randbytes(rng.randrange(1, min(64 * KiB, high - start) + 1))
        headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/*"}
        async with http.patch(url, data=data, headers=headers) as resp:
            assert resp.status == 204, await resp.text()
        model[start : start + len(data)] = data
        if rng.random() < 0.2:
            async with http.post(url + "?fsync") as resp:
                assert resp.status == 204, await resp.text()
        if rng.random() < 0.3:
            async with http.get(url, headers={"Range": f"bytes={low}-{high - 1}"}) as resp:
                assert await resp.read() == bytes(model[low:high])


async def leaving_reader(http: aiohttp.ClientSession, url: str, rng: random.Random) -> None:
    """Downloads ``url`` and goes away after a random while."""
    for _ in range(4):
        with contextlib.suppress(TimeoutError, aiohttp.ClientPayloadError):
            async with asyncio.timeout(rng.uniform(0.01, 0.2)), http.get(url) as resp:
                async for _ in resp.content.iter_chunked(256 * KiB):
                    pass


async def whole_reader(http: aiohttp.ClientSession, url: str, expected: bytes) -> None:
    async with http.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == expected


async def ranged_reader(
    http: aiohttp.ClientSession, url: str, expected: bytes, rng: random.Random
) -> None:
    for _ in range(6):
        first = rng.randrange(len(expected))
        last = min(len(expected) - 1, first + rng.randrange(3 * MiB))
        async with http.get(url, headers={"Range": f"bytes={first}-{last}"}) as resp:
            assert resp.status == 206
            assert await resp.read() == expected[first : last + 1]


async def test_many_clients_at_once(server: DataServer) -> None:
    written_url = server.url + "/files/written.bin"
    stable_url = server.url + "/files/stable.bin"
    stable = (server.root / "stable.bin").read_bytes()
    model = bytearray((server.root / "written.bin").read_bytes())
    rng = random.Random(1)
    # Two sessions: the writers' connections go to aiohttp (PATCH is not for
    # the fast path), the readers' stay on the fast path.
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
        aiohttp.ClientSession(timeout=TIMEOUT) as reads,
    ):
        clients = [
            *(
                writer(http, written_url, k, model, random.Random(rng.random()))
                for k in range(REGIONS)
            ),
            *(leaving_reader(reads, written_url, random.Random(rng.random())) for _ in range(3)),
            *(leaving_reader(reads, stable_url, random.Random(rng.random())) for _ in range(3)),
            *(
                ranged_reader(reads, stable_url, stable, random.Random(rng.random()))
                for _ in range(4)
            ),
            *(whole_reader(reads, stable_url, stable) for _ in range(3)),
        ]
        await asyncio.gather(*clients)
        async with http.post(written_url + "?fsync") as resp:
            assert resp.status == 204, await resp.text()
        for session in (http, reads):  # through aiohttp, then the fast path
            async with session.get(written_url) as resp:
                assert await resp.read() == bytes(model)
    assert (server.root / "written.bin").read_bytes() == bytes(model)
    assert server.cache is not None
    assert await server.mapped_bytes_settled() == 0
    assert server.cache.counters.dirty_bytes == 0
