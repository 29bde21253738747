"""Evictable memory: the ranges MemoryFile's users allow to be evicted, and
the tasks that ask them to evict.

Follows the eviction part of MemoryFile in the reference design
(pgalloc_newer.go). Users register *evictable* ranges in their own offset
space; ``start`` asks each user to evict them, one task per user, without
holding any state across the call (users must tolerate ranges that were
marked unevictable meanwhile).

Everything runs on the event loop and no method awaits while the state is
inconsistent, so there is no lock: fields marked "Protected by the event
loop" are read and changed only on the loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from cachesvc.core.ranges import Range, RangeSet, marker_set

# MemoryFile's logger: evictions are part of its work.
logger = logging.getLogger("cachesvc.memfile")


class EvictableUser(Protocol):
    """A user of MemoryFile memory that can be asked to give some of it back."""

    async def evict(self, rng: Range) -> None:
        """Drops the memory behind ``rng``, a range in the user's own offset space.

        May find ``rng`` (or part of it) unevictable by now and must then leave
        that part alone. Must not mark ``rng`` evictable again from here.
        """


@dataclass(slots=True)
class _UserEvictable:
    """Eviction state of one user. Protected by the event loop."""

    ranges: RangeSet[None]  # evictable ranges, in the user's offset space
    evicting: bool = False  # an eviction task is running for this user


class Evictions:
    """The evictable ranges of every user of one MemoryFile, and its eviction tasks."""

    def __init__(self) -> None:
        # Evictable ranges by user, and their total length. Protected by the event loop.
        self._evictable: dict[EvictableUser, _UserEvictable] = {}
        self._evictable_bytes = 0
        # Running eviction tasks (strong references). Protected by the event loop.
        self._eviction_tasks: set[asyncio.Task[None]] = set()
        self._closed = False  # Set by close. Protected by the event loop.

    @property
    def evictable_bytes(self) -> int:
        """Total length of all users' evictable ranges."""
        return self._evictable_bytes

    @property
    def user_count(self) -> int:
        """Users with evictable ranges or a running eviction task."""
        return len(self._evictable)

    @property
    def task_count(self) -> int:
        """Eviction tasks running."""
        return len(self._eviction_tasks)

    def mark_evictable(self, user: EvictableUser, rng: Range) -> None:
        """Allows ``user.evict`` to be called on ``rng`` (no effect where it
        already is evictable). Preconditions: ``rng.start <= rng.end``."""
        if rng.is_empty:
            return
        info = self._evictable.get(user)
        if info is None:
            info = self._evictable[user] = _UserEvictable(marker_set())
        before = info.ranges.total_length
        for gap in info.ranges.gaps(rng):
            info.ranges.insert(gap, None)
        self._evictable_bytes += info.ranges.total_length - before

    def mark_unevictable(self, user: EvictableUser, rng: Range) -> None:
        """Stops ``user.evict`` from being called on ``rng`` from now on (a call
        already under way may still cover it)."""
        info = self._evictable.get(user)
        if info is None or rng.is_empty:
            return
        removed = info.ranges.remove(rng)
        self._evictable_bytes -= sum(piece.length for piece, _ in removed)
        self._forget_if_idle(user, info)

    def mark_all_unevictable(self, user: EvictableUser) -> None:
        """``mark_unevictable`` over all of ``user``'s offsets."""
        info = self._evictable.get(user)
        if info is None:
            return
        self._evictable_bytes -= info.ranges.total_length
        info.ranges.clear()
        self._forget_if_idle(user, info)

    def _forget_if_idle(self, user: EvictableUser, info: _UserEvictable) -> None:
        # Only a user's eviction task may remove the entry while it runs.
        if not info.evicting and not info.ranges:
            del self._evictable[user]

    def ranges(self, user: EvictableUser) -> list[Range]:
        """``user``'s evictable ranges, ascending."""
        info = self._evictable.get(user)
        return [] if info is None else [rng for rng, _ in info.ranges]

    def start(self) -> None:
        """Starts evicting everything evictable: one task per user, unless one
        is already running for it. Does not wait (see wait)."""
        # Follows MemoryFile.startEvictionsLocked in the reference design.
        if self._closed:
            return
        for user, info in self._evictable.items():
            if not info.evicting and info.ranges:
                info.evicting = True
                task = asyncio.create_task(self._evict_user(user, info), name="memfile eviction")
                self._eviction_tasks.add(task)
                task.add_done_callback(self._eviction_tasks.discard)

    async def _evict_user(self, user: EvictableUser, info: _UserEvictable) -> None:
        """Evicts ``user``'s ranges, lowest first, until none is left."""
        try:
            while not self._closed:
                first = next(iter(info.ranges), None)
                if first is None:
                    break
                rng = first[0]
                info.ranges.remove(rng)
                self._evictable_bytes -= rng.length
                # Nothing of ours is held across the call: the user may mark
                # ranges (un)evictable meanwhile, including this one.
                try:
                    await user.evict(rng)
                except Exception:
                    logger.exception("eviction of %s by %r failed", rng, user)
        finally:
            info.evicting = False
            self._forget_if_idle(user, info)

    async def wait(self) -> None:
        """Waits until no eviction task is running."""
        while self._eviction_tasks:
            await asyncio.wait(set(self._eviction_tasks))

    async def close(self) -> None:
        """Cancels the eviction tasks and waits for them; none starts afterwards."""
        self._closed = True
        evictions = list(self._eviction_tasks)
        for task in evictions:
            task.cancel()
        await asyncio.gather(*evictions, return_exceptions=True)

    def check_invariants(self) -> None:
        """Asserts every invariant of the eviction state (for tests)."""
        evictable = 0
        for user, entry in self._evictable.items():
            entry.ranges.check_invariants(require_merged=True)
            assert entry.ranges or entry.evicting, f"idle empty evictable entry for {user!r}"
            evictable += entry.ranges.total_length
        assert evictable == self._evictable_bytes, (
            f"evictable {self._evictable_bytes} != {evictable}"
        )
