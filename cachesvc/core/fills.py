"""Fills: origin reads in flight for page-aligned ranges of one file, and the
planning of new ones (sharing with fills already in flight, readahead).

Follows maxFillRange in the reference design: a miss is filled together
with the bytes after it, up to a readahead window that starts at 64 KiB and
doubles on sequential access, bounded by the next cached page and the end
of the file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from cachesvc.core.ranges import Range, RangeSet, subtract_range

# The reference design's default fill window (maxFillRange): 64 KiB.
MIN_READAHEAD = 64 << 10
# The largest single fill; larger reads are filled in several pieces.
MAX_FILL = 32 << 20


@dataclass(slots=True)
class Fill:
    """An origin read in flight for a page-aligned file range."""

    range: Range
    done: asyncio.Future[None]
    stale: bool = False  # set when a write or truncate overtook the fill


@dataclass(slots=True)
class FillPlan:
    """What a read must wait for: fills already in flight, and new ones to start."""

    joined: list[asyncio.Future[None]]
    new: list[Range]


def plan_fills(
    gaps: Sequence[Range],
    in_flight: Sequence[Fill],
    cached: RangeSet[int],
    size_end: int,
    request_end: int,
    window: int,
) -> FillPlan:
    """Plans the fills covering ``gaps`` (uncached, page-aligned).

    Parts of a gap that a live fill already covers join that fill; the rest
    becomes new fills, each extended by the readahead ``window`` past
    ``request_end``, but never over a cached page, another fill, or
    ``size_end`` (the page-rounded file size), and cut into MAX_FILL pieces.
    """
    plan = FillPlan([], [])
    for gap in gaps:
        pieces = [gap]
        for fill in in_flight:
            if fill.stale or not fill.range.overlaps(gap):
                continue
            plan.joined.append(fill.done)
            pieces = [p for piece in pieces for p in subtract_range(piece, fill.range)]
        for piece in pieces:
            bound = cached.find_gap(piece.start)
            limit = min(
                bound.end if bound is not None else piece.end,
                size_end,
                max(piece.end, request_end + window),
                piece.start + max(MAX_FILL, piece.length),
            )
            for fill in in_flight:
                if fill.range.start >= piece.end:
                    limit = min(limit, fill.range.start)
            end = max(piece.end, limit)
            for start in range(piece.start, end, MAX_FILL):
                plan.new.append(Range(start, min(start + MAX_FILL, end)))
    return plan
