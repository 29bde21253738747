"""PageUsage: which pages of the memory file are allocated, referenced,
committed or awaiting reclaim, and the byte counts that follow.

The bookkeeping half of MemoryFile (see :mod:`cachesvc.core.memfile`,
which owns the file, its mappings, the worker threads and the reclaimer),
as a typed set that owns its operations: ``usage`` maps each allocated page
to ``UsageInfo(kind, known_committed, refs)``; pages without a segment are
free and uncommitted; pages whose references dropped to zero stay in it as
SYSTEM memory (*reclaimable*) until the reclaimer has punched a hole over
them, so they cannot be allocated again before they read as zeros.

Follows the usage set of MemoryFile in the reference design
(pgalloc_newer.go). Complexities: n is the number of usage segments, k
those an operation touches (see ranges.py).

Protected by the event loop: the owning MemoryFile calls it only on the
loop thread, between awaits.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from cachesvc.core.hostmem import PAGE_SIZE
from cachesvc.core.ranges import Range, RangeSet, marker_set

_PAGE_MASK = PAGE_SIZE - 1


class MemoryKind(enum.Enum):
    """What allocated memory is used for, for accounting."""

    PAGE_CACHE = "page_cache"
    SYSTEM = "system"


class MemoryFileError(Exception):
    """An invalid call: bad length or range, pages not allocated, file closed."""


class MemoryFileFull(MemoryFileError):
    """The backing file cannot grow to hold the allocation (max_size)."""


class UsageInfo(NamedTuple):
    """State of a run of pages in ``usage``."""

    kind: MemoryKind  # SYSTEM while refs == 0 (freed, awaiting reclaim)
    known_committed: bool  # definitely committed (False: may or may not be)
    refs: int  # holders; 0: reclaimable


class _UsagePolicy:
    """usage segments merge iff their values are equal; splits copy the value."""

    def merge(
        self, left: Range, left_value: UsageInfo, right: Range, right_value: UsageInfo
    ) -> UsageInfo | None:
        return left_value if left_value == right_value else None

    def split(self, rng: Range, value: UsageInfo, at: int) -> tuple[UsageInfo, UsageInfo]:
        return value, value


def _add_ref(seg: Range, info: UsageInfo) -> UsageInfo:
    return UsageInfo(info.kind, info.known_committed, info.refs + 1)


_FREED = UsageInfo(MemoryKind.SYSTEM, False, 0)


class PageUsage:
    """The usage set of one memory file, with its counts."""

    def __init__(self) -> None:
        # Allocated and reclaimable pages. Kept maximally merged.
        self._usage: RangeSet[UsageInfo] = RangeSet(_UsagePolicy())
        # The union of the usage segments with refs == 0.
        self._reclaimable: RangeSet[None] = marker_set()
        # No page below this is free.
        self._min_unallocated = 0
        # Bytes with refs > 0, by kind, and the most there ever were.
        self.allocated = dict.fromkeys(MemoryKind, 0)
        self.peak_allocated = dict.fromkeys(MemoryKind, 0)
        # Bytes of known-committed segments, by kind, and their sum (the
        # reference's usageExpected).
        self.committed = dict.fromkeys(MemoryKind, 0)
        self.known_committed = 0

    def __len__(self) -> int:
        """Usage segments. O(1)."""
        return len(self._usage)

    def segments(self) -> list[tuple[Range, UsageInfo]]:
        """A copy of ``usage``, for tests and diagnostics. O(n)."""
        return list(self._usage)

    @property
    def reclaimable_bytes(self) -> int:
        """Freed bytes not yet reclaimed. O(1)."""
        return self._reclaimable.total_length

    def first_reclaimable(self) -> Range | None:
        """The lowest run of reclaimable pages, or None. O(1)."""
        first = next(iter(self._reclaimable), None)
        return None if first is None else first[0]

    def uncommitted(self) -> list[Range]:
        """The referenced segments not known to be committed. O(n)."""
        return [seg for seg, info in self._usage if info.refs and not info.known_committed]

    # ------------------------------------------------------------ allocation

    def take(self, length: int, kind: MemoryKind, alignment: int, limit: int) -> Range:
        """Allocates the first free ``alignment``-aligned run of ``length``
        bytes with one reference; MemoryFileFull if it would end past
        ``limit``. O(log n + k), k the segments skipped. Follows
        findUnallocatedRange in the reference design."""
        hint = self._min_unallocated
        start = self._usage.first_gap_from(hint, length, alignment).start
        if start + length > limit:
            raise MemoryFileFull(f"allocate: {length} bytes do not fit below {limit}")
        # The first free page; start itself when the range begins at the hint.
        first_free = start if start == hint else self._usage.first_gap_from(hint, PAGE_SIZE).start
        rng = Range(start, start + length)
        self._usage.insert(rng, UsageInfo(kind, False, 1))
        self.allocated[kind] += length
        self.peak_allocated[kind] = max(self.peak_allocated[kind], self.allocated[kind])
        # If the range took the first free page, the next one is beyond it.
        self._min_unallocated = first_free if first_free < start else rng.end
        return rng

    # ------------------------------------------------------------ references

    def inc_ref(self, rng: Range) -> None:
        """Adds a reference to every page of ``rng``, which must be allocated.
        O(log n + k)."""
        self.check_held(rng, "inc_ref")
        self._usage.update(rng, _add_ref)

    def dec_ref(self, rng: Range) -> list[Range]:
        """Drops a reference from every page of ``rng``, which must be
        allocated; returns the runs left without references, now reclaimable.
        Validates the whole range before changing anything. O(log n + k).
        Follows MemoryFile.DecRef in the reference design."""
        self.check_held(rng, "dec_ref")
        freed: list[Range] = []

        def drop(seg: Range, info: UsageInfo) -> UsageInfo:
            if info.refs > 1:
                return UsageInfo(info.kind, info.known_committed, info.refs - 1)
            self.allocated[info.kind] -= seg.length
            if info.known_committed:
                # Reclassify as SYSTEM until reclaimed, as the reference does.
                self.committed[info.kind] -= seg.length
                self.committed[MemoryKind.SYSTEM] += seg.length
            freed.append(seg)
            return UsageInfo(MemoryKind.SYSTEM, info.known_committed, 0)

        self._usage.update(rng, drop)
        for seg in freed:
            self._reclaimable.insert(seg, None)
        return freed

    def check_held(self, rng: Range, op: str) -> None:
        """Raises MemoryFileError unless ``rng`` is page-aligned, non-empty and
        every page of it has at least one reference. O(log n + k)."""
        start, end = rng
        if not 0 <= start < end or (start | end) & _PAGE_MASK:
            raise MemoryFileError(f"{op}: invalid range {rng}")
        pos = start  # [start, pos) is held
        for seg, info in self._usage.segments(rng):
            if seg.start > pos:
                break
            if info.refs == 0:
                raise MemoryFileError(f"{op}({rng}): pages {seg.intersect(rng)} are freed")
            pos = seg.end
        if pos < end:
            raise MemoryFileError(f"{op}({rng}): pages from {pos} on are not allocated")

    # ------------------------------------------------------- commit, reclaim

    def mark_decommitted(self, rng: Range) -> None:
        """Clears known_committed over whatever is in ``rng`` now (a hole was
        punched). O(log n + k)."""

        def clear(seg: Range, info: UsageInfo) -> UsageInfo:
            if not info.known_committed:
                return info
            self.committed[info.kind] -= seg.length
            self.known_committed -= seg.length
            return UsageInfo(info.kind, False, info.refs)

        self._usage.update(rng, clear)

    def mark_committed(self, run: Range) -> None:
        """Records that the referenced pages of ``run`` are committed (found
        resident). O(log n + k)."""

        def mark(seg: Range, info: UsageInfo) -> UsageInfo:
            if info.known_committed or info.refs == 0:
                # Freed pages are about to be reclaimed; like unallocated
                # pages, they are assumed uncommitted.
                return info
            self.committed[info.kind] += seg.length
            self.known_committed += seg.length
            return UsageInfo(info.kind, True, info.refs)

        self._usage.update(run, mark)

    def mark_reclaimed(self, rng: Range) -> None:
        """Frees reclaimable ``rng`` (its hole is punched) for allocation.
        O(log n + k). Follows MemoryFile.markReclaimed in the reference design."""
        if self._usage.gaps(rng):
            raise RuntimeError(f"reclaimed {rng} includes unallocated pages:\n{self._usage!r}")
        for seg, info in self._usage.segments(rng):
            if info != _FREED:
                raise RuntimeError(f"reclaimed {rng} has segment {seg} in state {info}")
        self._usage.remove(rng)
        self._reclaimable.remove(rng)
        self._min_unallocated = min(self._min_unallocated, rng.start)

    # ------------------------------------------------------------- checking

    def __repr__(self) -> str:
        allocated = ", ".join(f"{k.value}={v}" for k, v in self.allocated.items())
        return (
            f"allocated({allocated}) reclaimable={self.reclaimable_bytes}"
            f" segments={len(self._usage)} min_unallocated={self._min_unallocated:#x}"
        )

    def check_invariants(self, file_size: int) -> None:
        """Asserts every invariant of the usage set within a file of
        ``file_size`` bytes. O(n)."""
        self._usage.check_invariants(require_merged=True)
        self._reclaimable.check_invariants(require_merged=True)
        allocated = dict.fromkeys(MemoryKind, 0)
        committed = dict.fromkeys(MemoryKind, 0)
        freed: RangeSet[None] = marker_set()
        for seg, info in self._usage:
            assert not (seg.start | seg.end) & _PAGE_MASK, f"unaligned segment {seg}"
            assert seg.end <= file_size, f"segment {seg} beyond the file size {file_size}"
            assert info.refs >= 0, f"segment {seg}: {info}"
            if info.refs:
                allocated[info.kind] += seg.length
            else:
                assert info.kind is MemoryKind.SYSTEM, f"freed segment {seg}: {info}"
                freed.insert(seg, None)
            if info.known_committed:
                committed[info.kind] += seg.length
        assert allocated == self.allocated, f"allocated {self.allocated}, usage says {allocated}"
        assert committed == self.committed, f"committed {self.committed}, usage says {committed}"
        assert self.known_committed == sum(committed.values())
        assert list(freed) == list(self._reclaimable), "reclaimable set differs from usage"
        first_free = self._usage.first_gap_from(0, PAGE_SIZE).start
        assert first_free >= self._min_unallocated, (
            f"page {first_free:#x} is free below min_unallocated {self._min_unallocated:#x}"
        )
