"""MemoryFile: the page allocator over one backing memory file.

Follows MemoryFile in the reference design (pgalloc_newer.go), rendered for
asyncio. One backing file (a memfd, or a file at a given path) holds every
page the cache allocates. Its size is a power-of-two multiple of CHUNK_SIZE
(capped at ``max_size``) and grows by doubling; uncommitted pages cost the
host nothing. The file is mapped into the process in CHUNK_SIZE pieces,
created lazily in a worker thread when an allocation first covers them, never
remapped, and unmapped only by ``close``.

Which pages are allocated, referenced, committed or reclaimable is kept by
a :class:`~cachesvc.core.pageusage.PageUsage` (the ``usage`` set and its
counts). ``allocate`` takes the first fit at or after a lower bound on the
first free page. When ``dec_ref`` drops a page's references to zero the page
becomes *reclaimable*: it stays in ``usage`` (so it cannot be allocated
again) until the reclaimer task has punched a hole over it, which gives the
memory back to the host and makes the page read as zeros; only then is it
free again.

What is evicted, and when, is decided above the allocator: the page cache
reserves its bytes against a budget and evicts through one driver (see
:mod:`cachesvc.core.budget` and :mod:`cachesvc.core.eviction`).

Committed memory is measured on the host, never guessed: ``update_usage``
reads the file's allocated blocks with fstat and, unless that total already
matches what ``usage`` knows to be committed, asks ``mincore`` which pages of
the segments not yet known committed are resident.

Concurrency. Everything runs on one event loop, and code between two awaits
is atomic, so the allocator state needs no lock: fields marked "Protected by
the event loop" are read and changed only on the loop thread, and no method
awaits while one of their invariants is broken (it decides and updates state
first, then awaits I/O). Blocking syscalls (ftruncate, mmap, fallocate,
fstat, mincore; see :mod:`cachesvc.core.hostmem`) run on the MemoryFile's
own worker threads; they get everything they need as arguments (fd,
addresses, ranges), never touch the state, and their results are applied on
the loop afterwards, re-checked against whatever changed meanwhile. The one
lock serializes growing the file and creating chunk mappings, which spans
awaits:

Lock order:
    MemoryFile.map_mu

Views returned by ``map_internal`` point into the chunk mappings. Release
them (or drop them) before ``close``: a chunk whose mapping still has
exported views cannot be unmapped, and is left for the garbage collector
to unmap once its last view is gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from cachesvc.core.hostmem import (
    CHUNK_SHIFT,
    ChunkMappings,
    allocated_bytes,
    map_chunks,
    open_backing,
    populate,
    punch_hole,
    resident_runs,
    zero,
)
from cachesvc.core.hostmem import CHUNK_SIZE as CHUNK_SIZE
from cachesvc.core.hostmem import HUGE_PAGE_SIZE as HUGE_PAGE_SIZE
from cachesvc.core.hostmem import PAGE_SIZE as PAGE_SIZE
from cachesvc.core.locks import OrderedLock
from cachesvc.core.pageusage import MemoryFileError as MemoryFileError
from cachesvc.core.pageusage import MemoryFileFull as MemoryFileFull
from cachesvc.core.pageusage import MemoryKind as MemoryKind
from cachesvc.core.pageusage import PageUsage, UsageInfo
from cachesvc.core.ranges import Range

# The "X as X" imports above are re-exports: the page geometry (PAGE_SIZE,
# HUGE_PAGE_SIZE, CHUNK_SIZE), MemoryKind and the errors are part of
# MemoryFile's interface.

logger = logging.getLogger("cachesvc.memfile")

# allocate_and_fill faults in allocations at least this large in a worker
# thread while the reader fills them (smaller ones are not worth the hop).
POPULATE_MIN = 256 << 10

_PAGE_MASK = PAGE_SIZE - 1
# Allocations never end beyond this offset when no max_size is given.
_NO_LIMIT = 1 << 62
# With unexplained committed bytes (swapped or not in a known segment),
# update_usage rescans at most this often (seconds), as the reference does.
_RESCAN_INTERVAL = 1.0
_WORKER_THREADS = 4

_P = ParamSpec("_P")
_T = TypeVar("_T")


# ---------------------------------------------------------------- MemoryFile


class MemoryFile:
    """Allocates reference-counted pages of one backing memory file."""

    @classmethod
    async def create(cls, path: str | None = None, *, max_size: int | None = None) -> MemoryFile:
        """Creates the backing file (a memfd unless ``path`` is given) and the
        reclaimer task. ``max_size`` (at least CHUNK_SIZE) bounds the file size;
        it is rounded down to a whole chunk."""
        if max_size is not None and max_size < CHUNK_SIZE:
            raise MemoryFileError(f"max_size {max_size} is below the chunk size {CHUNK_SIZE}")
        fd = await asyncio.to_thread(open_backing, path)
        self = cls(fd, max_size=max_size)
        self._reclaimer = asyncio.create_task(self._reclaim_loop(), name="memfile reclaimer")
        return self

    def __init__(self, fd: int, *, max_size: int | None) -> None:
        """Use ``create``: ``fd`` must already be truncated to CHUNK_SIZE."""
        self._fd = fd  # Immutable (closed by close).
        # The highest end of an allocation. Immutable.
        self._limit = _NO_LIMIT if max_size is None else max_size & ~(CHUNK_SIZE - 1)
        self._executor = ThreadPoolExecutor(_WORKER_THREADS, thread_name_prefix="memfile")
        # Whether the host can populate pages (MADV_POPULATE_WRITE); cleared
        # on the first failure. Protected by the event loop.
        self._populate = True

        self._map_mu = OrderedLock("MemoryFile.map_mu", 1, self)
        # Size the file has actually been extended to. Protected by map_mu.
        self._mapped_size = CHUNK_SIZE
        # The chunks below mapped_size. Reading needs no lock; changing them
        # requires map_mu.
        self._chunks = ChunkMappings()

        # Allocated, referenced, committed and reclaimable pages, with their
        # counts. Protected by the event loop.
        self._usage = PageUsage()
        # Size the file has (or is about to have); a power-of-two multiple of
        # CHUNK_SIZE or the limit. Protected by the event loop.
        self._file_size = CHUNK_SIZE
        # Committed bytes the file reports beyond the known ones (the
        # reference's usageSwapped), counted as SYSTEM. Protected by the event loop.
        self._unexplained = 0
        # The file's allocated bytes at the last update_usage. Protected by the event loop.
        self._total_committed = 0
        # time.monotonic() of the last mincore scan. Protected by the event loop.
        self._last_scan = -math.inf
        # Bumped whenever holes are punched, to detect stale scans. Protected
        # by the event loop.
        self._decommit_gen = 0
        self._reclaimed_total = 0  # Protected by the event loop.

        # Wakes the reclaimer; set when pages become reclaimable or on close.
        self._reclaim_wake = asyncio.Event()
        # Set while the reclaimer has nothing to do (or has stopped).
        self._reclaim_idle = asyncio.Event()
        self._reclaimer: asyncio.Task[None] | None = None  # Set by create.
        self._closed = False  # Protected by the event loop.

    # ----------------------------------------------------------- accessors

    @property
    def fd(self) -> int:
        """The backing file's descriptor (owned by the MemoryFile)."""
        return self._fd

    @property
    def file_size(self) -> int:
        return self._file_size

    @property
    def closed(self) -> bool:
        return self._closed

    def allocated_bytes(self, kind: MemoryKind) -> int:
        """Bytes of ``kind`` with at least one reference."""
        return self._usage.allocated[kind]

    def peak_allocated_bytes(self, kind: MemoryKind) -> int:
        """The most bytes of ``kind`` ever allocated at once."""
        return self._usage.peak_allocated[kind]

    def committed_bytes(self, kind: MemoryKind) -> int:
        """Committed bytes of ``kind`` as of the last ``update_usage``; bytes
        the host reports beyond the known segments count as SYSTEM."""
        extra = self._unexplained if kind is MemoryKind.SYSTEM else 0
        return self._usage.committed[kind] + extra

    @property
    def total_committed_bytes(self) -> int:
        """The file's allocated bytes (fstat) as of the last ``update_usage``."""
        return self._total_committed

    @property
    def reclaimable_bytes(self) -> int:
        """Freed bytes the reclaimer has not returned to the host yet."""
        return self._usage.reclaimable_bytes

    @property
    def reclaimed_bytes_total(self) -> int:
        """Bytes whose holes the reclaimer has punched since creation."""
        return self._reclaimed_total

    def usage_segments(self) -> list[tuple[Range, UsageInfo]]:
        """A copy of ``usage``, for tests and diagnostics."""
        return self._usage.segments()

    # ---------------------------------------------------------- allocation

    async def allocate(self, length: int, kind: MemoryKind) -> Range:
        """Allocates ``length`` zeroed bytes (page-aligned, > 0) with one reference.

        Ranges of HUGE_PAGE_SIZE or more are aligned to HUGE_PAGE_SIZE. Grows
        the file if nothing fits; when it cannot (``max_size``) but freed pages
        await reclaim, waits for the reclaimer and tries again. The chunks the
        range covers are mapped before this returns.
        """
        # Follows MemoryFile.Allocate in the reference design.
        if length <= 0 or length & _PAGE_MASK:
            raise MemoryFileError(f"allocate: invalid length {length}")
        while True:
            self._check_open("allocate")
            try:
                rng = self._allocate_now(length, kind)
                break
            except MemoryFileFull:
                if not self._usage.reclaimable_bytes:
                    raise
            await self.wait_reclaimed()
        try:
            await self._ensure_mapped(rng)
        except BaseException:
            self.dec_ref(rng)
            raise
        return rng

    def _allocate_now(self, length: int, kind: MemoryKind) -> Range:
        alignment = HUGE_PAGE_SIZE if length >= HUGE_PAGE_SIZE else PAGE_SIZE
        rng = self._usage.take(length, kind, alignment, self._limit)
        size = self._file_size
        while size < rng.end:
            size *= 2
        self._file_size = min(size, self._limit)
        return rng

    async def _ensure_mapped(self, rng: Range) -> None:
        """Extends the file and maps the chunks covering ``rng`` as needed."""
        first = rng.start >> CHUNK_SHIFT
        last = (rng.end - 1) >> CHUNK_SHIFT
        if self._chunks.covers(first, last):
            return
        async with self._map_mu:
            self._check_open("allocate")
            size = self._file_size
            if self._mapped_size < size:
                await self._run(os.ftruncate, self._fd, size)
                self._mapped_size = size
                self._chunks.extend(size >> CHUNK_SHIFT)
            missing = self._chunks.missing(first, last)
            if not missing:
                return
            self._chunks.install(await self._run(map_chunks, self._fd, missing))

    async def allocate_and_fill(
        self,
        length: int,
        kind: MemoryKind,
        reader: Callable[[list[memoryview]], Awaitable[int]],
        *,
        prefault: bool = True,
        allocated: Callable[[], None] | None = None,
    ) -> tuple[Range, int]:
        """Allocates ``length`` bytes and fills them with ``await reader(views)``.

        ``reader`` writes into the writable views and returns how many bytes
        it wrote, n. Pages past page_up(n) are freed again; returns the range
        that is kept (empty when n == 0) and n. If ``reader`` raises, all of
        the memory is freed and the error propagates. ``reader`` must not
        write into the views once it has returned or raised. ``prefault``:
        fault large allocations in from a worker thread meanwhile.
        ``allocated``: called once the memory is allocated, before ``reader``
        (a budget reservation becomes an allocation).
        """
        # Follows MemoryFile.AllocateAndFill in the reference design; the
        # partial last page is kept (it reads as zeros past n).
        rng = await self.allocate(length, kind)
        if allocated is not None:
            allocated()
        populating: asyncio.Future[bool] | None = None
        if prefault and self._populate and length >= POPULATE_MIN:
            # The reader (an origin fill on the event loop) would otherwise
            # take a fault per fresh page; a worker thread takes them, ahead
            # of the reader. Not before the reader starts: the origin round
            # trip then overlaps the faulting. On the origin benchmark (4 MiB
            # fills, 2026-11-22) a fill's request went out 5-10 ms after the
            # fill started when populating first, 0.3 ms now. Populating a
            # page the reader is writing is harmless (it only faults it in).
            populating = self._start(populate, self._chunks.address_pieces(rng))
        views = self.map_internal(rng, write=True)
        try:
            try:
                n = await reader(views)
            finally:
                if populating is not None:
                    # The pages must not be freed while the thread touches them.
                    self._populate = await populating
        except BaseException:
            self.dec_ref(rng)
            raise
        if not 0 <= n <= length:
            self.dec_ref(rng)
            raise MemoryFileError(f"allocate_and_fill: reader returned {n} for {length} bytes")
        kept = (n + _PAGE_MASK) & ~_PAGE_MASK
        if kept < length:
            self.dec_ref(Range(rng.start + kept, rng.end))
        return Range(rng.start, rng.start + kept), n

    # ------------------------------------------------------------ references

    def inc_ref(self, rng: Range) -> None:
        """Adds a reference to every page of ``rng``, which must be allocated."""
        self._usage.inc_ref(rng)

    def dec_ref(self, rng: Range) -> None:
        """Drops a reference from every page of ``rng``, which must be allocated.

        Pages left without references become reclaimable: the reclaimer
        punches holes over them and then returns them to the allocator.
        Validates the whole range before changing anything.
        """
        if self._usage.dec_ref(rng):
            self._reclaim_idle.clear()
            self._reclaim_wake.set()

    # ------------------------------------------------------------- mapping

    def map_internal(self, rng: Range, write: bool) -> list[memoryview]:
        """Views of the bytes of ``rng``, one per chunk it spans.

        ``rng`` must lie in allocated memory (allocation maps it). The views are
        read-only unless ``write``. Takes no lock and does no I/O.
        """
        start, end = rng
        if not 0 <= start <= end:
            raise MemoryFileError(f"map_internal: invalid range {rng}")
        if start == end:
            return []
        views = self._chunks.views(rng, write)
        if views is not None:
            return views
        raise MemoryFileError(f"map_internal({rng}): memory is not mapped")

    # ------------------------------------------------- decommit and reclaim

    async def decommit(self, rng: Range) -> None:
        """Punches a hole over allocated ``rng``: the host frees its memory and
        the pages read as zeros until written again."""
        # Follows MemoryFile.Decommit in the reference design.
        self._usage.check_held(rng, "decommit")
        self._check_open("decommit")
        # Shielded so that the pages are marked decommitted once punched even
        # if the caller is cancelled meanwhile.
        await asyncio.shield(self._punch_and_mark(rng))

    async def _punch_and_mark(self, rng: Range) -> None:
        try:
            await self._run(punch_hole, self._fd, rng.start, rng.length)
        except OSError as exc:
            raise MemoryFileError(f"decommit({rng}): {exc}") from exc
        self._mark_decommitted(rng)

    def _mark_decommitted(self, rng: Range) -> None:
        """Clears known_committed over whatever is in ``rng`` now."""
        self._decommit_gen += 1
        self._usage.mark_decommitted(rng)

    async def wait_reclaimed(self) -> None:
        """Waits until the reclaimer has returned every freed page to the
        allocator (or has stopped); raises RuntimeError if it failed."""
        await self._reclaim_idle.wait()
        reclaimer = self._reclaimer
        if reclaimer is not None and reclaimer.done() and not reclaimer.cancelled():
            exc = reclaimer.exception()
            if exc is not None:
                raise RuntimeError("the memory file reclaimer failed") from exc

    async def _reclaim_loop(self) -> None:
        """Punches holes over reclaimable pages, lowest first, and frees them."""
        # Follows MemoryFile.runReclaim in the reference design. Reclaiming
        # from the start of the file keeps first-fit allocation short.
        try:
            while not self._closed:
                rng = self._usage.first_reclaimable()
                if rng is None:
                    self._reclaim_idle.set()
                    self._reclaim_wake.clear()
                    await self._reclaim_wake.wait()
                    continue
                # rng stays in usage with refs == 0 while the hole is punched:
                # no call can allocate, reference or decommit it meanwhile.
                try:
                    await self._run(punch_hole, self._fd, rng.start, rng.length)
                    punched = True
                except OSError as exc:
                    # The memory stays committed, but the pages must read as
                    # zeros when allocated again.
                    logger.warning("reclaim: %s; zeroing %s instead", exc, rng)
                    await self._run(zero, self._chunks.address_pieces(rng))
                    punched = False
                self._mark_decommitted(rng)
                self._usage.mark_reclaimed(rng)
                if punched:
                    self._reclaimed_total += rng.length
        finally:
            self._reclaim_idle.set()

    # ----------------------------------------------------------- accounting

    async def update_usage(self) -> None:
        """Refreshes the committed figures from the host.

        Reads the file's allocated blocks (fstat); unless they match the bytes
        already known committed, scans the allocated segments not known to be
        committed with mincore and marks the resident pages. Bytes the host
        reports beyond the known ones (swapped pages, or pages committed
        outside allocated segments) are counted as SYSTEM.
        """
        # Follows MemoryFile.UpdateUsage and updateUsageLocked in the reference design.
        for _ in range(3):
            self._check_open("update_usage")
            gen = self._decommit_gen
            total = await self._run(allocated_bytes, self._fd)
            self._total_committed = total
            known = self._usage.known_committed
            if total == known + self._unexplained and (
                self._unexplained == 0 or time.monotonic() < self._last_scan + _RESCAN_INTERVAL
            ):
                return
            self._last_scan = time.monotonic()
            pieces = [
                piece
                for seg in self._usage.uncommitted()
                for piece in self._chunks.address_pieces(seg)
            ]
            runs = await self._run(resident_runs, pieces) if pieces else []
            if gen == self._decommit_gen:
                # No hole was punched during the scan, so every page it found
                # resident is still committed.
                for run in runs:
                    self._usage.mark_committed(run)
                self._unexplained = max(0, total - self._usage.known_committed)
                return
        # Holes kept being punched; the next call tries again.
        self._unexplained = max(0, self._total_committed - self._usage.known_committed)

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Stops the reclaimer, unmaps the chunks and closes the file.

        Callers must have released the views ``map_internal`` gave them; a
        chunk with views still exported is left for the garbage collector to
        unmap. Pages still allocated are simply dropped with the file.
        """
        if self._closed:
            return
        self._closed = True
        self._reclaim_wake.set()
        if self._reclaimer is not None:
            (outcome,) = await asyncio.gather(self._reclaimer, return_exceptions=True)
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                logger.error("the memory file reclaimer had failed", exc_info=outcome)
        async with self._map_mu:
            # Waits for work still running on the worker threads (a decommit
            # or update_usage) before the mappings and the fd go away.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
            self._chunks.close()
            os.close(self._fd)

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise MemoryFileError(f"{op}: the memory file is closed")

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Runs blocking ``fn`` on a worker thread."""
        return await self._start(fn, *args, **kwargs)

    def _start(
        self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> asyncio.Future[_T]:
        """Starts blocking ``fn`` on a worker thread; its future on the loop."""
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except RuntimeError as exc:  # the executor has been shut down
            raise MemoryFileError("the memory file is closed") from exc
        return asyncio.wrap_future(future)

    # ------------------------------------------------------ introspection

    def stats(self) -> dict[str, int]:
        """Current figures; cheap to read (nothing scans usage)."""
        return {
            "file_size": self._file_size,
            "usage_segments": len(self._usage),
            "mapped_chunks": self._chunks.mapped_count,
            "allocated_page_cache_bytes": self._usage.allocated[MemoryKind.PAGE_CACHE],
            "allocated_system_bytes": self._usage.allocated[MemoryKind.SYSTEM],
            "reclaimable_bytes": self.reclaimable_bytes,
            "reclaimed_bytes_total": self._reclaimed_total,
            "committed_page_cache_bytes": self.committed_bytes(MemoryKind.PAGE_CACHE),
            "committed_system_bytes": self.committed_bytes(MemoryKind.SYSTEM),
            "total_committed_bytes": self._total_committed,
        }

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<MemoryFile {state} size={self._file_size} {self._usage!r}>"

    def check_invariants(self) -> None:
        """Asserts every invariant of the allocator state (for tests)."""
        size = self._file_size
        assert size % CHUNK_SIZE == 0, f"file size {size} is not a whole number of chunks"
        chunks = size >> CHUNK_SHIFT
        assert size == self._limit or chunks & (chunks - 1) == 0, f"file size {size}"
        self._usage.check_invariants(size)
