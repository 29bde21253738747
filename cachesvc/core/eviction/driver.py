"""The one eviction driver: every eviction of the cache happens here.

Follows the Evict contract of the reference design (pgalloc's MemoryFile and
CachingInodeOperations.Evict): the driver asks the policy for its next
victim, looks at the extent's state without changing anything
(:meth:`ExtentOwner.extent_state`), and then either passes it over or takes
it off the evictable set (``policy.evicted``) *before* asking its owner to
evict it, holding nothing across that call. An owner must tolerate an
extent that became unevictable meanwhile (a response mapped it, a write
made it dirty): it leaves those pages alone, and they come back to the
policy when their owner admits them again.

Passed over: extents mapped by a response, a pin or a fill's waiters
(BUSY), and dirty ones, whose owner is asked to write back in the
background so that they can go next time (DIRTY). A pass gives up once it
has passed over every tracked extent in a row. Readahead not read yet is
not among the policy's victims: it goes only when a reader's fill needs the
room (:meth:`EvictionDriver.evict_prefetched`), or once it has waited too
long for its reader.

Protected by the event loop; ``evict`` awaits only the owners' evictions,
and each victim is chosen and taken off the set without an await between.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Protocol

from cachesvc.core.accounting import CacheCounters
from cachesvc.core.eviction.policy import INDEX_MASK, SLOT_SHIFT, EvictionPolicy


class ExtentState(enum.Enum):
    """Whether an extent can be evicted now."""

    EVICTABLE = "evictable"
    BUSY = "busy"  # mapped: a response, a pin, or a fill's waiters hold pages of it
    DIRTY = "dirty"  # holds bytes the origin does not have yet
    GONE = "gone"  # nothing of it is cached any more


class ExtentOwner(Protocol):
    """A file whose extents the driver evicts (the caching inode)."""

    @property
    def path(self) -> str: ...

    def extent_state(self, index: int) -> ExtentState:
        """The state of extent ``index``, without changing anything."""

    async def evict_extents(self, indexes: Sequence[int]) -> int:
        """Drops the cached, clean, unmapped pages of the extents ``indexes``;
        returns the bytes dropped. Must not admit them to the policy again."""

    def start_writeback(self) -> None:
        """Starts writing the file's dirty data back, in the background."""


# Victims chosen before they are evicted, at most.
BATCH = 64


class _Batch:
    """Victims chosen together, evicted owner by owner: one call (and one
    taking of the owner's locks) for a run of extents rather than one each."""

    __slots__ = ("_owners", "planned")

    def __init__(self) -> None:
        self._owners: dict[int, tuple[ExtentOwner, list[int]]] = {}
        self.planned = 0  # bytes the victims count for in the policy

    def add(self, owner: ExtentOwner, index: int, size: int) -> None:
        entry = self._owners.get(id(owner))
        if entry is None:
            entry = self._owners[id(owner)] = (owner, [])
        entry[1].append(index)
        self.planned += size

    def __len__(self) -> int:
        return sum(len(indexes) for _, indexes in self._owners.values())

    def __bool__(self) -> bool:
        return bool(self._owners)

    def by_owner(self) -> list[tuple[ExtentOwner, list[int]]]:
        return list(self._owners.values())


def ghost_key(path: str, index: int) -> int:
    """The key of extent ``index`` of ``path`` in a policy's eviction history."""
    return hash((path, index))


class EvictionDriver:
    """Evicts the policy's victims through their owners."""

    def __init__(
        self,
        policy: EvictionPolicy,
        owner_of: Callable[[int], ExtentOwner | None],
        counters: CacheCounters,
    ) -> None:
        self.policy = policy  # Immutable.
        # The owner of a table slot, or None. Immutable.
        self._owner_of = owner_of
        self._counters = counters  # Immutable.

    async def evict(self, want: int) -> int:
        """Evicts victims until ``want`` bytes are freed or none is left that
        can go now; returns the bytes freed. Readahead not read yet is not
        among them (see evict_prefetched)."""
        policy = self.policy
        freed = 0
        passed = 0  # victims passed over in a row
        flushing: set[int] = set()  # owners asked to write back (by id)
        while freed < want:
            batch = _Batch()
            while batch.planned < want - freed and len(batch) < BATCH:
                key = policy.victim()
                if key is None:
                    break
                index = key & INDEX_MASK
                owner = self._owner_of(key >> SLOT_SHIFT)
                state = ExtentState.GONE if owner is None else owner.extent_state(index)
                if state is ExtentState.GONE:
                    policy.remove(key)
                    continue
                if state is not ExtentState.EVICTABLE:
                    if state is ExtentState.DIRTY and owner and id(owner) not in flushing:
                        flushing.add(id(owner))
                        owner.start_writeback()
                    policy.skip(key)
                    passed += 1
                    if passed > len(policy):
                        break
                    continue
                assert owner is not None
                passed = 0
                batch.add(owner, index, policy.size(key))
                policy.evicted(key, ghost_key(owner.path, index))
            if not batch:
                break
            freed += await self._evict(batch)
        return freed

    async def evict_prefetched(self, want: int) -> int:
        """Evicts readahead that is not read yet, the furthest ahead first,
        until ``want`` bytes are freed or none that can go is left; returns
        the bytes freed (a reader's fill needs room that only readahead
        holds)."""
        policy = self.policy
        freed = 0
        while freed < want:
            batch = _Batch()
            chosen: list[int] = []
            for key in policy.prefetched_keys():
                index = key & INDEX_MASK
                owner = self._owner_of(key >> SLOT_SHIFT)
                if owner is not None and owner.extent_state(index) is ExtentState.EVICTABLE:
                    batch.add(owner, index, policy.size(key))
                    chosen.append(key)
                    if batch.planned >= want - freed or len(batch) >= BATCH:
                        break
            if not batch:
                break
            for key in chosen:  # the iterator is done: the policy may change
                owner = self._owner_of(key >> SLOT_SHIFT)
                assert owner is not None
                policy.evicted(key, ghost_key(owner.path, key & INDEX_MASK))
            freed += await self._evict(batch)
        return freed

    async def _evict(self, batch: _Batch) -> int:
        """Has each owner of ``batch`` evict its extents (taken off the policy
        already); returns the bytes freed."""
        freed = 0
        for owner, indexes in batch.by_owner():
            dropped = await owner.evict_extents(indexes)
            if dropped:
                self._counters.evictions += len(indexes)
                self._counters.evicted_bytes += dropped
                freed += dropped
        return freed

    async def evict_all(self) -> int:
        """Evicts every extent that can go now; returns the bytes freed."""
        return await self.evict(1 << 62)
