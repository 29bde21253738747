"""The Origin protocol: what every place remote files live must provide.

An origin knows nothing of the cache. Paths are origin-relative, '/'-separated,
already validated by the API layer (no '.', '..', empty or NUL segments); an
origin still confines itself to its root and refuses anything else.

Offsets and lengths are bytes; ranges are half-open ``[start, end)``.

Every origin translates its library's failures into the :class:`OriginError`
hierarchy below at its boundary (``raise OriginUnavailable(...) from exc``), so
callers map errors to HTTP statuses in exactly one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class OriginError(Exception):
    """Base class of every error an origin reports."""


class OriginNotFound(OriginError):
    """The path does not exist at the origin (or is not a regular file)."""


class OriginPermissionDenied(OriginError):
    """The origin refused access, or the path leaves the origin's root."""


class OriginUnavailable(OriginError):
    """The origin failed or answered something unusable (I/O error, 5xx)."""


class OriginTimeout(OriginError):
    """The origin did not answer in time."""


class OriginUnsupported(OriginError):
    """The origin cannot perform this operation (e.g. writes to a read-only origin)."""


class OriginNoSpace(OriginError):
    """The origin has no room for the data (ENOSPC, quota)."""


class OriginConflict(OriginError):
    """The object changed at the origin while we were reading it (validator mismatch)."""


def base_changed(path: str) -> OriginConflict:
    """The error of a rewrite whose base version is no longer the origin's."""
    return OriginConflict(f"{path!r} changed at the origin; the cached changes were not written")


@dataclass(frozen=True, slots=True)
class OriginStat:
    """Attributes of one origin file. Immutable."""

    size: int
    mtime: float  # seconds since the epoch
    etag: str  # opaque version token; changes whenever the content changes
    is_file: bool = True


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One entry of a directory listing. Immutable."""

    name: str
    is_dir: bool
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an origin can do. Immutable.

    writable: accepts writes at all (else every write is OriginUnsupported).
    partial_writes: write_from/set_size/allocate change bytes in place; when
        False, dirty data is written back with rewrite() as a whole object.
    durable_sync: sync() makes written data durable (fsync); when False the
        origin is durable as soon as a write call returns (object stores).
    prefault_fills: fresh cache pages are faulted in by a worker thread while
        read_into fills them. That pays off when read_into copies into the
        pages in Python; when the kernel receives into them (the HTTP origin)
        the thread only competes with it (see HttpOrigin.capabilities).
    """

    writable: bool
    partial_writes: bool
    durable_sync: bool
    prefault_fills: bool = True


ChangedReader = Callable[[int, int], Awaitable[bytes | memoryview]]
"""``read_changed(offset, length)``: the new bytes of a changed range, from the cache."""


class Origin(Protocol):
    """Where remote files live. All methods may raise :class:`OriginError`."""

    @property
    def capabilities(self) -> Capabilities:
        """What this origin supports."""
        ...

    @property
    def description(self) -> str:
        """A short human-readable name (URL without credentials) for logs."""
        ...

    async def stat(self, path: str) -> OriginStat:
        """Attributes of a regular file; OriginNotFound if missing or not a file."""
        ...

    async def read_into(
        self, path: str, offset: int, buffers: Sequence[memoryview], etag: str | None = None
    ) -> int:
        """Fill ``buffers`` in order with bytes from ``offset``; return bytes filled.

        May return short (only at end of file). With ``etag``, raises
        OriginConflict if the object no longer has that version.
        """
        ...

    async def write_from(self, path: str, offset: int, buffers: Sequence[memoryview]) -> int:
        """Write all of ``buffers`` at ``offset`` (partial_writes origins only)."""
        ...

    async def set_size(self, path: str, size: int) -> None:
        """Truncate or extend with zeros (partial_writes origins only)."""
        ...

    async def allocate(self, path: str, offset: int, length: int) -> None:
        """Reserve space for ``[offset, offset+length)`` (partial_writes origins only)."""
        ...

    async def sync(self, path: str) -> None:
        """Make everything written to ``path`` durable."""
        ...

    async def rewrite(
        self,
        path: str,
        size: int,
        changed: Sequence[tuple[int, int]],
        read_changed: ChangedReader,
        base_etag: str | None = None,
    ) -> OriginStat:
        """Write a new version of ``path`` with length ``size``.

        ``changed`` lists sorted, disjoint half-open ranges whose bytes come from
        ``read_changed``; every other byte below the old size keeps its old
        value, and bytes past the old size read as zeros. Used for write-back
        to origins without partial_writes; atomic (old or new object, never a mix).
        With ``base_etag``, raises OriginConflict unless the object's current
        version is ``base_etag`` (the changes were made to that version).
        """
        ...

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> OriginStat:
        """Atomically replace (or create, with parents) ``path`` with the streamed bytes.

        If ``chunks`` raises, the old content is left untouched.
        """
        ...

    async def create(self, path: str) -> OriginStat:
        """Create an empty file (and parent directories) if missing; return its stat."""
        ...

    async def remove(self, path: str) -> None:
        """Remove a file; OriginNotFound if missing."""
        ...

    async def list_dir(self, path: str) -> list[DirEntry]:
        """Entries of a directory ('' is the root); OriginNotFound if missing."""
        ...

    async def check(self) -> None:
        """Raise OriginError unless the origin is reachable (readiness probe)."""
        ...

    async def close(self) -> None:
        """Release connections, threads and descriptors."""
        ...
