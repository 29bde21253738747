"""Blocking I/O on open descriptors, for LocalOrigin's worker threads.

Vectored reads and writes that carry on after short transfers (at most
IOV_MAX buffers per call), space allocation that degrades to growing the
file, copies between descriptors (``copy_file_range`` where the filesystem
has it, plain reads and writes otherwise) and directory fsync (skipped where
the filesystem does not support it: EINVAL, EOPNOTSUPP). Nothing here
resolves a path or keeps state: every function works on the descriptors it
is given and raises OSError as the system calls do.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Sequence

IOV_MAX = 1024  # Linux UIO_MAXIOV: buffers per preadv/pwritev call.
COPY_CHUNK = 8 << 20  # rewrite(): bytes per read_changed() call and per plain copy step.

_NO_DIR_FSYNC = (errno.EINVAL, errno.EOPNOTSUPP)
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS)


@contextlib.contextmanager
def _byte_views(buffers: Sequence[memoryview | bytes]) -> Iterator[list[memoryview]]:
    """Non-empty one-dimensional byte views of ``buffers`` (same memory).

    The views are released on exit, so no export of the caller's memory (an
    mmap it may want to close) outlives the job.
    """
    views: list[memoryview] = []
    made: list[memoryview] = []
    try:
        for buf in buffers:
            view = memoryview(buf)
            made.append(view)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
                made.append(view)
            if view.nbytes:
                views.append(view)
        yield views
    finally:
        for view in made:
            view.release()


def _transfer_all(
    call: Callable[[int, list[memoryview], int], int],
    fd: int,
    offset: int,
    views: Sequence[memoryview],
) -> int:
    """Calls preadv/pwritev ``call`` until ``views`` are done (at most IOV_MAX
    views per call, continuing after short transfers) or it returns 0."""
    done = first = skip = 0  # skip: bytes of views[first] already transferred
    while first < len(views):
        batch = list(views[first : first + IOV_MAX])
        if skip:
            batch[0] = views[first][skip:]
        try:
            n = call(fd, batch, offset + done)
        finally:
            if skip:
                batch[0].release()
        if n == 0:
            break
        done += n
        n += skip
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        skip = n
    return done


def preadv_all(fd: int, offset: int, buffers: Sequence[memoryview | bytes]) -> int:
    """Fills ``buffers`` from ``offset`` until done or end of file; returns bytes read."""
    with _byte_views(buffers) as views:
        return _transfer_all(os.preadv, fd, offset, views)


def pwritev_all(fd: int, offset: int, buffers: Sequence[memoryview | bytes]) -> int:
    """Writes all of ``buffers`` at ``offset``; returns bytes written."""
    with _byte_views(buffers) as views:
        done = _transfer_all(os.pwritev, fd, offset, views)
        if done < sum(len(v) for v in views):
            raise OSError(errno.EIO, "write made no progress")
        return done


def allocate_space(fd: int, offset: int, length: int) -> None:
    """posix_fallocate; where the filesystem cannot reserve space, still grows
    the file as fallocate would."""
    if length == 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in _NO_FALLOCATE:
            raise
        if os.fstat(fd).st_size < offset + length:
            os.ftruncate(fd, offset + length)


def _copy_plain(src: int, dst: int, start: int, end: int) -> None:
    buf = memoryview(bytearray(min(COPY_CHUNK, end - start)))
    while start < end:
        n = os.preadv(src, [buf[: end - start]], start)
        if n == 0:
            return
        pwritev_all(dst, start, [buf[:n]])
        start += n


def fsync_dir_at(dir_fd: int) -> None:
    """fsyncs the directory ``dir_fd`` (which may be an O_PATH descriptor)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def copy_range(src: int, dst: int, end: int) -> None:
    """Copies bytes ``[0, end)`` of ``src`` to the same offsets of ``dst``.

    Uses copy_file_range, or plain reads and writes where the filesystem does
    not support it. Stops early if ``src`` ends first.
    """
    copied = 0
    while copied < end:
        try:
            n = os.copy_file_range(src, dst, end - copied, copied, copied)
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise
            _copy_plain(src, dst, copied, end)
            break
        if n == 0:
            break  # src shrank meanwhile (rewrite(): the old file); the rest reads as zeros
        copied += n
