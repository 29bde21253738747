"""The flusher: dirty data goes back to the origin in time and within bounds.

Follows the kernel's writeback daemon rather than the reference design
(which writes back only on fsync and eviction): dirty data older than
``dirty_expire`` is written back by a background task, all of it once dirty
bytes exceed ``max_dirty``, and a write that would take dirty bytes past
``max_dirty`` first writes the oldest back, or fails with CacheFull when it
cannot (write-back keeps failing).

The flusher knows the files with dirty data (their inodes report it when
they become dirty), so its periodic pass costs nothing for clean files.

Protected by the event loop; it takes no lock itself and calls inode
methods that take theirs, never holding one across another file's call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from cachesvc.core.accounting import CacheCounters
from cachesvc.core.errors import CacheFull
from cachesvc.core.inode import CachingInode
from cachesvc.core.inode_state import InodeState
from cachesvc.origins.base import OriginError


@dataclass(frozen=True, slots=True)
class WritebackFailure:
    """A file whose dirty data could not be written back. Immutable."""

    path: str
    ranges: list[tuple[int, int]]  # half-open dirty ranges left
    error: str


class Flusher:
    """Writes dirty files back: on a timer, over a limit, and on demand."""

    def __init__(self, counters: CacheCounters, *, max_dirty: int, dirty_expire: float) -> None:
        self._counters = counters  # Immutable.
        self.max_dirty = max_dirty  # Immutable.
        self.dirty_expire = dirty_expire  # Immutable.
        # Files that have had dirty data since the last pass. Protected by the event loop.
        self._dirty: dict[str, CachingInode] = {}

    def note_dirty(self, inode: CachingInode) -> None:
        """``inode`` has dirty data now."""
        self._dirty[inode.path] = inode

    def forget(self, inode: InodeState) -> None:
        """``inode`` is gone from the cache (with no dirty data left)."""
        if self._dirty.get(inode.path) is inode:
            del self._dirty[inode.path]

    def dirty_files(self) -> list[CachingInode]:
        """Files with dirty data, oldest dirt first."""
        files = [inode for inode in self._dirty.values() if inode.has_dirty]
        return sorted(files, key=lambda i: i.dirty_since if i.dirty_since is not None else 0.0)

    def last_error(self) -> str:
        for inode in self._dirty.values():
            if inode.last_error is not None:
                return str(inode.last_error)
        return "none"

    async def reserve_dirty(self, length: int) -> None:
        """Makes room for ``length`` more dirty bytes, writing back if needed.

        Raises CacheFull when write-back cannot bring dirty data under
        ``max_dirty``. Preconditions: the caller holds no inode lock.
        """
        limit = self.max_dirty
        if self._counters.dirty_bytes + length <= limit:
            return
        await self.writeback_oldest(limit - length)
        if self._counters.dirty_bytes + length > limit:
            raise CacheFull(
                f"{self._counters.dirty_bytes} dirty bytes cannot be written back "
                f"(limit {limit}); last error: {self.last_error()}"
            )

    async def writeback_oldest(self, target: int) -> None:
        """Writes back dirty files, oldest dirt first, until dirty <= target."""
        for inode in self.dirty_files():
            if self._counters.dirty_bytes <= target:
                return
            with contextlib.suppress(OriginError):
                await inode.writeback()

    async def sync_all(self) -> list[WritebackFailure]:
        """Writes back and fsyncs every dirty file; returns the failures."""
        failures: list[WritebackFailure] = []
        for inode in self.dirty_files():
            try:
                await inode.fsync()
            except OriginError as exc:
                ranges = [(r.start, r.end) for r in inode.dirty.ranges()]
                failures.append(WritebackFailure(inode.path, ranges, str(exc)))
        self._prune()
        return failures

    def _prune(self) -> None:
        for path, inode in list(self._dirty.items()):
            if not inode.has_dirty:
                del self._dirty[path]

    async def run(self) -> None:
        """The daemon: every half ``dirty_expire`` (0.05-5 s), writes back what
        has been dirty for ``dirty_expire``, then the oldest while dirty bytes
        exceed ``max_dirty``."""
        interval = max(0.05, min(5.0, self.dirty_expire / 2))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for inode in self.dirty_files():
                since = inode.dirty_since
                # A size change alone has no dirty bytes and no dirty_since.
                if since is None or now - since >= self.dirty_expire:
                    with contextlib.suppress(OriginError):
                        await inode.writeback()
            if self._counters.dirty_bytes > self.max_dirty:
                await self.writeback_oldest(self.max_dirty)
            self._prune()
