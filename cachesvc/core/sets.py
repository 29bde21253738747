"""The typed range sets of one cached file's dirt and mappings, each owning
its operations (the cached pages' set, FileRangeSet, is in
:mod:`cachesvc.core.cacheset`).

Follows DirtySet in the reference design (fsutil's ``dirty_set.go``): the
inode locks, decides and counts; the set does the range work.

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
from typing import Final

from cachesvc.core.pages import page_range
from cachesvc.core.ranges import Range, RangePolicy, RangeSet, subtract_range

__all__ = ["DirtySet", "MappingSet", "MemoryPieces"]

MemoryPieces = list[tuple[int, Range]]
"""``(file offset, memory range)`` pieces, in file order."""


# ------------------------------------------------------------------ policies


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


_GENERATION: Final = GenerationPolicy()
_COUNT: Final = CountPolicy()
_NO_SEGMENTS: Final[tuple[()]] = ()


class _LazySet:
    """A RangeSet[int] made on first insertion; a subclass may drop it once
    empty (``_settle``)."""

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
        return self._set is not None and bool(self._set)

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
            self._set.check_invariants(require_merged=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._set!r})"


# --------------------------------------------------------------- dirtiness


class DirtySet(_LazySet):
    """Cached bytes newer than the origin, with the write generation of the
    last write to them. Follows DirtySet in the reference design."""

    __slots__ = ()
    _POLICY = _GENERATION

    def check_invariants(self) -> None:
        super().check_invariants()
        assert self._set is None or self._set, "an empty dirty set is kept"

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
    holds of fills whose waiters have not mapped yet. Kept when it empties
    (a file mapped once is likely mapped again): its inode drops it when
    it settles."""

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
        return released
