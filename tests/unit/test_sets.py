"""The typed range sets of a cached file: FileRangeSet (one segment inline,
a RangeSet beyond) answers exactly as a plain RangeSet, and the sets'
operations (fill, drop, truncate, copy_out, write; mark_dirty, mark_written,
clear, clean_pages; add, remove) do what their docstrings say."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesvc.core.cacheset import FileRangeSet
from cachesvc.core.memfile import MemoryFile, MemoryKind
from cachesvc.core.ranges import MAX_OFFSET, Range, RangeSet
from cachesvc.core.sets import DirtySet, MappingSet
from tests.unit.test_ranges import MemoryOffsetPolicy

P = 4096
R = Range


def plain() -> RangeSet[int]:
    return RangeSet(MemoryOffsetPolicy())


def same(a: FileRangeSet, b: RangeSet[int]) -> None:
    a.check_invariants()
    assert list(a) == list(b)
    assert (a.total_length, len(a), bool(a)) == (b.total_length, len(b), bool(b))


# Pages 0..15 of a file, memory at page multiples (contiguous or not).
pages = st.integers(0, 16)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        # A memory offset, or None: the range's own file offset, so that
        # neighbours are contiguous in memory too and inserts join them.
        st.tuples(
            st.sampled_from(["insert", "remove"]), pages, pages, st.none() | st.integers(0, 40)
        ),
        max_size=40,
    ),
    probes=st.lists(st.tuples(pages, pages), max_size=8),
)
def test_file_range_set_answers_as_a_range_set(
    ops: list[tuple[str, int, int, int | None]], probes: list[tuple[int, int]]
) -> None:
    fast, slow = FileRangeSet(), plain()
    for op, a, b, page in ops:
        rng = R(min(a, b) * P, max(a, b) * P)
        mem = rng.start if page is None else page * P
        if op == "insert":
            if rng.is_empty or slow.segments(rng):
                continue
            fast.insert(rng, mem)
            slow.insert(rng, mem)
        else:
            assert fast._remove(rng) == slow.remove(rng)
        same(fast, slow)
        for x, y in probes:
            probe = R(min(x, y) * P, max(x, y) * P)
            assert fast.segments(probe) == slow.segments(probe)
            assert fast.gaps(probe) == slow.gaps(probe)
            assert fast.find(x * P) == slow.find(x * P)
            assert fast.find_gap(x * P) == slow.find_gap(x * P)


def test_an_insert_joining_two_segments_leaves_one_inline() -> None:
    s = FileRangeSet()
    s.insert(R(0, P), 0)
    s.insert(R(2 * P, 3 * P), 2 * P)
    s.insert(R(P, 2 * P), P)
    s.check_invariants()
    assert list(s) == [(R(0, 3 * P), 0)]


async def test_copy_out_across_segments(memfile: MemoryFile) -> None:
    s = FileRangeSet()
    high = await memfile.allocate(2 * P, MemoryKind.PAGE_CACHE)
    low = await memfile.allocate(2 * P, MemoryKind.PAGE_CACHE)  # after high's memory
    far = await memfile.allocate(P, MemoryKind.PAGE_CACHE)
    s.insert(R(0, 2 * P), low.start)
    s.insert(R(2 * P, 4 * P), high.start)  # adjacent in the file, not in memory
    s.insert(R(6 * P, 7 * P), far.start)
    data = bytes(range(256)) * 112  # 28 KiB
    assert s.write(memfile, 0, memoryview(data)) == [R(0, 2 * P), R(2 * P, 4 * P), R(6 * P, 7 * P)]
    assert s.copy_out(memfile, R(10, P)) == data[10:P]  # within one segment
    assert s.copy_out(memfile, R(P, 3 * P)) == data[P : 3 * P]  # across two
    assert s.copy_out(memfile, R(6 * P + 1, 7 * P)) == data[6 * P + 1 : 7 * P]
    assert s.copy_out(memfile, R(3 * P, 5 * P)) is None  # runs into the gap
    assert s.copy_out(memfile, R(4 * P, 5 * P)) is None  # in the gap
    assert s.copy_out(memfile, R(7 * P, 8 * P)) is None  # past the last
    s.drop(memfile, R(0, 8 * P))
    assert memfile.allocated_bytes(MemoryKind.PAGE_CACHE) == 0


def test_file_range_set_rejects_what_a_range_set_rejects() -> None:
    s = FileRangeSet()
    s.insert(R(0, P), 0)
    with pytest.raises(ValueError, match="overlaps"):
        s.insert(R(0, 2 * P), 10 * P)
    with pytest.raises(ValueError):
        s.insert(R(P, P), 0)
    with pytest.raises(ValueError):
        s.segments(R(5, 3))
    with pytest.raises(ValueError):
        s.find(-1)
    assert s.find_gap(MAX_OFFSET - 1) == R(P, MAX_OFFSET)
    assert repr(s) == "FileRangeSet([0, 4096)=0)"


@pytest.fixture
async def memfile() -> AsyncIterator[MemoryFile]:
    mf = await MemoryFile.create()
    yield mf
    await mf.close()


async def test_fill_keeps_what_is_uncached_and_frees_the_rest(memfile: MemoryFile) -> None:
    s = FileRangeSet()
    old = await memfile.allocate(P, MemoryKind.PAGE_CACHE)
    s.insert(R(2 * P, 3 * P), old.start)
    new = await memfile.allocate(8 * P, MemoryKind.PAGE_CACHE)
    kept = s.fill(memfile, R(0, 8 * P), new.start, limit=6 * P)
    assert kept == [R(0, 2 * P), R(3 * P, 6 * P)]
    assert s.total_length == 6 * P
    # The pages already cached and those past the limit went back.
    assert memfile.allocated_bytes(MemoryKind.PAGE_CACHE) == 6 * P


async def test_write_copy_out_truncate_drop(memfile: MemoryFile) -> None:
    s = FileRangeSet()
    mem = await memfile.allocate(4 * P, MemoryKind.PAGE_CACHE)
    s.insert(R(0, 4 * P), mem.start)
    data = bytes(range(256)) * 64  # 16 KiB
    assert s.write(memfile, 0, memoryview(data)) == [R(0, 4 * P)]
    assert s.write(memfile, 5 * P, memoryview(b"x")) == []  # not cached: nothing
    assert s.copy_out(memfile, R(100, 200)) == data[100:200]
    assert s.copy_out(memfile, R(4 * P - 1, 4 * P + 1)) is None
    dropped = s.truncate(memfile, P + 10)
    assert dropped == [R(2 * P, 4 * P)]
    assert s.copy_out(memfile, R(P, 2 * P)) == data[P : P + 10] + bytes(P - 10)
    assert s.drop(memfile, R(0, P)) == [R(0, P)]
    assert s.drop(memfile, R(0, P)) == []
    assert s.total_length == P
    assert memfile.allocated_bytes(MemoryKind.PAGE_CACHE) == P


def test_dirty_set_marks_cleans_and_keeps_generations() -> None:
    d = DirtySet()
    assert not d and d.total_length == 0
    assert d.mark_dirty(R(0, 100), gen=1) == 100
    assert d.mark_dirty(R(50, 150), gen=2) == 50
    assert d.ranges() == [R(0, 150)]
    # Merged ranges carry the newer generation: a snapshot at 1 leaves them dirty.
    assert d.mark_written(1) == 0
    assert d.mark_written(2) == 150
    assert not d
    d.mark_dirty(R(10, 20), gen=3)
    d.mark_dirty(R(2 * P + 1, 2 * P + 9), gen=4)
    d.mark_dirty(R(100 * P, 100 * P + 100), gen=4)
    assert d.clean_pages(R(0, 4 * P)) == [R(P, 2 * P), R(3 * P, 4 * P)]
    assert d.clear(R(0, 4 * P)) == 18
    assert d.ranges() == [R(100 * P, 100 * P + 100)]
    d.check_invariants()


def test_mapping_set_counts_and_releases() -> None:
    m = MappingSet()
    assert m.add(R(0, 2 * P)) == 2 * P
    assert m.add(R(P, 3 * P)) == P  # one page newly mapped
    assert m.remove(R(0, 2 * P)) == [R(0, P)]
    m.check_invariants()
    assert m.remove(R(P, 3 * P)) == [R(P, 3 * P)]
    assert not m and m.gaps(R(0, P)) == [R(0, P)]
