"""Page and extent arithmetic, and copying between buffers and memory-file views.

A *page* (PAGE_SIZE, 4 KiB) is the unit of caching: cached ranges start and
end on page boundaries. An *extent* (EXTENT_SIZE, 64 KiB, the reference
design's fill window, maxFillRange) is the unit of fills and of eviction: a
miss fills the whole extents it touches (clipped to the file's last page),
and the eviction policy tracks, ranks and evicts each file's extents. Extent ``i``
of a file covers file offsets ``[i * EXTENT_SIZE, (i + 1) * EXTENT_SIZE)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cachesvc.core.hostmem import PAGE_SIZE
from cachesvc.core.ranges import Range

_PAGE_MASK = PAGE_SIZE - 1
EXTENT_SHIFT = 16
EXTENT_SIZE = 1 << EXTENT_SHIFT
_EXTENT_MASK = EXTENT_SIZE - 1


def page_down(offset: int) -> int:
    """The start of the page containing ``offset``."""
    return offset & ~_PAGE_MASK


def page_up(offset: int) -> int:
    """``offset`` rounded up to a page boundary."""
    return (offset + _PAGE_MASK) & ~_PAGE_MASK


def page_range(start: int, end: int) -> Range:
    """The smallest page-aligned range containing ``[start, end)``."""
    return Range(page_down(start), page_up(end))


def extent_down(offset: int) -> int:
    """The start of the extent containing ``offset``."""
    return offset & ~_EXTENT_MASK


def extent_up(offset: int) -> int:
    """``offset`` rounded up to an extent boundary."""
    return (offset + _EXTENT_MASK) & ~_EXTENT_MASK


def extent_range(index: int) -> Range:
    """The file range of extent ``index``."""
    start = index << EXTENT_SHIFT
    return Range(start, start + EXTENT_SIZE)


def extent_indexes(rng: Range) -> range:
    """The indexes of the extents ``rng`` overlaps (none for an empty range)."""
    if rng.end <= rng.start:
        return range(0)
    return range(rng.start >> EXTENT_SHIFT, ((rng.end - 1) >> EXTENT_SHIFT) + 1)


def slice_views(views: Sequence[memoryview], skip: int, length: int) -> list[memoryview]:
    """The views covering ``length`` bytes after the first ``skip`` bytes of ``views``."""
    out: list[memoryview] = []
    for view in views:
        n = len(view)
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        out.append(view[skip : skip + take])
        length -= take
        skip = 0
        if length == 0:
            break
    return out


def copy_into_views(views: Sequence[memoryview], data: memoryview) -> None:
    """Copies ``data`` across ``views`` in order; their total length must match."""
    pos = 0
    for view in views:
        n = len(view)
        view[:] = data[pos : pos + n]
        pos += n
    if pos != len(data):
        raise RuntimeError(f"copy_into_views: views hold {pos} bytes, data has {len(data)}")


def copy_from_views(views: Sequence[memoryview], out: memoryview) -> None:
    """Copies the bytes of ``views`` into ``out``; their total length must match."""
    pos = 0
    for view in views:
        n = len(view)
        out[pos : pos + n] = view
        pos += n
    if pos != len(out):
        raise RuntimeError(f"copy_from_views: views hold {pos} bytes, buffer has {len(out)}")
