"""Origin wrappers for unit tests: count calls, add latency, gate fills, fail
writes, or pretend to be an object store (no partial writes).

They wrap a real LocalOrigin; only the behaviour under test is changed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, Sequence

from cachesvc.origins.base import (
    Capabilities,
    ChangedReader,
    DirEntry,
    Origin,
    OriginError,
    OriginStat,
)


class TestOrigin:
    """Delegates to ``inner``; see the module docstring for the knobs."""

    __test__ = False  # not a pytest class

    def __init__(self, inner: Origin, *, buffered: bool = False, delay: float = 0.0) -> None:
        self.inner = inner
        self.buffered = buffered
        self.delay = delay
        self.calls: collections.Counter[str] = collections.Counter()
        self.read_ranges: list[tuple[int, int]] = []
        self.fail_writes: OriginError | None = None
        # Set when a read reaches the origin; reads then wait for read_gate,
        # if there is one, and set reached_gate first.
        self.read_started = asyncio.Event()
        self.read_gate: asyncio.Event | None = None
        self.reached_gate = asyncio.Event()

    @property
    def capabilities(self) -> Capabilities:
        caps = self.inner.capabilities
        if self.buffered:
            return Capabilities(writable=True, partial_writes=False, durable_sync=False)
        return caps

    @property
    def description(self) -> str:
        return f"test({self.inner.description})"

    async def _enter(self, op: str, *, write: bool = False) -> None:
        self.calls[op] += 1
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow origin: the latency is the knob
        if write and self.fail_writes is not None:
            raise self.fail_writes

    async def stat(self, path: str) -> OriginStat:
        await self._enter("stat")
        return await self.inner.stat(path)

    async def read_into(
        self, path: str, offset: int, buffers: Sequence[memoryview], etag: str | None = None
    ) -> int:
        self.read_started.set()
        await self._enter("read")
        self.read_ranges.append((offset, offset + sum(len(b) for b in buffers)))
        if self.read_gate is not None:
            self.reached_gate.set()
            await self.read_gate.wait()
        # The local origin's version token changes with our own writes, so
        # pinning is only meaningful for real object stores.
        return await self.inner.read_into(path, offset, buffers, None)

    async def write_from(self, path: str, offset: int, buffers: Sequence[memoryview]) -> int:
        await self._enter("write", write=True)
        return await self.inner.write_from(path, offset, buffers)

    async def set_size(self, path: str, size: int) -> None:
        await self._enter("set_size", write=True)
        await self.inner.set_size(path, size)

    async def allocate(self, path: str, offset: int, length: int) -> None:
        await self._enter("allocate", write=True)
        await self.inner.allocate(path, offset, length)

    async def sync(self, path: str) -> None:
        await self._enter("sync", write=True)
        await self.inner.sync(path)

    async def rewrite(
        self,
        path: str,
        size: int,
        changed: Sequence[tuple[int, int]],
        read_changed: ChangedReader,
        base_etag: str | None = None,
    ) -> OriginStat:
        await self._enter("rewrite", write=True)
        return await self.inner.rewrite(path, size, changed, read_changed, base_etag)

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> OriginStat:
        await self._enter("replace", write=True)
        return await self.inner.replace(path, chunks)

    async def create(self, path: str) -> OriginStat:
        await self._enter("create", write=True)
        return await self.inner.create(path)

    async def remove(self, path: str) -> None:
        await self._enter("remove", write=True)
        await self.inner.remove(path)

    async def list_dir(self, path: str) -> list[DirEntry]:
        await self._enter("list")
        return await self.inner.list_dir(path)

    async def check(self) -> None:
        await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()
