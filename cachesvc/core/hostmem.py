"""Host memory plumbing for MemoryFile: the backing file, its chunk mappings
and the system calls that commit, decommit and measure its pages.

Page geometry (PAGE_SIZE, HUGE_PAGE_SIZE, CHUNK_SIZE) is the host's and the
mapping granularity. The functions below block and run on MemoryFile's
worker threads: they touch nothing but their arguments (descriptors,
addresses, ranges) and raise OSError as the system calls do. ``fallocate``
and ``mincore`` have no binding in the standard library and are called
through ctypes.

:class:`ChunkMappings` holds the file's mappings, one per CHUNK_SIZE chunk,
created lazily, never remapped and unmapped only by ``close``. Its lists only
grow and an entry is set at most once, so readers need no lock; changing
them requires the owner's lock (MemoryFile.map_mu).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re

from cachesvc.core.ranges import Range

# MemoryFile's logger: the mappings are part of it.
logger = logging.getLogger("cachesvc.memfile")

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
CHUNK_SIZE = 64 << 20

CHUNK_SHIFT = CHUNK_SIZE.bit_length() - 1

# fallocate(2) modes, from Linux's include/uapi/linux/falloc.h.
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int
# Linux 5.14+: fault pages in for writing without touching them.
_MADV_POPULATE_WRITE = 23
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_mincore.restype = ctypes.c_int

# mincore reports residency in bit 0 of each byte; the rest is reserved.
_RESIDENT_BIT = bytes(i & 1 for i in range(256))
_RESIDENT_RUN = re.compile(b"\x01+")


# --------------------------------------------------------------- worker side
# These run on worker threads and touch nothing but their arguments.


def open_backing(path: str | None) -> int:
    """Opens the backing file (a memfd unless ``path`` is given), one chunk long."""
    if path is None:
        fd = os.memfd_create("cachesvc", os.MFD_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # Truncate to 0 first so that no stale contents survive.
        os.ftruncate(fd, 0)
        os.ftruncate(fd, CHUNK_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_chunks(fd: int, indices: list[int]) -> list[tuple[int, mmap.mmap, int]]:
    """Maps the given chunks; returns (index, mapping, address) for each."""
    done: list[tuple[int, mmap.mmap, int]] = []
    try:
        for index in indices:
            mapping = mmap.mmap(
                fd,
                CHUNK_SIZE,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=index << CHUNK_SHIFT,
            )
            # The address is stable while the mapping lives; the ctypes
            # object pins an export only until it is dropped here.
            anchor = ctypes.c_char.from_buffer(mapping)
            address = ctypes.addressof(anchor)
            del anchor
            done.append((index, mapping, address))
    except BaseException:
        for _, mapping, _ in done:
            mapping.close()
        raise
    return done


def punch_hole(fd: int, start: int, length: int) -> None:
    """Frees ``[start, start + length)`` of the file; it reads as zeros afterwards."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, start, length) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"fallocate(PUNCH_HOLE, {start:#x}, {length:#x})", os.strerror(errno))


def zero(pieces: list[tuple[int, int, int]]) -> None:
    """Zeroes (file offset, address, length) pieces in place."""
    for _, address, length in pieces:
        ctypes.memset(address, 0, length)


def populate(pieces: list[tuple[int, int, int]]) -> bool:
    """Faults in (file offset, address, length) pieces for writing, so that
    whoever fills them next does not take a page fault per page; False if
    the host cannot (older kernels), which only costs that speed."""
    for _, address, length in pieces:
        if _madvise(address, length, _MADV_POPULATE_WRITE) != 0:
            return False
    return True


def allocated_bytes(fd: int) -> int:
    """The bytes the host has committed to the file, swapped ones included."""
    # st_blocks is in 512-byte units and counts swapped pages too.
    return os.fstat(fd).st_blocks * 512


def resident_runs(pieces: list[tuple[int, int, int]]) -> list[Range]:
    """For (file offset, address, length) pieces, the file ranges that are resident."""
    runs: list[Range] = []
    for offset, address, length in pieces:
        vec = (ctypes.c_ubyte * (length // PAGE_SIZE))()
        if _mincore(address, length, vec) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mincore({address:#x}, {length:#x})", os.strerror(errno))
        flags = bytes(vec).translate(_RESIDENT_BIT)
        for run in _RESIDENT_RUN.finditer(flags):
            runs.append(Range(offset + run.start() * PAGE_SIZE, offset + run.end() * PAGE_SIZE))
    return runs


# ------------------------------------------------------------ chunk mappings


class ChunkMappings:
    """The backing file's chunk mappings, their addresses and views.

    Readers need no lock; changing requires the owner's lock (MemoryFile.map_mu).
    """

    def __init__(self) -> None:
        # Per chunk below the file's mapped size: its mapping, address (0:
        # unmapped) and writable and read-only views of it (None: unmapped).
        self._maps: list[mmap.mmap | None] = [None]
        self._addresses: list[int] = [0]
        self._rw_views: list[memoryview | None] = [None]
        self._ro_views: list[memoryview | None] = [None]

    @property
    def mapped_count(self) -> int:
        """Chunks mapped so far."""
        return len(self._maps) - self._maps.count(None)

    def covers(self, first: int, last: int) -> bool:
        """Whether chunks ``first`` to ``last`` (inclusive) are all mapped."""
        views = self._rw_views
        return last < len(views) and all(views[i] is not None for i in range(first, last + 1))

    def extend(self, chunks: int) -> None:
        """Makes room for ``chunks`` chunks (the file has grown to that many)."""
        missing_chunks = chunks - len(self._maps)
        self._maps.extend([None] * missing_chunks)
        self._addresses.extend([0] * missing_chunks)
        self._rw_views.extend([None] * missing_chunks)
        self._ro_views.extend([None] * missing_chunks)

    def missing(self, first: int, last: int) -> list[int]:
        """The chunks from ``first`` to ``last`` (inclusive) not mapped yet."""
        return [i for i in range(first, last + 1) if self._maps[i] is None]

    def install(self, mapped: list[tuple[int, mmap.mmap, int]]) -> None:
        """Records what ``map_chunks`` returned."""
        for index, mapping, address in mapped:
            view = memoryview(mapping)
            self._maps[index] = mapping
            self._addresses[index] = address
            self._rw_views[index] = view
            self._ro_views[index] = view.toreadonly()

    def views(self, rng: Range, write: bool) -> list[memoryview] | None:
        """Views of the bytes of non-empty ``rng``, one per chunk it spans;
        None unless all of them are mapped. Read-only unless ``write``."""
        start, end = rng
        chunk_views = self._rw_views if write else self._ro_views
        first = start >> CHUNK_SHIFT
        last = (end - 1) >> CHUNK_SHIFT
        if last < len(chunk_views):
            if first == last:
                view = chunk_views[first]
                if view is not None:
                    base = first << CHUNK_SHIFT
                    return [view[start - base : end - base]]
            else:
                out: list[memoryview] = []
                for index in range(first, last + 1):
                    view = chunk_views[index]
                    if view is None:
                        break
                    base = index << CHUNK_SHIFT
                    out.append(view[max(start - base, 0) : min(end - base, CHUNK_SIZE)])
                else:
                    return out
        return None

    def address_pieces(self, rng: Range) -> list[tuple[int, int, int]]:
        """(file offset, address, length) pieces of ``rng``, one per chunk.

        Chunks not mapped (yet) are left out: nothing has written to them, so
        their pages are uncommitted and read as zeros.
        """
        pieces = []
        addresses = self._addresses
        offset = rng.start
        while offset < rng.end:
            index = offset >> CHUNK_SHIFT
            base = index << CHUNK_SHIFT
            length = min(rng.end, base + CHUNK_SIZE) - offset
            if index < len(addresses) and addresses[index]:
                pieces.append((offset, addresses[index] + offset - base, length))
            offset += length
        return pieces

    def close(self) -> None:
        """Releases the views and unmaps the chunks; a chunk whose mapping
        still has exported views is left for the garbage collector to unmap."""
        for views in (self._rw_views, self._ro_views):
            for view in views:
                if view is not None:
                    view.release()
            views.clear()
        self._addresses.clear()
        for index, mapping in enumerate(self._maps):
            if mapping is None:
                continue
            try:
                mapping.close()
            except BufferError:
                logger.warning("chunk %d still has exported views; leaving it mapped", index)
        self._maps.clear()
