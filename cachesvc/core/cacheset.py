"""FileRangeSet: the cached pages of one file, owning their operations.

Follows FileRangeSet in the reference design (fsutil's
``file_range_set.go``): the inode locks, decides and counts; the set does
the range work (fill, drop, truncate, copy out, write in). File ranges map
to the memory-file offset of their first byte; segments merge where file
and memory are both contiguous.

The storage is made for a cache of a million small files and of scattered
extents: one segment is held in three fields, more in three arrays of
64-bit ints (24 bytes a segment, where a generic RangeSet entry takes about
200). It answers as a RangeSet with a memory-offset policy would; tests
check it against one. Complexities: n segments, k touched; insertion and
removal also move the arrays' tails (a memmove).

No lock of its own: its inode's data_mu protects it.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cachesvc.core.hostmem import PAGE_SIZE
from cachesvc.core.pages import copy_into_views, page_up
from cachesvc.core.ranges import MAX_OFFSET, Range, subtract_range
from cachesvc.core.sets import MemoryPieces

if TYPE_CHECKING:
    from cachesvc.core.memfile import MemoryFile

__all__ = ["FileRangeSet"]


class _Segments:
    """Two or more segments of a FileRangeSet: starts, ends and memory offsets
    in three arrays of 64-bit ints, sorted by start, merged where file and
    memory are both contiguous. Insertion and removal move the arrays'
    tails (memmove, fast in C for the thousands of segments a file has at
    most in practice)."""

    __slots__ = ("ends", "mems", "starts", "total")

    def __init__(self) -> None:
        self.starts = array.array("q")
        self.ends = array.array("q")
        self.mems = array.array("q")
        self.total = 0  # bytes in all segments

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[Range, int]]:
        for start, end, mem in zip(self.starts, self.ends, self.mems, strict=True):
            yield Range(start, end), mem

    def _first(self, offset: int) -> int:
        """The index of the first segment ending after ``offset``. O(log n)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        return i if i >= 0 and self.ends[i] > offset else i + 1

    def find(self, offset: int) -> tuple[Range, int] | None:
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and offset < self.ends[i]:
            return Range(self.starts[i], self.ends[i]), self.mems[i]
        return None

    def find_gap(self, offset: int) -> Range | None:
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and offset < self.ends[i]:
            return None
        low = self.ends[i] if i >= 0 else 0
        high = self.starts[i + 1] if i + 1 < len(self.starts) else MAX_OFFSET
        return Range(low, high)

    def segments(self, rng: Range) -> list[tuple[Range, int]]:
        out: list[tuple[Range, int]] = []
        if rng.is_empty:
            return out
        starts, ends, mems = self.starts, self.ends, self.mems
        i = self._first(rng.start)
        while i < len(starts) and starts[i] < rng.end:
            out.append((Range(starts[i], ends[i]), mems[i]))
            i += 1
        return out

    def gaps(self, rng: Range) -> list[Range]:
        out: list[Range] = []
        pos = rng.start
        for seg, _ in self.segments(rng):
            if seg.start > pos:
                out.append(Range(pos, seg.start))
            pos = max(pos, seg.end)
        if pos < rng.end:
            out.append(Range(pos, rng.end))
        return out

    def insert(self, start: int, end: int, mem: int) -> None:
        starts, ends, mems = self.starts, self.ends, self.mems
        i = bisect.bisect_left(starts, start)
        if i > 0 and ends[i - 1] > start:
            raise ValueError(f"insert [{start}, {end}): overlaps [{starts[i - 1]}, {ends[i - 1]})")
        if i < len(starts) and starts[i] < end:
            raise ValueError(f"insert [{start}, {end}): overlaps segment at {starts[i]}")
        before = i > 0 and ends[i - 1] == start and mems[i - 1] + start - starts[i - 1] == mem
        after = i < len(starts) and starts[i] == end and mem + end - start == mems[i]
        if before and after:
            ends[i - 1] = ends[i]
            del starts[i], ends[i], mems[i]
        elif before:
            ends[i - 1] = end
        elif after:
            starts[i], mems[i] = start, mem
        else:
            starts.insert(i, start)
            ends.insert(i, end)
            mems.insert(i, mem)
        self.total += end - start

    def remove(self, rng: Range) -> list[tuple[Range, int]]:
        starts, ends, mems = self.starts, self.ends, self.mems
        i = j = self._first(rng.start)
        while j < len(starts) and starts[j] < rng.end:
            j += 1
        removed: list[tuple[Range, int]] = []
        kept: list[tuple[int, int, int]] = []
        for k in range(i, j):
            start, end, mem = starts[k], ends[k], mems[k]
            cut = Range(max(start, rng.start), min(end, rng.end))
            removed.append((cut, mem + cut.start - start))
            if start < cut.start:
                kept.append((start, cut.start, mem))
            if cut.end < end:
                kept.append((cut.end, end, mem + cut.end - start))
            self.total -= cut.length
        starts[i:j] = array.array("q", [k[0] for k in kept])
        ends[i:j] = array.array("q", [k[1] for k in kept])
        mems[i:j] = array.array("q", [k[2] for k in kept])
        return removed

    def check_invariants(self) -> None:
        starts, ends, mems = self.starts, self.ends, self.mems
        assert len(starts) == len(ends) == len(mems) >= 2, "segments kept for at most one"
        total = 0
        for k in range(len(starts)):
            assert 0 <= starts[k] < ends[k] <= MAX_OFFSET, (starts[k], ends[k])
            if k:
                assert ends[k - 1] <= starts[k], "overlapping segments"
                contiguous = mems[k - 1] + ends[k - 1] - starts[k - 1] == mems[k]
                assert not (ends[k - 1] == starts[k] and contiguous), "mergeable segments"
            total += ends[k] - starts[k]
        assert total == self.total, (total, self.total)


class FileRangeSet:
    """The cached pages of one file: page-aligned file ranges -> the memory-file
    offset of their first byte. Each segment holds one MemoryFile reference on
    its memory. Cached bytes at or past the file's size are zero.

    Most cached files are one segment (a small file, or a large one read
    into contiguous memory): while the set holds at most one, it is kept in
    three fields; beyond, in arrays (:class:`_Segments`). Measured: about
    0.9 KiB of heap per cached small file in all.
    """

    __slots__ = ("_end", "_many", "_mem", "_start")

    def __init__(self) -> None:
        # Two or more segments; None while there is at most one.
        self._many: _Segments | None = None
        # The one segment [_start, _end) -> _mem while _many is None; none if _end is 0.
        self._start = 0
        self._end = 0
        self._mem = 0

    def _demote(self) -> None:
        """Back to the fields once at most one segment is left."""
        many = self._many
        assert many is not None
        if len(many) > 1:
            return
        self._many = None
        if len(many):
            self._start, self._end, self._mem = many.starts[0], many.ends[0], many.mems[0]
        else:
            self._start = self._end = self._mem = 0

    def _promote(self) -> _Segments:
        """The fields' segment into arrays, for a second one."""
        many = self._many = _Segments()
        if self._end:
            many.insert(self._start, self._end, self._mem)
        self._start = self._end = self._mem = 0
        return many

    def __bool__(self) -> bool:
        """Whether any page is cached. O(1)."""
        return self._many is not None or self._end > 0

    def __len__(self) -> int:
        """Number of segments. O(1)."""
        if self._many is not None:
            return len(self._many)
        return 1 if self._end else 0

    def __iter__(self) -> Iterator[tuple[Range, int]]:
        """Every ``(segment, memory offset)``, ascending. O(n)."""
        if self._many is not None:
            return iter(self._many)
        return iter([(Range(self._start, self._end), self._mem)] if self._end else [])

    @property
    def total_length(self) -> int:
        """Bytes cached. O(1)."""
        return self._many.total if self._many is not None else self._end - self._start

    def segments(self, rng: Range) -> list[tuple[Range, int]]:
        """The segments overlapping ``rng``, unclipped. O(log n + k)."""
        if not rng.well_formed():
            raise ValueError(f"malformed range {rng}")
        if self._many is not None:
            return self._many.segments(rng)
        if self._end and rng.start < self._end and self._start < rng.end and not rng.is_empty:
            return [(Range(self._start, self._end), self._mem)]
        return []

    def gaps(self, rng: Range) -> list[Range]:
        """The parts of ``rng`` not cached. O(log n + k)."""
        if not rng.well_formed():
            raise ValueError(f"malformed range {rng}")
        if rng.is_empty:
            return []
        if self._many is not None:
            return self._many.gaps(rng)
        return subtract_range(rng, Range(self._start, self._end)) if self._end else [rng]

    def find(self, offset: int) -> tuple[Range, int] | None:
        """The segment holding ``offset`` and its memory offset, or None. O(log n)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if self._many is not None:
            return self._many.find(offset)
        if self._start <= offset < self._end:
            return Range(self._start, self._end), self._mem
        return None

    def find_gap(self, offset: int) -> Range | None:
        """The maximal uncached range holding ``offset``, or None if it is cached. O(log n)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if offset >= MAX_OFFSET:
            return None
        if self._many is not None:
            return self._many.find_gap(offset)
        if not self._end:
            return Range(0, MAX_OFFSET)
        if offset < self._start:
            return Range(0, self._start)
        if offset >= self._end:
            return Range(self._end, MAX_OFFSET)
        return None

    def _insert(self, rng: Range, mem: int) -> None:
        if not 0 <= rng.start < rng.end <= MAX_OFFSET:
            raise ValueError(f"insert of malformed or empty range {rng}")
        if self._many is not None:
            self._many.insert(rng.start, rng.end, mem)
            self._demote()  # the insert may have joined two segments
        elif not self._end:
            self._start, self._end, self._mem = rng.start, rng.end, mem
        elif rng.start < self._end and self._start < rng.end:
            raise ValueError(f"insert {rng}: overlaps segment [{self._start}, {self._end})")
        elif rng.end == self._start and mem + rng.length == self._mem:
            self._start, self._mem = rng.start, mem  # contiguous before
        elif rng.start == self._end and self._mem + self._end - self._start == mem:
            self._end = rng.end  # contiguous after
        else:
            self._promote().insert(rng.start, rng.end, mem)

    def _remove(self, rng: Range) -> list[tuple[Range, int]]:
        """Uncaches ``rng``; returns the pieces removed with their memory offsets."""
        if not rng.well_formed():
            raise ValueError(f"malformed range {rng}")
        if rng.is_empty:
            return []
        if self._many is not None:
            removed = self._many.remove(rng)
            self._demote()
            return removed
        part = Range(self._start, self._end).intersect(rng)
        if not self._end or part.is_empty:
            return []
        removed = [(part, self._mem + part.start - self._start)]
        left, right = Range(self._start, part.start), Range(part.end, self._end)
        if not left.is_empty and not right.is_empty:
            mem = self._mem
            self._start, self._end, self._mem = 0, 0, 0
            rest = self._promote()
            rest.insert(left.start, left.end, mem)
            rest.insert(right.start, right.end, mem + right.start - left.start)
        elif not left.is_empty:
            self._end = left.end
        elif not right.is_empty:
            self._mem += right.start - self._start
            self._start = right.start
        else:
            self._start = self._end = self._mem = 0
        return removed

    def check_invariants(self) -> None:
        """Asserts the set's structure. O(n)."""
        if self._many is not None:
            self._many.check_invariants()
        else:
            assert self._end == 0 or 0 <= self._start < self._end, (self._start, self._end)

    def __repr__(self) -> str:
        return f"FileRangeSet({', '.join(f'{r}={m}' for r, m in self)})"

    def cached_bytes(self, rng: Range) -> int:
        """How many bytes of ``rng`` are cached. O(log n + k)."""
        return sum(seg.intersect(rng).length for seg, _ in self.segments(rng))

    def pieces(self, pages: Range) -> MemoryPieces:
        """``(file offset, memory range)`` pieces of ``pages``, in order.

        Precondition: ``pages`` is page-aligned and cached. O(log n + k).
        """
        pieces: MemoryPieces = []
        for seg, mem in self.segments(pages):
            part = seg.intersect(pages)
            start = mem + part.start - seg.start
            pieces.append((part.start, Range(start, start + part.length)))
        return pieces

    def views(self, memfile: MemoryFile, rng: Range, *, write: bool) -> list[memoryview]:
        """Views of the bytes of ``rng``, in order.

        Precondition: ``rng`` is cached. O(log n + k).
        """
        views: list[memoryview] = []
        for seg, mem in self.segments(rng):
            part = seg.intersect(rng)
            start = mem + part.start - seg.start
            views += memfile.map_internal(Range(start, start + part.length), write)
        return views

    def copy_out(self, memfile: MemoryFile, rng: Range) -> bytes | None:
        """A copy of ``rng`` (non-empty) if all of it is cached, else None.
        O(log n + k) plus the copy; one segment, the usual case, takes no walk
        (a hit's hot path: plain ints, no Range until the memory's)."""
        offset, end = rng
        many = self._many
        if many is None:
            if not self._start <= offset < end <= self._end:
                return None
            start = self._mem + offset - self._start
        else:
            i = bisect.bisect_right(many.starts, offset) - 1
            if i < 0 or many.ends[i] <= offset:
                return None
            if many.ends[i] < end:
                if self.cached_bytes(rng) != rng.length:
                    return None
                return b"".join(self.views(memfile, rng, write=False))
            start = many.mems[i] + offset - many.starts[i]
        return b"".join(memfile.map_internal(Range(start, start + end - offset), False))

    def write(self, memfile: MemoryFile, offset: int, data: memoryview) -> list[Range]:
        """Copies ``data`` (written at ``offset``) into the cached parts of its
        range; returns those parts, ascending. O(log n + k) plus the copy."""
        target = Range(offset, offset + len(data))
        written: list[Range] = []
        for seg, mem in self.segments(target):
            part = seg.intersect(target)
            start = mem + part.start - seg.start
            views = memfile.map_internal(Range(start, start + part.length), True)
            copy_into_views(views, data[part.start - offset : part.end - offset])
            written.append(part)
        return written

    def insert(self, rng: Range, mem: int) -> None:
        """Caches page-aligned ``rng``, which must be uncached, in the memory at
        ``mem`` (whose reference the set takes over). O(log n)."""
        self._insert(rng, mem)

    def fill(self, memfile: MemoryFile, rng: Range, mem: int, limit: int) -> list[Range]:
        """Caches the parts of filled ``rng`` (in the memory at ``mem``, one
        reference) below ``limit`` that are still uncached, and frees the
        memory of the rest. Returns the parts cached, ascending.
        O(log n + k). Follows FileRangeSet.Fill in the reference design."""
        kept = self.gaps(Range(rng.start, min(rng.end, limit))) if rng.start < limit else []
        for gap in kept:
            self._insert(gap, mem + gap.start - rng.start)
        pos = rng.start
        for piece in [*kept, Range(rng.end, rng.end)]:
            if pos < piece.start:
                memfile.dec_ref(Range(mem + pos - rng.start, mem + piece.start - rng.start))
            pos = piece.end
        return kept

    def drop(self, memfile: MemoryFile, rng: Range) -> list[Range]:
        """Uncaches page-aligned ``rng`` and gives its memory references back;
        returns the ranges dropped, ascending. O(log n + k). Follows
        FileRangeSet.Drop in the reference design."""
        dropped: list[Range] = []
        for piece, mem in self._remove(rng):
            memfile.dec_ref(Range(mem, mem + piece.length))
            dropped.append(piece)
        return dropped

    def truncate(self, memfile: MemoryFile, size: int) -> list[Range]:
        """Drops the pages past the one holding the new end of file ``size``
        and zeroes the cached bytes past ``size`` on that page; returns the
        ranges dropped. O(log n + k). Follows FileRangeSet.Truncate."""
        dropped = self.drop(memfile, Range(page_up(size), MAX_OFFSET))
        if size % PAGE_SIZE:
            found = self.find(size)
            if found is not None:
                seg, mem = found
                tail = mem + size - seg.start
                for view in memfile.map_internal(Range(tail, tail + page_up(size) - size), True):
                    view[:] = bytes(len(view))
        return dropped
