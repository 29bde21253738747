"""FileCache: the path -> CachingInode table, the memory budget and write-back.

The cache owns one MemoryFile shared by all inodes. It keeps inodes in
recency order (least recently opened first) and, when the page cache grows
past ``cache_size``, evicts unmapped pages of the least recently used files
until usage is back under a low watermark: one global order across files
rather than the reference design's per-file order. A write-back daemon
writes dirty data older than ``dirty_expire``, and all dirty data once it
exceeds ``max_dirty``.

An inode is forgotten only when it has no cached pages, no dirty data, no
mappings and no users, so two inodes never cache the same path.

Lock order: FileCache itself takes no locks; it calls inode methods that
take the inode's locks (see inode.py) and never holds one across another
inode's call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from dataclasses import dataclass

from cachesvc.core.accounting import CacheCounters
from cachesvc.core.errors import CacheFull
from cachesvc.core.inode import CachingInode
from cachesvc.core.mapping import Mapping
from cachesvc.core.memfile import MemoryFile, MemoryKind
from cachesvc.origins.base import Origin, OriginError, OriginNotFound, OriginStat

log = logging.getLogger("cachesvc.cache")

# Eviction stops once page-cache usage is at or below this share of the budget.
LOW_WATERMARK = 0.9


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """Tunables of a FileCache. Immutable."""

    cache_size: int = 1 << 30
    max_dirty: int = 512 << 20
    dirty_expire: float = 30.0
    readahead: int = 4 << 20
    writethrough: bool = False
    revalidate: float = 60.0
    max_inodes: int = 100_000


@dataclass(frozen=True, slots=True)
class WritebackFailure:
    """A file whose dirty data could not be written back. Immutable."""

    path: str
    ranges: list[tuple[int, int]]  # half-open dirty ranges left
    error: str


class FileCache:
    """Caches origin files in one MemoryFile."""

    def __init__(self, origin: Origin, memfile: MemoryFile, options: CacheOptions) -> None:
        self.origin = origin  # Immutable.
        self.memfile = memfile  # Immutable.
        self.options = options  # Immutable.
        self.readahead = options.readahead  # Immutable.
        self.counters = CacheCounters()
        # path -> inode, least recently used first. Protected by the event loop.
        self._inodes: collections.OrderedDict[str, CachingInode] = collections.OrderedDict()
        # Opens in progress (one origin stat per path). Protected by the event loop.
        self._opening: dict[str, asyncio.Future[CachingInode]] = {}
        # When each inode was last revalidated (monotonic). Protected by the event loop.
        self._validated: dict[str, float] = {}
        # Operator pins: (path, start, end) -> mappings. Protected by the event loop.
        self._pins: dict[tuple[str, int, int], list[Mapping]] = {}
        self._evicting: asyncio.Task[None] | None = None
        self._daemon: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[object]] = set()

    def __repr__(self) -> str:
        return f"FileCache(files={len(self._inodes)}, {self.counters})"

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Starts the write-back daemon."""
        if self._daemon is None:
            self._daemon = asyncio.create_task(self._writeback_daemon(), name="writeback daemon")

    async def close(self) -> list[WritebackFailure]:
        """Stops background work, writes everything back; returns what failed."""
        for task in (self._daemon, self._evicting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._daemon = self._evicting = None
        failures = await self.sync_all()
        for mappings in list(self._pins.values()):
            for mapping in mappings:
                await mapping.release()
        self._pins.clear()
        return failures

    # ------------------------------------------------------------------ files

    @property
    def writethrough(self) -> bool:
        return self.options.writethrough

    def files(self) -> list[CachingInode]:
        """Cached files, least recently used first."""
        return list(self._inodes.values())

    def lookup(self, path: str) -> CachingInode | None:
        return self._inodes.get(path)

    def peek(self, path: str) -> CachingInode | None:
        """The inode of ``path`` if it is in the table and due for no
        revalidation: what a read may use without suspending. Counts as a
        use (recency), like :meth:`open`."""
        inode = self._inodes.get(path)
        if inode is None:
            return None
        if time.monotonic() - self._validated.get(path, 0.0) >= self.options.revalidate:
            return None
        self._inodes.move_to_end(path)
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
            self._inodes.move_to_end(path)
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
                stat = known or await self.origin.stat(path)
            except OriginNotFound:
                if not create:
                    raise
                stat = await self.origin.create(path)
            inode = CachingInode(self, path, stat)
            self._inodes[path] = inode
            self._validated[path] = time.monotonic()
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

    async def _maybe_revalidate(self, inode: CachingInode) -> None:
        now = time.monotonic()
        if now - self._validated.get(inode.path, 0.0) < self.options.revalidate:
            return
        self._validated[inode.path] = now
        try:
            stat = await self.origin.stat(inode.path)
        except OriginNotFound:
            if not inode.has_dirty:
                await inode.drop_clean()
                self._forget(inode)
                raise
            return
        await inode.revalidate(stat)

    def forget_if_idle(self, inode: CachingInode) -> None:
        """Forgets ``inode`` if nothing holds it any more."""
        if inode.is_idle and self._inodes.get(inode.path) is inode:
            self._forget(inode)

    def _forget(self, inode: CachingInode) -> None:
        if self._inodes.get(inode.path) is inode:
            del self._inodes[inode.path]
            self._validated.pop(inode.path, None)
            self.memfile.mark_all_unevictable(inode)

    def _limit_inodes(self) -> None:
        excess = len(self._inodes) - self.options.max_inodes
        if excess > 0:
            victims = list(self._inodes.values())[:excess]
            self._spawn(self._evict_inodes(victims))

    async def _evict_inodes(self, victims: list[CachingInode]) -> None:
        for inode in victims:
            for rng in self.memfile.evictable_ranges(inode):
                await inode.evict(rng)

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> tuple[CachingInode, bool]:
        """Replaces ``path`` with the streamed bytes; returns (inode, created).

        A new path is created by the upload itself, so an interrupted first
        upload leaves nothing behind; an existing file keeps its old content.
        """
        stat: OriginStat | None = None
        try:
            inode = await self._get(path, create=False)
        except OriginNotFound:
            stat = await self.origin.replace(path, chunks)
            # Not stat again: a DELETE may already have removed the new file,
            # and this PUT still succeeded.
            inode = await self._get(path, create=False, known=stat)
        inode.users += 1
        try:
            async with inode.writeback_mu, inode.attr_mu:
                created = stat is not None
                if stat is None:
                    # Under the inode's locks: no write-back interleaves.
                    stat = await self.origin.replace(path, chunks)
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
            await self.origin.remove(path)
            return
        async with inode.writeback_mu, inode.attr_mu:
            await self.origin.remove(path)
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

    async def reserve_dirty(self, length: int) -> None:
        """Makes room for ``length`` more dirty bytes, writing back if needed.

        Raises CacheFull when write-back cannot bring dirty data under
        ``max_dirty``. Preconditions: the caller holds no inode lock.
        """
        limit = self.options.max_dirty
        if self.counters.dirty_bytes + length <= limit:
            return
        await self._writeback_oldest(limit - length)
        if self.counters.dirty_bytes + length > limit:
            raise CacheFull(
                f"{self.counters.dirty_bytes} dirty bytes cannot be written back "
                f"(limit {limit}); last error: {self._last_error()}"
            )

    def _last_error(self) -> str:
        for inode in self._inodes.values():
            if inode.last_error is not None:
                return str(inode.last_error)
        return "none"

    async def _writeback_oldest(self, target: int) -> None:
        """Writes back dirty files, oldest dirt first, until dirty <= target."""
        dirty = sorted(
            (i for i in self._inodes.values() if i.has_dirty),
            key=lambda i: i.dirty_since if i.dirty_since is not None else 0.0,
        )
        for inode in dirty:
            if self.counters.dirty_bytes <= target:
                return
            with contextlib.suppress(OriginError):
                await inode.writeback()

    async def sync_all(self) -> list[WritebackFailure]:
        """Writes back and fsyncs every dirty file; returns the failures."""
        failures: list[WritebackFailure] = []
        for inode in list(self._inodes.values()):
            if not inode.has_dirty:
                continue
            try:
                await inode.fsync()
            except OriginError as exc:
                ranges = [(r.start, r.end) for r, _ in inode.dirty]
                failures.append(WritebackFailure(inode.path, ranges, str(exc)))
        return failures

    async def drop(self, path: str) -> int:
        """Writes ``path`` back, then drops its unmapped pages; returns bytes dropped."""
        inode = self._inodes.get(path)
        if inode is None:
            return 0
        await inode.fsync()
        return await inode.drop_clean()

    async def _writeback_daemon(self) -> None:
        interval = max(0.05, min(5.0, self.options.dirty_expire / 2))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for inode in list(self._inodes.values()):
                since = inode.dirty_since
                expired = since is not None and now - since >= self.options.dirty_expire
                if expired or (inode.has_dirty and since is None):
                    with contextlib.suppress(OriginError):
                        await inode.writeback()
            if self.counters.dirty_bytes > self.options.max_dirty:
                await self._writeback_oldest(self.options.max_dirty)

    # ------------------------------------------------------------------- pins

    async def pin(self, path: str, start: int, end: int) -> int:
        """Pins ``[start, end)`` of ``path`` in the cache; returns bytes pinned."""
        async with self.open(path) as inode:
            mapping = await inode.map_range(start, end - start, pin=True)
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
        await mapping.release()
        return True

    # --------------------------------------------------------------- eviction

    @property
    def page_cache_bytes(self) -> int:
        return self.memfile.allocated_bytes(MemoryKind.PAGE_CACHE)

    def note_allocation(self) -> None:
        """Starts budget eviction if the page cache has outgrown ``cache_size``."""
        if self.page_cache_bytes > self.options.cache_size and self._evicting is None:
            self._evicting = asyncio.create_task(self._evict_to_budget(), name="budget eviction")

    async def _evict_to_budget(self) -> None:
        try:
            target = int(self.options.cache_size * LOW_WATERMARK)
            for inode in list(self._inodes.values()):
                if self.page_cache_bytes <= target:
                    return
                for rng in self.memfile.evictable_ranges(inode):
                    await inode.evict(rng)
                    if self.page_cache_bytes <= target:
                        return
        finally:
            self._evicting = None

    async def evict_all(self, *, wait: bool) -> int:
        """Evicts everything evictable; with ``wait``, returns once the memory
        has been released to the host. Returns page-cache bytes before minus after."""
        before = self.page_cache_bytes
        self.memfile.start_evictions()
        if wait:
            await self.memfile.wait_for_evictions()
            await self.memfile.wait_reclaimed()
            await self.memfile.update_usage()
        return before - self.page_cache_bytes

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, object]:
        return {
            "files": len(self._inodes),
            "page_cache_bytes": self.page_cache_bytes,
            "cache_size": self.options.cache_size,
            "pins": sum(len(m) for m in self._pins.values()),
            **self.counters.as_dict(),
        }
