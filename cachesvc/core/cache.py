"""FileCache: the path -> CachingInode table and what all files share.

The cache owns one MemoryFile, the page-cache budget (every allocation
reserves its bytes first, see :mod:`cachesvc.core.budget`), the eviction
policy and its one driver (see :mod:`cachesvc.core.eviction`), the flusher
that writes dirty data back (see :mod:`cachesvc.core.flusher`) and the
operator's pins. It is the host of its inodes (``InodeHost``): they reach
the origin, the memory file, the budget and the policy through it, and it
finds an extent's owner for the driver by the inode's table slot.

An inode is forgotten only when it has no cached pages, no dirty data, no
mappings and no users, so two inodes never cache the same path; an idle
inode that keeps cached pages is settled (its locks, empty mapping set and
history dropped) once it has stayed idle for SETTLE_DELAY: a file read
again and again keeps them rather than making them anew for each request.
Beyond ``max_inodes`` files, extents are evicted through the driver, in
the policy's order, until idle files have gone below it.

Lock order: FileCache takes no lock of its own (the budget takes its
evict_mu); it calls inode methods that take the inode's locks (see
inode_state.py), and takes an inode's locks itself only in ``replace`` and
``remove``, never holding one across another inode's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from dataclasses import dataclass

from cachesvc.core.accounting import CacheCounters
from cachesvc.core.budget import MemoryBudget, NoRoom
from cachesvc.core.eviction import DEFAULT_POLICY, make_policy
from cachesvc.core.eviction.driver import EvictionDriver, ExtentOwner
from cachesvc.core.eviction.policy import EvictionPolicy
from cachesvc.core.flusher import Flusher, WritebackFailure
from cachesvc.core.inode import CachingInode
from cachesvc.core.inode_state import InodeState
from cachesvc.core.mapping import Mapping
from cachesvc.core.memfile import MemoryFile, MemoryKind
from cachesvc.core.pages import page_range
from cachesvc.origins.base import Origin, OriginNotFound, OriginStat

log = logging.getLogger("cachesvc.cache")

# Seconds an inode with cached pages stays idle before it is settled.
SETTLE_DELAY = 1.0

__all__ = ["CacheOptions", "FileCache", "PinLimit", "WritebackFailure"]


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """Tunables of a FileCache. Immutable."""

    cache_size: int = 1 << 30
    max_dirty: int = 512 << 20
    dirty_expire: float = 30.0
    readahead: int = 4 << 20
    writethrough: bool = False
    revalidate: float = 60.0
    max_inodes: int = 1_000_000
    eviction_policy: str = DEFAULT_POLICY
    max_pinned: int | None = None  # None: half of cache_size
    # How long an allocation waits for room before a read goes pass-through
    # and a write or pin gets 507.
    room_wait: float = 1.0


class PinLimit(NoRoom):
    """A pin would take pinned bytes past ``--max-pinned``."""


class FileCache:
    """Caches origin files in one MemoryFile."""

    def __init__(self, origin: Origin, memfile: MemoryFile, options: CacheOptions) -> None:
        self._origin = origin  # Immutable.
        self._memfile = memfile  # Immutable.
        self.options = options  # Immutable.
        self._counters = CacheCounters()
        self._policy = make_policy(options.eviction_policy, options.cache_size)  # Immutable.
        self.driver = EvictionDriver(self._policy, self._owner_of, self._counters)  # Immutable.
        self._budget = MemoryBudget(
            options.cache_size, memfile, self.driver, self._counters, room_wait=options.room_wait
        )  # Immutable.
        self.flusher = Flusher(
            self._counters, max_dirty=options.max_dirty, dirty_expire=options.dirty_expire
        )  # Immutable.
        # The most bytes pins may hold. Immutable.
        self.max_pinned = (
            options.max_pinned if options.max_pinned is not None else options.cache_size // 2
        )
        # path -> inode. Protected by the event loop.
        self._inodes: dict[str, CachingInode] = {}
        # The task bringing the file count under max_inodes, if one runs.
        # Protected by the event loop.
        self._limiting: asyncio.Task[None] | None = None
        # Table slots (extent keys name an inode by its slot), and the free
        # ones. Protected by the event loop.
        self._slots: list[CachingInode | None] = []
        self._free_slots: list[int] = []
        # Opens in progress (one origin stat per path). Protected by the event loop.
        self._opening: dict[str, asyncio.Future[CachingInode]] = {}
        # Operator pins: (path, start, end) -> mappings, and the bytes they
        # hold. Protected by the event loop.
        self._pins: dict[tuple[str, int, int], list[Mapping]] = {}
        self._pinned_bytes = 0
        self._daemon: asyncio.Task[None] | None = None
        # Inodes gone idle, to settle at the next sweep (see settle_idle).
        self._unsettled: set[CachingInode] = set()
        self._settling: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[object]] = set()

    def __repr__(self) -> str:
        return f"FileCache(files={len(self._inodes)}, {self._counters})"

    # ------------------------------------------------------- the inodes' host

    @property
    def origin(self) -> Origin:
        return self._origin

    @property
    def memfile(self) -> MemoryFile:
        return self._memfile

    @property
    def counters(self) -> CacheCounters:
        return self._counters

    @property
    def budget(self) -> MemoryBudget:
        return self._budget

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def readahead(self) -> int:
        return self.options.readahead

    async def reserve_dirty(self, length: int) -> None:
        await self.flusher.reserve_dirty(length)

    def note_dirty(self, inode: InodeState) -> None:
        found = self._inodes.get(inode.path)
        if found is inode:
            self.flusher.note_dirty(found)

    def spawn(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _owner_of(self, slot: int) -> ExtentOwner | None:
        return self._slots[slot] if slot < len(self._slots) else None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Starts the flusher's daemon."""
        if self._daemon is None:
            self._daemon = asyncio.create_task(self.flusher.run(), name="writeback daemon")

    async def close(self) -> list[WritebackFailure]:
        """Stops background work, writes everything back; returns what failed."""
        for stopping in (self._daemon, self._limiting):
            if stopping is not None:
                stopping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopping
        self._daemon = self._limiting = None
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        failures = await self.sync_all()
        for mappings in list(self._pins.values()):
            for mapping in mappings:
                await mapping.release()
        self._pins.clear()
        self._pinned_bytes = 0
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        return failures

    # ------------------------------------------------------------------ files

    @property
    def writethrough(self) -> bool:
        return self.options.writethrough

    def files(self) -> list[CachingInode]:
        """Cached files, in the order they were opened."""
        return list(self._inodes.values())

    def lookup(self, path: str) -> CachingInode | None:
        return self._inodes.get(path)

    def peek(self, path: str) -> CachingInode | None:
        """The inode of ``path`` if it is in the table and due for no
        revalidation: what a read may use without suspending."""
        inode = self._inodes.get(path)
        if inode is None:
            return None
        if time.monotonic() - inode.validated_at >= self.options.revalidate:
            return None
        return inode

    @contextlib.asynccontextmanager
    async def open(
        self, path: str, *, create: bool = False, keep: bool = False
    ) -> AsyncIterator[CachingInode]:
        """Yields the inode of ``path``, creating it at the origin if asked.

        Raises OriginNotFound if the file does not exist (and not ``create``).
        The inode stays in the table while the block runs, and after it if
        ``keep`` (until the inode limit or a revalidation drops it): for a
        caller that leaves the request to another handler, which would
        otherwise ask the origin for the same attributes again.
        """
        inode = await self._get(path, create=create)
        inode.users += 1
        try:
            yield inode
        finally:
            inode.users -= 1
            if not keep:
                self.forget_if_idle(inode)

    async def _get(
        self, path: str, *, create: bool, known: OriginStat | None = None
    ) -> CachingInode:
        """The inode of ``path``, made from the origin's stat (or from
        ``known``, a stat just returned by a write) if there is none."""
        inode = self._inodes.get(path)
        if inode is not None:
            await self._maybe_revalidate(inode)
            if self._inodes.get(path) is inode:
                return inode
        pending = self._opening.get(path)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[CachingInode] = asyncio.get_running_loop().create_future()
        self._opening[path] = future
        try:
            try:
                stat = known or await self._origin.stat(path)
            except OriginNotFound:
                if not create:
                    raise
                stat = await self._origin.create(path)
            inode = self._add(path, stat)
            future.set_result(inode)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()
            else:
                future.cancel()
            raise
        finally:
            del self._opening[path]
        self._limit_inodes()
        return inode

    def _add(self, path: str, stat: OriginStat) -> CachingInode:
        slot = self._free_slots.pop() if self._free_slots else len(self._slots)
        inode = CachingInode(self, path, slot, stat)
        if slot == len(self._slots):
            self._slots.append(inode)
        else:
            self._slots[slot] = inode
        self._inodes[path] = inode
        return inode

    async def _maybe_revalidate(self, inode: CachingInode) -> None:
        now = time.monotonic()
        if now - inode.validated_at < self.options.revalidate:
            return
        inode.validated_at = now
        try:
            stat = await self._origin.stat(inode.path)
        except OriginNotFound:
            if not inode.has_dirty:
                await inode.drop_clean()
                self._forget(inode)
                raise
            return
        await inode.revalidate(stat)

    def forget_if_idle(self, inode: InodeState) -> None:
        """Forgets ``inode`` if nothing holds it any more; else drops what it
        does not need once it has stayed idle (see settle_idle)."""
        found = self._inodes.get(inode.path)
        if found is not inode:
            return
        if found.is_idle:
            self._forget(found)
        elif not found.users:
            self._unsettled.add(found)
            if self._settling is None:
                loop = asyncio.get_running_loop()
                self._settling = loop.call_later(SETTLE_DELAY, self.settle_idle)

    def settle_idle(self) -> None:
        """Settles the inodes gone idle since the last sweep that still are."""
        self._settling = None
        unsettled, self._unsettled = self._unsettled, set()
        for inode in unsettled:
            if self._inodes.get(inode.path) is inode and not inode.users:
                inode.settle()

    def _forget(self, inode: InodeState) -> None:
        if self._inodes.get(inode.path) is inode:
            del self._inodes[inode.path]
            self._slots[inode.slot] = None
            self._free_slots.append(inode.slot)
            self.flusher.forget(inode)

    def _limit_inodes(self) -> None:
        if len(self._inodes) > self.options.max_inodes and self._limiting is None:
            self._limiting = asyncio.create_task(self._evict_files(), name="file limit")

    async def _evict_files(self) -> None:
        """Evicts extents, in the policy's order, until files that became idle
        have been forgotten below ``max_inodes`` (or nothing can be evicted)."""
        try:
            while len(self._inodes) > self.options.max_inodes:
                if not await self.driver.evict(1):
                    return
        finally:
            self._limiting = None

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> tuple[CachingInode, bool]:
        """Replaces ``path`` with the streamed bytes; returns (inode, created).

        A new path is created by the upload itself, so an interrupted first
        upload leaves nothing behind; an existing file keeps its old content.
        """
        stat: OriginStat | None = None
        try:
            inode = await self._get(path, create=False)
        except OriginNotFound:
            stat = await self._origin.replace(path, chunks)
            # Not stat again: a DELETE may already have removed the new file,
            # and this PUT still succeeded.
            inode = await self._get(path, create=False, known=stat)
        inode.users += 1
        try:
            async with inode.writeback_mu, inode.attr_mu:
                created = stat is not None
                if stat is None:
                    # Under the inode's locks: no write-back interleaves.
                    stat = await self._origin.replace(path, chunks)
                # For a new path, another request may have created the inode
                # meanwhile: it adopts the upload too.
                await inode.replaced(stat)
        finally:
            inode.users -= 1
        self.forget_if_idle(inode)
        return inode, created

    async def remove(self, path: str) -> None:
        """Removes ``path`` at the origin and drops it (and its dirty data) here."""
        inode = self._inodes.get(path)
        if inode is None:
            await self._origin.remove(path)
            return
        async with inode.writeback_mu, inode.attr_mu:
            await self._origin.remove(path)
            async with inode.maps_mu, inode.data_mu.writing():
                inode.discard_locked()
        self._forget(inode)

    # ------------------------------------------------------------ write paths

    async def write(
        self, inode: CachingInode, offset: int, data: bytes | memoryview, *, sync: bool = False
    ) -> None:
        """Writes through ``inode``; writes back first in writethrough mode or
        with ``sync`` (which also makes it durable)."""
        await inode.write(offset, data)
        if sync:
            await inode.fsync()
        elif self.options.writethrough:
            await inode.writeback()

    async def sync_all(self) -> list[WritebackFailure]:
        """Writes back and fsyncs every dirty file; returns the failures."""
        return await self.flusher.sync_all()

    async def drop(self, path: str) -> int:
        """Writes ``path`` back, then drops its unmapped pages; returns bytes dropped."""
        inode = self._inodes.get(path)
        if inode is None:
            return 0
        await inode.fsync()
        return await inode.drop_clean()

    # ------------------------------------------------------------------- pins

    @property
    def pinned_bytes(self) -> int:
        """Bytes held by operator pins (whole pages)."""
        return self._pinned_bytes

    async def pin(self, path: str, start: int, end: int) -> int:
        """Pins ``[start, end)`` of ``path`` in the cache; returns bytes pinned.

        Raises PinLimit at once, without touching the origin, if the pin
        would take pinned bytes past ``max_pinned``; NoRoom if the budget
        cannot make room for it in time.
        """
        want = page_range(start, end).length
        if self._pinned_bytes + want > self.max_pinned:
            raise PinLimit(
                f"pinning {want} bytes would take pinned bytes to"
                f" {self._pinned_bytes + want}, past --max-pinned {self.max_pinned}"
            )
        self._pinned_bytes += want
        try:
            async with self.open(path) as inode:
                mapping = await inode.map_range(start, end - start, pin=True)
        except BaseException:
            self._pinned_bytes -= want
            raise
        self._pins.setdefault((path, start, end), []).append(mapping)
        return mapping.length

    async def unpin(self, path: str, start: int, end: int) -> bool:
        """Releases one pin of exactly ``[start, end)``; False if there was none."""
        mappings = self._pins.get((path, start, end))
        if not mappings:
            return False
        mapping = mappings.pop()
        if not mappings:
            del self._pins[(path, start, end)]
        self._pinned_bytes -= page_range(start, end).length
        await mapping.release()
        return True

    # --------------------------------------------------------------- eviction

    @property
    def page_cache_bytes(self) -> int:
        return self._memfile.allocated_bytes(MemoryKind.PAGE_CACHE)

    @property
    def evictable_bytes(self) -> int:
        """Cached bytes eviction may take: neither mapped (responses, pins,
        fills' waiters) nor dirty."""
        counters = self._counters
        return max(0, counters.cached_bytes - counters.mapped_bytes - counters.dirty_bytes)

    async def evict_all(self, *, wait: bool) -> int:
        """Evicts everything evictable; with ``wait``, returns once the memory
        has been released to the host. Returns page-cache bytes before minus after."""
        before = self.page_cache_bytes
        if wait:
            await self.driver.evict_all()
            await self._memfile.wait_reclaimed()
            await self._memfile.update_usage()
        else:
            self.spawn(self.driver.evict_all())
        return before - self.page_cache_bytes

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, object]:
        return {
            "files": len(self._inodes),
            "page_cache_bytes": self.page_cache_bytes,
            "cache_size": self.options.cache_size,
            "pins": sum(len(m) for m in self._pins.values()),
            "pinned_bytes": self._pinned_bytes,
            "eviction_policy": self._policy.name,
            **self._counters.as_dict(),
        }
