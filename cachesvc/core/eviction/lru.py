"""LRU at extent granularity: evict the extent read least recently.

Kept selectable (``--eviction-policy lru``) so that the comparison with
S3-FIFO can be rerun: a one-pass scan larger than the cache pushes out
everything else under LRU. An ordered dict holds the tracked keys, least
recently used first; a read moves its extent to the end. A prefetched
extent enters at the end like any other, and its first read only marks it
read.

Protected by the event loop.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from cachesvc.core.eviction.policy import PREFETCHED, pack, resized, size_of


class Lru:
    """The LRU policy."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        del capacity  # LRU needs no sizing
        # key -> packed state, least recently used first. Protected by the event loop.
        self._order: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._bytes = 0
        self._prefetched_bytes = 0
        # Keys admitted as prefetched, oldest first, with stale slots
        # (dropped once they outnumber the tracked keys).
        self._prefetched_order: collections.deque[int] = collections.deque()

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def prefetched(self, key: int) -> bool:
        return bool(self._order.get(key, 0) & PREFETCHED)

    def prefetched_keys(self) -> Iterator[int]:
        order = self._prefetched_order
        while order and not self._order.get(order[-1], 0) & PREFETCHED:
            order.pop()  # stale
        return (key for key in reversed(order) if self._order.get(key, 0) & PREFETCHED)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def tracked_bytes(self) -> int:
        return self._bytes

    @property
    def prefetched_bytes(self) -> int:
        return self._prefetched_bytes

    def stats(self) -> dict[str, int]:
        return {
            "extents": len(self._order),
            "tracked_bytes": self._bytes,
            "prefetched_bytes": self._prefetched_bytes,
        }

    def admit(self, key: int, size: int, ghost: int, prefetched: bool) -> None:
        state = self._order.get(key)
        if state is not None:
            self._account(state, -1)
            state = resized(state, size)
        else:
            state = pack(size, prefetched)
            if prefetched:
                self._prefetched_order.append(key)
                if len(self._prefetched_order) > 2 * len(self._order) + 1024:
                    self._prefetched_order = collections.deque(
                        k for k in self._prefetched_order if self._order.get(k, 0) & PREFETCHED
                    )
        self._order[key] = state
        self._account(state, 1)

    def touch(self, key: int) -> None:
        state = self._order.get(key)
        if state is None:
            return
        if state & PREFETCHED:
            self._prefetched_bytes -= size_of(state)
            self._order[key] = state & ~PREFETCHED
        self._order.move_to_end(key)

    def remove(self, key: int) -> None:
        state = self._order.pop(key, None)
        if state is not None:
            self._account(state, -1)

    def victim(self) -> int | None:
        return next(iter(self._order), None)

    def skip(self, key: int, *, in_use: bool) -> None:
        self._order.move_to_end(key)

    def evicted(self, key: int, ghost: int) -> None:
        self._account(self._order.pop(key), -1)

    def _account(self, state: int, sign: int) -> None:
        size = size_of(state) * sign
        self._bytes += size
        if state & PREFETCHED:
            self._prefetched_bytes += size

    def check_invariants(self) -> None:
        total = sum(size_of(state) for state in self._order.values())
        prefetched = sum(size_of(s) for s in self._order.values() if s & PREFETCHED)
        assert (total, prefetched) == (self._bytes, self._prefetched_bytes), (
            f"bytes {self._bytes}/{self._prefetched_bytes}, states say {total}/{prefetched}"
        )

    def __repr__(self) -> str:
        return f"Lru(extents={len(self._order)}, bytes={self._bytes})"
