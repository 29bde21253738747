"""Page arithmetic and copying between byte buffers and memory-file views."""

from __future__ import annotations

from collections.abc import Sequence

from cachesvc.core.memfile import PAGE_SIZE
from cachesvc.core.ranges import Range

_PAGE_MASK = PAGE_SIZE - 1


def page_down(offset: int) -> int:
    """The start of the page containing ``offset``."""
    return offset & ~_PAGE_MASK


def page_up(offset: int) -> int:
    """``offset`` rounded up to a page boundary."""
    return (offset + _PAGE_MASK) & ~_PAGE_MASK


def page_range(start: int, end: int) -> Range:
    """The smallest page-aligned range containing ``[start, end)``."""
    return Range(page_down(start), page_up(end))


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
