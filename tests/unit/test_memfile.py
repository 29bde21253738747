"""Unit tests of MemoryFile: placement, reference counts, reclaim, mapping,
committed accounting, plus a stateful property test."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachesvc.core import hostmem
from cachesvc.core import memfile as memfile_module
from cachesvc.core.memfile import (
    CHUNK_SIZE,
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    MemoryFile,
    MemoryFileError,
    MemoryFileFull,
    MemoryKind,
    UsageInfo,
)
from cachesvc.core.ranges import Range

PC = MemoryKind.PAGE_CACHE
SYS = MemoryKind.SYSTEM
MiB = 1 << 20
WAIT = 10.0  # seconds; bound of every wait


@pytest.fixture
async def mf() -> AsyncIterator[MemoryFile]:
    memfile = await MemoryFile.create()
    try:
        yield memfile
    finally:
        await memfile.close()


async def reclaimed(memfile: MemoryFile) -> None:
    async with asyncio.timeout(WAIT):
        await memfile.wait_reclaimed()
    assert memfile.reclaimable_bytes == 0


def host_bytes(memfile: MemoryFile) -> int:
    return os.fstat(memfile.fd).st_blocks * 512


def pattern(offset: int, length: int) -> bytes:
    """Content that is a function of the file offset."""
    return bytes((i * 7 + (i >> 12)) & 0xFF for i in range(offset, offset + length))


def write(memfile: MemoryFile, rng: Range, data: bytes) -> None:
    pos = 0
    for view in memfile.map_internal(rng, write=True):
        view[:] = data[pos : pos + len(view)]
        pos += len(view)
    assert pos == len(data)


def read(memfile: MemoryFile, rng: Range) -> bytes:
    return b"".join(bytes(view) for view in memfile.map_internal(rng, write=False))


def touch(memfile: MemoryFile, rng: Range) -> None:
    """Commits every page of ``rng`` by writing one byte per page."""
    for view in memfile.map_internal(rng, write=True):
        view[::PAGE_SIZE] = b"\x01" * (len(view) // PAGE_SIZE)


# ----------------------------------------------------------------- placement


@pytest.mark.parametrize("length", [0, -PAGE_SIZE, 100, PAGE_SIZE + 1])
async def test_allocate_rejects_bad_lengths(mf: MemoryFile, length: int) -> None:
    with pytest.raises(MemoryFileError):
        await mf.allocate(length, PC)
    assert mf.usage_segments() == []


async def test_small_and_huge_alignment_first_fit(mf: MemoryFile) -> None:
    a = await mf.allocate(PAGE_SIZE, PC)
    b = await mf.allocate(2 * PAGE_SIZE, SYS)
    huge = await mf.allocate(HUGE_PAGE_SIZE, PC)
    c = await mf.allocate(PAGE_SIZE, PC)
    assert a == Range(0, PAGE_SIZE)
    assert b == Range(PAGE_SIZE, 3 * PAGE_SIZE)
    # 2 MiB and larger are aligned to 2 MiB; the small one fills the hole below.
    assert huge == Range(HUGE_PAGE_SIZE, 2 * HUGE_PAGE_SIZE)
    assert c == Range(3 * PAGE_SIZE, 4 * PAGE_SIZE)
    big = await mf.allocate(3 * HUGE_PAGE_SIZE + PAGE_SIZE, PC)
    assert big.start == 2 * HUGE_PAGE_SIZE
    assert mf.allocated_bytes(PC) == 2 * PAGE_SIZE + HUGE_PAGE_SIZE + big.length
    assert mf.allocated_bytes(SYS) == 2 * PAGE_SIZE
    mf.check_invariants()


async def test_freed_pages_wait_for_reclaim_then_hint_drops(mf: MemoryFile) -> None:
    a = await mf.allocate(PAGE_SIZE, PC)
    b = await mf.allocate(PAGE_SIZE, PC)
    c = await mf.allocate(PAGE_SIZE, PC)
    mf.dec_ref(b)
    mf.check_invariants()
    assert mf.reclaimable_bytes == PAGE_SIZE
    assert (b, UsageInfo(SYS, False, 0)) in mf.usage_segments()
    # Not reclaimed yet: b is not handed out again. (allocate does not yield
    # here, so the reclaimer has not run.)
    d = await mf.allocate(PAGE_SIZE, PC)
    assert d == Range(c.end, c.end + PAGE_SIZE)
    await reclaimed(mf)
    assert mf.reclaimed_bytes_total == PAGE_SIZE
    e = await mf.allocate(PAGE_SIZE, PC)
    assert e == b
    assert a.end == b.start
    mf.check_invariants()


async def test_file_grows_by_doubling(mf: MemoryFile) -> None:
    assert mf.file_size == CHUNK_SIZE
    first = await mf.allocate(CHUNK_SIZE, PC)
    assert first == Range(0, CHUNK_SIZE)
    assert mf.file_size == CHUNK_SIZE
    second = await mf.allocate(HUGE_PAGE_SIZE, PC)
    assert second.start == CHUNK_SIZE
    assert mf.file_size == 2 * CHUNK_SIZE
    third = await mf.allocate(100 * MiB, PC)
    assert third == Range(CHUNK_SIZE + 2 * MiB, CHUNK_SIZE + 102 * MiB)
    assert mf.file_size == 4 * CHUNK_SIZE
    assert os.fstat(mf.fd).st_size == mf.file_size
    assert mf.stats()["mapped_chunks"] == 3
    mf.check_invariants()


async def test_max_size_bounds_growth_and_waits_for_reclaim() -> None:
    memfile = await MemoryFile.create(max_size=2 * CHUNK_SIZE + MiB)
    try:
        a = await memfile.allocate(CHUNK_SIZE, PC)
        await memfile.allocate(CHUNK_SIZE, PC)
        assert memfile.file_size == 2 * CHUNK_SIZE
        with pytest.raises(MemoryFileFull):
            await memfile.allocate(PAGE_SIZE, PC)
        memfile.dec_ref(a)
        # Full, but freed pages await reclaim: allocate waits for them.
        async with asyncio.timeout(WAIT):
            again = await memfile.allocate(PAGE_SIZE, PC)
        assert again == Range(0, PAGE_SIZE)
        memfile.check_invariants()
    finally:
        await memfile.close()
    with pytest.raises(MemoryFileError):
        await MemoryFile.create(max_size=CHUNK_SIZE - PAGE_SIZE)


async def test_closed_file_refuses_work() -> None:
    memfile = await MemoryFile.create()
    rng = await memfile.allocate(PAGE_SIZE, PC)
    await memfile.close()
    await memfile.close()  # idempotent
    assert memfile.closed
    with pytest.raises(MemoryFileError):
        await memfile.allocate(PAGE_SIZE, PC)
    with pytest.raises(MemoryFileError):
        memfile.map_internal(rng, write=False)
    with pytest.raises(MemoryFileError):
        await memfile.update_usage()


# ---------------------------------------------------------------- references


async def test_inc_ref_splits_and_dec_ref_merges(mf: MemoryFile) -> None:
    rng = await mf.allocate(4 * PAGE_SIZE, PC)
    middle = Range(PAGE_SIZE, 3 * PAGE_SIZE)
    mf.inc_ref(middle)
    assert mf.usage_segments() == [
        (Range(0, PAGE_SIZE), UsageInfo(PC, False, 1)),
        (middle, UsageInfo(PC, False, 2)),
        (Range(3 * PAGE_SIZE, 4 * PAGE_SIZE), UsageInfo(PC, False, 1)),
    ]
    mf.check_invariants()
    mf.dec_ref(middle)
    assert mf.usage_segments() == [(rng, UsageInfo(PC, False, 1))]
    mf.dec_ref(Range(0, 2 * PAGE_SIZE))
    assert mf.allocated_bytes(PC) == 2 * PAGE_SIZE
    assert mf.reclaimable_bytes == 2 * PAGE_SIZE
    mf.check_invariants()
    await reclaimed(mf)
    assert mf.usage_segments() == [(Range(2 * PAGE_SIZE, 4 * PAGE_SIZE), UsageInfo(PC, False, 1))]
    mf.check_invariants()


async def test_bad_ref_changes_raise_and_change_nothing(mf: MemoryFile) -> None:
    rng = await mf.allocate(2 * PAGE_SIZE, PC)
    before = mf.usage_segments()
    bad = [
        Range(0, 3 * PAGE_SIZE),  # runs into unallocated pages
        Range(8 * PAGE_SIZE, 9 * PAGE_SIZE),  # unallocated
        Range(0, 100),  # unaligned
        Range(PAGE_SIZE, PAGE_SIZE),  # empty
        Range(2 * PAGE_SIZE, PAGE_SIZE),  # inverted
    ]
    for rng_bad in bad:
        with pytest.raises(MemoryFileError):
            mf.dec_ref(rng_bad)
        with pytest.raises(MemoryFileError):
            mf.inc_ref(rng_bad)
        assert mf.usage_segments() == before
    mf.dec_ref(Range(PAGE_SIZE, 2 * PAGE_SIZE))
    after_free = mf.usage_segments()
    # Refs may not go below zero, nor may freed pages be revived; the valid
    # first page is left alone too.
    with pytest.raises(MemoryFileError):
        mf.dec_ref(rng)
    with pytest.raises(MemoryFileError):
        mf.inc_ref(rng)
    with pytest.raises(MemoryFileError):
        await mf.decommit(rng)
    assert mf.usage_segments() == after_free
    mf.check_invariants()


# ------------------------------------------------------------------ reclaim


async def test_reclaim_gives_touched_memory_back_to_the_host(mf: MemoryFile) -> None:
    rng = await mf.allocate(CHUNK_SIZE, PC)
    touch(mf, rng)
    assert host_bytes(mf) >= CHUNK_SIZE
    await mf.update_usage()
    assert mf.committed_bytes(PC) == CHUNK_SIZE
    assert mf.total_committed_bytes >= CHUNK_SIZE
    mf.dec_ref(rng)
    # Freed but not reclaimed yet: known-committed bytes move to SYSTEM.
    assert mf.committed_bytes(PC) == 0
    assert mf.committed_bytes(SYS) >= CHUNK_SIZE
    await reclaimed(mf)
    assert host_bytes(mf) < CHUNK_SIZE // 16
    assert mf.reclaimed_bytes_total == CHUNK_SIZE
    await mf.update_usage()
    assert mf.committed_bytes(PC) == 0
    assert mf.total_committed_bytes == host_bytes(mf)
    assert mf.usage_segments() == []
    mf.check_invariants()


async def test_decommit_zeroes_and_uncommits(mf: MemoryFile) -> None:
    rng = await mf.allocate(MiB, PC)
    write(mf, rng, b"\xab" * MiB)
    await mf.update_usage()
    assert mf.committed_bytes(PC) == MiB
    half = Range(rng.start, rng.start + MiB // 2)
    await mf.decommit(half)
    assert mf.committed_bytes(PC) == MiB // 2
    assert read(mf, half) == bytes(MiB // 2)
    assert read(mf, Range(half.end, rng.end)) == b"\xab" * (MiB // 2)
    mf.check_invariants()
    await mf.update_usage()
    assert mf.committed_bytes(PC) >= MiB // 2
    assert mf.total_committed_bytes == host_bytes(mf)
    mf.check_invariants()


async def test_update_usage_skips_mincore_when_totals_match(
    mf: MemoryFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    scans: list[int] = []
    real = hostmem.resident_runs

    def counting(pieces: list[tuple[int, int, int]]) -> list[Range]:
        scans.append(len(pieces))
        return real(pieces)

    monkeypatch.setattr(memfile_module, "resident_runs", counting)
    rng = await mf.allocate(4 * PAGE_SIZE, PC)
    touch(mf, Range(rng.start, rng.start + 2 * PAGE_SIZE))
    await mf.update_usage()
    assert scans == [1]
    assert mf.committed_bytes(PC) == 2 * PAGE_SIZE
    await mf.update_usage()
    assert scans == [1]  # the file's blocks match the known-committed bytes
    touch(mf, rng)
    await mf.update_usage()
    assert scans == [1, 1]
    assert mf.committed_bytes(PC) == 4 * PAGE_SIZE
    mf.check_invariants()


async def test_update_usage_discards_a_scan_raced_by_a_punch(
    mf: MemoryFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = await mf.allocate(4 * PAGE_SIZE, PC)
    touch(mf, rng)
    scanned = threading.Event()
    resume = threading.Event()
    real = hostmem.resident_runs

    def paused(pieces: list[tuple[int, int, int]]) -> list[Range]:
        runs = real(pieces)
        scanned.set()
        resume.wait(WAIT)
        return runs

    monkeypatch.setattr(memfile_module, "resident_runs", paused)
    update = asyncio.create_task(mf.update_usage())
    assert await asyncio.to_thread(scanned.wait, WAIT)
    # The scan saw the pages resident; now they are punched before it reports.
    await mf.decommit(rng)
    resume.set()
    async with asyncio.timeout(WAIT):
        await update
    assert mf.committed_bytes(PC) == 0
    assert mf.total_committed_bytes == host_bytes(mf) == 0
    mf.check_invariants()


# ------------------------------------------------------------------ mapping


async def test_map_internal_round_trips_across_a_chunk_boundary(tmp_path: Path) -> None:
    path = tmp_path / "memory"
    memfile = await MemoryFile.create(str(path))
    try:
        head = await memfile.allocate(CHUNK_SIZE - 2 * MiB, PC)
        rng = await memfile.allocate(4 * MiB, PC)
        assert head.end == rng.start < CHUNK_SIZE < rng.end
        views = memfile.map_internal(rng, write=True)
        assert [len(v) for v in views] == [2 * MiB, 2 * MiB]
        data = random.Random(7).randbytes(rng.length)
        write(memfile, rng, data)
        assert read(memfile, rng) == data
        # The bytes are in the file at the allocated offsets.
        assert os.pread(memfile.fd, 3 * MiB, rng.start + MiB) == data[MiB : 4 * MiB]
        assert path.stat().st_size == memfile.file_size
        inner = Range(CHUNK_SIZE - 10, CHUNK_SIZE + 10)
        assert read(memfile, inner) == data[inner.start - rng.start : inner.end - rng.start]
        assert memfile.map_internal(Range(rng.start, rng.start), write=False) == []
        for view in views:
            view.release()
    finally:
        await memfile.close()
    assert path.exists()


async def test_read_only_views_refuse_writes(mf: MemoryFile) -> None:
    rng = await mf.allocate(PAGE_SIZE, PC)
    (view,) = mf.map_internal(rng, write=False)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    (writable,) = mf.map_internal(rng, write=True)
    writable[0] = 42
    assert view[0] == 42


async def test_map_internal_of_unmapped_memory_raises(mf: MemoryFile) -> None:
    with pytest.raises(MemoryFileError):
        mf.map_internal(Range(4 * CHUNK_SIZE, 4 * CHUNK_SIZE + PAGE_SIZE), write=False)
    with pytest.raises(MemoryFileError):
        mf.map_internal(Range(PAGE_SIZE, 0), write=False)


async def test_close_tolerates_exported_views() -> None:
    memfile = await MemoryFile.create()
    rng = await memfile.allocate(PAGE_SIZE, PC)
    (view,) = memfile.map_internal(rng, write=True)
    view[0] = 9
    await memfile.close()
    # The chunk stays mapped for as long as the view lives.
    assert view[0] == 9
    view.release()


# -------------------------------------------------------------------- fills


async def test_allocate_and_fill_keeps_the_filled_pages(mf: MemoryFile) -> None:
    async def reader(views: list[memoryview]) -> int:
        views[0][:5000] = b"\x11" * 5000
        return 5000

    rng, n = await mf.allocate_and_fill(4 * PAGE_SIZE, PC, reader)
    assert n == 5000
    assert rng == Range(0, 2 * PAGE_SIZE)
    assert read(mf, rng) == b"\x11" * 5000 + bytes(2 * PAGE_SIZE - 5000)
    assert mf.allocated_bytes(PC) == 2 * PAGE_SIZE
    assert mf.reclaimable_bytes == 2 * PAGE_SIZE
    mf.check_invariants()


async def test_allocate_and_fill_frees_everything_on_error(mf: MemoryFile) -> None:
    async def failing(views: list[memoryview]) -> int:
        views[0][0] = 1
        raise ConnectionError("origin went away")

    with pytest.raises(ConnectionError):
        await mf.allocate_and_fill(4 * PAGE_SIZE, PC, failing)
    assert mf.allocated_bytes(PC) == 0

    async def lying(views: list[memoryview]) -> int:
        return 5 * PAGE_SIZE

    with pytest.raises(MemoryFileError):
        await mf.allocate_and_fill(4 * PAGE_SIZE, PC, lying)
    assert mf.allocated_bytes(PC) == 0

    async def empty(views: list[memoryview]) -> int:
        return 0

    rng, n = await mf.allocate_and_fill(PAGE_SIZE, PC, empty)
    assert (rng.length, n) == (0, 0)
    await reclaimed(mf)
    assert mf.usage_segments() == []
    mf.check_invariants()


async def test_stats_and_repr(mf: MemoryFile) -> None:
    await mf.allocate(2 * PAGE_SIZE, PC)
    stats = mf.stats()
    assert stats["allocated_page_cache_bytes"] == 2 * PAGE_SIZE
    assert stats["file_size"] == CHUNK_SIZE
    assert stats["usage_segments"] == 1
    assert f"fd={mf.fd}" in repr(mf)
    assert "page_cache=8192" in repr(mf)


# ------------------------------------------------------ stateful property


class MemoryFileMachine(RuleBasedStateMachine):
    """Random allocate / inc_ref / dec_ref / reclaim sequences against a model
    where every held reference is one range."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.memfile = self.loop.run_until_complete(MemoryFile.create())
        self.holds: list[Range] = []

    def teardown(self) -> None:
        self.loop.run_until_complete(self.memfile.close())
        self.loop.close()

    def model(self) -> Counter[int]:
        refs: Counter[int] = Counter()
        for held in self.holds:
            refs.update(range(held.start, held.end, PAGE_SIZE))
        return refs

    @staticmethod
    def sub_range(data: st.DataObject, rng: Range) -> Range:
        pages = rng.length // PAGE_SIZE
        first = data.draw(st.integers(0, pages - 1))
        last = data.draw(st.integers(first + 1, pages))
        return Range(rng.start + first * PAGE_SIZE, rng.start + last * PAGE_SIZE)

    @rule(
        pages=st.integers(1, 24) | st.just(HUGE_PAGE_SIZE // PAGE_SIZE),
        kind=st.sampled_from(MemoryKind),
    )
    def allocate(self, pages: int, kind: MemoryKind) -> None:
        rng = self.loop.run_until_complete(self.memfile.allocate(pages * PAGE_SIZE, kind))
        for held in self.holds:
            assert not rng.overlaps(held), f"{rng} overlaps live {held}"
        self.holds.append(rng)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def inc_ref(self, data: st.DataObject) -> None:
        rng = self.sub_range(data, data.draw(st.sampled_from(self.holds)))
        self.memfile.inc_ref(rng)
        self.holds.append(rng)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def dec_ref(self, data: st.DataObject) -> None:
        held = self.holds.pop(data.draw(st.integers(0, len(self.holds) - 1)))
        rng = self.sub_range(data, held)
        self.memfile.dec_ref(rng)
        for rest in (Range(held.start, rng.start), Range(rng.end, held.end)):
            if not rest.is_empty:
                self.holds.append(rest)

    @rule(page=st.integers(0, 1200))
    def dec_ref_of_unheld_page_fails(self, page: int) -> None:
        rng = Range(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)
        assume(self.model()[rng.start] == 0)
        before = self.memfile.usage_segments()
        with pytest.raises(MemoryFileError):
            self.memfile.dec_ref(rng)
        assert self.memfile.usage_segments() == before

    @rule()
    def reclaim(self) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.memfile.wait_reclaimed(), WAIT))
        assert self.memfile.reclaimable_bytes == 0

    @invariant()
    def consistent(self) -> None:
        self.memfile.check_invariants()
        actual: dict[int, int] = {}
        for seg, info in self.memfile.usage_segments():
            if info.refs:
                actual.update(dict.fromkeys(range(seg.start, seg.end, PAGE_SIZE), info.refs))
        assert actual == dict(self.model())
        total = sum(self.memfile.allocated_bytes(kind) for kind in MemoryKind)
        assert total == len(actual) * PAGE_SIZE


MemoryFileMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryFileMachine = MemoryFileMachine.TestCase


async def test_large_fills_are_faulted_in_while_the_reader_runs(mf: MemoryFile) -> None:
    populate_done = asyncio.Event()

    async def reader(views: list[memoryview]) -> int:
        # Writes nothing: only the populate can make these pages resident,
        # and it runs while the reader does.
        for _ in range(500):
            if hostmem.resident_runs(mf._chunks.address_pieces(Range(0, 1 << 20))) == [
                Range(0, 1 << 20)
            ]:
                populate_done.set()
                break
            await asyncio.sleep(0.01)
        return sum(len(v) for v in views)

    rng, _ = await mf.allocate_and_fill(1 << 20, MemoryKind.PAGE_CACHE, reader)
    assert rng == Range(0, 1 << 20)
    assert populate_done.is_set()
    # Small fills are not worth a thread hop: their pages stay untouched.
    small = Range(1 << 20, (1 << 20) + 8192)
    got, _ = await mf.allocate_and_fill(8192, MemoryKind.PAGE_CACHE, _length)
    assert got == small
    assert hostmem.resident_runs(mf._chunks.address_pieces(small)) == []


async def test_a_failed_fill_waits_for_its_populate_before_freeing(mf: MemoryFile) -> None:
    async def reader(views: list[memoryview]) -> int:
        raise OSError("origin gone")

    with pytest.raises(OSError, match="origin gone"):
        await mf.allocate_and_fill(8 << 20, MemoryKind.PAGE_CACHE, reader)
    # The populate had ended before the pages were freed: the reclaimer
    # punches them out and nothing faults them back in afterwards.
    await mf.wait_reclaimed()
    await mf.update_usage()
    assert mf.total_committed_bytes == 0
    mf.check_invariants()


async def _length(views: list[memoryview]) -> int:
    return sum(len(v) for v in views)
