"""Sets of disjoint half-open ranges, each mapped to a value.

Follows the segment sets of the reference design (gVisor's ``segment.Set``
as used for FileRangeSet, the usage set and the dirty set), rendered on a
``sortedcontainers.SortedDict`` that maps each segment's start to
``(end, value)``. A *segment* is a maximal stored range with one value; the
offsets no segment covers form the *gaps*, bounded by 0 and MAX_OFFSET.

A ``RangePolicy`` gives the value semantics: ``merge`` decides whether two
adjacent segments become one (and with what value), ``split`` gives the
values of the two halves when a segment is cut. Operations that change
values (``update``) first cut the segments straddling
the edges of their range (``isolate``), then merge what became mergeable
around it (``merge_adjacent``), so a set whose every operation goes through
them stays fully merged. ``insert`` merges the new segment with both
neighbours.

Ranges are ``[start, end)`` with ``0 <= start <= end <= MAX_OFFSET``; public
operations raise ValueError for anything else. Complexities are in the
docstrings: n is the number of segments, k the number of segments an
operation touches; each segment it creates or deletes (by a cut, a merge or
a removal) costs a further SortedDict insertion or deletion, O(log n)
amortized.

Speed. SortedDict's positional API (``bisect_*``, ``islice``, indexing its
views) walks a positional index tree in Python, ~2 us a call, and once built
that tree is maintained by every later insertion and deletion. This module
never uses positions: it finds neighbours with two C bisects over the
underlying SortedList's sorted sublists (``_lists``, their maxima ``_maxes``;
unchanged since sortedcontainers 1.x, read here and nowhere else, in
``_floor``, ``_after`` and ``_starts``) and changes the set only through the
public dict interface, so the index tree is never built. ``check_invariants``
verifies those reads against the public iteration.

A RangeSet has no lock of its own: its owner serializes access (the event
loop, or the owner's lock). Every field is protected by the owner's
serialization. Callbacks (policy methods, ``fn`` of ``update``) must not modify the set
they are called from.
"""

from __future__ import annotations

import enum
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

from sortedcontainers import SortedDict

__all__ = [
    "MAX_OFFSET",
    "MarkerPolicy",
    "Range",
    "RangePolicy",
    "RangeSet",
    "marker_set",
    "subtract_range",
    "union_ranges",
]

MAX_OFFSET: Final[int] = 2**63 - 1
"""The end of the offset space: no range ends beyond it, the last gap ends at it."""

# How many segments repr() shows before eliding the rest.
_REPR_SEGMENTS: Final = 32

V = TypeVar("V")


class Range(NamedTuple):
    """A half-open range of offsets ``[start, end)``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """Number of offsets in the range."""
        return self.end - self.start

    @property
    def is_empty(self) -> bool:
        """Whether the range holds no offset."""
        return self.end <= self.start

    def contains(self, offset: int) -> bool:
        """Whether ``offset`` lies in the range."""
        return self.start <= offset < self.end

    def overlaps(self, other: Range) -> bool:
        """Whether the ranges share at least one offset (an empty range overlaps nothing)."""
        start = self.start if self.start > other.start else other.start
        end = self.end if self.end < other.end else other.end
        return start < end

    def intersect(self, other: Range) -> Range:
        """The offsets in both ranges; empty (possibly elsewhere) if they do not overlap."""
        start = self.start if self.start > other.start else other.start
        end = self.end if self.end < other.end else other.end
        return Range(start, end if end > start else start)

    def is_superset_of(self, other: Range) -> bool:
        """Whether ``other`` lies within this range (an empty ``other`` included)."""
        return self.start <= other.start and other.end <= self.end

    def well_formed(self) -> bool:
        """Whether ``0 <= start <= end <= MAX_OFFSET``."""
        return 0 <= self.start <= self.end <= MAX_OFFSET

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


class RangePolicy(Protocol[V]):
    """The value semantics of a RangeSet."""

    def merge(self, left: Range, left_value: V, right: Range, right_value: V) -> V | None:
        """The value of ``left`` and ``right`` merged (left.end == right.start), or
        None to keep them apart."""
        ...

    def split(self, rng: Range, value: V, at: int) -> tuple[V, V]:
        """The values of ``[rng.start, at)`` and ``[at, rng.end)`` when ``rng`` is cut at
        ``at`` (``rng.start < at < rng.end``)."""
        ...


class _Apart(enum.Enum):
    """The answer "keep apart" of RangeSet._merged, distinct from every value."""

    APART = enum.auto()


_APART: Final = _Apart.APART


def _malformed(start: int, end: int) -> ValueError:
    return ValueError(f"malformed range [{start}, {end}): need 0 <= start <= end <= MAX_OFFSET")


class RangeSet(Generic[V]):
    """Disjoint half-open segments mapped to values, merged and split by a policy."""

    __slots__ = ("_always_merge", "_lists", "_map", "_maxes", "_policy", "_total")

    def __init__(self, policy: RangePolicy[V]) -> None:
        # Decides merging and splitting of values. Immutable.
        self._policy = policy
        # True for MarkerPolicy: its values are None, so its merge cannot
        # answer with a value distinct from "keep apart"; markers always merge.
        # Immutable.
        self._always_merge = isinstance(policy, MarkerPolicy)
        # Segment start -> (segment end, value). Protected by the owner.
        self._map: SortedDict[int, tuple[int, V]] = SortedDict()
        # _map's SortedList of segment starts: its sorted sublists and their
        # maxima, changed in place by _map, read only (see "Speed" above).
        # Immutable (the list objects themselves).
        inner = self._map._list  # type: ignore[attr-defined]
        self._lists: list[list[int]] = inner._lists
        self._maxes: list[int] = inner._maxes
        # Sum of the segments' lengths. Protected by the owner.
        self._total = 0

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Number of segments. O(1)."""
        return len(self._map)

    def __bool__(self) -> bool:
        """Whether any segment exists. O(1)."""
        return bool(self._map)

    def __iter__(self) -> Iterator[tuple[Range, V]]:
        """Yields every ``(segment, value)`` in ascending order. O(n) in all."""
        for start, (end, value) in self._map.items():
            yield Range(start, end), value

    @property
    def total_length(self) -> int:
        """Sum of the segments' lengths. O(1)."""
        return self._total

    def find(self, offset: int) -> tuple[Range, V] | None:
        """The segment containing ``offset`` and its value, or None. O(log n)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        start = self._floor(offset)
        if start >= 0:
            end, value = self._map[start]
            if offset < end:
                return Range(start, end), value
        return None

    def find_gap(self, offset: int) -> Range | None:
        """The maximal gap containing ``offset``, or None if a segment covers it (or
        ``offset >= MAX_OFFSET``). Gaps are bounded by 0 and MAX_OFFSET. O(log n)."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if offset >= MAX_OFFSET:
            return None
        gap_start = 0
        prev_start = self._floor(offset)
        if prev_start >= 0:
            gap_start = self._map[prev_start][0]
            if offset < gap_start:
                return None
        next_start = self._after(offset)
        return Range(gap_start, next_start if next_start >= 0 else MAX_OFFSET)

    def segments(self, rng: Range) -> list[tuple[Range, V]]:
        """The segments overlapping ``rng``, unclipped, ascending, with their values.

        Empty for an empty ``rng``. O(log n + k).
        """
        start, end = rng
        if not 0 <= start <= end <= MAX_OFFSET:
            raise _malformed(start, end)
        out: list[tuple[Range, V]] = []
        if start == end:
            return out
        m = self._map
        first = self._floor(start)
        if first < 0 or m[first][0] <= start:
            first = start
        for seg_start in self._starts(first, end):
            seg_end, value = m[seg_start]
            out.append((Range(seg_start, seg_end), value))
        return out

    def gaps(self, rng: Range) -> list[Range]:
        """The gaps inside ``rng``, clipped to it, ascending.

        Empty for an empty ``rng``. O(log n + k).
        """
        start, end = rng
        if not 0 <= start <= end <= MAX_OFFSET:
            raise _malformed(start, end)
        out: list[Range] = []
        if start == end:
            return out
        m = self._map
        pos = start  # everything in [start, pos) is accounted for
        prev_start = self._floor(start)
        if prev_start >= 0:
            prev_end = m[prev_start][0]
            if prev_end > pos:
                pos = prev_end
        for seg_start in self._starts(pos, end):
            if seg_start > pos:
                out.append(Range(pos, seg_start))
            pos = m[seg_start][0]
        if pos < end:
            out.append(Range(pos, end))
        return out

    def first_gap_from(self, offset: int, length: int, alignment: int = 1) -> Range:
        """The first ``[s, s + length)`` no segment overlaps, with ``s >= offset`` and
        ``s % alignment == 0``.

        ``length`` and ``alignment`` must be positive. Raises ValueError if no
        such range ends by MAX_OFFSET. O(log n + k), k the segments skipped.
        """
        # Follows findUnallocatedRange in the reference design.
        if offset < 0 or length < 1 or alignment < 1:
            raise ValueError(
                f"first_gap_from: need offset >= 0, length >= 1, alignment >= 1; "
                f"got {offset}, {length}, {alignment}"
            )
        pos = -(-offset // alignment) * alignment
        m = self._map
        while True:
            # The segment covering pos, else the next one if it leaves too little room:
            # either way the answer starts after it.
            seg_start = self._floor(pos)
            if seg_start < 0 or m[seg_start][0] <= pos:
                seg_start = self._after(pos)
                if seg_start < 0 or seg_start - pos >= length:
                    break
            pos = -(-m[seg_start][0] // alignment) * alignment
        if pos + length > MAX_OFFSET:
            raise ValueError(f"first_gap_from({offset}, {length}, {alignment}): no room")
        return Range(pos, pos + length)

    # ----------------------------------------------------------- mutation

    def insert(self, rng: Range, value: V) -> Range:
        """Adds the segment ``rng`` -> ``value`` and returns the segment that holds it
        after merging with its neighbours through the policy.

        ``rng`` must be non-empty and lie in a gap, else ValueError.
        O(log n).
        """
        start, end = rng
        if not 0 <= start < end <= MAX_OFFSET:
            if start == end:
                raise ValueError(f"insert of empty range [{start}, {end})")
            raise _malformed(start, end)
        m = self._map
        next_start = self._after(start)
        if 0 <= next_start < end:
            raise ValueError(f"insert [{start}, {end}): overlaps segment at {next_start}")
        prev_start = self._floor(start)
        if prev_start >= 0:
            prev_end, prev_value = m[prev_start]
            if prev_end > start:
                raise ValueError(
                    f"insert [{start}, {end}): overlaps segment [{prev_start}, {prev_end})"
                )
            if prev_end == start:
                merged = self._merged(prev_start, start, end, prev_value, value)
                if merged is not _APART:
                    start = prev_start
                    value = merged
        if next_start == end:
            next_end, next_value = m[next_start]
            merged = self._merged(start, end, next_end, value, next_value)
            if merged is not _APART:
                del m[next_start]
                end = next_end
                value = merged
        m[start] = (end, value)
        self._total += rng[1] - rng[0]
        return Range(start, end)

    def isolate(self, rng: Range) -> None:
        """Cuts (through the policy) the segments straddling ``rng.start`` or
        ``rng.end``, so that every segment lies either within ``rng`` or outside it.

        No-op for an empty ``rng``. O(log n).
        """
        start, end = rng
        if not 0 <= start <= end <= MAX_OFFSET:
            raise _malformed(start, end)
        if start != end:
            self._split_at(start)
            self._split_at(end)

    def remove(self, rng: Range) -> list[tuple[Range, V]]:
        """Removes all coverage in ``rng``, cutting segments straddling its edges,
        and returns the removed pieces (within ``rng``) with their values, ascending.

        No-op for an empty ``rng``. O(log n + k).
        """
        start, end = rng
        if not 0 <= start <= end <= MAX_OFFSET:
            raise _malformed(start, end)
        removed: list[tuple[Range, V]] = []
        if start == end:
            return removed
        self._split_at(start)
        self._split_at(end)
        m = self._map
        for seg_start in self._starts(start, end):
            seg_end, value = m.pop(seg_start)
            removed.append((Range(seg_start, seg_end), value))
            self._total -= seg_end - seg_start
        return removed

    def update(self, rng: Range, fn: Callable[[Range, V], V]) -> None:
        """Replaces the value of every segment within ``rng`` by ``fn(segment, value)``,
        after isolating ``rng``; gaps are skipped. Then merges around ``rng``.

        ``fn`` sees each piece within ``rng`` in ascending order. If ``fn``
        raises, the pieces before keep their new values and the set stays
        valid and merged. No-op for an empty ``rng``. O(log n + k).
        """
        start, end = rng
        if not 0 <= start <= end <= MAX_OFFSET:
            raise _malformed(start, end)
        if start == end:
            return
        self._split_at(start)
        self._split_at(end)
        m = self._map
        try:
            for seg_start in self._starts(start, end):
                seg_end, value = m[seg_start]
                m[seg_start] = (seg_end, fn(Range(seg_start, seg_end), value))
        finally:
            self._merge_touching(start, end)

    def merge_adjacent(self, rng: Range) -> None:
        """Merges, through the policy, every pair of adjacent segments that both touch
        the closed interval ``[rng.start, rng.end]``.

        So segments just outside ``rng`` that end at ``rng.start`` or begin at
        ``rng.end`` take part; for an empty ``rng`` the only candidate pair is
        the one meeting at ``rng.start``. O(log n + k).
        """
        start, end = rng
        if not 0 <= start <= end <= MAX_OFFSET:
            raise _malformed(start, end)
        self._merge_touching(start, end)

    def clear(self) -> None:
        """Removes every segment. O(n)."""
        self._map.clear()
        self._total = 0

    # ----------------------------------------------------------- checking

    def check_invariants(self, *, require_merged: bool = False) -> None:
        """Raises AssertionError unless segments are sorted, well formed, non-empty and
        disjoint and total_length is their total; with ``require_merged``, also
        unless no two adjacent segments are mergeable. O(n)."""
        total = 0
        prev: tuple[int, int, V] | None = None
        for start, (end, value) in self._map.items():
            if not 0 <= start < end <= MAX_OFFSET:
                raise AssertionError(f"bad segment [{start}, {end}) in {self!r}")
            if prev is not None:
                prev_start, prev_end, prev_value = prev
                if start < prev_end:
                    raise AssertionError(f"segment [{start}, {end}) overlaps its predecessor")
                if (
                    require_merged
                    and start == prev_end
                    and self._merged(prev_start, start, end, prev_value, value) is not _APART
                ):
                    raise AssertionError(
                        f"segments [{prev_start}, {prev_end}) and [{start}, {end}) are mergeable"
                    )
            total += end - start
            prev = (start, end, value)
        if total != self._total:
            raise AssertionError(f"total_length is {self._total}, segments sum to {total}")
        starts = list(self._map)
        if self._starts(0, MAX_OFFSET) != starts or self._maxes != [sub[-1] for sub in self._lists]:
            raise AssertionError("the SortedList internals read here disagree with the set")

    def __repr__(self) -> str:
        parts = []
        for count, (start, (end, value)) in enumerate(self._map.items()):
            if count == _REPR_SEGMENTS:
                parts.append(f"... {len(self._map) - count} more")
                break
            parts.append(f"[{start}, {end})" if value is None else f"[{start}, {end})={value!r}")
        return f"RangeSet({', '.join(parts)})"

    # ----------------------------------------------------------- internals

    def _merged(self, start: int, mid: int, end: int, left: V, right: V) -> V | _Apart:
        """The value of ``[start, mid)`` -> left merged with ``[mid, end)`` -> right,
        or _APART if the policy keeps them apart."""
        if self._always_merge:
            return left
        merged = self._policy.merge(Range(start, mid), left, Range(mid, end), right)
        return _APART if merged is None else merged

    def _floor(self, offset: int) -> int:
        """The greatest segment start <= ``offset``, or -1. O(log n)."""
        maxes = self._maxes
        pos = bisect_right(maxes, offset)
        if pos < len(maxes):
            sub = self._lists[pos]
            idx = bisect_right(sub, offset)
            if idx:
                return sub[idx - 1]
        return maxes[pos - 1] if pos else -1

    def _after(self, offset: int) -> int:
        """The least segment start > ``offset``, or -1. O(log n)."""
        maxes = self._maxes
        pos = bisect_right(maxes, offset)
        if pos == len(maxes):
            return -1
        sub = self._lists[pos]
        return sub[bisect_right(sub, offset)]

    def _starts(self, lo: int, hi: int) -> list[int]:
        """The segment starts in ``[lo, hi)``, ascending, as a new list (so the set
        may change while the caller walks it). O(log n + k), k of it in C."""
        lists = self._lists
        maxes = self._maxes
        first = bisect_left(maxes, lo)
        if first == len(maxes):
            return []
        last = bisect_left(maxes, hi)  # the sublist holding hi's position
        sub = lists[first]
        if first == last:
            return sub[bisect_left(sub, lo) : bisect_left(sub, hi)]
        out = sub[bisect_left(sub, lo) :]
        for sub in islice(lists, first + 1, last):
            out += sub
        if last < len(lists):
            sub = lists[last]
            out += sub[: bisect_left(sub, hi)]
        return out

    def _split_at(self, at: int) -> None:
        """Cuts the segment strictly straddling ``at``, if any, through the policy.
        O(log n)."""
        start = self._floor(at - 1)
        if start >= 0:
            m = self._map
            end, value = m[start]
            if at < end:
                left, right = self._policy.split(Range(start, end), value, at)
                m[start] = (at, left)
                m[at] = (end, right)

    def _merge_touching(self, start: int, end: int) -> None:
        """merge_adjacent for a validated range. O(log n + k)."""
        m = self._map
        first = self._floor(start - 1)
        if first < 0 or m[first][0] < start:
            first = start
        run = self._starts(first, end + 1)
        if len(run) < 2:
            return
        cur_start = run[0]
        cur_end, cur_value = m[cur_start]
        changed = False
        for seg_start in islice(run, 1, None):
            seg_end, value = m[seg_start]
            if seg_start == cur_end:
                merged = self._merged(cur_start, seg_start, seg_end, cur_value, value)
                if merged is not _APART:
                    del m[seg_start]
                    cur_end = seg_end
                    cur_value = merged
                    changed = True
                    continue
            if changed:
                m[cur_start] = (cur_end, cur_value)
                changed = False
            cur_start, cur_end, cur_value = seg_start, seg_end, value
        if changed:
            m[cur_start] = (cur_end, cur_value)


# ------------------------------------------------------------------ markers


class MarkerPolicy:
    """Plain membership: values are None and adjacent segments always merge.

    RangeSet recognizes this policy and merges without asking it: a merged
    value of None would read as "keep apart".
    """

    __slots__ = ()

    def merge(self, left: Range, left_value: None, right: Range, right_value: None) -> None:
        return None

    def split(self, rng: Range, value: None, at: int) -> tuple[None, None]:
        return None, None


def marker_set() -> RangeSet[None]:
    """A set of plain ranges (e.g. evictable ranges)."""
    return RangeSet(_MARKER_POLICY)


_MARKER_POLICY: Final = MarkerPolicy()


def subtract_range(rng: Range, cut: Range) -> list[Range]:
    """``rng`` minus ``cut``: zero, one or two non-empty ranges, in order."""
    out = []
    if cut.start > rng.start:
        out.append(Range(rng.start, min(rng.end, cut.start)))
    if cut.end < rng.end:
        out.append(Range(max(rng.start, cut.end), rng.end))
    return [r for r in out if not r.is_empty]


def union_ranges(ranges: Iterable[Range]) -> list[Range]:
    """The sorted union of ``ranges``, with overlapping and adjacent ones merged."""
    merged: list[Range] = []
    for rng in sorted(ranges):
        if merged and rng.start <= merged[-1].end:
            merged[-1] = Range(merged[-1].start, max(merged[-1].end, rng.end))
        elif not rng.is_empty:
            merged.append(rng)
    return merged
