"""Mapping: cache pages of one file range held outside ``data_mu``.

A response that streams cached bytes, or an operator pin, holds a mapping
until it is done. The mapping holds a MemoryFile reference on every page it
covers, so the bytes stay valid and the pages unevicted meanwhile; writes
to the range made after the mapping was taken may still show through, as
with a shared memory mapping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from cachesvc.core.pages import copy_from_views
from cachesvc.core.ranges import Range
from cachesvc.core.sets import MemoryPieces

if TYPE_CHECKING:
    from cachesvc.core.memfile import MemoryFile

# Releases under way, referenced until done (the event loop keeps only weak
# references to tasks). Protected by the event loop.
_releasing: set[asyncio.Task[None]] = set()


class MappingOwner(Protocol):
    """The inode a mapping belongs to."""

    @property
    def memfile(self) -> MemoryFile: ...

    async def remove_mapping(
        self, pages: Range, memory: MemoryPieces, pinned: bool, evictability_gen: int
    ) -> None: ...

    def remove_mapping_now(
        self, pages: Range, memory: MemoryPieces, pinned: bool, evictability_gen: int
    ) -> bool: ...


class Mapping:
    """Cached bytes ``[offset, offset+length)`` of one file, held until released."""

    __slots__ = (
        "_evictability_gen", "_memory", "_owner", "_pages", "_released", "length", "missed",
        "offset", "pinned",
    )  # fmt: skip

    def __init__(
        self,
        owner: MappingOwner,
        pages: Range,
        memory: MemoryPieces,
        offset: int,
        length: int,
        pinned: bool,
        evictability_gen: int,
    ) -> None:
        self._owner = owner  # Immutable.
        self._pages = pages  # page-aligned file range covered. Immutable.
        self._memory = memory  # pieces covering _pages, each referenced once. Immutable.
        self.offset = offset  # first mapped byte. Immutable.
        self.length = length  # number of mapped bytes. Immutable.
        self.pinned = pinned  # an operator pin (off the evictable set). Immutable.
        self._evictability_gen = evictability_gen  # the owner's, when mapped. Immutable.
        self.missed = 0  # bytes that had to be filled from the origin for this mapping
        self._released = False

    def extents(self) -> list[tuple[int, int]]:
        """``(memory file offset, length)`` pieces holding the mapped bytes, in order."""
        out: list[tuple[int, int]] = []
        start, end = self.offset, self.offset + self.length
        for file_off, mem in self._memory:
            lo = max(start, file_off)
            hi = min(end, file_off + mem.length)
            if lo < hi:
                out.append((mem.start + lo - file_off, hi - lo))
        return out

    def views(self) -> list[memoryview]:
        """Read-only views of the mapped bytes, in order."""
        memfile = self._owner.memfile
        out: list[memoryview] = []
        for mem_off, n in self.extents():
            out += memfile.map_internal(Range(mem_off, mem_off + n), write=False)
        return out

    def tobytes(self) -> bytes:
        """A copy of the mapped bytes."""
        out = bytearray(self.length)
        copy_from_views(self.views(), memoryview(out))
        return bytes(out)

    async def release(self) -> None:
        """Gives the pages back; the mapping must not be used afterwards.
        See :func:`release_all`."""
        await release_all((self,))


async def release_all(mappings: Iterable[Mapping]) -> None:
    """Gives the pages of ``mappings`` back, all of them even if the caller
    is cancelled meanwhile.

    Releasing may wait for the owner's locks, and the caller is often a
    response whose client went away, cancelled in a ``finally`` block. So
    a release that cannot be done at once runs in a task of its own, which
    a cancellation of the caller does not stop (asyncio.shield); the
    caller's CancelledError is raised all the same.
    """
    waiting = []
    for m in mappings:
        if m._released:
            continue
        m._released = True
        if not m._owner.remove_mapping_now(m._pages, m._memory, m.pinned, m._evictability_gen):
            waiting.append(m)
    if not waiting:
        return
    task = asyncio.create_task(_remove(waiting), name="release mappings")
    _releasing.add(task)
    task.add_done_callback(_releasing.discard)
    await asyncio.shield(task)


async def _remove(mappings: list[Mapping]) -> None:
    for m in mappings:
        await m._owner.remove_mapping(m._pages, m._memory, m.pinned, m._evictability_gen)
