"""DirtySnapshot: what one write-back of a file must write.

A write-back takes a snapshot of the dirty ranges under the inode's locks,
referencing the memory that holds them, then writes without any lock held:
reads and writes of the file go on meanwhile. Each dirty range carries the
write generation of its last write, so when the write-back succeeds only
ranges not written since the snapshot are marked clean.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachesvc.core.mapping import MemoryPieces
from cachesvc.core.memfile import MemoryFile
from cachesvc.core.pages import copy_from_views
from cachesvc.core.ranges import Range, union_ranges


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
