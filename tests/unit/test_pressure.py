"""Memory under pressure: the hard budget, pins within bounds, fills held
for their readers, readahead inside the budget, pass-through reads.

Over a real LocalOrigin; origin traffic is counted by the TestOrigin
wrapper, never timed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cachesvc.core.budget import NoRoom, budget_slack
from cachesvc.core.cache import PinLimit
from cachesvc.core.errors import CacheFull
from cachesvc.core.eviction.driver import ExtentState
from cachesvc.core.memfile import MemoryKind
from tests.support.content import pattern
from tests.unit.cache_fixtures import Rig, cache_rig

KiB = 1 << 10
MiB = 1 << 20


def make_files(root: Path, names: list[str], size: int) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for seed, name in enumerate(names):
        data = pattern(seed, 0, size)
        (root / name).write_bytes(data)
        out[name] = data
    return out


def origin_bytes(rig: Rig) -> int:
    return sum(end - start for start, end in rig.origin.read_ranges)


def peak(rig: Rig) -> int:
    return rig.memfile.peak_allocated_bytes(MemoryKind.PAGE_CACHE)


async def stream(rig: Rig, name: str, size: int, chunk: int) -> bytes:
    """Reads ``name`` start to end as a response streams it: one mapping of
    ``chunk`` bytes at a time, released once copied."""
    out = bytearray()
    async with rig.cache.open(name) as inode:
        for offset in range(0, size, chunk):
            mapping = await inode.map_range(offset, chunk)
            try:
                out += mapping.tobytes()
            finally:
                await mapping.release()
            await asyncio.sleep(0)  # the client takes its time: others run
    return bytes(out)


async def test_a_pin_over_max_pinned_is_refused_at_once_without_origin_reads(
    tmp_path: Path,
) -> None:
    make_files(tmp_path / "o", ["big.bin"], 32 * MiB)
    async with cache_rig(tmp_path / "o", cache_size=16 * MiB) as rig:
        with pytest.raises(PinLimit, match="max-pinned"):
            await rig.cache.pin("big.bin", 0, 32 * MiB)
        assert rig.origin.calls["read"] == 0
        assert rig.cache.pinned_bytes == 0
        # Within the limit (half the cache by default) it is taken.
        assert await rig.cache.pin("big.bin", 0, 4 * MiB) == 4 * MiB
        with pytest.raises(PinLimit):
            await rig.cache.pin("big.bin", 4 * MiB, 9 * MiB)
        assert rig.cache.pinned_bytes == 4 * MiB
        assert peak(rig) <= 16 * MiB


async def test_a_fills_pages_are_held_until_its_waiter_maps_them(tmp_path: Path) -> None:
    data = make_files(tmp_path / "o", ["a.bin"], 4 * MiB)
    async with (
        cache_rig(tmp_path / "o", cache_size=2 * MiB, readahead=0) as rig,
        rig.cache.open("a.bin") as inode,
    ):
        gate = asyncio.Event()
        rig.origin.read_gate = gate
        reader = asyncio.create_task(inode.read(0, MiB))
        await asyncio.wait_for(rig.origin.reached_gate.wait(), 5)
        (fill,) = inode._fills
        seen: list[ExtentState] = []
        # Runs when the fill completes, before its waiter can map: the
        # moment a budget eviction of another task could strike.
        fill.done.add_done_callback(lambda _: seen.extend(inode.extent_state(i) for i in range(16)))
        gate.set()
        assert await asyncio.wait_for(reader, 5) == data["a.bin"][:MiB]
        assert seen == [ExtentState.BUSY] * 16
        # Mapped and released by the reader, the hold is gone too.
        assert not inode.mappings
        assert [inode.extent_state(i) for i in range(16)] == [ExtentState.EVICTABLE] * 16
        assert rig.cache.counters.mapped_bytes == 0


async def test_cold_concurrent_streams_read_each_byte_about_once(tmp_path: Path) -> None:
    names = [f"s{i}.bin" for i in range(8)]
    size = 8 * MiB
    data = make_files(tmp_path / "o", names, size)
    cache_size = 16 * MiB  # a quarter of what the streams read
    async with cache_rig(tmp_path / "o", cache_size=cache_size, readahead=2 * MiB) as rig:
        bodies = await asyncio.wait_for(
            asyncio.gather(*(stream(rig, n, size, 512 * KiB) for n in names)), 60
        )
        assert all(body == data[n] for body, n in zip(bodies, names, strict=True))
        total = 8 * size
        assert origin_bytes(rig) <= 1.1 * total, (origin_bytes(rig), total)
        assert peak(rig) <= cache_size + budget_slack(cache_size)
        assert rig.cache.counters.bypass_bytes == 0


async def test_reads_go_pass_through_when_nothing_can_be_evicted(tmp_path: Path) -> None:
    data = make_files(tmp_path / "o", ["pinned.bin", "other.bin"], 2 * MiB)
    async with cache_rig(
        tmp_path / "o", cache_size=MiB, readahead=0, room_wait=0.05, max_pinned=MiB
    ) as rig:
        await rig.cache.pin("pinned.bin", 0, MiB)  # the whole budget
        async with rig.cache.open("other.bin") as inode:
            with pytest.raises(NoRoom):
                await inode.map_range(0, 64 * KiB)
            assert await inode.read(100_000, 300_000) == data["other.bin"][100_000:400_000]
        assert rig.cache.counters.bypass_bytes == 300_000
        assert rig.cache.counters.room_refusals >= 1
        assert peak(rig) <= MiB
        # Once the pin goes, the same read is cached again.
        assert await rig.cache.unpin("pinned.bin", 0, MiB)
        async with rig.cache.open("other.bin") as inode:
            assert await inode.read(100_000, 300_000) == data["other.bin"][100_000:400_000]
        assert rig.cache.counters.bypass_bytes == 300_000


async def test_a_buffered_write_without_room_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    data = make_files(tmp_path / "o", ["pinned.bin", "w.bin"], MiB)
    async with cache_rig(
        tmp_path / "o", buffered=True, cache_size=MiB, room_wait=0.05, max_pinned=MiB
    ) as rig:
        await rig.cache.pin("pinned.bin", 0, MiB)
        async with rig.cache.open("w.bin") as inode:
            with pytest.raises(CacheFull):
                await rig.cache.write(inode, 8192, b"x" * 100_000)
            assert rig.cache.counters.dirty_bytes == 0
            assert await inode.read(0, MiB) == data["w.bin"]
            assert inode.attr.version == 0


async def test_readahead_stays_within_the_room_the_budget_has_for_it(tmp_path: Path) -> None:
    make_files(tmp_path / "o", ["seq.bin"], 32 * MiB)
    async with cache_rig(tmp_path / "o", cache_size=4 * MiB, readahead=4 * MiB) as rig:
        async with rig.cache.open("seq.bin") as inode:
            for offset in range(0, 32 * MiB, 256 * KiB):
                await inode.read(offset, 256 * KiB)
                assert rig.cache.policy.prefetched_bytes <= 4 * MiB
                assert rig.cache.page_cache_bytes <= 4 * MiB
        assert origin_bytes(rig) <= 1.1 * 32 * MiB
