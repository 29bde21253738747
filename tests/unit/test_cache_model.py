"""A stateful model test of the cache: random reads, writes, truncates,
fsyncs, evictions, drops, pins and unpins on several files through a
FileCache with a tiny budget (eviction runs constantly), compared with a
bytearray per file. Every read must equal the model; after an fsync the
origin file on disk must equal the model. A pin or a (buffered) write the
budget has no room for is refused with CacheFull and changes nothing; after
every step the page cache's allocated bytes are within the budget.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachesvc.core.budget import budget_slack
from cachesvc.core.errors import CacheFull
from tests.support.content import pattern
from tests.unit.cache_fixtures import Rig, cache_rig

FILES = ("a.bin", "b.bin", "dir/c.bin")
MAX_SIZE = 300_000
offsets = st.integers(0, MAX_SIZE)
lengths = st.integers(0, 70_000)


CACHE_SIZE = 256 * 1024


class CacheModel(RuleBasedStateMachine):
    buffered = False
    policy = "s3fifo"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="cachesvc-model-"))
        self.model: dict[str, bytearray] = {}
        self.pins: list[tuple[str, int, int]] = []
        self._rig_cm: Any = None
        self.rig: Rig

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    @initialize(sizes=st.lists(st.integers(0, 200_000), min_size=3, max_size=3))
    def setup(self, sizes: list[int]) -> None:
        root = self.tmp / "origin"
        for i, (name, size) in enumerate(zip(FILES, sizes, strict=True)):
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = pattern(i, 0, size)
            path.write_bytes(data)
            self.model[name] = bytearray(data)
        self._rig_cm = cache_rig(
            root,
            buffered=self.buffered,
            cache_size=CACHE_SIZE,
            readahead=128 * 1024,
            room_wait=0.02,
            eviction_policy=self.policy,
        )
        self.rig = self.run(self._rig_cm.__aenter__())

    def teardown(self) -> None:
        try:
            if self._rig_cm is not None:
                self.run(self._rig_cm.__aexit__(None, None, None))
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _with(self, name: str, fn: Any) -> Any:
        async with self.rig.cache.open(name) as inode:
            result = await fn(inode)
            inode.check_invariants()
            return result

    @rule(name=st.sampled_from(FILES), offset=offsets, length=lengths)
    def read(self, name: str, offset: int, length: int) -> None:
        got = self.run(self._with(name, lambda i: i.read(offset, length)))
        assert got == bytes(self.model[name][offset : offset + length])

    @rule(name=st.sampled_from(FILES), offset=offsets, length=st.integers(1, 40_000),
          seed=st.integers(0, 1000))  # fmt: skip
    def write(self, name: str, offset: int, length: int, seed: int) -> None:
        data = pattern(1000 + seed, offset, length)
        try:
            self.run(self._with(name, lambda i: self.rig.cache.write(i, offset, data)))
        except CacheFull:
            assert self.buffered, "only a buffered write allocates"
            return  # refused: nothing changed
        model = self.model[name]
        if offset + length > len(model):
            model.extend(bytes(offset + length - len(model)))
        model[offset : offset + length] = data

    @rule(name=st.sampled_from(FILES), size=offsets)
    def truncate(self, name: str, size: int) -> None:
        self.run(self._with(name, lambda i: i.truncate(size)))
        model = self.model[name]
        if size < len(model):
            del model[size:]
        else:
            model.extend(bytes(size - len(model)))

    @rule(name=st.sampled_from(FILES))
    def fsync(self, name: str) -> None:
        self.run(self._with(name, lambda i: i.fsync()))
        on_disk = (self.rig.root / name).read_bytes()
        assert on_disk == bytes(self.model[name])

    @rule()
    def evict(self) -> None:
        self.run(self.rig.cache.evict_all(wait=True))

    @rule(name=st.sampled_from(FILES))
    def drop(self, name: str) -> None:
        self.run(self.rig.cache.drop(name))
        assert (self.rig.root / name).read_bytes() == bytes(self.model[name])

    @rule(name=st.sampled_from(FILES), offset=offsets, length=st.integers(1, 50_000))
    def pin(self, name: str, offset: int, length: int) -> None:
        try:
            self.run(self.rig.cache.pin(name, offset, offset + length))
        except CacheFull:
            return  # past --max-pinned, or no room: refused
        self.pins.append((name, offset, offset + length))

    @precondition(lambda self: bool(self.pins))
    @rule(index=st.integers(0, 100))
    def unpin(self, index: int) -> None:
        name, start, end = self.pins.pop(index % len(self.pins))
        assert self.run(self.rig.cache.unpin(name, start, end))

    @invariant()
    def accounting_is_consistent(self) -> None:
        if not hasattr(self, "rig"):
            return
        cache = self.rig.cache
        files = cache.files()
        assert cache.counters.dirty_bytes == sum(f.dirty.total_length for f in files)
        assert cache.counters.mapped_bytes == sum(f.mappings.total_length for f in files)
        assert cache.counters.cached_bytes == sum(f.cache_set.total_length for f in files)
        self.rig.memfile.check_invariants()
        cache.policy.check_invariants()
        assert cache.page_cache_bytes <= CACHE_SIZE + budget_slack(CACHE_SIZE)
        assert cache.budget.reserved == 0


class BufferedCacheModel(CacheModel):
    """The same model over an origin without partial writes (like S3)."""

    buffered = True


class LruCacheModel(CacheModel):
    """The same model with the LRU eviction policy."""

    policy = "lru"


_settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CacheModel.TestCase.settings = _settings
BufferedCacheModel.TestCase.settings = _settings
LruCacheModel.TestCase.settings = _settings
TestCacheModel = CacheModel.TestCase
TestBufferedCacheModel = BufferedCacheModel.TestCase
TestLruCacheModel = LruCacheModel.TestCase
