"""Reads of a cached file, the fills that bring its bytes in, and readahead.

The read layer of the caching inode (see :mod:`cachesvc.core.inode_state`
for the layers and the lock order). Follows the read path of
CachingInodeOperations in the reference design (``Translate`` and
``maxFillRange``), rendered for asyncio with what a service needs more:

- A fill runs without ``data_mu``: reads of cached ranges never wait for
  it, and concurrent misses of the same range share it. A write or
  truncate that overtakes a fill marks it stale, and its bytes are dropped.
- A miss fills the whole 64 KiB extents it touches and, on sequential
  access, the bytes after it up to a readahead window that starts at
  64 KiB and doubles, bounded by the next cached page, the end of the file
  and ``MAX_FILL``; readahead keeps windows in flight ahead of a
  sequential reader, so the origin is read while the caller sends what it
  has. With ``--readahead 0`` a miss fills only its own extents.
- A fill reserves its bytes in the budget before allocating them. The
  pages it brings in belong to the readers waiting on it until each has
  mapped them or gone away (the fill's *holds*): eviction cannot take them
  in between, so concurrent cold readers never refill each other's pages.
  Readahead reserves without waiting and is bounded by the budget's room
  for it; its pages enter the eviction policy as prefetched.
- When the budget has no room (:class:`~cachesvc.core.budget.NoRoom`), a
  read can still be served pass-through (:meth:`FillingInode.read_through`):
  origin bytes copied to the caller without caching them.
"""

from __future__ import annotations

import asyncio

from cachesvc.core.budget import NoRoom
from cachesvc.core.fillplan import MIN_READAHEAD, Fill, plan_fills
from cachesvc.core.inode_state import InodeState
from cachesvc.core.mapping import Mapping, release_all
from cachesvc.core.memfile import MemoryKind
from cachesvc.core.pages import (
    page_down,
    page_range,
    page_up,
    slice_views,
)
from cachesvc.core.ranges import Range, subtract_range
from cachesvc.origins.base import OriginConflict

# How many readahead windows past the reader a completed fill looks. Two
# windows, as reads look, left the origin idle between pairs of fills that
# finished together while the reader was still sending: a cold streamed
# 64 MiB read from a 2 ms origin (benchmarks/origin_bench.py, 2026-11-22,
# 3 x 7 rounds interleaved) took a median 0.232-0.267 s with two and
# 0.204-0.227 s with three; four was no better than two.
COMPLETION_LOOKAHEAD = 3
# How often a fill follows the origin to a version our own write-backs made.
PIN_RETRIES = 3
# How often a pass-through read starts over when a write overtakes it.
THROUGH_ATTEMPTS = 5

# Fill tasks running (the event loop keeps only weak references to tasks).
# Protected by the event loop.
_running: set[asyncio.Task[None]] = set()


async def _wait_shared(fills: list[Fill]) -> None:
    """Waits for fills that other readers may share; raises the first one's
    error. Unlike gather, a waiter that is cancelled (a response whose client
    went away) leaves the fills running for the others."""
    if fills:
        await asyncio.wait([fill.done for fill in fills])
    for fill in fills:
        fill.done.result()


class FillingInode(InodeState):
    """The read layer of the caching inode."""

    __slots__ = ()

    # ------------------------------------------------------------------ reads

    async def read(self, offset: int, length: int) -> bytes:
        """Returns up to ``length`` bytes at ``offset`` (short at end of file).

        A fully cached range is copied out under ``data_mu`` without taking a
        mapping: nothing awaits while the views are in use, so no page can go
        away meanwhile. Otherwise the range is filled and mapped first, or,
        if the budget has no room, read pass-through.
        """
        data = await self.read_cached(offset, length)
        if data is not None:
            return data
        try:
            mapping = await self.map_range(offset, length)
        except NoRoom:
            return await self.read_through(offset, length)
        try:
            return mapping.tobytes()
        finally:
            await mapping.release()

    async def read_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes of ``[offset, offset+length)`` if all of it is cached
        (counted as a hit), else None and nothing counted."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        await self.data_mu.acquire_read()
        try:
            return self._copy_cached_locked(offset, length)
        finally:
            self.data_mu.release_read()

    def read_cached_now(self, offset: int, length: int) -> bytes | None:
        """Like :meth:`read_cached`, without suspending: None also when a
        writer holds data_mu.

        data_mu is not taken: the copy runs to its end without an await, so
        no writer can take the lock meanwhile, and one that waits for it
        waits no longer than it would for a reader.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        if self._data_writer():
            return None
        return self._copy_cached_locked(offset, length)

    def _copy_cached_locked(self, offset: int, length: int) -> bytes | None:
        """A copy of ``[offset, offset+length)`` clipped to the size, counted as
        a hit, or None (nothing counted) if any of it is not cached.

        Preconditions: data_mu is held (for reading suffices), or no writer
        holds it and the caller does not suspend until it has the copy.
        """
        end = min(offset + length, self.attr.size)
        if offset >= end:
            return b""
        data = self.cache_set.copy_out(self.host.memfile, Range(offset, end))
        if data is not None:
            self.host.counters.hit_bytes += end - offset
            self._touch_extents(offset, end)
            self._note_access(offset, length)
            self._read_ahead_locked(page_up(end))
        return data

    async def map_range(self, offset: int, length: int, *, pin: bool = False) -> Mapping:
        """Caches ``[offset, offset+length)`` (clipped to the size) and maps it.

        The caller must ``await mapping.release()``. A ``pin`` also takes the
        extents it covers off the eviction policy for as long as it lasts; a
        short-lived mapping (a response) leaves them there, since eviction
        passes mapped extents over anyway. Gaps are filled from the origin,
        with readahead for sequential access; fills already in flight for the
        range are shared, and no lock is held while the origin reads. Raises
        NoRoom when the budget has no room for a fill (see read_through).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        self._note_access(offset, length)
        first_pass = True
        missed = 0
        waited: list[Fill] = []
        # The request's pages that were cached while it waits for the others:
        # held, so that eviction cannot take them in between.
        held: list[Mapping] = []
        try:
            while True:
                async with self.maps_mu:
                    await self.data_mu.acquire_read()
                    try:
                        end = min(offset + length, self.attr.size)
                        if offset >= end:
                            return Mapping(self, Range(0, 0), [], offset, 0, pin, 0)
                        pages = page_range(offset, end)
                        gaps = self.cache_set.gaps(pages)
                        if first_pass:
                            self._touch_extents(offset, end)
                        if not gaps:
                            if first_pass:
                                self.host.counters.hit_bytes += end - offset
                            mapping = self._map_locked(pages, offset, end - offset, pin=pin)
                            mapping.missed = missed
                            self._read_ahead_locked(pages.end)
                            return mapping
                        if first_pass:
                            want = Range(offset, end)
                            missed = sum(g.intersect(want).length for g in gaps)
                            self.host.counters.hit_bytes += end - offset - missed
                            self.host.counters.miss_bytes += missed
                            held = [
                                self._map_locked(part, part.start, part.length, pin=False)
                                for seg, _ in self.cache_set.segments(pages)
                                for part in [seg.intersect(pages)]
                            ]
                        fills = self._start_fills_locked(gaps, pages.end)
                        for fill in fills:
                            fill.waiters += 1
                            fill.demand_end = max(fill.demand_end, pages.end)
                        waited += fills
                    finally:
                        self.data_mu.release_read()
                first_pass = False
                await _wait_shared(fills)
        finally:
            if held:
                await release_all(held)
            if waited:
                await self._leave_fills(waited)

    async def _leave_fills(self, fills: list[Fill]) -> None:
        """A reader is done waiting on ``fills``: it has mapped their pages or
        gone away. The holds of fills left without waiters are released."""
        holds: list[Mapping] = []
        for fill in fills:
            fill.waiters -= 1
            if not fill.waiters and fill.holds:
                holds += fill.holds
                fill.holds = None
        if holds:
            await release_all(holds)

    async def read_through(self, offset: int, length: int) -> bytes:
        """The bytes of ``[offset, offset+length)`` (clipped to the size), from
        the cache where cached and from the origin elsewhere, without caching
        any: a read served pass-through when the budget has no room. The
        origin bytes are counted as bypass bytes. Starts over if a write or
        truncate overtakes it; raises OriginConflict if that keeps happening.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        for _ in range(THROUGH_ATTEMPTS):
            async with self.data_mu.reading():
                end = min(offset + length, self.attr.size)
                if offset >= end:
                    return b""
                want = Range(offset, end)
                out = bytearray(want.length)
                view = memoryview(out)
                for seg, mem in self.cache_set.segments(want):
                    part = seg.intersect(want)
                    start = mem + part.start - seg.start
                    views = self.host.memfile.map_internal(Range(start, start + part.length), False)
                    pos = part.start - offset
                    for piece in views:
                        view[pos : pos + len(piece)] = piece
                        pos += len(piece)
                # Bytes at or past a buffered origin's valid end read as zeros.
                valid = self._origin_valid if self.buffered else end
                gaps = [g.intersect(Range(offset, valid)) for g in self.cache_set.gaps(want)]
                gaps = [g for g in gaps if not g.is_empty]
                pin = self._origin_etag if self.buffered else None
                fill = Fill(page_range(offset, end), through=True)
                self._fills = (*self._fills, fill)
            try:
                for gap in gaps:
                    target = [view[gap.start - offset : gap.end - offset]]
                    if await self._read_origin(gap.start, target, pin) < gap.length:
                        raise OriginConflict(f"{self.path}: origin file is shorter than expected")
            finally:
                self._fills = tuple(f for f in self._fills if f is not fill)
            if not fill.stale:
                self.host.counters.bypass_bytes += sum(g.length for g in gaps)
                return bytes(out)
        raise OriginConflict(f"{self.path} kept changing while being read")

    # -------------------------------------------------------------- readahead

    def _note_access(self, offset: int, length: int) -> None:
        """Updates the readahead window for a read. A seek drops it: a random
        read fills only its own extents. Sequential reads grow it, to at
        least 64 KiB and the read's own size, doubling each time, up to
        ``--readahead``."""
        if offset == self._ra_next:
            window = max(self._ra_window * 2, MIN_READAHEAD, page_up(length))
            window = min(window, self.host.readahead)
        else:
            window = 0
        if window != self._ra_window:
            self._ra_window = window
            self._ra_covered = 0
        self._ra_next = offset + length

    def _read_ahead_locked(self, end: int, windows: int = 2) -> None:
        """On sequential access, starts a fill (not awaited) of the next window
        once the reader (at ``end``) is within ``windows`` windows of what is
        neither cached nor being filled, so the origin is read while the
        caller sends what it has. Like the kernel's asynchronous readahead
        marker. Reads look two windows ahead; a completed fill looks
        COMPLETION_LOOKAHEAD windows ahead, so the next origin request goes
        out when the last one ends rather than when the reader next maps.
        The window shrinks to the budget's room for readahead. What was
        found covered (cached or being filled) is remembered, and a read
        whose lookahead ends inside it does not look again: a hit costs no
        walk. Pages evicted meanwhile are read when a reader reaches them.

        Preconditions: data_mu is held (for reading suffices), or no writer
        holds it and the caller does not suspend.
        """
        window = self._ra_window
        if window <= MIN_READAHEAD:
            return
        size_end = page_up(self.attr.size)
        if min(end + windows * window, size_end) <= self._ra_covered:
            return
        window = min(window, page_down(self.host.budget.readahead_room() // windows))
        if window < MIN_READAHEAD:
            return
        end = page_down(end)  # whole pages: the reader's next byte is on this one
        lookahead = Range(end, min(end + windows * window, size_end))
        if lookahead.is_empty:
            return
        missing = self.cache_set.gaps(lookahead)
        for fill in self._fills:
            if not fill.stale and not fill.through:
                missing = [p for gap in missing for p in subtract_range(gap, fill.range)]
        if not missing:
            self._ra_covered = self._covered_end(lookahead.end, size_end)
            return
        start = missing[0].start
        ahead = Range(start, min(start + window, size_end))
        plan = plan_fills(self.cache_set.gaps(ahead), self._fills, self.cache_set, size_end,
                          ahead.end, 0)  # fmt: skip
        for rng in plan.new:
            self._start_fill(rng, prefetch=True)

    def _covered_end(self, offset: int, size_end: int) -> int:
        """Where the run of pages from ``offset`` that are cached or being
        filled ends (at most ``size_end``).

        Preconditions: as for :meth:`_read_ahead_locked`.
        """
        while offset < size_end:
            found = self.cache_set.find(offset)
            if found is not None:
                offset = found[0].end
                continue
            filling = [
                f.range.end
                for f in self._fills
                if not f.stale and not f.through and f.range.start <= offset < f.range.end
            ]
            if not filling:
                break
            offset = max(filling)
        return min(offset, size_end)

    # ------------------------------------------------------------------ fills

    def _start_fills_locked(self, gaps: list[Range], request_end: int) -> list[Fill]:
        """Starts or joins fills covering ``gaps``; returns the fills to await.

        Preconditions: data_mu is held (for reading suffices).
        """
        self.data_mu.assert_held()
        # Beyond the request, a fill reads ahead only as far as the budget
        # has room for readahead.
        window = min(self._ra_window, max(0, self.host.budget.readahead_room()))
        plan = plan_fills(
            gaps, self._fills, self.cache_set, page_up(self.attr.size), request_end, window
        )
        return [*plan.joined, *(self._start_fill(rng) for rng in plan.new)]

    def _start_fill(self, rng: Range, *, prefetch: bool = False) -> Fill:
        fill = Fill(rng, prefetch=prefetch)
        self._fills = (*self._fills, fill)
        task = asyncio.create_task(self._run_fill(fill), name=f"fill {self.path} {rng}")
        _running.add(task)
        task.add_done_callback(_running.discard)
        return fill

    def _forget_fill(self, fill: Fill) -> None:
        self._fills = tuple(f for f in self._fills if f is not fill)
        self._ra_covered = 0  # it may have ended without caching its range

    async def _run_fill(self, fill: Fill) -> None:
        rng = fill.range
        budget = self.host.budget
        try:
            # Readahead nobody waits for yet takes only the room there is.
            await budget.reserve(rng.length, wait=fill.waiters > 0, prefetch=not fill.waiters)
        except NoRoom as exc:
            self._forget_fill(fill)
            fill.done.set_exception(exc)
            fill.done.exception()  # retrieved: the waiters may all be gone
            return
        reserved = rng.length

        def allocated() -> None:
            nonlocal reserved
            budget.release(reserved)
            reserved = 0

        # Bytes at or past the origin's valid end are zeros: freshly allocated
        # pages already are, so only the part below it is read.
        valid = self._origin_valid if self.buffered else self.attr.size
        want = max(0, min(rng.end, valid) - rng.start)
        pin = self._origin_etag if self.buffered else None

        async def reader(views: list[memoryview]) -> int:
            if want:
                got = await self._read_origin(rng.start, slice_views(views, 0, want), pin)
                if got < want:
                    raise OriginConflict(f"{self.path}: origin file is shorter than expected")
            return rng.length

        memfile = self.host.memfile
        try:
            memory, _ = await memfile.allocate_and_fill(
                rng.length,
                MemoryKind.PAGE_CACHE,
                reader,
                prefault=self.host.origin.capabilities.prefault_fills,
                allocated=allocated,
            )
        except Exception as exc:
            self._forget_fill(fill)
            if fill.stale or (self._resizing and isinstance(exc, OriginConflict)):
                # Our own truncate cut the origin short under a fill whose
                # bytes would be dropped anyway: its waiters look again.
                fill.done.set_result(None)
                return
            # Waiters get the error; retrieve it here too, since they may all be gone.
            fill.done.set_exception(exc)
            fill.done.exception()
            return
        except BaseException:
            self._forget_fill(fill)
            fill.done.cancel()
            raise
        finally:
            if reserved:
                budget.release(reserved)
        try:
            async with self.maps_mu, self.data_mu.writing():
                self._forget_fill(fill)
                if fill.stale:
                    memfile.dec_ref(memory)
                    budget.note_released()
                else:
                    self._insert_filled_locked(fill, memory)
        finally:
            if not fill.done.done():
                fill.done.set_result(None)

    def _insert_filled_locked(self, fill: Fill, memory: Range) -> None:
        """Caches what ``fill`` brought in (``memory``) where it is still
        uncached, holds it for the fill's waiters, and reads further ahead.

        Preconditions: maps_mu is held; data_mu is held for writing.
        """
        self.maps_mu.assert_held()
        self.data_mu.assert_held(write=True)
        memfile = self.host.memfile
        limit = page_up(self.attr.size)
        kept = self.cache_set.fill(memfile, fill.range, memory.start, limit)
        self.host.counters.cached_bytes += sum(r.length for r in kept)
        if sum(r.length for r in kept) < memory.length:
            self.host.budget.note_released()
        # What a reader asked for is used, and held for the waiters until they
        # have mapped it; what lies beyond it is readahead.
        wanted = Range(0, fill.demand_end if fill.waiters else 0)
        demanded = [part for r in kept for part in [r.intersect(wanted)] if not part.is_empty]
        self._track_extents_locked(demanded)
        self._track_extents_locked(
            (r.intersect(Range(wanted.end, r.end)) for r in kept), prefetched=True
        )
        if demanded:
            fill.holds = [self._map_locked(p, p.start, p.length, pin=False) for p in demanded]
        # Keep the origin busy while the reader sends what it has.
        self._read_ahead_locked(self._ra_next, COMPLETION_LOOKAHEAD)

    async def _read_origin(self, offset: int, views: list[memoryview], pin: str | None) -> int:
        """Reads origin bytes of version ``pin`` into ``views``.

        If our own write-back replaced that version meanwhile (buffered
        origins upload whole objects), reads from the version it made
        instead: a fill reads only pages that are not cached, so not dirty,
        and a write-back changes only dirty bytes. Other changes of the
        origin's version raise OriginConflict.
        """
        origin = self.host.origin
        for _ in range(PIN_RETRIES):
            try:
                return await origin.read_into(self.path, offset, views, pin)
            except OriginConflict:
                newer = await self._version_written_since(pin)
                if newer is None:
                    raise
                pin = newer
        return await origin.read_into(self.path, offset, views, pin)

    async def _version_written_since(self, pin: str | None) -> str | None:
        """The origin version our own write-back made after ``pin``, waiting
        for an upload in progress; None if there is none."""
        uploading = self._uploading
        if uploading is not None and (made := await uploading) is not None and made != pin:
            return made
        current = self._origin_etag
        return current if current is not None and current != pin else None


__all__ = ["COMPLETION_LOOKAHEAD", "FillingInode"]
