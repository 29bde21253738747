"""CachingInode: one cached origin file.

Follows CachingInodeOperations in the reference design (inode_cached.go),
rendered for asyncio, with the changes DESIGN.md asks for: fills run outside
``data_mu`` so they never block reads of cached ranges, concurrent misses
share one origin read, a failed write-back keeps its data dirty, and cached
bytes can be handed to a socket as a *mapping*.

Lock order:
    CachingInode.writeback_mu
      CachingInode.attr_mu
        CachingInode.maps_mu
          CachingInode.data_mu

Invariants (protected as the fields say):
  - ``cache`` segments are page-aligned file ranges; cached bytes at or past
    ``size`` are zero.
  - Every cached range that is not mapped is registered evictable with the
    MemoryFile; mapped ranges are unevictable.
  - Each cache segment holds one MemoryFile reference on its memory; each
    Mapping holds one more on the memory it covers until released.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cachesvc.core.fills import MIN_READAHEAD, Fill, plan_fills
from cachesvc.core.locks import OrderedLock, RWLock
from cachesvc.core.mapping import Mapping, MemoryPieces
from cachesvc.core.memfile import MemoryKind
from cachesvc.core.pages import (
    copy_into_views,
    page_down,
    page_range,
    page_up,
    slice_views,
)
from cachesvc.core.ranges import (
    DirtyInfo,
    Range,
    dirty_set,
    file_range_set,
    ref_count_set,
    subtract_range,
    union_ranges,
)
from cachesvc.core.writeback import DirtySnapshot
from cachesvc.origins.base import OriginConflict, OriginError, OriginStat, OriginUnsupported

if TYPE_CHECKING:
    from cachesvc.core.cache import FileCache

log = logging.getLogger("cachesvc.inode")

# A page-aligned end beyond any file.
_END = 1 << 62
# How many readahead windows past the reader a completed fill looks. Two
# windows, as reads look, left the origin idle between pairs of fills that
# finished together while the reader was still sending: a cold streamed
# 64 MiB read from a 2 ms origin (benchmarks/origin_bench.py, 2026-11-22,
# 3 x 7 rounds interleaved) took a median 0.232-0.267 s with two and
# 0.204-0.227 s with three; four was no better than two.
COMPLETION_LOOKAHEAD = 3
# Local changes remembered for readers of older versions (unchanged_since):
# a reader that more changes passed meanwhile starts again.
CHANGES_KEPT = 64
# How often a fill follows the origin to a version our own write-backs made.
PIN_RETRIES = 3


@dataclass(slots=True)
class Attributes:
    """Attributes of a cached file; see CachingInode for protection."""

    size: int
    mtime: float
    etag_base: str  # origin version the cached content started from
    version: int = 0  # local modifications since etag_base
    etag: str = field(default="")  # strong ETag shown to clients

    def refresh_etag(self) -> None:
        digest = hashlib.blake2b(f"{self.etag_base}/{self.version}".encode(), digest_size=12)
        self.etag = digest.hexdigest()


class CachingInode:
    """One cached file: attributes, cached pages, dirty ranges and mappings."""

    def __init__(self, cache: FileCache, path: str, stat: OriginStat) -> None:
        self.cache = cache  # Immutable.
        self.path = path  # Immutable.
        self.origin = cache.origin  # Immutable.
        self.memfile = cache.memfile  # Immutable.
        self._buffered = not self.origin.capabilities.partial_writes  # Immutable.

        self.writeback_mu = OrderedLock("CachingInode.writeback_mu", 0, self)
        self.attr_mu = OrderedLock("CachingInode.attr_mu", 1, self)
        self.maps_mu = OrderedLock("CachingInode.maps_mu", 2, self)
        self.data_mu = RWLock("CachingInode.data_mu", 3, self)

        # attr.size: reading requires attr_mu or data_mu; changing it requires
        # both (data_mu for writing). Other attributes are protected by attr_mu
        # and are also changed only with data_mu held for writing.
        self.attr = Attributes(size=stat.size, mtime=stat.mtime, etag_base=stat.etag)
        self.attr.refresh_etag()
        # Write generation of the newest size change not yet at the origin,
        # or None. Protected by attr_mu.
        self._size_dirty_gen: int | None = None
        # The origin's current version as we know it (None: re-learn at the
        # next revalidation, after our own in-place writes). Protected by attr_mu.
        self._origin_etag: str | None = stat.etag
        # Buffered origins only: origin bytes at or past this offset are stale
        # (truncated away here) and read as zeros. Protected by data_mu.
        self._origin_valid = stat.size
        # Lowest truncation since the current write-back took its snapshot.
        # Protected by data_mu.
        self._truncated_to: int | None = None
        # Last write-back failure, for reports. Protected by attr_mu.
        self.last_error: OriginError | None = None
        # Monotonic time the oldest dirty data appeared, or None. Protected by data_mu.
        self.dirty_since: float | None = None

        # File range -> memory offset. Protected by data_mu.
        self.cache_set = file_range_set()
        # Cached ranges newer than the origin. Protected by data_mu.
        self.dirty = dirty_set()
        # Mapping counts per file range. Protected by maps_mu.
        self.mappings = ref_count_set()
        # Fills in flight, in start order. Added with data_mu held, removed with
        # it held for writing, or on failure; list changes never span an await.
        self._fills: list[Fill] = []
        self._fill_tasks: set[asyncio.Task[None]] = set()
        # Generation of the newest write. Protected by data_mu.
        self._write_gen = 0
        # Bumped by every eviction call and unpin: a response mapping released
        # after it re-registers its pages as evictable. Protected by the event loop.
        self._evictability_gen = 0
        # Readahead state (only a hint; races are harmless). Protected by the event loop.
        self._ra_next = -1
        self._ra_window = MIN_READAHEAD
        # Requests using this inode (FileCache.open). Protected by the event loop.
        self.users = 0
        # Truncates of a written-through origin in progress. Protected by the
        # event loop.
        self._resizing = 0
        # Buffered origins, while a write-back replaces the origin's object:
        # resolved with the version it made once the upload is done (None if
        # it failed), until _origin_etag says so too. Fills pinned to the old
        # version wait for it (_read_origin). Protected by the event loop.
        self._uploading: asyncio.Future[str | None] | None = None
        # Bumped when the content is replaced by another origin version, whose
        # attr.version starts again at 0. Protected by data_mu.
        self.epoch = 0
        # (attr.version made, file range whose bytes it changed) of the latest
        # local changes, oldest first; cleared with each new epoch. Lets a
        # reader of an older version tell whether its bytes changed
        # (unchanged_since). Protected by data_mu.
        self._changes: collections.deque[tuple[int, Range]] = collections.deque(maxlen=CHANGES_KEPT)

    def __repr__(self) -> str:
        return (
            f"CachingInode({self.path!r}, size={self.attr.size},"
            f" cached={self.cache_set.total_length}, dirty={self.dirty.total_length},"
            f" mapped={self.mappings.total_length},"
            f" fills={len(self._fills)})"
        )

    # ------------------------------------------------------------------ state

    @property
    def is_idle(self) -> bool:
        """True when nothing holds this inode: it may be forgotten."""
        return (
            self.users == 0
            and not self.cache_set
            and not self.dirty
            and not self.mappings
            and not self._fills
            and self._size_dirty_gen is None
            and not self.attr_mu.locked()
            and not self.writeback_mu.locked()
            and not self.data_mu.held
        )

    @property
    def has_dirty(self) -> bool:
        return bool(self.dirty) or self._size_dirty_gen is not None

    def stats(self) -> dict[str, object]:
        return {
            "path": self.path,
            "size": self.attr.size,
            "cached_bytes": self.cache_set.total_length,
            "dirty_bytes": self.dirty.total_length,
            "mapped_bytes": self.mappings.total_length,
            "etag": self.attr.etag,
            "last_error": str(self.last_error) if self.last_error else None,
        }

    def check_invariants(self) -> None:
        """Asserts the structural invariants (tests call this between steps)."""
        self.cache_set.check_invariants()
        self.dirty.check_invariants()
        self.mappings.check_invariants()
        for rng, _ in self.cache_set:
            assert rng.start % 4096 == 0 and rng.end % 4096 == 0, rng
        for rng, _ in self.dirty:
            assert not self.cache_set.gaps(rng), f"dirty {rng} not cached"
        for rng, count in self.mappings:
            assert count > 0, (rng, count)

    def _bump_version_locked(self, changed: Range) -> None:
        """Makes a new local version whose bytes differ from the last in ``changed``.

        Preconditions: attr_mu is held; data_mu is held for writing.
        """
        self.attr.version += 1
        self.attr.mtime = time.time()
        self.attr.refresh_etag()
        self._changes.append((self.attr.version, changed))

    def unchanged_since(self, epoch: int, version: int, rng: Range) -> bool:
        """Whether the bytes of file range ``rng`` are still those of version
        ``version`` of epoch ``epoch`` (a reader's snapshot): no local change
        since touched them. False when that is not known any more.

        Preconditions: data_mu is held (for reading suffices), or no writer
        holds it and the caller does not suspend.
        """
        if epoch != self.epoch or version > self.attr.version:
            return False
        if version == self.attr.version:
            return True
        changes = self._changes
        if not changes or changes[0][0] > version + 1:
            return False  # some changes since are no longer recorded
        return not any(made > version and changed.overlaps(rng) for made, changed in changes)

    # ------------------------------------------------------------------ reads

    async def read(self, offset: int, length: int) -> bytes:
        """Returns up to ``length`` bytes at ``offset`` (short at end of file).

        A fully cached range is copied out under ``data_mu`` without taking a
        mapping: nothing awaits while the views are in use, so no page can go
        away meanwhile. Otherwise the range is filled and mapped first.
        """
        data = await self.read_cached(offset, length)
        if data is not None:
            return data
        mapping = await self.map_range(offset, length)
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
            data = self._copy_cached_locked(offset, length)
            if data is not None:
                self._note_access(offset, length)
                self._read_ahead_locked(page_up(offset + len(data)))
        finally:
            self.data_mu.release_read()
        return data

    def read_cached_now(self, offset: int, length: int) -> bytes | None:
        """Like :meth:`read_cached`, without suspending: None also when a
        writer holds data_mu.

        data_mu is not taken: the copy runs to its end without an await, so
        no writer can take the lock meanwhile, and one that waits for it
        waits no longer than it would for a reader.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        if self.data_mu.held_for_writing:
            return None
        data = self._copy_cached_locked(offset, length)
        if data is not None:
            self._note_access(offset, length)
            self._read_ahead_locked(page_up(offset + len(data)))
        return data

    def _copy_cached_locked(self, offset: int, length: int) -> bytes | None:
        """A copy of ``[offset, offset+length)`` clipped to the size, counted as
        a hit, or None (nothing counted) if any of it is not cached.

        Preconditions: data_mu is held (for reading suffices), or no writer
        holds it and the caller does not suspend until it has the copy.
        """
        end = min(offset + length, self.attr.size)
        if offset >= end:
            return b""
        views: list[memoryview] = []
        found = self.cache_set.find(offset)
        if found is not None and found[0].end >= end:
            # One segment holds it all: the usual case, without the walk.
            seg, mem = found
            mem_start = mem + offset - seg.start
            views = self.memfile.map_internal(Range(mem_start, mem_start + end - offset), False)
            self.cache.counters.hit_bytes += end - offset
            return b"".join(views)
        want = Range(offset, end)
        pos = offset
        for seg, mem in self.cache_set.segments(want):
            if seg.start > pos:
                return None
            part = seg.intersect(want)
            mem_start = mem + part.start - seg.start
            views += self.memfile.map_internal(Range(mem_start, mem_start + part.length), False)
            pos = part.end
        if pos < end:
            return None
        self.cache.counters.hit_bytes += end - offset
        return b"".join(views)

    async def map_range(self, offset: int, length: int, *, pin: bool = False) -> Mapping:
        """Caches ``[offset, offset+length)`` (clipped to the size) and maps it.

        The caller must ``await mapping.release()``. A ``pin`` also takes the
        pages off the MemoryFile's evictable set for as long as it lasts; a
        short-lived mapping (a response) leaves them there, since eviction
        skips mapped pages anyway. Gaps are filled from the
        origin, with readahead for sequential access; fills already in flight
        for the range are shared, and no lock is held while the origin reads.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        self._note_access(offset, length)
        first_pass = True
        missed = 0
        while True:
            async with self.maps_mu:
                await self.data_mu.acquire_read()
                try:
                    end = min(offset + length, self.attr.size)
                    if offset >= end:
                        return Mapping(self, Range(0, 0), [], offset, 0, pin, 0)
                    pages = page_range(offset, end)
                    gaps = self.cache_set.gaps(pages)
                    if not gaps:
                        if first_pass:
                            self.cache.counters.hit_bytes += end - offset
                        memory = self._add_mapping_locked(pages, pin)
                        mapping = Mapping(
                            self, pages, memory, offset, end - offset, pin, self._evictability_gen
                        )
                        mapping.missed = missed
                        self._read_ahead_locked(pages.end)
                        return mapping
                    if first_pass:
                        missed = sum(g.intersect(Range(offset, end)).length for g in gaps)
                        self.cache.counters.hit_bytes += end - offset - missed
                        self.cache.counters.miss_bytes += missed
                    waits = self._start_fills_locked(gaps, pages.end)
                finally:
                    self.data_mu.release_read()
            first_pass = False
            await _wait_shared(waits)

    def _read_ahead_locked(self, end: int, windows: int = 2) -> None:
        """On sequential access, starts a fill (not awaited) of the next window
        once the reader (at ``end``) is within ``windows`` windows of what is
        neither cached nor being filled, so the origin is read while the
        caller sends what it has. Like the kernel's asynchronous readahead
        marker. Reads look two windows ahead; a completed fill looks
        COMPLETION_LOOKAHEAD windows ahead, so the next origin request goes
        out when the last one ends rather than when the reader next maps.

        Preconditions: data_mu is held (for reading suffices), or no writer
        holds it and the caller does not suspend.
        """
        window = self._ra_window
        if window <= MIN_READAHEAD:
            return
        size_end = page_up(self.attr.size)
        end = page_down(end)  # whole pages: the reader's next byte is on this one
        lookahead = Range(end, min(end + windows * window, size_end))
        if lookahead.is_empty:
            return
        missing = self.cache_set.gaps(lookahead)
        for fill in self._fills:
            missing = [p for gap in missing for p in subtract_range(gap, fill.range)]
        if not missing:
            return
        start = missing[0].start
        ahead = Range(start, min(start + window, size_end))
        plan = plan_fills(self.cache_set.gaps(ahead), self._fills, self.cache_set, size_end,
                          ahead.end, 0)  # fmt: skip
        for rng in plan.new:
            self._start_fill(rng)

    def _note_access(self, offset: int, length: int) -> None:
        """Updates the readahead window: it doubles on sequential access, and
        restarts at 64 KiB (or the request's own size, for large requests,
        which stream) on a seek."""
        if offset == self._ra_next:
            self._ra_window = min(self._ra_window * 2, self.cache.readahead)
        else:
            self._ra_window = min(max(MIN_READAHEAD, page_up(length)), self.cache.readahead)
        self._ra_next = offset + length

    def _start_fills_locked(
        self, gaps: list[Range], request_end: int
    ) -> list[asyncio.Future[None]]:
        """Starts or joins fills covering ``gaps``; returns the futures to await.

        Preconditions: data_mu is held (for reading suffices).
        """
        plan = plan_fills(
            gaps, self._fills, self.cache_set, page_up(self.attr.size), request_end,
            self._ra_window,
        )  # fmt: skip
        return [*plan.joined, *(self._start_fill(rng) for rng in plan.new)]

    def _start_fill(self, rng: Range) -> asyncio.Future[None]:
        fill = Fill(rng, asyncio.get_running_loop().create_future())
        self._fills.append(fill)
        task = asyncio.create_task(self._run_fill(fill), name=f"fill {self.path} {rng}")
        self._fill_tasks.add(task)
        task.add_done_callback(self._fill_tasks.discard)
        return fill.done

    async def _run_fill(self, fill: Fill) -> None:
        rng = fill.range
        # Bytes at or past the origin's valid end are zeros: freshly allocated
        # pages already are, so only the part below it is read.
        valid = self._origin_valid if self._buffered else self.attr.size
        want = max(0, min(rng.end, valid) - rng.start)
        pin = self._origin_etag if self._buffered else None

        async def reader(views: list[memoryview]) -> int:
            if want:
                got = await self._read_origin(rng.start, slice_views(views, 0, want), pin)
                if got < want:
                    raise OriginConflict(f"{self.path}: origin file is shorter than expected")
            return rng.length

        try:
            memory, _ = await self.memfile.allocate_and_fill(
                rng.length,
                MemoryKind.PAGE_CACHE,
                reader,
                prefault=self.origin.capabilities.prefault_fills,
            )
        except Exception as exc:
            self._fills.remove(fill)
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
            self._fills.remove(fill)
            fill.done.cancel()
            raise
        try:
            async with self.maps_mu, self.data_mu.writing():
                self._fills.remove(fill)
                if fill.stale:
                    self.memfile.dec_ref(memory)
                else:
                    self._insert_filled_locked(rng, memory.start)
                    # Keep the origin busy while the reader sends what it has.
                    self._read_ahead_locked(self._ra_next, COMPLETION_LOOKAHEAD)
        finally:
            if not fill.done.done():
                fill.done.set_result(None)
        self.cache.note_allocation()

    async def _read_origin(self, offset: int, views: list[memoryview], pin: str | None) -> int:
        """Reads origin bytes of version ``pin`` into ``views``.

        If our own write-back replaced that version meanwhile (buffered
        origins upload whole objects), reads from the version it made
        instead: a fill reads only pages that are not cached, so not dirty,
        and a write-back changes only dirty bytes. Other changes of the
        origin's version raise OriginConflict.
        """
        for _ in range(PIN_RETRIES):
            try:
                return await self.origin.read_into(self.path, offset, views, pin)
            except OriginConflict:
                newer = await self._version_written_since(pin)
                if newer is None:
                    raise
                pin = newer
        return await self.origin.read_into(self.path, offset, views, pin)

    async def _version_written_since(self, pin: str | None) -> str | None:
        """The origin version our own write-back made after ``pin``, waiting
        for an upload in progress; None if there is none."""
        uploading = self._uploading
        if uploading is not None and (made := await uploading) is not None and made != pin:
            return made
        current = self._origin_etag
        return current if current is not None and current != pin else None

    def _insert_filled_locked(self, rng: Range, mem_start: int) -> None:
        """Inserts the still-uncached parts of a fill and frees the rest.

        Preconditions: maps_mu is held; data_mu is held for writing.
        """
        limit = page_up(self.attr.size)
        kept: list[Range] = []
        for gap in self.cache_set.gaps(Range(rng.start, min(rng.end, limit))):
            self.cache_set.insert(gap, mem_start + gap.start - rng.start)
            kept.append(gap)
        pos = rng.start
        for piece in [*kept, Range(rng.end, rng.end)]:
            if pos < piece.start:
                self.memfile.dec_ref(
                    Range(mem_start + pos - rng.start, mem_start + piece.start - rng.start)
                )
            pos = piece.end
        for piece in kept:
            self._mark_evictable_locked(piece)

    def _mark_evictable_locked(self, rng: Range) -> None:
        """Registers the unmapped parts of cached ``rng`` as evictable.

        Preconditions: maps_mu is held; data_mu is held.
        """
        for free in self.mappings.gaps(rng):
            self.memfile.mark_evictable(self, free)

    # --------------------------------------------------------------- mappings

    def _memory_pieces_locked(self, pages: Range) -> MemoryPieces:
        """``(file offset, memory range)`` pieces of cached ``pages``, in order.

        Preconditions: data_mu is held; ``pages`` is fully cached.
        """
        pieces: MemoryPieces = []
        for seg, mem in self.cache_set.segments(pages):
            part = seg.intersect(pages)
            start = mem + part.start - seg.start
            pieces.append((part.start, Range(start, start + part.length)))
        return pieces

    def _add_mapping_locked(self, pages: Range, pin: bool) -> MemoryPieces:
        """Maps cached ``pages``: counts them mapped and references their memory.

        Preconditions: maps_mu is held; data_mu is held; ``pages`` is cached.
        """
        memory = self._memory_pieces_locked(pages)
        for _, mem in memory:
            self.memfile.inc_ref(mem)
        if not self.mappings.segments(pages):
            # The common case: nothing else maps these pages.
            self.mappings.insert(pages, 1)
            self.cache.counters.mapped_bytes += pages.length
        else:
            newly_mapped = self.mappings.gaps(pages)
            self.mappings.update(pages, lambda _r, count: count + 1)
            for rng in newly_mapped:
                self.mappings.insert(rng, 1)
                self.cache.counters.mapped_bytes += rng.length
        if pin:
            self.memfile.mark_unevictable(self, pages)
        return memory

    async def remove_mapping(
        self, pages: Range, memory: MemoryPieces, pinned: bool, evictability_gen: int
    ) -> None:
        """Undoes _add_mapping_locked (called by Mapping.release)."""
        async with self.maps_mu, self.data_mu.reading():
            self._remove_mapping_locked(pages, memory, pinned, evictability_gen)
        self.cache.forget_if_idle(self)

    def remove_mapping_now(
        self, pages: Range, memory: MemoryPieces, pinned: bool, evictability_gen: int
    ) -> bool:
        """remove_mapping without suspending, when maps_mu is free and no
        writer holds data_mu; else False, and nothing done.

        The locks are not taken: nothing here awaits, so no other task can
        run before it is done (as in read_cached_now).
        """
        if self.maps_mu.locked() or self.data_mu.held_for_writing:
            return False
        self._remove_mapping_locked(pages, memory, pinned, evictability_gen)
        self.cache.forget_if_idle(self)
        return True

    def _remove_mapping_locked(
        self, pages: Range, memory: MemoryPieces, pinned: bool, evictability_gen: int
    ) -> None:
        """Gives back the memory references and mapping counts of one mapping.

        Pages no longer mapped become evictable again if the mapping was a
        pin, or if an eviction or unpin since the mapping was taken may have
        taken them off the evictable set.

        Preconditions: maps_mu is held; data_mu is held (for reading suffices);
        or neither is held by anyone and the caller does not suspend.
        """
        for _, mem in memory:
            self.memfile.dec_ref(mem)
        if pages.is_empty:
            return
        segments = self.mappings.segments(pages)
        if all(count == 1 for _, count in segments):
            self.mappings.remove(pages)
            released = [pages]
        else:
            self.mappings.update(pages, lambda _r, count: count - 1)
            released = [rng for rng, count in self.mappings.segments(pages) if count == 0]
            for rng in released:
                self.mappings.remove(rng)
        self.cache.counters.mapped_bytes -= sum(rng.length for rng in released)
        if pinned:
            self._evictability_gen += 1
        if pinned or evictability_gen != self._evictability_gen:
            for rng in released:
                for seg, _ in self.cache_set.segments(rng):
                    self.memfile.mark_evictable(self, seg.intersect(rng))

    # ----------------------------------------------------------------- writes

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data`` at ``offset``, growing the file if needed.

        Bytes on cached pages are written there and marked dirty. Bytes on
        gaps go to the origin directly when it takes partial writes;
        otherwise they are buffered in the cache (partial edge pages are
        filled from the origin first) and written back later.
        """
        self._require_writable()
        view = memoryview(data).cast("B")
        if not view:
            return
        end = offset + len(view)
        await self.cache.reserve_dirty(page_range(offset, end).length)
        async with self.attr_mu:
            while True:
                if self._buffered:
                    await self._cache_edges_locked(offset, end)
                async with self.maps_mu, self.data_mu.writing():
                    # An eviction may have raced the edge fill: fill again.
                    if self._buffered and not self._edges_cached_locked(offset, end):
                        continue
                    await self._write_locked(offset, view)
                    return

    def _require_writable(self) -> None:
        """Refuses changes the origin could never take (they would stay dirty forever)."""
        if not self.origin.capabilities.writable:
            raise OriginUnsupported(f"{self.origin.description} does not accept writes")

    def _partial_edge_pages(self, start: int, end: int) -> list[int]:
        """Pages partly covered by ``[start, end)`` that hold file bytes."""
        pages = {page_down(start), page_down(end - 1)}
        return [
            page
            for page in sorted(pages)
            if Range(max(start, page), min(end, page + 4096)).length < 4096
            and page < self.attr.size
        ]

    async def _cache_edges_locked(self, start: int, end: int) -> None:
        """Caches the partially written first and last pages (buffered origins).

        Preconditions: attr_mu is held. Takes and releases maps_mu and data_mu.
        """
        for page in self._partial_edge_pages(start, end):
            mapping = await self.map_range(page, 4096)
            await mapping.release()

    def _edges_cached_locked(self, start: int, end: int) -> bool:
        """Preconditions: data_mu is held."""
        return all(
            self.cache_set.find(page) is not None for page in self._partial_edge_pages(start, end)
        )

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        """Preconditions: attr_mu and maps_mu are held; data_mu is held for writing.

        May await origin I/O with all three held (gap writes), as the
        reference design does.
        """
        end = offset + len(data)
        target = Range(offset, end)
        for fill in self._fills:
            if fill.range.overlaps(page_range(offset, end)):
                fill.stale = True
        if self._buffered:
            for gap in self.cache_set.gaps(page_range(offset, end)):
                memory = await self.memfile.allocate(gap.length, MemoryKind.PAGE_CACHE)
                self.cache_set.insert(gap, memory.start)
                self._mark_evictable_locked(gap)
        else:
            for gap in self.cache_set.gaps(target):
                piece = data[gap.start - offset : gap.end - offset]
                self._origin_etag = None
                await self.origin.write_from(self.path, gap.start, [piece])
        self._write_gen += 1
        for seg, mem in self.cache_set.segments(target):
            part = seg.intersect(target)
            mem_start = mem + part.start - seg.start
            dst = self.memfile.map_internal(Range(mem_start, mem_start + part.length), True)
            copy_into_views(dst, data[part.start - offset : part.end - offset])
            self._mark_dirty_locked(part)
        if end > self.attr.size:
            self.attr.size = end
            self._size_dirty_gen = self._write_gen
        self._bump_version_locked(target)

    def _mark_dirty_locked(self, rng: Range) -> None:
        """Preconditions: data_mu is held for writing; ``rng`` is cached."""
        before = self.dirty.total_length
        gen = self._write_gen
        for gap in self.dirty.gaps(rng):
            self.dirty.insert(gap, DirtyInfo(gen=gen))
        self.dirty.update(rng, lambda _r, info: DirtyInfo(info.keep, gen))
        self.cache.counters.dirty_bytes += self.dirty.total_length - before
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()

    # ----------------------------------------------------------- truncation

    async def truncate(self, size: int) -> None:
        """Sets the size; cached bytes past it are dropped without write-back."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        self._require_writable()
        async with self.attr_mu:
            if self._buffered:
                async with self.maps_mu, self.data_mu.writing():
                    self._truncate_locked(size)
                return
            # Written through, as the reference design does. Until the new
            # size is set here too, fills may find the origin shorter.
            self._origin_etag = None
            self._resizing += 1
            try:
                await self.origin.set_size(self.path, size)
                async with self.maps_mu, self.data_mu.writing():
                    self._truncate_locked(size)
            finally:
                self._resizing -= 1

    def _truncate_locked(self, size: int) -> None:
        """Preconditions: attr_mu and maps_mu are held; data_mu is held for writing."""
        old = self.attr.size
        for fill in self._fills:
            if fill.range.end > page_down(min(size, old)):
                fill.stale = True
        self._write_gen += 1
        self.attr.size = size
        if self._buffered:
            self._size_dirty_gen = self._write_gen
        if size < old:
            self._drop_locked(
                Range(page_up(size), max(page_up(old), page_up(size))), dirty_too=True
            )
            self._clear_dirty_locked(Range(size, page_up(size)))
            self._zero_tail_locked(size)
            if self._buffered:
                self._origin_valid = min(self._origin_valid, size)
                if self._truncated_to is not None:
                    self._truncated_to = min(self._truncated_to, size)
                else:
                    self._truncated_to = size
        self._bump_version_locked(Range(min(old, size), _END))

    def _zero_tail_locked(self, size: int) -> None:
        """Zeroes cached bytes of the last page past ``size``.

        Preconditions: data_mu is held for writing.
        """
        if size % 4096 == 0:
            return
        found = self.cache_set.find(size)
        if found is None:
            return
        seg, mem = found
        tail = mem + size - seg.start
        for view in self.memfile.map_internal(Range(tail, tail + page_up(size) - size), True):
            view[:] = bytes(len(view))

    def _drop_locked(self, rng: Range, *, dirty_too: bool) -> int:
        """Removes cached pages in page-aligned ``rng`` (skipping dirty ones unless
        ``dirty_too``); returns bytes dropped.

        Preconditions: maps_mu is held; data_mu is held for writing.
        """
        dropped = 0
        for seg, mem in self.cache_set.segments(rng):
            part = seg.intersect(rng)
            pieces = [part] if dirty_too else self._clean_pages_locked(part)
            for piece in pieces:
                mem_start = mem + piece.start - seg.start
                self.cache_set.remove(piece)
                self.memfile.mark_unevictable(self, piece)
                self.memfile.dec_ref(Range(mem_start, mem_start + piece.length))
                dropped += piece.length
        if dirty_too:
            self._clear_dirty_locked(rng)
        return dropped

    def _clean_pages_locked(self, pages: Range) -> list[Range]:
        """The parts of page-aligned ``pages`` whose pages hold no dirty byte.

        Preconditions: data_mu is held.
        """
        clean = [pages]
        for rng, _ in self.dirty.segments(pages):
            dirty_pages = page_range(rng.start, rng.end)
            clean = [p for piece in clean for p in subtract_range(piece, dirty_pages)]
        return clean

    def _clear_dirty_locked(self, rng: Range) -> None:
        """Preconditions: data_mu is held for writing."""
        before = self.dirty.total_length
        self.dirty.remove(rng)
        self.cache.counters.dirty_bytes -= before - self.dirty.total_length
        if not self.dirty:
            self.dirty_since = None

    async def allocate(self, offset: int, length: int) -> None:
        """Reserves ``[offset, offset+length)``, growing the file like fallocate."""
        self._require_writable()
        end = offset + length
        async with self.attr_mu:
            if not self._buffered:
                self._origin_etag = None
                await self.origin.allocate(self.path, offset, length)
            if end > self.attr.size:
                async with self.maps_mu, self.data_mu.writing():
                    self._write_gen += 1
                    grown = Range(self.attr.size, _END)
                    self.attr.size = end
                    if self._buffered:
                        self._size_dirty_gen = self._write_gen
                    self._bump_version_locked(grown)

    # ------------------------------------------------------------- write-back

    async def writeback(self) -> int:
        """Writes dirty bytes and attributes to the origin and makes them durable.

        Returns bytes written. On failure the data stays dirty and cached, the
        error is recorded and raised; the next call writes it all again.
        """
        async with self.writeback_mu:
            return await self._writeback_locked(sync=False)

    async def fsync(self) -> None:
        """Writes back like writeback(), then syncs the origin file even if
        nothing here was dirty (bytes written straight to the origin)."""
        async with self.writeback_mu:
            await self._writeback_locked(sync=True)

    async def _writeback_locked(self, *, sync: bool) -> int:
        """Preconditions: writeback_mu is held. Takes attr_mu and data_mu briefly."""
        async with self.attr_mu, self.data_mu.reading():
            snapshot = self._snapshot_dirty_locked() if self.has_dirty else None
        if snapshot is None:
            if sync and self.origin.capabilities.durable_sync:
                await self._sync_origin()
            return 0
        uploading: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._uploading = uploading
        try:
            try:
                stat = await self._write_snapshot(snapshot)
            except OriginError as exc:
                self.cache.counters.writeback_errors += 1
                self.last_error = _detached(exc)
                log.warning("write-back of %s failed, data kept dirty: %s", self.path, exc)
                raise
            finally:
                snapshot.release()
            uploading.set_result(stat.etag)
            async with self.attr_mu, self.maps_mu, self.data_mu.writing():
                self._written_back_locked(snapshot, stat)
        finally:
            if not uploading.done():
                uploading.set_result(None)
            self._uploading = None
        written = sum(r.length for r in snapshot.dirty)
        self.cache.counters.writeback_bytes += written
        return written

    def _snapshot_dirty_locked(self) -> DirtySnapshot:
        """Snapshots what a write-back must write, referencing its memory.

        Preconditions: attr_mu is held; data_mu is held.
        """
        size = self.attr.size
        dirty = [r.intersect(Range(0, size)) for r, _ in self.dirty]
        dirty = [r for r in dirty if not r.is_empty]
        pieces: MemoryPieces = []
        # Several dirty ranges may share a page: reference each page once.
        for pages in union_ranges(page_range(r.start, r.end) for r in dirty):
            for file_off, mem in self._memory_pieces_locked(pages):
                self.memfile.inc_ref(mem)
                pieces.append((file_off, mem))
        self._truncated_to = None
        return DirtySnapshot(
            self.memfile, self._write_gen, size, self._size_dirty_gen is not None, dirty,
            pieces, self._origin_valid,
        )  # fmt: skip

    async def _write_snapshot(self, snapshot: DirtySnapshot) -> OriginStat:
        """Writes a snapshot to the origin and makes it durable; no lock held."""
        if self._buffered:
            changed = [(r.start, r.end) for r in snapshot.changed()]
            return await self.origin.rewrite(
                self.path, snapshot.size, changed, snapshot.read_changed, self._origin_etag
            )
        for rng in snapshot.dirty:
            await self.origin.write_from(self.path, rng.start, snapshot.views(rng))
        if snapshot.size_dirty:
            await self.origin.set_size(self.path, snapshot.size)
        if self.origin.capabilities.durable_sync:
            await self.origin.sync(self.path)
        return await self.origin.stat(self.path)

    def _written_back_locked(self, snapshot: DirtySnapshot, stat: OriginStat) -> None:
        """Marks clean what the snapshot wrote and nothing written since.

        Preconditions: attr_mu and maps_mu are held; data_mu is held for writing.
        """
        before = self.dirty.total_length
        for rng, info in list(self.dirty):
            if info.gen <= snapshot.generation:
                self.dirty.remove(rng)
        self.cache.counters.dirty_bytes -= before - self.dirty.total_length
        if not self.dirty:
            self.dirty_since = None
        if self._size_dirty_gen is not None and self._size_dirty_gen <= snapshot.generation:
            self._size_dirty_gen = None
        if self._buffered:
            low = self._truncated_to
            self._origin_valid = snapshot.size if low is None else min(snapshot.size, low)
        self._origin_etag = stat.etag
        self.last_error = None
        # Evicting these pages stopped while they could not be written back.
        for rng in snapshot.dirty:
            for seg, _ in self.cache_set.segments(page_range(rng.start, rng.end)):
                self._mark_evictable_locked(seg)

    async def _sync_origin(self) -> None:
        try:
            await self.origin.sync(self.path)
        except OriginError as exc:
            self.cache.counters.writeback_errors += 1
            self.last_error = _detached(exc)
            raise

    # --------------------------------------------------------------- eviction

    async def evict(self, rng: Range) -> None:
        """Drops cached pages of ``rng``: mapped pages are skipped; dirty ones
        are written back first and kept if that fails (EvictableUser)."""
        rng = page_range(rng.start, rng.end)
        self._evictability_gen += 1
        if self.dirty.segments(rng):
            try:
                await self.writeback()
            except OriginError:
                # Kept, and left unevictable: a successful write-back makes
                # the range evictable again, so eviction does not spin on it.
                return
        async with self.maps_mu, self.data_mu.writing():
            dropped = 0
            for free in self.mappings.gaps(rng):
                dropped += self._drop_locked(free, dirty_too=False)
        if dropped:
            self.cache.counters.evictions += 1
            self.cache.counters.evicted_bytes += dropped
        self.cache.forget_if_idle(self)

    async def drop_clean(self) -> int:
        """Drops every unmapped clean cached page; returns bytes dropped."""
        async with self.maps_mu, self.data_mu.writing():
            dropped = 0
            for free in self.mappings.gaps(Range(0, _END)):
                dropped += self._drop_locked(free, dirty_too=False)
        self.cache.forget_if_idle(self)
        return dropped

    # ------------------------------------------------------------ revalidation

    async def revalidate(self, stat: OriginStat) -> bool:
        """Adopts the origin's attributes; drops the cache if the origin's
        version changed and nothing is dirty here. Returns True if dropped."""
        async with self.attr_mu:
            if self._origin_etag is None:
                self._origin_etag = stat.etag
                return False
            if stat.etag == self._origin_etag:
                return False
            if self.has_dirty:
                log.warning(
                    "%s changed at the origin while dirty here; keeping local data", self.path
                )
                return False
            async with self.maps_mu, self.data_mu.writing():
                self._adopt_locked(stat)
            return True

    def discard_locked(self) -> None:
        """Drops all cached and dirty data (the file is gone at the origin).

        Preconditions: attr_mu and maps_mu are held; data_mu is held for writing.
        """
        for fill in self._fills:
            fill.stale = True
        self._drop_locked(Range(0, _END), dirty_too=True)
        self._size_dirty_gen = None
        self._truncated_to = None

    def _adopt_locked(self, stat: OriginStat) -> None:
        """Replaces the cached content with the origin's new version.

        Preconditions: attr_mu and maps_mu are held; data_mu is held for writing.
        """
        self.discard_locked()
        self._write_gen += 1
        self.attr.size = stat.size
        self.attr.mtime = stat.mtime
        self.attr.etag_base = stat.etag
        self.attr.version = 0
        self.attr.refresh_etag()
        self.epoch += 1
        self._changes.clear()
        self._origin_etag = stat.etag
        self._origin_valid = stat.size
        self.last_error = None

    async def replaced(self, stat: OriginStat) -> None:
        """Adopts a new version written by ``Origin.replace`` (a full PUT).

        Preconditions: attr_mu is held (the caller held it across the upload).
        """
        async with self.maps_mu, self.data_mu.writing():
            self._adopt_locked(stat)


__all__ = ["CachingInode"]


async def _wait_shared(fills: list[asyncio.Future[None]]) -> None:
    """Waits for fills that other readers may share; raises the first one's
    error. Unlike gather, a waiter that is cancelled (a response whose client
    went away) leaves the fills running for the others."""
    if fills:
        await asyncio.wait(fills)
    for fill in fills:
        fill.result()


def _detached(exc: OriginError) -> OriginError:
    """A copy of ``exc`` without traceback or cause, safe to keep: a kept
    traceback would keep the frames of the failed write alive, and with them
    views of the memory file."""
    return type(exc)(str(exc))
