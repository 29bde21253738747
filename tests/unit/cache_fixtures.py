"""Building a FileCache over a real LocalOrigin in a temp dir for unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cachesvc.core.cache import CacheOptions, FileCache
from cachesvc.core.memfile import MemoryFile
from cachesvc.origins.local import LocalOrigin
from tests.support.origins import TestOrigin


@dataclass
class Rig:
    cache: FileCache
    origin: TestOrigin
    memfile: MemoryFile
    root: Path


@asynccontextmanager
async def cache_rig(
    root: Path,
    *,
    buffered: bool = False,
    cache_size: int = 64 << 20,
    max_dirty: int = 32 << 20,
    delay: float = 0.0,
    readahead: int = 4 << 20,
    dirty_expire: float = 3600.0,
    max_inodes: int = 100_000,
    room_wait: float = 1.0,
    eviction_policy: str = "s3fifo",
    max_pinned: int | None = None,
) -> AsyncIterator[Rig]:
    root.mkdir(parents=True, exist_ok=True)
    origin = TestOrigin(LocalOrigin.open(str(root)), buffered=buffered, delay=delay)
    memfile = await MemoryFile.create()
    cache = FileCache(
        origin,
        memfile,
        CacheOptions(
            cache_size=cache_size,
            max_dirty=max_dirty,
            dirty_expire=dirty_expire,
            readahead=readahead,
            revalidate=3600.0,
            max_inodes=max_inodes,
            room_wait=room_wait,
            eviction_policy=eviction_policy,
            max_pinned=max_pinned,
        ),
    )
    cache.start()
    try:
        yield Rig(cache, origin, memfile, root)
    finally:
        origin.fail_writes = None
        await cache.close()
        await memfile.close()
        await origin.close()
