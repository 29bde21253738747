"""LRU at extent granularity: evict the extent read least recently.

Kept selectable (``--eviction-policy lru``) so that the comparison with
S3-FIFO can be rerun: a one-pass scan larger than the cache pushes out
everything else under LRU. An ordered dict holds the tracked keys, least
recently used first; a read moves its extent to the end. Readahead waits
outside the order until it is read (see
:mod:`cachesvc.core.eviction.prefetch`); readahead nobody came for enters
it at the front, first to go.

Protected by the event loop.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping

from cachesvc.core.eviction.policy import pack, resized, size_of
from cachesvc.core.eviction.prefetch import PrefetchingPolicy, PrefetchQueue


class Lru(PrefetchingPolicy):
    """The LRU policy."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        del capacity  # LRU needs no sizing
        # key -> packed state, least recently used first. Protected by the event loop.
        self._order: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._bytes = 0
        # Readahead not read yet: outside the order.
        self._prefetch = PrefetchQueue()

    def _ranked(self) -> Mapping[int, int]:
        return self._order

    def _ranked_bytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        return {
            "extents": len(self),
            "tracked_bytes": self.tracked_bytes,
            "prefetched_bytes": self._prefetch.bytes,
        }

    def admit(self, key: int, size: int, ghost: int, prefetched: bool) -> None:
        state = self._order.get(key)
        if state is not None:
            self._bytes -= size_of(state)
            state = resized(state, size)
            self._order[key] = state
            self._bytes += size_of(state)
        elif key in self._prefetch:
            self._prefetch.resize(key, size_of(pack(size)))
        elif prefetched:
            self._prefetch.add(key, size_of(pack(size)), time.monotonic())
        else:
            self._append(key, pack(size))

    def touch(self, key: int) -> None:
        if key in self._order:
            self._order.move_to_end(key)
            return
        size = self._prefetch.take(key)
        if size is not None:
            self._append(key, pack(size))

    def remove(self, key: int) -> None:
        state = self._order.pop(key, None)
        if state is not None:
            self._bytes -= size_of(state)
        else:
            self._prefetch.take(key)

    def victim(self) -> int | None:
        # Readahead nobody came for goes first.
        for key, size in self._prefetch.expired(time.monotonic()):
            self._append(key, pack(size))
            self._order.move_to_end(key, last=False)
        return next(iter(self._order), None)

    def skip(self, key: int) -> None:
        self._order.move_to_end(key)

    def evicted(self, key: int, ghost: int) -> None:
        state = self._order.pop(key, None)
        if state is None:
            self._prefetch.take(key)
        else:
            self._bytes -= size_of(state)

    def _append(self, key: int, state: int) -> None:
        self._order[key] = state
        self._bytes += size_of(state)

    def check_invariants(self) -> None:
        total = sum(size_of(state) for state in self._order.values())
        assert total == self._bytes, f"bytes {self._bytes}, states say {total}"
        assert not any(key in self._prefetch for key in self._order), "queued and prefetched"
        self._prefetch.check_invariants()

    def __repr__(self) -> str:
        return f"Lru(extents={len(self)}, bytes={self.tracked_bytes})"
