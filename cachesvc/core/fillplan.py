"""Fills: origin reads in flight for page-aligned ranges of one file, and the
planning of new ones (sharing with fills already in flight, readahead).

Follows maxFillRange in the reference design (a 64 KiB window), aligned to
the extents the eviction policy tracks: a miss is filled by the whole
extents it touches (so that what is cached and evicted is whole extents,
as a simulation of the policy at extent granularity assumes), together
with the bytes after it up to a readahead window, bounded by the next
cached page, the end of the file and MAX_FILL. The fills are run by the read
layer of the inode (:mod:`cachesvc.core.fills`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NamedTuple

from cachesvc.core.cacheset import FileRangeSet
from cachesvc.core.mapping import Mapping
from cachesvc.core.pages import EXTENT_SIZE, extent_down, extent_up
from cachesvc.core.ranges import Range, subtract_range

# The reference design's fill window (maxFillRange): 64 KiB.
MIN_READAHEAD = 64 << 10
# The largest single fill; larger reads are filled in several pieces.
MAX_FILL = 32 << 20


class Fill:
    """An origin read in flight for a page-aligned file range."""

    __slots__ = ("demand_end", "done", "holds", "prefetch", "range", "stale", "through", "waiters")

    def __init__(self, rng: Range, *, prefetch: bool = False, through: bool = False) -> None:
        self.range = rng  # Immutable.
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.prefetch = prefetch  # started by readahead, for no reader. Immutable.
        self.through = through  # a pass-through read: nothing is cached. Immutable.
        self.stale = False  # set when a write or truncate overtook the fill
        self.waiters = 0  # readers waiting on it, or that have yet to map its pages
        # Where the bytes some reader asked for end; what lies beyond is
        # readahead (admitted to the policy as prefetched).
        self.demand_end = rng.start
        self.holds: list[Mapping] | None = None  # its pages, until the waiters map them


class FillPlan(NamedTuple):
    """What a read must wait for: fills already in flight, and new ones to start."""

    joined: list[Fill]
    new: list[Range]


def plan_fills(
    gaps: Sequence[Range],
    in_flight: Sequence[Fill],
    cached: FileRangeSet,
    size_end: int,
    request_end: int,
    window: int,
) -> FillPlan:
    """Plans the fills covering ``gaps`` (uncached, page-aligned).

    Parts of a gap that a live fill already covers join that fill; the rest
    becomes new fills, each widened to whole extents and extended by the
    readahead ``window`` past ``request_end``, but never over a cached page,
    another live fill, or ``size_end`` (the page-rounded file size), and
    cut into MAX_FILL pieces.
    """
    live = [f for f in in_flight if not f.stale and not f.through]
    plan = FillPlan([], [])
    for gap in gaps:
        pieces = [gap]
        for fill in live:
            if fill.range.overlaps(gap):
                if fill not in plan.joined:
                    plan.joined.append(fill)
                pieces = [p for piece in pieces for p in subtract_range(piece, fill.range)]
        for piece in pieces:
            bound = cached.find_gap(piece.start)
            assert bound is not None, f"{piece} is not a gap"
            low, high = bound.start, min(bound.end, size_end)
            for fill in live:
                if fill.range.end <= piece.start:
                    low = max(low, fill.range.end)
                elif fill.range.start >= piece.end:
                    high = min(high, fill.range.start)
            # A read of an extent or more starts its fill where it starts: the
            # bytes before it are as likely to be wanted as any others.
            small = request_end - piece.start < EXTENT_SIZE
            start = max(extent_down(piece.start), low) if small else piece.start
            end = min(
                extent_up(max(piece.end, request_end + window)),
                high,
                start + max(MAX_FILL, piece.end - start),
            )
            end = max(end, piece.end)
            for pos in range(start, end, MAX_FILL):
                plan.new.append(Range(pos, min(pos + MAX_FILL, end)))
    return plan
