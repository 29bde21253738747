"""S3-FIFO: a small FIFO, a main FIFO with two-bit clock, and a ghost history.

From "FIFO queues are all you need for cache eviction" (Yang et al., SOSP
2023), as libCacheSim's S3FIFO renders it, at extent granularity:

- A new extent enters the *small* queue (10 % of the budget), or the *main*
  queue if its ghost key is in the ghost history (it was evicted from the
  small queue lately: a second chance for things reused at a longer
  distance).
- A read adds one to the extent's access count (capped at 3); reads never
  move anything. Before the first eviction, extents beyond the small
  queue's share go to the main queue. Readahead waits outside the queues
  (see :mod:`cachesvc.core.eviction.prefetch`): its first read enters it
  into the small queue, so a one-pass scan, prefetched or not, leaves every
  extent it brought in at count 0.
- Evicting from the small queue (while it holds at least its share, 10 %,
  of the tracked bytes, or the main queue is empty; the tracked bytes are
  the budget less what is mapped or being filled): an extent read twice
  since it came in
  (MOVE_TO_MAIN) moves to the main queue with its count cleared; one that
  was not is evicted and its ghost key remembered.
- Evicting from the main queue: an extent with a count is put back at the
  tail with its count decremented; one without is evicted.
- An extent the driver cannot evict now (mapped, dirty) is passed over: at
  the tail of the main queue, where it stays unless it is read again. Once
  every extent of one queue has been passed over since the last eviction,
  the other is evicted from, whatever its size.

So a scan passes through the small queue and out, while the hot set, read
again within the small queue's time, stays in the main queue.

The queues are deques of keys with lazy deletion: a removed or moved key
leaves a stale slot behind, recognized by the key's state (absent, or in
the other queue) and skipped; the deques are rebuilt once stale slots
outnumber live ones. The ghost history is a pair of Bloom filters (current
and previous generation, each taking evicted keys until they add up to 0.6
of the budget): a key is in the history while it is in either, so about
0.9 of the budget's worth of evicted extents is remembered, as in
libCacheSim (a few bits per key instead of a queue entry).

Protected by the event loop.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from typing import Final

from cachesvc.core.eviction.policy import (
    FREQ_MASK,
    FREQ_ONE,
    MAIN,
    MAX_FREQ,
    pack,
    resized,
    size_of,
)
from cachesvc.core.eviction.prefetch import PrefetchingPolicy, PrefetchQueue
from cachesvc.core.hostmem import PAGE_SIZE
from cachesvc.core.pages import EXTENT_SIZE

# The small queue's share of the budget (the paper's 10 %).
SMALL_SHARE: Final = 0.10
# Reads in the small queue that move an extent to the main queue (as
# libCacheSim's S3FIFO, whose default is 2).
MOVE_TO_MAIN: Final = 2
# Stale queue slots tolerated beyond the live ones before a rebuild.
_STALE_SLACK: Final = 1024
# The ghost history's reach, as a share of the budget: what was evicted
# within about this many bytes of evictions is remembered (libCacheSim's
# S3FIFO keeps 0.9; two generations of 0.6 remember 0.6-1.2, 0.9 on average).
GHOST_GENERATION_SHARE: Final = 0.6
# Bloom filter bits per remembered key, hash functions per key, and the most
# keys a generation takes (4 MiB of bits per filter).
_BLOOM_BITS_PER_KEY: Final = 16
_BLOOM_HASHES: Final = 4
_MAX_GHOST_KEYS: Final = 2 << 20


class GhostHistory:
    """Recently evicted ghost keys, approximately: two generations of Bloom
    filters, each taking keys until they add up to ``generation_bytes`` of
    evicted extents (or the filter's key capacity). A key is remembered
    while it is in either, so the history holds the last one to two
    generations. A false positive (about 0.2 %) only gives an extent the main
    queue early."""

    def __init__(self, generation_bytes: int) -> None:
        # Bytes of evicted extents per generation. Immutable.
        self._generation_bytes = max(EXTENT_SIZE, generation_bytes)
        # Keys per generation at most: every extent as small as a page.
        self._max_keys = min(_MAX_GHOST_KEYS, max(64, generation_bytes // PAGE_SIZE))
        bits = self._max_keys * _BLOOM_BITS_PER_KEY
        # Filter size in bits (a power of two, for masking). Immutable.
        self._bits = 1 << (bits - 1).bit_length()
        self._current = bytearray(self._bits // 8)
        self._previous = bytearray(self._bits // 8)
        self._keys = 0  # keys added to the current generation
        self._bytes = 0  # and the bytes of their extents

    def _positions(self, ghost: int) -> list[int]:
        mask = self._bits - 1
        h = ghost & 0xFFFFFFFFFFFFFFFF
        step = (h >> 32) | 1
        return [(h + i * step) & mask for i in range(_BLOOM_HASHES)]

    def add(self, ghost: int, size: int) -> None:
        """Remembers ``ghost``, an evicted extent of ``size`` bytes."""
        if self._bytes >= self._generation_bytes or self._keys >= self._max_keys:
            self._previous, self._current = self._current, self._previous
            self._current[:] = bytes(len(self._current))
            self._keys = self._bytes = 0
        for bit in self._positions(ghost):
            self._current[bit >> 3] |= 1 << (bit & 7)
        self._keys += 1
        self._bytes += size

    def __contains__(self, ghost: int) -> bool:
        positions = self._positions(ghost)
        return all(self._current[b >> 3] & (1 << (b & 7)) for b in positions) or all(
            self._previous[b >> 3] & (1 << (b & 7)) for b in positions
        )


class S3Fifo(PrefetchingPolicy):
    """The S3-FIFO policy over a budget of ``capacity`` bytes."""

    name = "s3fifo"

    def __init__(self, capacity: int) -> None:
        # The small queue's share of the budget: before the first eviction,
        # extents beyond it go to the main queue. Immutable.
        self._small_target = max(EXTENT_SIZE, int(capacity * SMALL_SHARE))
        # key -> packed state (policy.pack) of the extents in the queues.
        self._state: dict[int, int] = {}
        # Keys in insertion order, with stale slots (see the module docstring).
        self._small: collections.deque[int] = collections.deque()
        self._main: collections.deque[int] = collections.deque()
        self._small_bytes = 0
        self._main_bytes = 0
        # Readahead not read yet: outside the queues.
        self._prefetch = PrefetchQueue()
        self._ghost = GhostHistory(int(capacity * GHOST_GENERATION_SHARE))
        # Extents of each queue passed over since the last eviction: once
        # every one of a queue has been, the other is evicted from, whatever
        # its size.
        self._small_passes = 0
        self._main_passes = 0
        self._evicted_any = False  # set by the first eviction
        # Promotions and ghost hits since creation, for stats.
        self._promoted = 0
        self._ghost_hits = 0

    # ---------------------------------------------------------------- queries

    def _ranked(self) -> Mapping[int, int]:
        return self._state

    def _ranked_bytes(self) -> int:
        return self._small_bytes + self._main_bytes

    def stats(self) -> dict[str, int]:
        return {
            "extents": len(self),
            "small_bytes": self._small_bytes,
            "main_bytes": self._main_bytes,
            "prefetched_bytes": self._prefetch.bytes,
            "promoted_total": self._promoted,
            "ghost_hits_total": self._ghost_hits,
        }

    # --------------------------------------------------------------- changes

    def admit(self, key: int, size: int, ghost: int, prefetched: bool) -> None:
        state = self._state.get(key)
        if state is not None:
            self._account(state, -1)
            state = resized(state, size)
            self._account(state, 1)
            self._state[key] = state
            return
        if key in self._prefetch:
            self._prefetch.resize(key, size_of(pack(size)))
            return
        if prefetched:
            self._prefetch.add(key, size_of(pack(size)), time.monotonic())
            return
        if ghost in self._ghost:
            self._ghost_hits += 1
            self._enqueue(key, pack(size) | MAIN)
        elif not self._evicted_any and self._small_bytes >= self._small_target:
            # Before the first eviction, the small queue's overflow goes to
            # the main queue (libCacheSim's S3FIFO): what came in between
            # then and a full cache stays a little longer.
            self._enqueue(key, pack(size) | MAIN)
        else:
            self._enqueue(key, pack(size))
        self._compact_if_stale()

    def touch(self, key: int) -> None:
        state = self._state.get(key)
        if state is None:
            size = self._prefetch.take(key)
            if size is not None:
                # A reader reached its readahead: used once, as a miss would be.
                self._enqueue(key, pack(size))
        elif (state & FREQ_MASK) < MAX_FREQ * FREQ_ONE:
            self._state[key] = state + FREQ_ONE

    def remove(self, key: int) -> None:
        state = self._state.pop(key, None)
        if state is not None:
            self._account(state, -1)
            self._compact_if_stale()
        else:
            self._prefetch.take(key)

    def _from_small(self) -> bool:
        """Whether the next victim comes from the small queue."""
        if not self._small_bytes:
            return False
        if not self._main_bytes:
            return True
        small_done = self._small_passes >= len(self._small)
        main_done = self._main_passes >= len(self._main)
        if small_done != main_done:
            return main_done
        return self._small_bytes >= SMALL_SHARE * (self._small_bytes + self._main_bytes)

    def victim(self) -> int | None:
        # Readahead nobody came for is ranked like any unread extent, first
        # in line.
        for key, size in self._prefetch.expired(time.monotonic()):
            self._enqueue(key, pack(size), first=True)
        while True:
            if self._from_small():
                key = self._small[0]
                state = self._state.get(key)
                if state is None or state & MAIN:
                    self._small.popleft()  # stale
                    continue
                if state & FREQ_MASK >= MOVE_TO_MAIN * FREQ_ONE:
                    # Read again while in the small queue: into the main queue.
                    self._small.popleft()
                    self._account(state, -1)
                    self._enqueue(key, (state & ~FREQ_MASK) | MAIN)
                    self._promoted += 1
                    continue
                return key
            if not self._main_bytes:
                return None
            key = self._main[0]
            state = self._state.get(key)
            if state is None or not state & MAIN:
                self._main.popleft()  # stale
                continue
            if state & FREQ_MASK:
                self._main.rotate(-1)
                self._state[key] = state - FREQ_ONE
                continue
            return key

    def skip(self, key: int) -> None:
        # An extent of the small queue that is in use (mapped, dirty) has
        # passed its probation like one that was read: into the main queue,
        # where it stays unless it is read again.
        state = self._state[key]
        if state & MAIN:
            self._main_passes += 1
            if self._main and self._main[0] == key:
                self._main.rotate(-1)
            else:  # not at the head after all: a second slot at the tail
                self._main.append(key)
            return
        if self._small and self._small[0] == key:
            self._small.popleft()
        self._account(state, -1)
        self._enqueue(key, (state & ~FREQ_MASK) | MAIN)

    def evicted(self, key: int, ghost: int) -> None:
        self._evicted_any = True
        self._small_passes = self._main_passes = 0
        state = self._state.pop(key, None)
        if state is None:
            self._prefetch.take(key)  # readahead given way: no history
            return
        self._account(state, -1)
        queue = self._main if state & MAIN else self._small
        if queue and queue[0] == key:
            queue.popleft()
        if not state & MAIN:
            self._ghost.add(ghost, size_of(state))

    # ------------------------------------------------------------- internals

    def _enqueue(self, key: int, state: int, *, first: bool = False) -> None:
        """Puts ``key`` in the queue its ``state`` names: at the tail, or at the
        head (``first``)."""
        self._state[key] = state
        self._account(state, 1)
        queue = self._main if state & MAIN else self._small
        if first:
            queue.appendleft(key)
        else:
            queue.append(key)

    def _account(self, state: int, sign: int) -> None:
        size = size_of(state) * sign
        if state & MAIN:
            self._main_bytes += size
        else:
            self._small_bytes += size

    def _compact_if_stale(self) -> None:
        """Rebuilds the deques once stale slots outnumber live keys."""
        if len(self._small) + len(self._main) <= 2 * len(self._state) + _STALE_SLACK:
            return
        self._small = self._live(self._small, main=False)
        self._main = self._live(self._main, main=True)

    def _live(self, queue: collections.deque[int], *, main: bool) -> collections.deque[int]:
        seen: set[int] = set()
        out: collections.deque[int] = collections.deque()
        for key in queue:
            state = self._state.get(key)
            if state is not None and bool(state & MAIN) == main and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def check_invariants(self) -> None:
        small = main = 0
        small_keys, main_keys = set(self._small), set(self._main)
        for key, state in self._state.items():
            assert key not in self._prefetch, f"{key} both queued and prefetched"
            size = size_of(state)
            if state & MAIN:
                main += size
                assert key in main_keys, f"{key} missing from the main queue"
            else:
                small += size
                assert key in small_keys, f"{key} missing from the small queue"
        assert (small, main) == (self._small_bytes, self._main_bytes), (
            f"queue bytes {self._small_bytes}/{self._main_bytes}, states say {small}/{main}"
        )
        self._prefetch.check_invariants()

    def __repr__(self) -> str:
        return (
            f"S3Fifo(extents={len(self)}, small={self._small_bytes},"
            f" main={self._main_bytes}, prefetched={self._prefetch.bytes})"
        )
