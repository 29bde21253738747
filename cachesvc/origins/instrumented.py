"""An Origin wrapper that reports every call to an observer.

All origins report through the same metrics (requests by operation and
outcome, bytes by direction, request durations) by being wrapped in
:class:`InstrumentedOrigin`; the observer (api/metrics.py) owns the metric
objects, so this module knows nothing of Prometheus.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

from cachesvc.origins.base import (
    Capabilities,
    ChangedReader,
    DirEntry,
    Origin,
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

_OUTCOMES: tuple[tuple[type[OriginError], str], ...] = (
    (OriginNotFound, "not_found"),
    (OriginPermissionDenied, "denied"),
    (OriginTimeout, "timeout"),
    (OriginNoSpace, "no_space"),
    (OriginUnsupported, "unsupported"),
    (OriginConflict, "conflict"),
    (OriginUnavailable, "unavailable"),
)


def outcome_of(exc: BaseException | None) -> str:
    """The ``outcome`` label for a call that raised ``exc`` (None: success)."""
    if exc is None:
        return "ok"
    for cls, label in _OUTCOMES:
        if isinstance(exc, cls):
            return label
    return "error"


class OriginObserver(Protocol):
    """Receives one report per origin call and per transferred byte count."""

    def observe(self, op: str, outcome: str, seconds: float) -> None: ...

    def transferred(self, direction: str, nbytes: int) -> None: ...


class InstrumentedOrigin:
    """Delegates to ``inner`` and reports each call to ``observer``."""

    def __init__(self, inner: Origin, observer: OriginObserver) -> None:
        self.inner = inner  # Immutable.
        self._observer = observer  # Immutable.

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @property
    def description(self) -> str:
        return self.inner.description

    @contextmanager
    def _timed(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self._observer.observe(op, outcome_of(exc), time.perf_counter() - start)
            raise
        self._observer.observe(op, "ok", time.perf_counter() - start)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        with self._timed(op):
            return await fn()

    async def stat(self, path: str) -> OriginStat:
        return await self._call("stat", lambda: self.inner.stat(path))

    async def read_into(
        self, path: str, offset: int, buffers: Sequence[memoryview], etag: str | None = None
    ) -> int:
        n = await self._call("read", lambda: self.inner.read_into(path, offset, buffers, etag))
        self._observer.transferred("in", n)
        return n

    async def write_from(self, path: str, offset: int, buffers: Sequence[memoryview]) -> int:
        n = await self._call("write", lambda: self.inner.write_from(path, offset, buffers))
        self._observer.transferred("out", n)
        return n

    async def set_size(self, path: str, size: int) -> None:
        await self._call("set_size", lambda: self.inner.set_size(path, size))

    async def allocate(self, path: str, offset: int, length: int) -> None:
        await self._call("allocate", lambda: self.inner.allocate(path, offset, length))

    async def sync(self, path: str) -> None:
        await self._call("sync", lambda: self.inner.sync(path))

    async def rewrite(
        self,
        path: str,
        size: int,
        changed: Sequence[tuple[int, int]],
        read_changed: ChangedReader,
        base_etag: str | None = None,
    ) -> OriginStat:
        async def counted(offset: int, length: int) -> bytes | memoryview:
            data = await read_changed(offset, length)
            self._observer.transferred("out", len(data))
            return data

        return await self._call(
            "rewrite", lambda: self.inner.rewrite(path, size, changed, counted, base_etag)
        )

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> OriginStat:
        async def counted() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                self._observer.transferred("out", len(chunk))
                yield chunk

        return await self._call("replace", lambda: self.inner.replace(path, counted()))

    async def create(self, path: str) -> OriginStat:
        return await self._call("create", lambda: self.inner.create(path))

    async def remove(self, path: str) -> None:
        await self._call("remove", lambda: self.inner.remove(path))

    async def list_dir(self, path: str) -> list[DirEntry]:
        return await self._call("list", lambda: self.inner.list_dir(path))

    async def check(self) -> None:
        await self._call("check", self.inner.check)

    async def close(self) -> None:
        await self.inner.close()
