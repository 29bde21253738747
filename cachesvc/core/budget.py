"""The hard page-cache budget: room is reserved before memory is allocated.

Every page-cache allocation (a fill, the pages a buffered write needs) first
reserves its bytes here. A reservation is granted when the bytes allocated
plus those reserved and not yet allocated stay within the budget
(``--cache-size``); otherwise the reserving task runs the eviction driver
for the shortfall (one pass at a time: the others re-check after it) and,
if nothing can be evicted now (everything mapped, pinned, dirty or being
filled), waits for memory to be released, up to a deadline. Then it gets
:class:`NoRoom`: a read is served pass-through instead, a pin or a write
gets 507. Nothing retries in a loop without a bound.

So the page cache's allocated bytes never exceed the budget: the slack
(max(2 MiB, 1 %)) is the tolerance the metrics and tests allow, not used
here. The reservation is returned as soon as the allocation is made (the
allocated bytes count from then on).

Readahead reserves without waiting, and its eviction spares extents that
were prefetched and are not read yet; :meth:`MemoryBudget.readahead_room`
bounds a readahead window by what eviction could free.

Lock order (an eviction takes inode locks of any file):
    CachingInode.writeback_mu, CachingInode.attr_mu (of any file)
      MemoryBudget.evict_mu
        CachingInode.maps_mu
          CachingInode.data_mu

So a reservation may be made holding an inode's attr_mu (a buffered write
does), never its maps_mu or data_mu.
"""

from __future__ import annotations

import asyncio
from typing import Final

from cachesvc.core.accounting import CacheCounters
from cachesvc.core.errors import CacheFull
from cachesvc.core.eviction.driver import EvictionDriver
from cachesvc.core.locks import OrderedLock
from cachesvc.core.memfile import MemoryFile, MemoryKind

# The slack the budget is held to, at least.
MIN_SLACK: Final = 2 << 20
# Readahead leaves this share of the budget (1/8) to readers' own fills.
READER_RESERVE: Final = 8


class NoRoom(CacheFull):
    """The budget has no room, and eviction could not make any in time."""


def budget_slack(limit: int) -> int:
    """How far allocated bytes may be seen above the budget: max(2 MiB, 1 %)."""
    return max(MIN_SLACK, limit // 100)


class MemoryBudget:
    """Reservations against the page-cache budget of one MemoryFile."""

    def __init__(
        self,
        limit: int,
        memfile: MemoryFile,
        driver: EvictionDriver,
        counters: CacheCounters,
        *,
        room_wait: float,
    ) -> None:
        self.limit = limit  # bytes (--cache-size). Immutable.
        self.slack = budget_slack(limit)  # Immutable.
        # How long a reservation waits for memory to be released. Immutable.
        self.room_wait = room_wait
        self._memfile = memfile  # Immutable.
        self._driver = driver  # Immutable.
        self._counters = counters  # Immutable.
        self._evict_mu = OrderedLock("MemoryBudget.evict_mu", 0, self)
        # Bytes reserved and not allocated yet. Protected by the event loop.
        self._reserved = 0
        # Set when memory was released or became evictable. Protected by the event loop.
        self._released = asyncio.Event()

    @property
    def allocated(self) -> int:
        """Page-cache bytes allocated now."""
        return self._memfile.allocated_bytes(MemoryKind.PAGE_CACHE)

    @property
    def reserved(self) -> int:
        """Bytes reserved and not allocated yet."""
        return self._reserved

    @property
    def free(self) -> int:
        """Bytes a reservation could take without evicting."""
        return self.limit - self.allocated - self._reserved

    def readahead_room(self) -> int:
        """Bytes readahead may take now: what is free, plus what eviction could
        free without touching mapped, dirty or prefetched and unread pages,
        less a reserve for readers' own fills (an eighth of the budget),
        which would otherwise have to evict readahead. Fills in flight count
        as taken (allocated, not yet evictable)."""
        policy = self._driver.policy
        busy = self._counters.mapped_bytes + self._counters.dirty_bytes
        evictable = policy.tracked_bytes - policy.prefetched_bytes - busy
        reserve = self.limit // READER_RESERVE
        return self.limit - reserve - self._reserved - self.allocated + max(0, evictable)

    async def reserve(self, length: int, *, wait: bool, prefetch: bool = False) -> None:
        """Reserves ``length`` bytes, evicting as needed; raises NoRoom if that
        is impossible (more than the budget), or if no room could be made
        and none was released within ``room_wait`` seconds (at once without
        ``wait``). ``prefetch``: for readahead (see the module docstring).
        The caller gives the reservation back with :meth:`release`.

        Precondition: the caller holds no inode's maps_mu or data_mu.
        """
        if length > self.limit:
            raise NoRoom(f"{length} bytes do not fit in the {self.limit}-byte cache")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.room_wait if wait else 0.0)
        while True:
            if self._fits(length):
                self._reserved += length
                return
            self._released.clear()
            async with self._evict_mu:
                freed = await self._make_room(length, prefetch=prefetch)
            if freed or self._fits(length):
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self._released.wait()
            except TimeoutError:
                break
        self._counters.room_refusals += 1
        raise NoRoom(
            f"no room for {length} bytes in the {self.limit}-byte cache: everything cached is"
            " mapped, pinned, dirty or being filled"
        )

    async def _make_room(self, length: int, *, prefetch: bool) -> int:
        """Evicts for the shortfall of a reservation of ``length`` bytes;
        returns the bytes freed. Readahead not read yet is spared while
        anything else can go (and always for readahead); when it must go,
        what was read furthest ahead goes first.

        Preconditions: evict_mu is held.
        """
        self._evict_mu.assert_held()
        short = self.allocated + self._reserved + length - self.limit
        if short <= 0:
            return 0
        freed = await self._driver.evict(short)
        if freed < short and not prefetch:
            freed += await self._driver.evict_prefetched(short - freed)
        return freed

    def _fits(self, length: int) -> bool:
        return self.allocated + self._reserved + length <= self.limit

    def release(self, length: int) -> None:
        """Gives back ``length`` reserved bytes (allocated now, or not needed)."""
        self._reserved -= length
        if self._reserved < 0:
            raise RuntimeError(f"released {length} bytes more than reserved")
        self.note_released()

    def note_released(self) -> None:
        """Memory was freed, or pages became evictable: wakes the reservations
        waiting for room."""
        self._released.set()

    def stats(self) -> dict[str, int]:
        return {
            "limit_bytes": self.limit,
            "slack_bytes": self.slack,
            "allocated_bytes": self.allocated,
            "reserved_bytes": self._reserved,
        }
