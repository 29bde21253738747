"""LocalOrigin: files in a local directory (also an NFS, SMB or FUSE mount).

The root. ``LocalOrigin(root)`` takes an existing directory and opens it
synchronously (a startup step); ``LocalOrigin.open(root)`` creates it first
when missing. Replacing or remounting the root directory later is reported by
:meth:`LocalOrigin.check`; the origin keeps using the directory it opened.

Confinement. Nothing outside the root is ever opened. A path is resolved one
component at a time from a descriptor of the root: each directory with
``O_PATH | O_DIRECTORY | O_NOFOLLOW`` relative to its parent, the final name
with ``O_NOFOLLOW``. A symbolic link anywhere in a path is refused with
OriginPermissionDenied whatever it points to (inside or outside the root,
existing or not): its target is never looked at, so the answer cannot reveal
anything about it. Names ``''``, ``'.'``, ``'..'`` and names with a NUL are
refused the same way (``'/'`` only separates names). Only regular files are
served: the final name is checked with lstat before it is opened, so a device
is never opened; it is opened with ``O_NONBLOCK`` (a FIFO swapped in
meanwhile cannot block a worker) and checked again with fstat. Anything else
is OriginNotFound, as is a file where a directory is expected.

Threads. Every system call runs in a bounded thread pool. An operation is one
job (resolve, open, read, close ...); the event loop only keeps the books. A
caller that is cancelled does not wait for its job, which cannot be
interrupted: the job finishes in the background and its completion callback
releases what it used, so a descriptor is never closed while a job uses it.
:meth:`LocalOrigin.close` waits for every job (a job stuck on a dead hard NFS
mount keeps it waiting; the caller bounds that wait).

Descriptors. Open files are kept in a table keyed by path, least recently used
first and at most ``max_open_files`` long, so that a write and the fsync that
follows it use the same descriptor. Before each use, a cached descriptor is
checked against the path (device and inode number, one lstat), so a file
replaced behind our back is reopened rather than read stale. That check
resolves the path in one call, but it only compares identities: a descriptor
is only ever opened through the step-by-step walk above. Evicting a
descriptor with unsynced writes just closes it: the data stays in the host's
page cache, and an fsync on a new descriptor still flushes it (Linux syncs the
file, not the descriptor). An error reported by such a close is kept and
returned by the next :meth:`LocalOrigin.sync` of that path.

Durability. :meth:`LocalOrigin.replace` and :meth:`LocalOrigin.rewrite` write
a temporary file ``.<name>.cachesvc-tmp-<hex>`` next to the target, fsync it,
rename it over the target and fsync the directory: readers see the old or the
new content, never a mix, and a failure leaves the old content and no
temporary file. Listings hide those temporary files. Creating a file or a
directory and removing a file fsync the directory that changed. A directory
fsync that the filesystem does not support (EINVAL, EOPNOTSUPP) is skipped.

All bookkeeping happens on the event loop thread, so it needs no lock; job
threads only read the fields marked Immutable and the job objects handed to
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import stat as statmod
from collections import OrderedDict
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from cachesvc.origins.base import (
    Capabilities,
    ChangedReader,
    DirEntry,
    OriginConflict,
    OriginError,
    OriginNoSpace,
    OriginNotFound,
    OriginPermissionDenied,
    OriginStat,
    OriginTimeout,
    OriginUnavailable,
    OriginUnsupported,
)

T = TypeVar("T")

IOV_MAX = 1024  # Linux UIO_MAXIOV: buffers per preadv/pwritev call.
COPY_CHUNK = 8 << 20  # rewrite(): bytes per read_changed() call and per plain copy step.
WRITE_BATCH = 1 << 20  # replace(): streamed bytes gathered into one write job.
TEMP_MARKER = ".cachesvc-tmp-"
_TEMP_STEM_BYTES = 200  # Keeps temporary names under NAME_MAX (255 bytes).
_TEMP_NAME = re.compile(r"\..*" + re.escape(TEMP_MARKER) + r"[0-9a-f]{16}", re.DOTALL)

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NO_DIR_FSYNC = (errno.EINVAL, errno.EOPNOTSUPP)
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS)

_ERRNO_ERRORS: dict[int, type[OriginError]] = {
    errno.ENOENT: OriginNotFound,
    errno.ENOTDIR: OriginNotFound,
    errno.EISDIR: OriginNotFound,
    errno.ENAMETOOLONG: OriginNotFound,  # such a name cannot exist
    errno.EACCES: OriginPermissionDenied,
    errno.EPERM: OriginPermissionDenied,
    errno.ELOOP: OriginPermissionDenied,  # a symbolic link (refused, never followed)
    errno.EROFS: OriginPermissionDenied,
    errno.ENOSPC: OriginNoSpace,
    errno.EDQUOT: OriginNoSpace,
    errno.EFBIG: OriginNoSpace,
    errno.ETIMEDOUT: OriginTimeout,
}


def origin_error(exc: OSError, where: str) -> OriginError:
    """The OriginError for ``exc``; the message names only ``where`` (an origin path).

    This is the one place errno values are mapped; anything not listed (EIO,
    ESTALE ...) is OriginUnavailable. Callers ``raise origin_error(exc, p) from exc``.
    """
    cls = _ERRNO_ERRORS.get(exc.errno or 0, OriginUnavailable)
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    return cls(f"{where or '/'}: {reason}")


def split_path(path: str) -> list[str]:
    """The names of an origin-relative path; OriginPermissionDenied if one is not a plain name."""
    names = path.split("/")
    for name in names:
        if name in ("", ".", "..") or "\0" in name:
            raise OriginPermissionDenied(f"{path!r}: not a valid origin path")
    return names


def etag_of(st: os.stat_result) -> str:
    """The version token of a file: inode, modification time and size."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary files (hidden from listings)."""
    return _TEMP_NAME.fullmatch(name) is not None


def _temp_name(name: str) -> str:
    stem = name.encode("utf-8", "surrogateescape")[:_TEMP_STEM_BYTES].decode("utf-8", "ignore")
    return f".{stem}{TEMP_MARKER}{secrets.token_hex(8)}"


def _origin_stat(st: os.stat_result) -> OriginStat:
    return OriginStat(size=st.st_size, mtime=st.st_mtime_ns / 1e9, etag=etag_of(st))


def _symlink_refused() -> OSError:
    return OSError(errno.ELOOP, "symbolic links are not followed")


def _require_regular(st: os.stat_result) -> None:
    """Raises the OSError we report for anything but a regular file."""
    if statmod.S_ISLNK(st.st_mode):
        raise _symlink_refused()
    if not statmod.S_ISREG(st.st_mode):
        raise OSError(errno.ENOENT, "not a regular file")


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


def _preadv_all(fd: int, offset: int, buffers: Sequence[memoryview | bytes]) -> int:
    """Fills ``buffers`` from ``offset`` until done or end of file; returns bytes read."""
    with _byte_views(buffers) as views:
        return _transfer_all(os.preadv, fd, offset, views)


def _pwritev_all(fd: int, offset: int, buffers: Sequence[memoryview | bytes]) -> int:
    """Writes all of ``buffers`` at ``offset``; returns bytes written."""
    with _byte_views(buffers) as views:
        done = _transfer_all(os.pwritev, fd, offset, views)
        if done < sum(len(v) for v in views):
            raise OSError(errno.EIO, "write made no progress")
        return done


def _allocate(fd: int, offset: int, length: int) -> None:
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
        _pwritev_all(dst, start, [buf[:n]])
        start += n


def _fsync_dir_at(dir_fd: int) -> None:
    """fsyncs the directory ``dir_fd`` (which may be an O_PATH descriptor)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def _check_changed(size: int, changed: Sequence[tuple[int, int]]) -> None:
    low = 0
    for start, end in changed:
        if not low <= start < end <= size:
            raise ValueError(f"changed ranges must be sorted, disjoint and within {size}")
        low = end


@dataclass(eq=False, slots=True)
class _Handle:
    """One open descriptor of a regular file."""

    fd: int  # Immutable.
    dev: int  # Immutable.
    ino: int  # Immutable.
    writable: bool  # Immutable.
    users: int = 0  # Jobs using fd. Loop thread only.
    cached: bool = False  # In the table; once False, fd closes when users is 0. Loop thread only.
    dirty: bool = False  # Written since the last successful sync. Loop thread only.


@dataclass(eq=False, slots=True)
class _FileJob:
    """What a file job found; written by its thread, read by its completion callback."""

    fresh: _Handle | None = None  # A descriptor the job opened.
    stale: bool = False  # The cached descriptor handed to the job no longer names the path.


@dataclass(eq=False, slots=True)
class _Temp:
    """A temporary file being written for replace() or rewrite().

    Its jobs run one after another; each field is written by a job thread and
    read by the next job, except ``last``, which is loop thread only.
    """

    names: list[str]  # Immutable: the target's path.
    parent: int = -1  # O_PATH descriptor of the target's directory.
    fd: int = -1  # The temporary file.
    name: str = ""  # Its name in parent; '' once renamed over the target (or never created).
    old: int = -1  # rewrite(): the current target, -1 if none.
    old_size: int = 0
    last: asyncio.Future[Any] | None = None  # The last job submitted for this file.


class LocalOrigin:
    """An Origin over a local directory. See the module docstring."""

    def __init__(
        self,
        root: str,
        *,
        max_workers: int = 16,
        max_open_files: int = 256,
        read_only: bool = False,
        check_timeout: float = 10.0,
    ) -> None:
        if max_workers < 1 or max_open_files < 1 or check_timeout <= 0:
            raise ValueError("max_workers, max_open_files and check_timeout must be positive")
        self.root = os.path.abspath(root)  # Immutable.
        try:
            fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise origin_error(exc, f"origin root {self.root}") from exc
        self._root_fd = fd  # Immutable; closed by close() once no job runs.
        self._read_only = read_only  # Immutable.
        self._capabilities = Capabilities(  # Immutable.
            writable=not read_only, partial_writes=True, durable_sync=True
        )
        self._max_open_files = max_open_files  # Immutable.
        self._check_timeout = check_timeout  # Immutable.
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="local-origin")
        # Open descriptors by path, least recently used first. Loop thread only.
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        # Bumped by every invalidation: a job that opened a file meanwhile does
        # not cache its descriptor. Loop thread only.
        self._generation = 0
        # Errors from closing descriptors with unsynced writes, by path, for
        # the next sync(). Loop thread only.
        self._close_errors: dict[str, OSError] = {}
        # Jobs submitted and not finished. Loop thread only.
        self._inflight: set[asyncio.Future[Any]] = set()
        self._closing = False  # Set by close(): no new operation starts. Loop thread only.
        self._shut_down = False  # Set by close() once the pool is gone. Loop thread only.

    @classmethod
    def open(
        cls,
        root: str,
        *,
        create: bool = True,
        max_workers: int = 16,
        max_open_files: int = 256,
        read_only: bool = False,
    ) -> LocalOrigin:
        """A LocalOrigin over ``root``, creating the directory (and parents) if
        missing and ``create`` is set. Blocks briefly: call at startup."""
        if create:
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as exc:
                raise origin_error(exc, f"origin root {os.path.abspath(root)}") from exc
        return cls(
            root, max_workers=max_workers, max_open_files=max_open_files, read_only=read_only
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def description(self) -> str:
        return f"file://{self.root}"

    def __repr__(self) -> str:
        state = "closed" if self._closing else f"{len(self._handles)} open files"
        return f"LocalOrigin({self.root!r}, {state})"

    def stats(self) -> dict[str, int]:
        """Open cached descriptors and jobs in flight."""
        return {"open_files": len(self._handles), "jobs": len(self._inflight)}

    # ------------------------------------------------------------------ reads

    async def stat(self, path: str) -> OriginStat:
        names = self._names(path)
        return _origin_stat(await self._run(path, self._stat_job, names))

    async def read_into(
        self, path: str, offset: int, buffers: Sequence[memoryview], etag: str | None = None
    ) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")

        def check(fd: int) -> None:
            if etag is not None and etag_of(os.fstat(fd)) != etag:
                raise OriginConflict(f"{path}: changed at the origin")

        def read(fd: int) -> int:
            check(fd)
            n = _preadv_all(fd, offset, buffers)
            check(fd)
            return n

        return await self._file_op(path, read, write=False)

    async def list_dir(self, path: str) -> list[DirEntry]:
        self._ensure_open(path)
        names = split_path(path) if path else []
        return await self._run(path, self._list_job, names)

    async def check(self) -> None:
        self._ensure_open("")
        try:
            async with asyncio.timeout(self._check_timeout):
                await self._run("", self._check_job)
        except TimeoutError as exc:
            raise OriginTimeout("origin root did not answer in time") from exc

    # ----------------------------------------------------------------- writes

    async def write_from(self, path: str, offset: int, buffers: Sequence[memoryview]) -> int:
        self._require_writable(path)
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        return await self._file_op(
            path, lambda fd: _pwritev_all(fd, offset, buffers), write=True, dirties=True
        )

    async def set_size(self, path: str, size: int) -> None:
        self._require_writable(path)
        if size < 0:
            raise ValueError(f"negative size {size}")
        await self._file_op(path, lambda fd: os.ftruncate(fd, size), write=True, dirties=True)

    async def allocate(self, path: str, offset: int, length: int) -> None:
        self._require_writable(path)
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset {offset} or length {length}")
        await self._file_op(
            path, lambda fd: _allocate(fd, offset, length), write=True, dirties=True
        )

    async def sync(self, path: str) -> None:
        failure = self._close_errors.pop(path, None)
        if failure is not None:
            raise origin_error(failure, path) from failure
        await self._file_op(path, os.fsync, write=False, dirties=False)

    async def create(self, path: str) -> OriginStat:
        self._require_writable(path)
        return _origin_stat(await self._file_op(path, os.fstat, write=True, create=True))

    async def remove(self, path: str) -> None:
        self._require_writable(path)
        names = self._names(path)
        job = self._submit(self._remove_job, names)
        job.add_done_callback(lambda _: self._invalidate(path))
        await self._wait(path, job)

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> OriginStat:
        async def fill(temp: _Temp) -> None:
            batch: list[bytes] = []
            offset = pending = 0
            async for chunk in chunks:
                batch.append(chunk)
                pending += len(chunk)
                if pending >= WRITE_BATCH or len(batch) >= IOV_MAX:
                    await self._temp_job(path, temp, _write_temp, offset, batch)
                    offset += pending
                    batch, pending = [], 0
            if batch:
                await self._temp_job(path, temp, _write_temp, offset, batch)

        return await self._write_atomically(path, fill, keep_old=False)

    async def rewrite(
        self, path: str, size: int, changed: Sequence[tuple[int, int]], read_changed: ChangedReader
    ) -> OriginStat:
        if size < 0:
            raise ValueError(f"negative size {size}")
        _check_changed(size, changed)

        async def fill(temp: _Temp) -> None:
            await self._temp_job(path, temp, _copy_old, size)
            for start, end in changed:
                for offset in range(start, end, COPY_CHUNK):
                    length = min(COPY_CHUNK, end - offset)
                    data = await read_changed(offset, length)
                    with memoryview(data) as view:
                        got = view.nbytes
                    if got != length:
                        raise RuntimeError(f"read_changed({offset}, {length}) returned {got} bytes")
                    await self._temp_job(path, temp, _write_temp, offset, [data])

        return await self._write_atomically(path, fill, keep_old=True)

    # -------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        await self._drain()
        for path, handle in list(self._handles.items()):
            self._retire(path, handle)
        await self._drain()
        os.close(self._root_fd)
        self._shut_down = True
        self._pool.shutdown(wait=True)

    async def _drain(self) -> None:
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    # --------------------------------------------------- jobs and bookkeeping

    def _ensure_open(self, path: str) -> None:
        if self._closing:
            raise OriginUnavailable(f"{path or '/'}: origin is closed")

    def _names(self, path: str) -> list[str]:
        self._ensure_open(path)
        return split_path(path)

    def _require_writable(self, path: str) -> None:
        if self._read_only:
            raise OriginUnsupported(f"{path or '/'}: origin is read-only")

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._shut_down:
            raise OriginUnavailable("origin is closed")
        job = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        self._inflight.add(job)
        job.add_done_callback(self._job_ended)
        return job

    def _job_ended(self, job: asyncio.Future[Any]) -> None:
        self._inflight.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved: the caller may have gone

    async def _wait(self, path: str, job: asyncio.Future[T]) -> T:
        """The job's result; cancelling the caller leaves the job running."""
        try:
            return await asyncio.shield(job)
        except OSError as exc:
            raise origin_error(exc, path) from exc

    async def _run(self, path: str, fn: Callable[..., T], *args: Any) -> T:
        return await self._wait(path, self._submit(fn, *args))

    async def _file_op(
        self,
        path: str,
        op: Callable[[int], T],
        *,
        write: bool,
        create: bool = False,
        dirties: bool | None = None,
    ) -> T:
        """Runs ``op(fd)`` in a job on a descriptor of ``path``, cached or new.

        ``dirties`` marks the descriptor as having unsynced writes (True) or
        none (False) when ``op`` succeeds.
        """
        names = self._names(path)
        handle = self._handles.get(path)
        if handle is not None and (handle.writable or not write):
            handle.users += 1
            self._handles.move_to_end(path)
        else:
            handle = None
        found = _FileJob()
        generation = self._generation
        job = self._submit(self._file_job, names, handle, found, op, write, create)
        job.add_done_callback(
            lambda j: self._file_job_ended(path, handle, found, generation, dirties, j)
        )
        return await self._wait(path, job)

    def _file_job(
        self,
        names: list[str],
        handle: _Handle | None,
        found: _FileJob,
        op: Callable[[int], T],
        write: bool,
        create: bool,
    ) -> T:
        if handle is not None:
            if self._still_names(handle, names):
                return op(handle.fd)
            found.stale = True
        found.fresh = self._open_file(names, write=write, create=create)
        return op(found.fresh.fd)

    def _file_job_ended(
        self,
        path: str,
        handle: _Handle | None,
        found: _FileJob,
        generation: int,
        dirties: bool | None,
        job: asyncio.Future[Any],
    ) -> None:
        failed = job.cancelled() or isinstance(job.exception(), OSError)
        fresh = found.fresh
        if handle is not None:
            if found.stale or (failed and fresh is None):
                self._retire(path, handle)
            elif not failed and dirties is not None:
                handle.dirty = dirties
            self._release(path, handle)
        if fresh is None:
            return
        if failed or generation != self._generation or self._closing:
            self._close_handle(path, fresh)
            return
        if dirties is not None:
            fresh.dirty = dirties
        old = self._handles.get(path)
        if old is not None:
            self._retire(path, old)
        fresh.cached = True
        self._handles[path] = fresh
        while len(self._handles) > self._max_open_files:
            self._retire(*next(iter(self._handles.items())))

    def _retire(self, path: str, handle: _Handle) -> None:
        """Drops ``handle`` from the table; closes it now or when its last job ends."""
        if not handle.cached:
            return
        handle.cached = False
        if self._handles.get(path) is handle:
            del self._handles[path]
        if handle.users == 0:
            self._close_handle(path, handle)

    def _release(self, path: str, handle: _Handle) -> None:
        handle.users -= 1
        if handle.users == 0 and not handle.cached:
            self._close_handle(path, handle)

    def _close_handle(self, path: str, handle: _Handle) -> None:
        job = self._submit(os.close, handle.fd)
        if handle.dirty:
            job.add_done_callback(lambda j: self._closed_dirty(path, j))

    def _closed_dirty(self, path: str, job: asyncio.Future[None]) -> None:
        exc = None if job.cancelled() else job.exception()
        if isinstance(exc, OSError):
            self._close_errors[path] = exc

    def _invalidate(self, path: str) -> None:
        """Forgets what we hold for ``path`` after it was removed or replaced."""
        self._generation += 1
        self._close_errors.pop(path, None)
        handle = self._handles.get(path)
        if handle is not None:
            self._retire(path, handle)

    async def _write_atomically(
        self, path: str, fill: Callable[[_Temp], Awaitable[None]], *, keep_old: bool
    ) -> OriginStat:
        """Writes a temporary file with ``fill`` and renames it over ``path``."""
        self._require_writable(path)
        temp = _Temp(self._names(path))
        try:
            await self._temp_job(path, temp, self._open_temp, keep_old)
            await fill(temp)
            commit = self._submit(self._commit_temp, temp)
            temp.last = commit
            commit.add_done_callback(lambda _: self._invalidate(path))
            st = await self._wait(path, commit)
        finally:
            last = temp.last
            if last is not None and not last.done():
                # Cancelled during a job: clean up once it ends.
                last.add_done_callback(lambda _: self._submit(_drop_temp, temp))
            elif self._shut_down:
                _drop_temp(temp)  # closed meanwhile: no pool left; a few quick calls
            else:
                await asyncio.shield(self._submit(_drop_temp, temp))
        return _origin_stat(st)

    async def _temp_job(self, path: str, temp: _Temp, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(temp, *args)``; the previous job on ``temp`` has ended."""
        job = self._submit(fn, temp, *args)
        temp.last = job
        return await self._wait(path, job)

    # ------------------------------------------------- job bodies (in threads)

    def _open_dir(self, names: Sequence[str], *, create: bool = False) -> int:
        """An O_PATH descriptor of directory ``names`` (caller closes), resolved
        without following symbolic links; with ``create``, makes missing ones."""
        fd = os.dup(self._root_fd)
        try:
            for name in names:
                sub = self._open_subdir(fd, name, create)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_subdir(dir_fd: int, name: str, create: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except NotADirectoryError:
            # O_DIRECTORY | O_NOFOLLOW fails alike for a link and a file.
            if statmod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise _symlink_refused() from None
            raise
        except FileNotFoundError:
            if not create:
                raise
        try:
            os.mkdir(name, dir_fd=dir_fd)
        except FileExistsError:
            pass  # made meanwhile
        else:
            _fsync_dir_at(dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    def _open_file(self, names: list[str], *, write: bool, create: bool) -> _Handle:
        parent = self._open_dir(names[:-1], create=create)
        try:
            fd = self._open_in(parent, names[-1], write=write, create=create)
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            _require_regular(st)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return _Handle(fd, st.st_dev, st.st_ino, writable=write)

    @staticmethod
    def _open_in(parent: int, name: str, *, write: bool, create: bool) -> int:
        """Opens regular file ``name`` in ``parent``; with ``create`` (and
        ``write``), creates it if missing and fsyncs ``parent``."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            if not create:
                raise
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
            try:
                fd = os.open(name, flags, 0o666, dir_fd=parent)
            except FileExistsError:
                pass  # created meanwhile: open it like any other
            else:
                try:
                    _fsync_dir_at(parent)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
        else:
            _require_regular(st)
        return os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _FILE_FLAGS, dir_fd=parent)

    def _still_names(self, handle: _Handle, names: list[str]) -> bool:
        """Whether the path still names the file ``handle`` has open (the cheap
        check of a cached descriptor; opening always resolves step by step)."""
        try:
            st = os.stat("/".join(names), dir_fd=self._root_fd, follow_symlinks=False)
        except OSError:
            return False
        return st.st_ino == handle.ino and st.st_dev == handle.dev

    def _stat_job(self, names: list[str]) -> os.stat_result:
        parent = self._open_dir(names[:-1])
        try:
            st = os.stat(names[-1], dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        _require_regular(st)
        return st

    def _list_job(self, names: list[str]) -> list[DirEntry]:
        parent = self._open_dir(names)
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)
        entries = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if not _listable_name(entry.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    if statmod.S_ISDIR(st.st_mode) or statmod.S_ISREG(st.st_mode):
                        is_dir = statmod.S_ISDIR(st.st_mode)
                        entries.append(
                            DirEntry(entry.name, is_dir, st.st_size, st.st_mtime_ns / 1e9)
                        )
        finally:
            os.close(fd)
        entries.sort(key=lambda e: e.name)
        return entries

    def _remove_job(self, names: list[str]) -> None:
        parent = self._open_dir(names[:-1])
        try:
            _require_regular(os.stat(names[-1], dir_fd=parent, follow_symlinks=False))
            os.unlink(names[-1], dir_fd=parent)
            _fsync_dir_at(parent)
        finally:
            os.close(parent)

    def _check_job(self) -> None:
        held = os.fstat(self._root_fd)
        now = os.stat(self.root)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            raise OSError(errno.ESTALE, "root directory was replaced or remounted")

    def _open_temp(self, temp: _Temp, keep_old: bool) -> None:
        name = temp.names[-1]
        temp.parent = self._open_dir(temp.names[:-1], create=True)
        mode = None
        try:
            st = os.stat(name, dir_fd=temp.parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            _require_regular(st)
            mode = statmod.S_IMODE(st.st_mode) & 0o777
            if keep_old:
                temp.old = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=temp.parent)
                old = os.fstat(temp.old)
                _require_regular(old)
                os.set_blocking(temp.old, True)
                temp.old_size = old.st_size
        tmp_name = _temp_name(name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        temp.fd = os.open(tmp_name, flags, 0o666, dir_fd=temp.parent)
        temp.name = tmp_name
        if mode is not None:
            # Keep the old permission bits where the filesystem lets us.
            with contextlib.suppress(PermissionError):
                os.fchmod(temp.fd, mode)

    @staticmethod
    def _commit_temp(temp: _Temp) -> os.stat_result:
        os.fsync(temp.fd)
        st = os.fstat(temp.fd)
        os.rename(temp.name, temp.names[-1], src_dir_fd=temp.parent, dst_dir_fd=temp.parent)
        temp.name = ""
        _fsync_dir_at(temp.parent)
        return st


def _listable_name(name: str) -> bool:
    """Not a temporary file, and addressable through the API (valid UTF-8)."""
    if is_temp_name(name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write_temp(temp: _Temp, offset: int, buffers: Sequence[memoryview | bytes]) -> int:
    return _pwritev_all(temp.fd, offset, buffers)


def _copy_old(temp: _Temp, size: int) -> None:
    """Copies the old content below ``size`` into the temporary file and sets its size."""
    end = min(temp.old_size, size) if temp.old >= 0 else 0
    copied = 0
    while copied < end:
        try:
            n = os.copy_file_range(temp.old, temp.fd, end - copied, copied, copied)
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise
            _copy_plain(temp.old, temp.fd, copied, end)
            break
        if n == 0:
            break  # the old file shrank meanwhile; the rest reads as zeros
        copied += n
    os.ftruncate(temp.fd, size)


def _drop_temp(temp: _Temp) -> None:
    """Unlinks the temporary file unless renamed, and closes its descriptors."""
    if temp.name:
        with contextlib.suppress(OSError):
            os.unlink(temp.name, dir_fd=temp.parent)
    for fd in (temp.fd, temp.old, temp.parent):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
