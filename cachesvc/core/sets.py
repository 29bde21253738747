"""The typed range sets of one cached file, each owning its operations.

Follows FileRangeSet and DirtySet in the reference design (fsutil's
``file_range_set.go`` and ``dirty_set.go``): the inode locks, decides and
counts; the set does the range work.

- :class:`FileRangeSet`: the cached pages, file range -> memory-file offset.
- :class:`DirtySet`: cached bytes newer than the origin, with the write
  generation of their last write.
- :class:`MappingSet`: how many mappings (responses, pins, fill holds) hold
  each page.

Each wraps one generic :class:`~cachesvc.core.ranges.RangeSet`, created on
first use and dropped again once empty: a cache may hold a million idle
files, and an idle file has nothing dirty or mapped. Complexities: n is the
number of segments of the set, k the number an operation touches; each
changed segment costs O(log n) (see ranges.py).

Like the RangeSet, a typed set has no lock: its inode's locks protect it,
as the inode's field comments say.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from cachesvc.core.hostmem import PAGE_SIZE
from cachesvc.core.pages import copy_into_views, page_range, page_up
from cachesvc.core.ranges import MAX_OFFSET, Range, RangePolicy, RangeSet, subtract_range

if TYPE_CHECKING:
    from cachesvc.core.memfile import MemoryFile

__all__ = [
    "DirtySet",
    "FileRangeSet",
    "MappingSet",
    "MemoryOffsetPolicy",
    "MemoryPieces",
]

MemoryPieces = list[tuple[int, Range]]
"""``(file offset, memory range)`` pieces, in file order."""


# ------------------------------------------------------------------ policies


class MemoryOffsetPolicy:
    """Values are the memory-file offset of a segment's first byte: segments merge
    iff the memory behind them is contiguous too."""

    __slots__ = ()

    def merge(self, left: Range, left_value: int, right: Range, right_value: int) -> int | None:
        return left_value if left_value + (left.end - left.start) == right_value else None

    def split(self, rng: Range, value: int, at: int) -> tuple[int, int]:
        return value, value + (at - rng.start)


class GenerationPolicy:
    """Values are write generations: adjacent segments always merge, keeping the
    newer generation (so a merged range is written again rather than too few)."""

    __slots__ = ()

    def merge(self, left: Range, left_value: int, right: Range, right_value: int) -> int:
        return left_value if left_value >= right_value else right_value

    def split(self, rng: Range, value: int, at: int) -> tuple[int, int]:
        return value, value


class CountPolicy:
    """Values are counts: segments merge iff their counts are equal."""

    __slots__ = ()

    def merge(self, left: Range, left_value: int, right: Range, right_value: int) -> int | None:
        return left_value if left_value == right_value else None

    def split(self, rng: Range, value: int, at: int) -> tuple[int, int]:
        return value, value


_MEMORY_OFFSET: Final = MemoryOffsetPolicy()
_GENERATION: Final = GenerationPolicy()
_COUNT: Final = CountPolicy()
_NO_SEGMENTS: Final[tuple[()]] = ()


class _LazySet:
    """A RangeSet[int] made on first insertion and dropped once empty."""

    __slots__ = ("_set",)

    # The subclass's value semantics. Immutable.
    _POLICY: RangePolicy[int]

    def __init__(self) -> None:
        self._set: RangeSet[int] | None = None  # None while empty

    def _made(self) -> RangeSet[int]:
        """The generic set, made if the set is empty."""
        if self._set is None:
            self._set = RangeSet(self._POLICY)
        return self._set

    def _settle(self) -> None:
        """Drops the generic set once it is empty."""
        if self._set is not None and not self._set:
            self._set = None

    def __bool__(self) -> bool:
        """Whether any range is in the set. O(1)."""
        return self._set is not None

    def __len__(self) -> int:
        """Number of segments. O(1)."""
        return 0 if self._set is None else len(self._set)

    def __iter__(self) -> Iterator[tuple[Range, int]]:
        """Every ``(segment, value)``, ascending. O(n)."""
        return iter(_NO_SEGMENTS) if self._set is None else iter(self._set)

    @property
    def total_length(self) -> int:
        """Bytes in the set. O(1)."""
        return 0 if self._set is None else self._set.total_length

    def segments(self, rng: Range) -> list[tuple[Range, int]]:
        """The segments overlapping ``rng``, unclipped. O(log n + k)."""
        return [] if self._set is None else self._set.segments(rng)

    def gaps(self, rng: Range) -> list[Range]:
        """The parts of ``rng`` not in the set. O(log n + k)."""
        return [rng] if self._set is None else self._set.gaps(rng)

    def check_invariants(self) -> None:
        """Asserts the set's structure (merged segments, totals). O(n)."""
        if self._set is not None:
            assert self._set, "an empty set is kept"
            self._set.check_invariants(require_merged=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._set!r})"


# --------------------------------------------------------------- the cache


class FileRangeSet:
    """The cached pages of one file: page-aligned file ranges -> the memory-file
    offset of their first byte. Each segment holds one MemoryFile reference on
    its memory. Cached bytes at or past the file's size are zero.

    Most cached files are one segment (a small file, or a large one read
    into contiguous memory): while the set holds at most one, it is kept in
    three fields, and a RangeSet is made only for a second (measured:
    about 1.7 KB of heap per cached small file less). The two forms answer
    alike; tests check one against the other.
    """

    __slots__ = ("_end", "_mem", "_set", "_start")

    def __init__(self) -> None:
        # Two or more segments; None while there is at most one.
        self._set: RangeSet[int] | None = None
        # The one segment [_start, _end) -> _mem while _set is None; none if _end is 0.
        self._start = 0
        self._end = 0
        self._mem = 0

    def _demote(self) -> None:
        """Back to the fields once the RangeSet holds at most one segment."""
        assert self._set is not None
        if len(self._set) > 1:
            return
        first = next(iter(self._set), None)
        self._set = None
        if first is None:
            self._start = self._end = self._mem = 0
        else:
            (self._start, self._end), self._mem = first

    def _promote(self) -> RangeSet[int]:
        """The fields' segment into a RangeSet, for a second one."""
        self._set = RangeSet(_MEMORY_OFFSET)
        if self._end:
            self._set.insert(Range(self._start, self._end), self._mem)
        self._start = self._end = self._mem = 0
        return self._set

    def __bool__(self) -> bool:
        """Whether any page is cached. O(1)."""
        return self._set is not None or self._end > 0

    def __len__(self) -> int:
        """Number of segments. O(1)."""
        if self._set is not None:
            return len(self._set)
        return 1 if self._end else 0

    def __iter__(self) -> Iterator[tuple[Range, int]]:
        """Every ``(segment, memory offset)``, ascending. O(n)."""
        if self._set is not None:
            return iter(self._set)
        return iter([(Range(self._start, self._end), self._mem)] if self._end else [])

    @property
    def total_length(self) -> int:
        """Bytes cached. O(1)."""
        return self._set.total_length if self._set is not None else self._end - self._start

    def segments(self, rng: Range) -> list[tuple[Range, int]]:
        """The segments overlapping ``rng``, unclipped. O(log n + k)."""
        if self._set is not None:
            return self._set.segments(rng)
        if not rng.well_formed():
            raise ValueError(f"malformed range {rng}")
        if self._end and rng.start < self._end and self._start < rng.end and not rng.is_empty:
            return [(Range(self._start, self._end), self._mem)]
        return []

    def gaps(self, rng: Range) -> list[Range]:
        """The parts of ``rng`` not cached. O(log n + k)."""
        if self._set is not None:
            return self._set.gaps(rng)
        if not rng.well_formed():
            raise ValueError(f"malformed range {rng}")
        if rng.is_empty:
            return []
        return subtract_range(rng, Range(self._start, self._end)) if self._end else [rng]

    def find(self, offset: int) -> tuple[Range, int] | None:
        """The segment holding ``offset`` and its memory offset, or None. O(log n)."""
        if self._set is not None:
            return self._set.find(offset)
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if self._start <= offset < self._end:
            return Range(self._start, self._end), self._mem
        return None

    def find_gap(self, offset: int) -> Range | None:
        """The maximal uncached range holding ``offset``, or None if it is cached. O(log n)."""
        if self._set is not None:
            return self._set.find_gap(offset)
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if not self._end:
            return Range(0, MAX_OFFSET)
        if offset < self._start:
            return Range(0, self._start)
        if offset >= self._end:
            return Range(self._end, MAX_OFFSET)
        return None

    def _insert(self, rng: Range, mem: int) -> None:
        if self._set is not None:
            self._set.insert(rng, mem)
            return
        if not 0 <= rng.start < rng.end <= MAX_OFFSET:
            raise ValueError(f"insert of malformed or empty range {rng}")
        if not self._end:
            self._start, self._end, self._mem = rng.start, rng.end, mem
        elif rng.start < self._end and self._start < rng.end:
            raise ValueError(f"insert {rng}: overlaps segment [{self._start}, {self._end})")
        elif rng.end == self._start and mem + rng.length == self._mem:
            self._start, self._mem = rng.start, mem  # contiguous before
        elif rng.start == self._end and self._mem + self._end - self._start == mem:
            self._end = rng.end  # contiguous after
        else:
            self._promote().insert(rng, mem)

    def _remove(self, rng: Range) -> list[tuple[Range, int]]:
        """Uncaches ``rng``; returns the pieces removed with their memory offsets."""
        if self._set is not None:
            removed = self._set.remove(rng)
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
            rest.insert(left, mem)
            rest.insert(right, mem + right.start - left.start)
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
        if self._set is not None:
            assert len(self._set) >= 2, "a RangeSet kept for at most one segment"
            self._set.check_invariants(require_merged=True)
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
        O(log n + k) plus the copy; one segment, the usual case, takes no walk."""
        found = self.find(rng.start)
        if found is None:
            return None
        seg, mem = found
        if seg.end >= rng.end:
            start = mem + rng.start - seg.start
            return b"".join(memfile.map_internal(Range(start, start + rng.length), False))
        if self.cached_bytes(rng) != rng.length:
            return None
        return b"".join(self.views(memfile, rng, write=False))

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


# --------------------------------------------------------------- dirtiness


class DirtySet(_LazySet):
    """Cached bytes newer than the origin, with the write generation of the
    last write to them. Follows DirtySet in the reference design."""

    __slots__ = ()
    _POLICY = _GENERATION

    def ranges(self) -> list[Range]:
        """The dirty ranges, ascending. O(n)."""
        return [rng for rng, _ in self]

    def mark_dirty(self, rng: Range, gen: int) -> int:
        """Marks ``rng`` written at generation ``gen`` (the newest); returns the
        bytes that were clean. O(log n + k). Follows DirtySet.MarkDirty."""
        dirty = self._made()
        before = dirty.total_length
        for gap in dirty.gaps(rng):
            dirty.insert(gap, gen)
        dirty.update(rng, lambda _r, _gen: gen)
        return dirty.total_length - before

    def mark_written(self, gen: int) -> int:
        """Cleans every range last written at or before generation ``gen`` (a
        successful write-back of a snapshot taken then); returns the bytes
        cleaned. O(n). Follows DirtySet.MarkClean."""
        if self._set is None:
            return 0
        before = self._set.total_length
        for rng, written in list(self._set):
            if written <= gen:
                self._set.remove(rng)
        cleaned = before - self._set.total_length
        self._settle()
        return cleaned

    def clear(self, rng: Range) -> int:
        """Forgets that ``rng`` is dirty (its bytes are gone: truncated or
        discarded); returns the bytes cleaned. O(log n + k)."""
        if self._set is None:
            return 0
        cleaned = sum(piece.length for piece, _ in self._set.remove(rng))
        self._settle()
        return cleaned

    def clean_pages(self, pages: Range) -> list[Range]:
        """The parts of page-aligned ``pages`` whose pages hold no dirty byte.
        O(log n + k)."""
        clean = [pages]
        for rng, _ in self.segments(pages):
            dirty_pages = page_range(rng.start, rng.end)
            clean = [p for piece in clean for p in subtract_range(piece, dirty_pages)]
        return clean


# ---------------------------------------------------------------- mappings


class MappingSet(_LazySet):
    """How many mappings hold each page: responses, operator pins and the
    holds of fills whose waiters have not mapped yet."""

    __slots__ = ()
    _POLICY = _COUNT

    def add(self, pages: Range) -> int:
        """Counts one more mapping of ``pages``; returns the bytes not mapped
        before. O(log n + k)."""
        counts = self._made()
        if not counts.segments(pages):
            # The common case: nothing else maps these pages.
            counts.insert(pages, 1)
            return pages.length
        newly = counts.gaps(pages)
        counts.update(pages, lambda _r, count: count + 1)
        for rng in newly:
            counts.insert(rng, 1)
        return sum(rng.length for rng in newly)

    def check_invariants(self) -> None:
        super().check_invariants()
        for rng, count in self:
            assert count > 0, (rng, count)

    def remove(self, pages: Range) -> list[Range]:
        """Counts one mapping of ``pages`` fewer; returns the ranges no longer
        mapped at all. Precondition: ``pages`` is mapped. O(log n + k)."""
        counts = self._made()
        segments = counts.segments(pages)
        if all(count == 1 for _, count in segments):
            counts.remove(pages)
            released = [pages]
        else:
            counts.update(pages, lambda _r, count: count - 1)
            released = [rng for rng, count in counts.segments(pages) if count == 0]
            for rng in released:
                counts.remove(rng)
        self._settle()
        return released
