"""Extents read ahead and not read yet, kept apart from a policy's order.

Readahead brings in extents no reader has asked for yet. They do not take
part in a policy's ranking until a reader reaches them (their first read is
their admission, as if it were the miss it saved), so that evicting for
other data never has to pass them over one by one, and a one-pass stream
leaves the policy's queues as any one-time read does. They go:

- when a reader reaches them (``take``): into the policy, as newly read;
- when a reader's fill needs room that only readahead holds: the most
  recently prefetched first (:meth:`PrefetchQueue.newest`), since a
  sequential reader reaches the older ones sooner;
- when nobody has read them within ``PREFETCH_TTL`` seconds (a stream that
  stopped): into the policy as unread, first in line for eviction
  (:meth:`PrefetchQueue.expired`).

Every operation is O(1) amortized: a dict of key -> (size, time) and a
queue in prefetch order whose slots for keys taken since are skipped.

Protected by the event loop.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from typing import Final

from cachesvc.core.eviction.policy import size_of

# Seconds readahead may wait for its reader before it is ranked like any
# unread extent (and so evicted first).
PREFETCH_TTL: Final = 5.0


class PrefetchQueue:
    """The prefetched, unread extents of one policy."""

    __slots__ = ("_entries", "_order", "bytes")

    def __init__(self) -> None:
        # key -> (bytes it counts for, when it was prefetched).
        self._entries: dict[int, tuple[int, float]] = {}
        # (key, when) in prefetch order, with slots of keys taken since.
        self._order: collections.deque[tuple[int, float]] = collections.deque()
        self.bytes = 0  # of all entries

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def size(self, key: int) -> int:
        """Bytes ``key`` counts for (0 if not held)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry[0]

    def add(self, key: int, size: int, now: float) -> None:
        """Holds ``key`` (not held yet), ``size`` bytes, prefetched at ``now``."""
        self._entries[key] = (size, now)
        self._order.append((key, now))
        self.bytes += size
        if len(self._order) > 2 * len(self._entries) + 1024:
            self._order = collections.deque(
                (k, t) for k, t in self._order if self._entries.get(k, (0, -1.0))[1] == t
            )

    def resize(self, key: int, size: int) -> None:
        """Held ``key`` counts for ``size`` bytes now."""
        old, when = self._entries[key]
        self._entries[key] = (size, when)
        self.bytes += size - old

    def take(self, key: int) -> int | None:
        """Lets go of ``key``; returns the bytes it counted for (None if not held)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[0]
        return entry[0]

    def newest(self) -> Iterator[int]:
        """The keys held, most recently prefetched first. The queue must not
        change while the iterator is used."""
        order, entries = self._order, self._entries
        while order and entries.get(order[-1][0], (0, -1.0))[1] != order[-1][1]:
            order.pop()  # taken since
        return (k for k, t in reversed(order) if entries.get(k, (0, -1.0))[1] == t)

    def expired(self, now: float) -> list[tuple[int, int]]:
        """Lets go of the keys prefetched more than PREFETCH_TTL seconds before
        ``now``; returns them with their sizes, oldest first."""
        out: list[tuple[int, int]] = []
        order, entries = self._order, self._entries
        while order and order[0][1] < now - PREFETCH_TTL:
            key, when = order.popleft()
            entry = entries.get(key)
            if entry is not None and entry[1] == when:
                del entries[key]
                self.bytes -= entry[0]
                out.append((key, entry[0]))
        return out

    def check_invariants(self) -> None:
        assert self.bytes == sum(size for size, _ in self._entries.values()), "prefetched bytes"
        queued = set(self._order)
        for key, (_, when) in self._entries.items():
            assert (key, when) in queued, f"prefetched {key} missing from the queue"


class PrefetchingPolicy:
    """What a policy that keeps readahead apart answers the same way: its
    ranked extents are a dict of key -> packed state (``_ranked``), its
    readahead a PrefetchQueue (``_prefetch``)."""

    __slots__ = ()
    _prefetch: PrefetchQueue

    def _ranked(self) -> Mapping[int, int]:
        """The ranked extents: key -> packed state."""
        raise NotImplementedError

    def _ranked_bytes(self) -> int:
        """Bytes of the ranked extents."""
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        return key in self._ranked() or key in self._prefetch

    def __len__(self) -> int:
        return len(self._ranked()) + len(self._prefetch)

    def size(self, key: int) -> int:
        state = self._ranked().get(key)
        return size_of(state) if state is not None else self._prefetch.size(key)

    def prefetched(self, key: int) -> bool:
        return key in self._prefetch

    def prefetched_keys(self) -> Iterator[int]:
        return self._prefetch.newest()

    @property
    def tracked_bytes(self) -> int:
        return self._ranked_bytes() + self._prefetch.bytes

    @property
    def prefetched_bytes(self) -> int:
        return self._prefetch.bytes
