"""CachingInode: one cached origin file.

Follows CachingInodeOperations in the reference design (inode_cached.go),
rendered for asyncio. The class is built in layers, one module each (see
:mod:`cachesvc.core.inode_state` for the list and the lock order); this top
layer holds writes, truncation, eviction and revalidation, and is what the
cache and the API use.

Lock order:
    CachingInode.writeback_mu
      CachingInode.attr_mu
        CachingInode.maps_mu
          CachingInode.data_mu
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cachesvc.core.eviction.driver import ExtentState
from cachesvc.core.hostmem import PAGE_SIZE
from cachesvc.core.inode_state import END
from cachesvc.core.memfile import MemoryKind
from cachesvc.core.pages import extent_range, page_down, page_range
from cachesvc.core.ranges import Range, union_ranges
from cachesvc.core.writeback import WritebackInode
from cachesvc.origins.base import OriginStat, OriginUnsupported

log = logging.getLogger("cachesvc.inode")


class CachingInode(WritebackInode):
    """One cached file: attributes, cached pages, dirty ranges and mappings."""

    __slots__ = ()

    # ----------------------------------------------------------------- writes

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data`` at ``offset``, growing the file if needed.

        Bytes on cached pages are written there and marked dirty. Bytes on
        gaps go to the origin directly when it takes partial writes;
        otherwise they are buffered in the cache (partial edge pages are
        filled from the origin first, and the budget must have room for the
        other pages: NoRoom, a CacheFull, if not) and written back later.
        """
        self._require_writable()
        view = memoryview(data).cast("B")
        if not view:
            return
        end = offset + len(view)
        pages = page_range(offset, end)
        await self.host.reserve_dirty(pages.length)
        budget = self.host.budget
        reserved = 0  # bytes of the budget this write holds for its new pages
        try:
            async with self.attr_mu:
                while True:
                    if self.buffered:
                        await self._cache_edges_locked(offset, end)
                        # Read without data_mu, and checked again under it.
                        need = pages.length - self.cache_set.cached_bytes(pages)
                        if need > reserved:
                            await budget.reserve(need - reserved, wait=True)
                            reserved = need
                    async with self.maps_mu, self.data_mu.writing():
                        # An eviction may have raced the edge fill or the
                        # reservation: cache and reserve again.
                        if self.buffered and (
                            not self._edges_cached_locked(offset, end)
                            or pages.length - self.cache_set.cached_bytes(pages) > reserved
                        ):
                            continue
                        await self._write_locked(offset, view)
                        return
        finally:
            if reserved:
                budget.release(reserved)

    def _require_writable(self) -> None:
        """Refuses changes the origin could never take (they would stay dirty forever)."""
        origin = self.host.origin
        if not origin.capabilities.writable:
            raise OriginUnsupported(f"{origin.description} does not accept writes")

    def _partial_edge_pages(self, start: int, end: int) -> list[int]:
        """Pages partly covered by ``[start, end)`` that hold file bytes."""
        pages = {page_down(start), page_down(end - 1)}
        return [
            page
            for page in sorted(pages)
            if Range(max(start, page), min(end, page + PAGE_SIZE)).length < PAGE_SIZE
            and page < self.attr.size
        ]

    async def _cache_edges_locked(self, start: int, end: int) -> None:
        """Caches the partially written first and last pages (buffered origins).

        Preconditions: attr_mu is held. Takes and releases maps_mu and data_mu.
        """
        self.attr_mu.assert_held()
        for page in self._partial_edge_pages(start, end):
            mapping = await self.map_range(page, PAGE_SIZE)
            await mapping.release()

    def _edges_cached_locked(self, start: int, end: int) -> bool:
        """Preconditions: data_mu is held."""
        self.data_mu.assert_held()
        return all(
            self.cache_set.find(page) is not None for page in self._partial_edge_pages(start, end)
        )

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        """Preconditions: attr_mu and maps_mu are held; data_mu is held for
        writing; for a buffered origin, the caller has reserved the budget
        for the uncached pages the write covers.

        May await origin I/O with all three held (gap writes), as the
        reference design does.
        """
        self.attr_mu.assert_held()
        self.maps_mu.assert_held()
        self.data_mu.assert_held(write=True)
        end = offset + len(data)
        target = Range(offset, end)
        for fill in self._fills:
            if fill.range.overlaps(page_range(offset, end)):
                fill.stale = True
        memfile = self.host.memfile
        if self.buffered:
            allocated = []
            for gap in self.cache_set.gaps(page_range(offset, end)):
                memory = await memfile.allocate(gap.length, MemoryKind.PAGE_CACHE)
                self.cache_set.insert(gap, memory.start)
                self.host.counters.cached_bytes += gap.length
                allocated.append(gap)
            self._track_extents_locked(allocated)
        else:
            for gap in self.cache_set.gaps(target):
                piece = data[gap.start - offset : gap.end - offset]
                self._origin_etag = None
                await self.host.origin.write_from(self.path, gap.start, [piece])
        self._write_gen += 1
        for part in self.cache_set.write(memfile, offset, data):
            self._mark_dirty_locked(part)
        if end > self.attr.size:
            self.attr.size = end
            self._size_changed_locked()
        self._bump_version_locked(target)

    # ------------------------------------------------------------ truncation

    async def truncate(self, size: int) -> None:
        """Sets the size; cached bytes past it are dropped without write-back."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        self._require_writable()
        async with self.attr_mu:
            if self.buffered:
                async with self.maps_mu, self.data_mu.writing():
                    self._truncate_locked(size)
                return
            # Written through, as the reference design does. Until the new
            # size is set here too, fills may find the origin shorter.
            self._origin_etag = None
            self._resizing += 1
            try:
                await self.host.origin.set_size(self.path, size)
                async with self.maps_mu, self.data_mu.writing():
                    self._truncate_locked(size)
            finally:
                self._resizing -= 1

    def _truncate_locked(self, size: int) -> None:
        """Preconditions: attr_mu and maps_mu are held; data_mu is held for writing."""
        self.attr_mu.assert_held()
        self.maps_mu.assert_held()
        self.data_mu.assert_held(write=True)
        old = self.attr.size
        for fill in self._fills:
            if fill.range.end > page_down(min(size, old)):
                fill.stale = True
        self._write_gen += 1
        self.attr.size = size
        if self.buffered:
            self._size_changed_locked()
        if size < old:
            self._clear_dirty_locked(Range(size, END))
            dropped = self.cache_set.truncate(self.host.memfile, size)
            self.host.counters.cached_bytes -= sum(r.length for r in dropped)
            self._ra_covered = 0
            self._track_extents_locked([*dropped, page_range(size, size + 1)])
            if dropped:
                self.host.budget.note_released()
            if self.buffered:
                self._origin_valid = min(self._origin_valid, size)
                if self._truncated_to is not None:
                    self._truncated_to = min(self._truncated_to, size)
                else:
                    self._truncated_to = size
        self._bump_version_locked(Range(min(old, size), END))

    async def allocate(self, offset: int, length: int) -> None:
        """Reserves ``[offset, offset+length)``, growing the file like fallocate."""
        self._require_writable()
        end = offset + length
        async with self.attr_mu:
            if not self.buffered:
                self._origin_etag = None
                await self.host.origin.allocate(self.path, offset, length)
            if end > self.attr.size:
                async with self.maps_mu, self.data_mu.writing():
                    self._write_gen += 1
                    grown = Range(self.attr.size, END)
                    self.attr.size = end
                    if self.buffered:
                        self._size_changed_locked()
                    self._bump_version_locked(grown)

    # --------------------------------------------------------------- eviction

    def extent_state(self, index: int) -> ExtentState:
        """Whether extent ``index`` can be evicted now (ExtentOwner)."""
        rng = extent_range(index)
        if not self.cache_set.segments(rng):
            return ExtentState.GONE
        if self.mappings.segments(rng):
            return ExtentState.BUSY
        if self.dirty.segments(rng):
            return ExtentState.DIRTY
        return ExtentState.EVICTABLE

    async def evict_extents(self, indexes: Sequence[int]) -> int:
        """Drops the clean, unmapped cached pages of the extents ``indexes``;
        returns the bytes dropped (ExtentOwner). Pages mapped or dirtied since
        the driver looked stay, off the policy until their mapping is
        released or their write-back is done."""
        runs = union_ranges(extent_range(index) for index in indexes)
        self._evictability_gen += 1
        async with self.maps_mu, self.data_mu.writing():
            dropped = 0
            for run in runs:
                for free in self.mappings.gaps(run):
                    dropped += self._drop_locked(free, dirty_too=False)
        self.host.forget_if_idle(self)
        return dropped

    async def drop_clean(self) -> int:
        """Drops every unmapped clean cached page; returns bytes dropped."""
        async with self.maps_mu, self.data_mu.writing():
            dropped = 0
            for free in self.mappings.gaps(Range(0, END)):
                dropped += self._drop_locked(free, dirty_too=False)
        self.host.forget_if_idle(self)
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
        self._drop_locked(Range(0, END), dirty_too=True)
        self._size_dirty_gen = None
        self._truncated_to = None

    def _adopt_locked(self, stat: OriginStat) -> None:
        """Replaces the cached content with the origin's new version.

        Preconditions: attr_mu and maps_mu are held; data_mu is held for writing.
        """
        self.attr_mu.assert_held()
        self.discard_locked()
        self._write_gen += 1
        self.attr.size = stat.size
        self.attr.mtime = stat.mtime
        self.attr.etag_base = stat.etag
        self.attr.version = 0
        self.epoch += 1
        self._changes = None
        self._origin_etag = stat.etag
        self._origin_valid = stat.size
        self.last_error = None

    async def replaced(self, stat: OriginStat) -> None:
        """Adopts a new version written by ``Origin.replace`` (a full PUT).

        Preconditions: attr_mu is held (the caller held it across the upload).
        """
        self.attr_mu.assert_held()
        async with self.maps_mu, self.data_mu.writing():
            self._adopt_locked(stat)


__all__ = ["CachingInode"]
