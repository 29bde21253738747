"""FileCache and CachingInode over a real LocalOrigin: reads, fills, writes,
write-back, faults, eviction, pins and revalidation."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cachesvc.core.errors import CacheFull
from cachesvc.core.fills import COMPLETION_LOOKAHEAD
from cachesvc.core.inode_state import CHANGES_KEPT
from cachesvc.core.mapping import release_all
from cachesvc.core.ranges import Range
from cachesvc.origins.base import OriginNoSpace, OriginNotFound, OriginUnavailable
from tests.support.content import pattern
from tests.support.waiting import until
from tests.unit.cache_fixtures import cache_rig

KiB = 1 << 10
MiB = 1 << 20


def make_file(root: Path, name: str, size: int, seed: int = 1) -> bytes:
    data = pattern(seed, 0, size)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


async def test_reads_fill_once_then_hit(tmp_path: Path) -> None:
    data = make_file(tmp_path / "o", "f.bin", 3 * MiB + 123)
    async with cache_rig(tmp_path / "o") as rig:
        async with rig.cache.open("f.bin") as inode:
            for offset, length in [(0, 10), (4090, 20), (MiB - 1, MiB + 2), (3 * MiB, 500)]:
                assert await inode.read(offset, length) == data[offset : offset + length]
            reads = rig.origin.calls["read"]
            assert await inode.read(5, 100) == data[5:105]
            assert rig.origin.calls["read"] == reads
            inode.check_invariants()
        assert rig.cache.counters.hit_bytes >= 100
        assert rig.cache.counters.miss_bytes > 0


async def test_read_past_end_is_short_or_empty(tmp_path: Path) -> None:
    data = make_file(tmp_path / "o", "f.bin", 10_000)
    async with cache_rig(tmp_path / "o") as rig, rig.cache.open("f.bin") as inode:
        assert await inode.read(9_990, 100) == data[9_990:]
        assert await inode.read(10_000, 100) == b""
        assert await inode.read(20_000, 1) == b""


async def test_missing_file_is_not_found(tmp_path: Path) -> None:
    async with cache_rig(tmp_path / "o") as rig:
        with pytest.raises(OriginNotFound):
            async with rig.cache.open("nope"):
                pass


async def test_sequential_cold_read_uses_readahead(tmp_path: Path) -> None:
    size = 16 * MiB
    data = make_file(tmp_path / "o", "seq.bin", size)
    async with cache_rig(tmp_path / "o") as rig, rig.cache.open("seq.bin") as inode:
        requests = 0
        for offset in range(0, size, 4096):
            assert await inode.read(offset, 4096) == data[offset : offset + 4096]
            requests += 1
        assert rig.origin.calls["read"] * 16 <= requests, rig.origin.calls


async def test_completed_readahead_keeps_the_origin_busy(tmp_path: Path) -> None:
    # A streaming reader maps 4 MiB at a time; fills that complete while it
    # is still sending look COMPLETION_LOOKAHEAD windows past it.
    make_file(tmp_path / "o", "seq.bin", 64 * MiB)
    async with cache_rig(tmp_path / "o") as rig, rig.cache.open("seq.bin") as inode:
        for offset in (0, 4 * MiB):
            await (await inode.map_range(offset, 4 * MiB)).release()
        async with asyncio.timeout(10):
            while inode._fills:  # noqa: ASYNC110 (fills have no event to wait on)
                await asyncio.sleep(0.01)
        cached = inode.cache_set.find(0)
        assert cached is not None
        # Reads alone look two windows past the reader's end, 8 MiB.
        assert cached[0].end >= 8 * MiB + COMPLETION_LOOKAHEAD * 4 * MiB > 16 * MiB
        assert cached[0].end < 64 * MiB  # bounded: nothing runs on by itself


async def test_concurrent_misses_share_one_origin_read(tmp_path: Path) -> None:
    data = make_file(tmp_path / "o", "f.bin", MiB)
    async with cache_rig(tmp_path / "o") as rig, rig.cache.open("f.bin") as inode:
        gate = asyncio.Event()
        rig.origin.read_gate = gate
        readers = [asyncio.create_task(inode.read(1000, 3000)) for _ in range(20)]
        for _ in range(20):
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*readers), 10)
        assert all(r == data[1000:4000] for r in results)
        assert rig.origin.calls["read"] == 1


async def test_cached_read_is_not_blocked_by_a_slow_fill(tmp_path: Path) -> None:
    data = make_file(tmp_path / "o", "f.bin", 8 * MiB)
    async with cache_rig(tmp_path / "o") as rig, rig.cache.open("f.bin") as inode:
        assert await inode.read(0, 4096) == data[:4096]
        gate = asyncio.Event()
        rig.origin.read_gate = gate
        slow = asyncio.create_task(inode.read(6 * MiB, 4096))
        await asyncio.wait_for(rig.origin.reached_gate.wait(), 5)
        assert not slow.done()
        # The cached range is served while the fill waits at the origin.
        assert await asyncio.wait_for(inode.read(0, 4096), 2) == data[:4096]
        gate.set()
        assert await asyncio.wait_for(slow, 10) == data[6 * MiB : 6 * MiB + 4096]


@pytest.mark.parametrize("buffered", [False, True], ids=["partial", "buffered"])
async def test_write_then_fsync_reaches_the_origin(tmp_path: Path, buffered: bool) -> None:
    root = tmp_path / "o"
    data = bytearray(make_file(root, "f.bin", 100_000))
    async with cache_rig(root, buffered=buffered) as rig, rig.cache.open("f.bin") as inode:
        await inode.read(0, 8192)  # cache the first pages
        writes = [(10, b"A" * 100), (5000, b"B" * 5000), (50_001, b"C" * 3), (99_990, b"D" * 30)]
        for offset, chunk in writes:
            await rig.cache.write(inode, offset, chunk)
            end = offset + len(chunk)
            if end > len(data):
                data.extend(bytes(end - len(data)))
            data[offset:end] = chunk
        assert await inode.read(0, len(data)) == bytes(data)
        assert rig.cache.counters.dirty_bytes > 0
        inode.check_invariants()
        await inode.fsync()
        assert rig.cache.counters.dirty_bytes == 0
        assert (root / "f.bin").read_bytes() == bytes(data)
        assert rig.origin.calls["sync" if not buffered else "rewrite"] >= 1


async def test_buffered_gap_writes_stay_in_cache_until_fsync(tmp_path: Path) -> None:
    root = tmp_path / "o"
    original = make_file(root, "f.bin", 50_000)
    async with cache_rig(root, buffered=True) as rig, rig.cache.open("f.bin") as inode:
        await rig.cache.write(inode, 20_000, b"x" * 10)
        assert (root / "f.bin").read_bytes() == original
        expected = original[:20_000] + b"x" * 10 + original[20_010:]
        assert await inode.read(0, 50_000) == expected
        await inode.fsync()
        assert (root / "f.bin").read_bytes() == expected


@pytest.mark.parametrize("buffered", [False, True], ids=["partial", "buffered"])
async def test_truncate_shrink_then_grow_reads_zeros(tmp_path: Path, buffered: bool) -> None:
    root = tmp_path / "o"
    data = make_file(root, "f.bin", 40_000)
    async with cache_rig(root, buffered=buffered) as rig, rig.cache.open("f.bin") as inode:
        await inode.read(0, 40_000)
        etag = inode.attr.etag
        await inode.truncate(10_001)
        assert inode.attr.etag != etag
        await inode.truncate(30_000)
        expected = data[:10_001] + bytes(30_000 - 10_001)
        assert await inode.read(0, 40_000) == expected
        await inode.fsync()
        assert (root / "f.bin").read_bytes() == expected


@pytest.mark.parametrize("buffered", [False, True], ids=["partial", "buffered"])
async def test_failed_writeback_keeps_dirty_data(tmp_path: Path, buffered: bool) -> None:
    root = tmp_path / "o"
    data = bytearray(make_file(root, "f.bin", 64 * 1024))
    async with cache_rig(root, buffered=buffered) as rig, rig.cache.open("f.bin") as inode:
        await inode.read(0, len(data))
        await rig.cache.write(inode, 100, b"new bytes")
        data[100:109] = b"new bytes"
        rig.origin.fail_writes = OriginNoSpace("disk full")
        with pytest.raises(OriginNoSpace):
            await inode.fsync()
        assert rig.cache.counters.writeback_errors >= 1
        assert rig.cache.counters.dirty_bytes > 0
        # Eviction must not drop the dirty bytes, and they stay readable.
        await rig.cache.evict_all(wait=True)
        assert await inode.read(0, len(data)) == bytes(data)
        rig.origin.fail_writes = OriginUnavailable("EIO")
        with pytest.raises(OriginUnavailable):
            await inode.fsync()
        rig.origin.fail_writes = None
        await inode.fsync()
        assert rig.cache.counters.dirty_bytes == 0
        assert (root / "f.bin").read_bytes() == bytes(data)


async def test_dirty_limit_gives_cache_full_when_writeback_fails(tmp_path: Path) -> None:
    root = tmp_path / "o"
    make_file(root, "f.bin", 0)
    async with cache_rig(root, buffered=True, max_dirty=64 * 1024) as rig:
        async with rig.cache.open("f.bin") as inode:
            rig.origin.fail_writes = OriginUnavailable("EIO")
            await rig.cache.write(inode, 0, b"a" * 40_000)
            with pytest.raises(CacheFull):
                await rig.cache.write(inode, 40_000, b"b" * 40_000)
            # The first write is still there.
            assert await inode.read(0, 40_000) == b"a" * 40_000
            rig.origin.fail_writes = None
            await rig.cache.write(inode, 40_000, b"b" * 40_000)
            await inode.fsync()
        assert (root / "f.bin").read_bytes() == b"a" * 40_000 + b"b" * 40_000


async def test_concurrent_readers_and_writers(tmp_path: Path) -> None:
    root = tmp_path / "o"
    size = 2 * MiB
    old = make_file(root, "f.bin", size, seed=1)
    new = pattern(2, 0, size)
    async with cache_rig(root) as rig, rig.cache.open("f.bin") as inode:
        await inode.read(0, MiB)  # half cached: writes hit both pages and gaps

        async def writer(i: int) -> None:
            start = i * 64 * 1024
            await rig.cache.write(inode, start, new[start : start + 64 * 1024])

        async def reader(i: int) -> None:
            start = (i * 37_000) % (size - 100_000)
            got = await inode.read(start, 100_000)
            for j in range(0, 100_000, 4096):
                piece = got[j : j + 4096]
                exp_old = old[start + j : start + j + len(piece)]
                exp_new = new[start + j : start + j + len(piece)]
                # Each written 64 KiB block is either old or new as a whole
                # at the time of the copy; pages may mix only across blocks.
                assert all(b in (o, n) for b, o, n in zip(piece, exp_old, exp_new, strict=True))

        tasks = [writer(i) for i in range(size // (64 * 1024))]
        tasks += [reader(i) for i in range(40)]
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert await inode.read(0, size) == new
        inode.check_invariants()
        await inode.fsync()
    assert (root / "f.bin").read_bytes() == new


async def test_budget_eviction_keeps_the_cache_small(tmp_path: Path) -> None:
    root = tmp_path / "o"
    data = make_file(root, "f.bin", 4 * MiB)
    async with cache_rig(root, cache_size=256 * 1024, readahead=64 * 1024) as rig:
        async with rig.cache.open("f.bin") as inode:
            for offset in range(0, 4 * MiB, 64 * 1024):
                assert await inode.read(offset, 64 * 1024) == data[offset : offset + 64 * 1024]
        for _ in range(100):
            if rig.cache.page_cache_bytes <= 256 * 1024:
                break
            await asyncio.sleep(0.01)
        assert rig.cache.page_cache_bytes <= 256 * 1024
        assert rig.cache.counters.evicted_bytes > 0


async def test_pins_are_mapped_and_survive_eviction(tmp_path: Path) -> None:
    root = tmp_path / "o"
    data = make_file(root, "f.bin", MiB)
    async with cache_rig(root) as rig:
        pinned = await rig.cache.pin("f.bin", 0, 256 * 1024)
        assert pinned == 256 * 1024
        assert rig.cache.counters.mapped_bytes == 256 * 1024
        async with rig.cache.open("f.bin") as inode:
            await inode.read(0, MiB)
        await rig.cache.evict_all(wait=True)
        inode = rig.cache.lookup("f.bin")
        assert inode is not None
        assert inode.cache_set.total_length == 256 * 1024
        reads = rig.origin.calls["read"]
        async with rig.cache.open("f.bin") as inode:
            assert await inode.read(1000, 1000) == data[1000:2000]
        assert rig.origin.calls["read"] == reads
        assert await rig.cache.unpin("f.bin", 0, 256 * 1024)
        assert not await rig.cache.unpin("f.bin", 0, 256 * 1024)
        assert rig.cache.counters.mapped_bytes == 0
        await rig.cache.evict_all(wait=True)
        assert rig.cache.page_cache_bytes == 0


async def test_revalidation_drops_a_changed_file(tmp_path: Path) -> None:
    root = tmp_path / "o"
    make_file(root, "f.bin", 10_000, seed=1)
    async with cache_rig(root) as rig:
        async with rig.cache.open("f.bin") as inode:
            await inode.read(0, 10_000)
            etag = inode.attr.etag
        new = pattern(9, 0, 12_000)
        (root / "f.bin").write_bytes(new)
        os.utime(root / "f.bin", ns=(1, 1))
        stat = await rig.origin.stat("f.bin")
        async with rig.cache.open("f.bin") as inode:
            assert await inode.revalidate(stat)
            assert inode.attr.etag != etag
            assert await inode.read(0, 12_000) == new


async def test_replace_and_remove(tmp_path: Path) -> None:
    root = tmp_path / "o"
    make_file(root, "f.bin", 10_000)
    async with cache_rig(root) as rig:
        async with rig.cache.open("f.bin") as inode:
            await inode.read(0, 10_000)
            etag = inode.attr.etag

        async def chunks() -> object:
            yield b"hello "
            yield b"world"

        inode, created = await rig.cache.replace("f.bin", chunks())  # type: ignore[arg-type]
        assert not created
        assert inode.attr.etag != etag
        async with rig.cache.open("f.bin") as inode:
            assert await inode.read(0, 100) == b"hello world"
        await rig.cache.remove("f.bin")
        assert not (root / "f.bin").exists()
        with pytest.raises(OriginNotFound):
            async with rig.cache.open("f.bin"):
                pass


@pytest.mark.parametrize("buffered", [False, True], ids=["partial", "buffered"])
async def test_allocate_grows_the_file_with_zeros(tmp_path: Path, buffered: bool) -> None:
    root = tmp_path / "o"
    data = make_file(root, "f.bin", 5000)
    async with cache_rig(root, buffered=buffered) as rig, rig.cache.open("f.bin") as inode:
        etag = inode.attr.etag
        await inode.allocate(4000, 20_000)
        assert inode.attr.size == 24_000
        assert inode.attr.etag != etag
        await inode.allocate(0, 100)  # inside the file: no change
        assert inode.attr.size == 24_000
        assert await inode.read(0, 30_000) == data + bytes(19_000)
        await inode.fsync()
        assert (root / "f.bin").read_bytes() == data + bytes(19_000)


async def test_the_file_limit_evicts_in_the_policys_order(tmp_path: Path) -> None:
    root = tmp_path / "o"
    for i in range(5):
        make_file(root, f"f{i}.bin", 60_000, seed=i)
    async with cache_rig(root, max_inodes=2) as rig:
        for name in ("f0.bin", "f0.bin", "f0.bin", "f1.bin", "f2.bin", "f3.bin", "f4.bin"):
            async with rig.cache.open(name) as inode:
                await inode.read(0, 60_000)
        for _ in range(200):
            if len(rig.cache.files()) <= 2:
                break
            await asyncio.sleep(0.01)
        # f0, read three times, went to S3-FIFO's main queue; the files read
        # once left through the small queue, oldest first.
        assert [inode.path for inode in rig.cache.files()] == ["f0.bin", "f4.bin"]
        assert rig.cache.counters.evicted_bytes > 0


async def test_read_cached_now_copies_without_suspending_unless_a_writer_holds_data(
    tmp_path: Path,
) -> None:
    data = make_file(tmp_path / "o", "f.bin", 32 * MiB)
    async with cache_rig(tmp_path / "o") as rig, rig.cache.open("f.bin") as inode:
        assert inode.read_cached_now(0, 100) is None  # nothing cached yet
        await inode.read(0, 2 * MiB)
        assert inode.read_cached_now(10, 100) == data[10:110]
        assert inode.read_cached_now(MiB - 5, MiB) == data[MiB - 5 : 2 * MiB - 5]
        gap = inode.cache_set.gaps(Range(0, 32 * MiB))[0]
        assert inode.read_cached_now(gap.start - 10, 20) is None  # half cached
        await inode.data_mu.acquire_write()
        try:
            assert inode.read_cached_now(10, 100) is None
        finally:
            inode.data_mu.release_write()
        assert inode.read_cached_now(10, 100) == data[10:110]


async def test_peek_finds_only_files_needing_no_revalidation(tmp_path: Path) -> None:
    make_file(tmp_path / "o", "f.bin", 100)
    async with cache_rig(tmp_path / "o") as rig:
        assert rig.cache.peek("f.bin") is None
        async with rig.cache.open("f.bin") as inode:
            assert rig.cache.peek("f.bin") is inode
        rig.cache.options = dataclasses.replace(rig.cache.options, revalidate=0.0)
        assert rig.cache.peek("f.bin") is None


async def test_mappings_are_released_even_if_the_releaser_is_cancelled(tmp_path: Path) -> None:
    root = tmp_path / "o"
    make_file(root, "f.bin", MiB)
    async with cache_rig(root) as rig, rig.cache.open("f.bin") as inode:
        mappings = [await inode.map_range(i * 4096, 4096) for i in range(3)]
        assert rig.cache.counters.mapped_bytes == 3 * 4096
        # A writer holds maps_mu: releasing waits, and is cancelled meanwhile,
        # as a response is when its client goes away.
        await inode.maps_mu.acquire()
        releaser = asyncio.create_task(release_all(mappings))
        await until(lambda: inode.maps_mu.waiting, "the releaser waits for maps_mu")
        assert not releaser.done()
        releaser.cancel()
        with pytest.raises(asyncio.CancelledError):
            await releaser
        inode.maps_mu.release()
        for _ in range(100):
            if not rig.cache.counters.mapped_bytes:
                break
            await asyncio.sleep(0.01)
        assert rig.cache.counters.mapped_bytes == 0
        assert not inode.mappings
        await release_all(mappings)  # released once only
        assert rig.cache.counters.mapped_bytes == 0


async def test_a_cancelled_reader_leaves_a_shared_fill_to_the_others(tmp_path: Path) -> None:
    root = tmp_path / "o"
    data = make_file(root, "f.bin", MiB)
    async with cache_rig(root, delay=0.05) as rig, rig.cache.open("f.bin") as inode:
        # Two readers miss on the same range and share one fill; the first
        # goes away (its client disconnected) while the origin is read.
        leaving = asyncio.create_task(inode.read(0, 64 * 1024))
        staying = asyncio.create_task(inode.read(0, 64 * 1024))
        await until(
            lambda: inode._fills and inode._fills[0].waiters == 2, "both readers wait on the fill"
        )
        leaving.cancel()
        assert await staying == data[: 64 * 1024]
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert rig.origin.calls["read"] == 1


async def test_readahead_after_a_fill_starts_on_a_page_boundary(tmp_path: Path) -> None:
    root = tmp_path / "o"
    data = make_file(root, "f.bin", 8 * MiB)
    async with cache_rig(root, delay=0.2, readahead=MiB) as rig, rig.cache.open("f.bin") as inode:
        assert await inode.read(0, MiB) == data[:MiB]
        rig.origin.read_started.clear()
        far = asyncio.create_task(inode.read(6 * MiB, 4096))  # a slow fill elsewhere
        await asyncio.wait_for(rig.origin.read_started.wait(), 5)
        # Cached sequential reads, the last ending off a page boundary, set
        # where the reader goes next; then their pages are evicted.
        assert await inode.read(0, 1000) == data[:1000]
        assert await inode.read(1000, 200 * KiB) == data[1000 : 1000 + 200 * KiB]
        await rig.cache.evict_all(wait=True)
        assert not inode.cache_set
        # The far fill completes and reads ahead of the reader, from the
        # page its next byte is on.
        assert await far == data[6 * MiB : 6 * MiB + 4096]
        for _ in range(100):
            if not inode._fills:
                break
            await asyncio.sleep(0.01)
        next_byte = 1000 + 200 * KiB
        assert inode.cache_set.find(next_byte - next_byte % 4096) is not None
        inode.check_invariants()


async def test_unchanged_since_tells_which_bytes_later_versions_touched(tmp_path: Path) -> None:
    root = tmp_path / "o"
    make_file(root, "f.bin", MiB)
    async with cache_rig(root) as rig, rig.cache.open("f.bin") as inode:
        epoch, version = inode.epoch, inode.attr.version
        head, tail = Range(0, 4096), Range(MiB - 4096, MiB)
        assert inode.unchanged_since(epoch, version, head)
        await inode.write(MiB - 10, b"x" * 20)  # the tail, and growth
        assert inode.unchanged_since(epoch, version, head)
        assert not inode.unchanged_since(epoch, version, tail)
        await inode.allocate(0, 2 * MiB)  # growth only
        assert inode.unchanged_since(epoch, version, Range(0, MiB - 10))
        await inode.truncate(100_000)  # everything from 100,000 on
        assert inode.unchanged_since(epoch, version, head)
        assert not inode.unchanged_since(epoch, version, Range(99_000, 101_000))
        assert not inode.unchanged_since(epoch, version + 10, head)  # a version not made yet
        # Older than the changes remembered: not known, so changed.
        for i in range(CHANGES_KEPT):
            await inode.write(50_000 + i, b"y")
        assert not inode.unchanged_since(epoch, version, head)
        now = inode.attr.version
        await inode.write(60_000, b"z")
        assert inode.unchanged_since(epoch, now, head)
        # Another origin version: nothing of the old one is known to hold.
        async with inode.attr_mu, inode.maps_mu, inode.data_mu.writing():
            inode.discard_locked()
        async with inode.attr_mu:  # as FileCache.replace holds it
            await inode.replaced(await rig.origin.stat("f.bin"))
        assert not inode.unchanged_since(epoch, inode.attr.version, head)
        assert inode.unchanged_since(inode.epoch, inode.attr.version, head)


async def test_a_put_of_a_new_file_succeeds_even_if_it_is_deleted_at_once(tmp_path: Path) -> None:
    root = tmp_path / "o"
    root.mkdir()
    async with cache_rig(root, delay=0.05) as rig:

        async def chunks() -> AsyncIterator[bytes]:
            yield b"abc"

        putting = asyncio.create_task(rig.cache.replace("new.bin", chunks()))
        for _ in range(500):  # until the upload is done
            if (root / "new.bin").exists():
                break
            await asyncio.sleep(0.002)
        (root / "new.bin").unlink()  # as a concurrent DELETE would
        inode, created = await putting
        assert created
        assert inode.attr.size == 3


async def test_a_read_racing_our_own_truncate_sees_the_new_size(tmp_path: Path) -> None:
    root = tmp_path / "o"
    data = make_file(root, "f.bin", MiB)
    async with cache_rig(root) as rig, rig.cache.open("f.bin") as inode:
        gate = asyncio.Event()
        rig.origin.read_gate = gate  # the fill waits until the truncate is done
        reading = asyncio.create_task(inode.read(512 * KiB, 64 * KiB))
        await asyncio.wait_for(rig.origin.reached_gate.wait(), 5)
        await inode.truncate(100_000)  # written through: the origin shrinks first
        gate.set()
        assert await reading == b""  # past the new end, not an error
        assert await inode.read(99_000, 2000) == data[99_000:100_000]
