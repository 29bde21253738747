"""Write-back: writing a cached file's dirty bytes and size to the origin.

The write-back layer of the caching inode (see :mod:`cachesvc.core.inode_state`
for the layers and the lock order). Follows SyncDirty and WriteOut in the
reference design, with what a service needs more: a failed write-back keeps
the data dirty and cached, records the error and raises it; the next one
writes everything again (it never trusts an origin sync that followed a
failure).

A write-back takes a :class:`DirtySnapshot` under the inode's locks,
referencing the memory that holds the dirty bytes, then writes without any
lock held (only ``writeback_mu``, which orders write-backs): reads and
writes of the file go on meanwhile. Each dirty range carries the write
generation of its last write, so when the write-back succeeds only ranges
not written since the snapshot are marked clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from cachesvc.core.fills import FillingInode
from cachesvc.core.memfile import MemoryFile
from cachesvc.core.pages import copy_from_views, page_range
from cachesvc.core.ranges import Range, union_ranges
from cachesvc.core.sets import MemoryPieces
from cachesvc.origins.base import OriginError, OriginStat

log = logging.getLogger("cachesvc.inode")


@dataclass(slots=True)
class DirtySnapshot:
    """The dirty state of one file at the start of a write-back. Immutable after creation."""

    memfile: MemoryFile
    generation: int  # write generation when taken; newer writes stay dirty
    size: int  # file size to write
    size_dirty: bool  # the size itself must be written
    dirty: list[Range]  # dirty byte ranges below size, sorted
    pieces: MemoryPieces  # page-aligned memory holding them, one reference each
    origin_valid: int  # buffered origins: origin bytes at or past this are stale

    def changed(self) -> list[Range]:
        """Ranges an object-store rewrite must take from here (dirty bytes plus
        the zeros of a region truncated away and grown again)."""
        extra = [Range(self.origin_valid, self.size)] if self.origin_valid < self.size else []
        return union_ranges([*self.dirty, *extra])

    def views(self, rng: Range) -> list[memoryview]:
        """Views of the snapshot's bytes of file range ``rng`` (which must be dirty)."""
        out: list[memoryview] = []
        for file_off, mem in self.pieces:
            part = Range(file_off, file_off + mem.length).intersect(rng)
            if part.is_empty:
                continue
            start = mem.start + part.start - file_off
            out += self.memfile.map_internal(Range(start, start + part.length), write=False)
        return out

    async def read_changed(self, offset: int, length: int) -> bytes:
        """``Origin.rewrite``'s reader: snapshot bytes, zeros where nothing is cached."""
        out = bytearray(length)
        want = Range(offset, offset + length)
        for file_off, mem in self.pieces:
            part = Range(file_off, file_off + mem.length).intersect(want)
            if part.is_empty:
                continue
            target = memoryview(out)[part.start - offset : part.end - offset]
            copy_from_views(self.views(part), target)
        return bytes(out)

    def release(self) -> None:
        """Drops the snapshot's memory references."""
        for _, mem in self.pieces:
            self.memfile.dec_ref(mem)
        self.pieces = []


def detached(exc: OriginError) -> OriginError:
    """A copy of ``exc`` without traceback or cause, safe to keep: a kept
    traceback would keep the frames of the failed write alive, and with them
    views of the memory file."""
    return type(exc)(str(exc))


class WritebackInode(FillingInode):
    """The write-back layer of the caching inode."""

    __slots__ = ()

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

    def start_writeback(self) -> None:
        """Starts a write-back in the background (eviction met dirty pages);
        its failure is recorded like any other."""
        if not self._lock_set().writeback_mu.locked():
            self.host.spawn(self._writeback_quietly())

    async def _writeback_quietly(self) -> None:
        # A failure is recorded in last_error and the counters; the data stays dirty.
        with contextlib.suppress(OriginError):
            await self.writeback()

    async def _writeback_locked(self, *, sync: bool) -> int:
        """Preconditions: writeback_mu is held. Takes attr_mu and data_mu briefly."""
        self.writeback_mu.assert_held()
        async with self.attr_mu, self.data_mu.reading():
            snapshot = self._snapshot_dirty_locked() if self.has_dirty else None
        origin = self.host.origin
        if snapshot is None:
            if sync and origin.capabilities.durable_sync:
                await self._sync_origin()
            return 0
        uploading: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._uploading = uploading
        counters = self.host.counters
        try:
            try:
                stat = await self._write_snapshot(snapshot)
            except OriginError as exc:
                counters.writeback_errors += 1
                self.last_error = detached(exc)
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
        counters.writeback_bytes += written
        return written

    def _snapshot_dirty_locked(self) -> DirtySnapshot:
        """Snapshots what a write-back must write, referencing its memory.

        Preconditions: attr_mu is held; data_mu is held.
        """
        self.attr_mu.assert_held()
        self.data_mu.assert_held()
        size = self.attr.size
        dirty = [r.intersect(Range(0, size)) for r in self.dirty.ranges()]
        dirty = [r for r in dirty if not r.is_empty]
        pieces: MemoryPieces = []
        memfile = self.host.memfile
        # Several dirty ranges may share a page: reference each page once.
        for pages in union_ranges(page_range(r.start, r.end) for r in dirty):
            for file_off, mem in self.cache_set.pieces(pages):
                memfile.inc_ref(mem)
                pieces.append((file_off, mem))
        self._truncated_to = None
        return DirtySnapshot(
            memfile, self._write_gen, size, self._size_dirty_gen is not None, dirty, pieces,
            self._origin_valid,
        )  # fmt: skip

    async def _write_snapshot(self, snapshot: DirtySnapshot) -> OriginStat:
        """Writes a snapshot to the origin and makes it durable; no lock held."""
        origin = self.host.origin
        if self.buffered:
            changed = [(r.start, r.end) for r in snapshot.changed()]
            return await origin.rewrite(
                self.path, snapshot.size, changed, snapshot.read_changed, self._origin_etag
            )
        for rng in snapshot.dirty:
            await origin.write_from(self.path, rng.start, snapshot.views(rng))
        if snapshot.size_dirty:
            await origin.set_size(self.path, snapshot.size)
        if origin.capabilities.durable_sync:
            await origin.sync(self.path)
        return await origin.stat(self.path)

    def _written_back_locked(self, snapshot: DirtySnapshot, stat: OriginStat) -> None:
        """Marks clean what the snapshot wrote and nothing written since.

        Preconditions: attr_mu and maps_mu are held; data_mu is held for writing.
        """
        self.attr_mu.assert_held()
        self.maps_mu.assert_held()
        self.data_mu.assert_held(write=True)
        if self._dirty is not None:
            self.host.counters.dirty_bytes -= self._dirty.mark_written(snapshot.generation)
        self._settle_dirty()
        if self._size_dirty_gen is not None and self._size_dirty_gen <= snapshot.generation:
            self._size_dirty_gen = None
        if self.buffered:
            low = self._truncated_to
            self._origin_valid = snapshot.size if low is None else min(snapshot.size, low)
        self._origin_etag = stat.etag
        self.last_error = None
        # Pages an eviction left behind because they were dirty go back to
        # the policy, and waiting reservations may evict them now.
        self._track_extents_locked(
            seg.intersect(pages)
            for rng in snapshot.dirty
            for pages in [page_range(rng.start, rng.end)]
            for seg, _ in self.cache_set.segments(pages)
        )
        self.host.budget.note_released()

    async def _sync_origin(self) -> None:
        try:
            await self.host.origin.sync(self.path)
        except OriginError as exc:
            self.host.counters.writeback_errors += 1
            self.last_error = detached(exc)
            raise


__all__ = ["DirtySnapshot", "WritebackInode"]
