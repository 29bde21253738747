"""LocalOrigin: files in a local directory (also an NFS, SMB or FUSE mount).

The root. ``LocalOrigin(root)`` takes an existing directory and opens it
synchronously (a startup step); ``LocalOrigin.open(root)`` creates it first
when missing. Replacing or remounting the root directory later is reported by
:meth:`LocalOrigin.check`; the origin keeps using the directory it opened.

Confinement. Nothing outside the root is ever opened: a path is resolved one
name at a time from a descriptor of the root and never through a symbolic
link, and only regular files are opened (see :mod:`cachesvc.origins.local.paths`).

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
directory and removing a file fsync the directory that changed (where the
filesystem supports directory fsync).

All bookkeeping happens on the event loop thread, so it needs no lock; job
threads only read the fields marked Immutable and the job objects handed to
them.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import OrderedDict
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
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
    base_changed,
)
from cachesvc.origins.local.fileio import (
    COPY_CHUNK,
    IOV_MAX,
    allocate_space,
    preadv_all,
    pwritev_all,
)
from cachesvc.origins.local.paths import (
    TempFile,
    commit_temp,
    copy_old,
    drop_temp,
    list_entries,
    open_file,
    open_temp,
    remove_file,
    split_path,
    stat_file,
    write_temp,
)

T = TypeVar("T")

WRITE_BATCH = 1 << 20  # replace(): streamed bytes gathered into one write job.

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


def etag_of(st: os.stat_result) -> str:
    """The version token of a file: inode, modification time and size."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _origin_stat(st: os.stat_result) -> OriginStat:
    return OriginStat(size=st.st_size, mtime=st.st_mtime_ns / 1e9, etag=etag_of(st))


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
        return _origin_stat(await self._run(path, stat_file, self._root_fd, names))

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
            n = preadv_all(fd, offset, buffers)
            check(fd)
            return n

        return await self._file_op(path, read, write=False)

    async def list_dir(self, path: str) -> list[DirEntry]:
        self._ensure_open(path)
        names = split_path(path) if path else []
        return await self._run(path, list_entries, self._root_fd, names)

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
            path, lambda fd: pwritev_all(fd, offset, buffers), write=True, dirties=True
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
            path, lambda fd: allocate_space(fd, offset, length), write=True, dirties=True
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
        job = self._submit(remove_file, self._root_fd, names)
        job.add_done_callback(lambda _: self._invalidate(path))
        await self._wait(path, job)

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> OriginStat:
        async def fill(temp: TempFile) -> None:
            batch: list[bytes] = []
            offset = pending = 0
            async for chunk in chunks:
                batch.append(chunk)
                pending += len(chunk)
                if pending >= WRITE_BATCH or len(batch) >= IOV_MAX:
                    await self._temp_job(path, temp, write_temp, offset, batch)
                    offset += pending
                    batch, pending = [], 0
            if batch:
                await self._temp_job(path, temp, write_temp, offset, batch)

        return await self._write_atomically(path, fill, keep_old=False)

    async def rewrite(
        self,
        path: str,
        size: int,
        changed: Sequence[tuple[int, int]],
        read_changed: ChangedReader,
        base_etag: str | None = None,
    ) -> OriginStat:
        if size < 0:
            raise ValueError(f"negative size {size}")
        _check_changed(size, changed)
        if base_etag is not None:
            try:
                current = (await self.stat(path)).etag
            except OriginNotFound:
                current = None
            if current != base_etag:
                raise base_changed(path)

        async def fill(temp: TempFile) -> None:
            await self._temp_job(path, temp, copy_old, size)
            for start, end in changed:
                for offset in range(start, end, COPY_CHUNK):
                    length = min(COPY_CHUNK, end - offset)
                    data = await read_changed(offset, length)
                    with memoryview(data) as view:
                        got = view.nbytes
                    if got != length:
                        raise RuntimeError(f"read_changed({offset}, {length}) returned {got} bytes")
                    await self._temp_job(path, temp, write_temp, offset, [data])

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
        self, path: str, fill: Callable[[TempFile], Awaitable[None]], *, keep_old: bool
    ) -> OriginStat:
        """Writes a temporary file with ``fill`` and renames it over ``path``."""
        self._require_writable(path)
        temp = TempFile(self._names(path))
        try:
            await self._temp_job(path, temp, open_temp, self._root_fd, keep_old)
            await fill(temp)
            commit = self._submit(commit_temp, temp)
            temp.last = commit
            commit.add_done_callback(lambda _: self._invalidate(path))
            st = await self._wait(path, commit)
        finally:
            last = temp.last
            if last is not None and not last.done():
                # Cancelled during a job: clean up once it ends.
                last.add_done_callback(lambda _: self._submit(drop_temp, temp))
            elif self._shut_down:
                drop_temp(temp)  # closed meanwhile: no pool left; a few quick calls
            else:
                await asyncio.shield(self._submit(drop_temp, temp))
        return _origin_stat(st)

    async def _temp_job(self, path: str, temp: TempFile, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(temp, *args)``; the previous job on ``temp`` has ended."""
        job = self._submit(fn, temp, *args)
        temp.last = job
        return await self._wait(path, job)

    # ------------------------------------------------- job bodies (in threads)

    def _open_file(self, names: list[str], *, write: bool, create: bool) -> _Handle:
        fd, st = open_file(self._root_fd, names, write=write, create=create)
        return _Handle(fd, st.st_dev, st.st_ino, writable=write)

    def _still_names(self, handle: _Handle, names: list[str]) -> bool:
        """Whether the path still names the file ``handle`` has open (the cheap
        check of a cached descriptor; opening always resolves step by step)."""
        try:
            st = os.stat("/".join(names), dir_fd=self._root_fd, follow_symlinks=False)
        except OSError:
            return False
        return st.st_ino == handle.ino and st.st_dev == handle.dev

    def _check_job(self) -> None:
        held = os.fstat(self._root_fd)
        now = os.stat(self.root)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            raise OSError(errno.ESTALE, "root directory was replaced or remounted")
