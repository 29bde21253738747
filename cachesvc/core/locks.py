"""Asyncio lock primitives with an optional lock-order and ownership checker.

The caching inode takes four locks, always in this order (see inode.py)::

    Lock order:
        CachingInode.writeback_mu (OrderedLock, rank 0)
          CachingInode.attr_mu    (OrderedLock, rank 1)
            CachingInode.maps_mu  (OrderedLock, rank 2)
              CachingInode.data_mu (RWLock, rank 3)

Each lock has a rank and an owner (the object whose invariants it protects).
With checking enabled (tests enable it for the whole suite), a task that
acquires a lock while holding a lock of the same owner with an equal or
higher rank gets :class:`LockOrderError` instead of a possible deadlock,
and every lock knows which tasks hold it (as trio's locks record their
``_owner``), so a ``_locked`` method can assert its preconditions
(:meth:`OrderedLock.assert_held`, :meth:`RWLock.assert_held`,
:meth:`RWLock.assert_no_writer`) instead of only stating them. Held locks
are tracked per task, not per context, so child tasks do not inherit their
parent's locks. With checking off, the assertions cost one global read.

The reader-writer lock prefers writers: once a writer waits, new readers
queue behind it, so a stream of reads cannot starve truncate or eviction.
Uncontended acquisition does not suspend the caller.
"""

from __future__ import annotations

import asyncio
import collections
import os
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final


class LockOrderError(RuntimeError):
    """A task acquired locks of one owner out of the documented order."""


_checking: bool = os.environ.get("CACHESVC_LOCK_CHECK", "") == "1"
# Locks held by each task, in acquisition order: (owner id, rank, name, mode),
# mode "x" (exclusive), "w" (RWLock for writing) or "r" (for reading).
_held: weakref.WeakKeyDictionary[asyncio.Task[object], list[tuple[int, int, str, str]]] = (
    weakref.WeakKeyDictionary()
)


def set_lock_order_checking(enabled: bool) -> None:
    """Turns the lock-order checker on or off (process-wide)."""
    global _checking
    _checking = enabled


def lock_order_checking() -> bool:
    """Reports whether the lock-order checker is on."""
    return _checking


def _note_acquire(owner: int, rank: int, name: str, mode: str) -> None:
    task = asyncio.current_task()
    if task is None:
        return
    held = _held.setdefault(task, [])
    for held_owner, held_rank, held_name, _ in held:
        if held_owner == owner and held_rank >= rank:
            raise LockOrderError(f"acquiring {name} while holding {held_name}")
    held.append((owner, rank, name, mode))


def _note_release(owner: int, rank: int) -> None:
    task = asyncio.current_task()
    if task is None:
        return
    held = _held.get(task)
    if not held:
        return
    for i in range(len(held) - 1, -1, -1):
        if held[i][0] == owner and held[i][1] == rank:
            del held[i]
            return


def _held_mode(owner: int, rank: int) -> str | None:
    """How the current task holds the lock of ``owner`` and ``rank``, if it does."""
    task = asyncio.current_task()
    held = _held.get(task) if task is not None else None
    for held_owner, held_rank, _, mode in held or ():
        if held_owner == owner and held_rank == rank:
            return mode
    return None


class OrderedLock:
    """An asyncio.Lock with a rank for the lock-order checker."""

    __slots__ = ("_lock", "_owner", "_rank", "_waiting", "name")

    def __init__(self, name: str, rank: int, owner: object) -> None:
        self._lock = asyncio.Lock()
        self.name: Final = name  # Immutable.
        self._rank: Final = rank  # Immutable.
        self._owner: Final = id(owner)  # Immutable.
        self._waiting = 0  # tasks in acquire(). Protected by the event loop.

    def locked(self) -> bool:
        """Reports whether some task holds the lock."""
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        """Tasks waiting to acquire the lock."""
        return self._waiting

    def contended(self) -> bool:
        """Reports whether some task holds the lock or waits for it."""
        return self._lock.locked() or self._waiting > 0

    def assert_held(self) -> None:
        """With checking on, asserts that the current task holds the lock."""
        if _checking and _held_mode(self._owner, self._rank) is None:
            raise AssertionError(f"{self.name} is not held by this task")

    async def acquire(self) -> None:
        if _checking:
            _note_acquire(self._owner, self._rank, self.name, "x")
        self._waiting += 1
        try:
            await self._lock.acquire()
        except BaseException:
            if _checking:
                _note_release(self._owner, self._rank)
            raise
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._lock.release()
        if _checking:
            _note_release(self._owner, self._rank)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OrderedLock({self.name}, locked={self.locked()})"


class RWLock:
    """A writer-preferring asyncio reader-writer lock with a rank.

    Readers share the lock; a writer holds it alone.
    """

    __slots__ = (
        "_owner",
        "_rank",
        "_read_waiters",
        "_readers",
        "_write_waiters",
        "_writer",
        "name",
    )

    def __init__(self, name: str, rank: int, owner: object) -> None:
        self.name: Final = name  # Immutable.
        self._rank: Final = rank  # Immutable.
        self._owner: Final = id(owner)  # Immutable.
        # The fields below are protected by the event loop: they change only
        # between awaits.
        self._readers = 0  # Number of read holders.
        self._writer = False  # True while a writer holds the lock.
        self._read_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._write_waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def held_for_reading(self) -> bool:
        """True while at least one reader holds the lock."""
        return self._readers > 0

    @property
    def held_for_writing(self) -> bool:
        """True while a writer holds the lock."""
        return self._writer

    @property
    def held(self) -> bool:
        """True while the lock is held for reading or writing."""
        return self._writer or self._readers > 0

    def contended(self) -> bool:
        """Reports whether some task holds the lock or waits for it."""
        return self.held or bool(self._read_waiters) or bool(self._write_waiters)

    def assert_held(self, *, write: bool = False) -> None:
        """With checking on, asserts that the current task holds the lock (for
        writing, if ``write``)."""
        if not _checking:
            return
        mode = _held_mode(self._owner, self._rank)
        if mode is None or (write and mode != "w"):
            how = "for writing" if write else "at all"
            raise AssertionError(f"{self.name} is not held {how} by this task")

    def assert_no_writer(self) -> None:
        """With checking on, asserts what a reader that does not take the lock
        relies on: the current task holds it, or no writer does."""
        if _checking and self._writer and _held_mode(self._owner, self._rank) is None:
            raise AssertionError(f"{self.name} is held for writing by another task")

    async def acquire_read(self) -> None:
        if _checking:
            _note_acquire(self._owner, self._rank, self.name, "r")
        if not self._writer and not self._write_waiters:
            self._readers += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._read_waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                # Granted just as we were cancelled: give it back.
                self._readers -= 1
                self._wake()
            else:
                self._read_waiters.remove(fut)
            if _checking:
                _note_release(self._owner, self._rank)
            raise

    def release_read(self) -> None:
        if self._readers <= 0:
            raise RuntimeError(f"{self.name}: release_read of a lock not held for reading")
        self._readers -= 1
        if _checking:
            _note_release(self._owner, self._rank)
        self._wake()

    async def acquire_write(self) -> None:
        if _checking:
            _note_acquire(self._owner, self._rank, self.name, "w")
        if not self._writer and self._readers == 0 and not self._write_waiters:
            self._writer = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._write_waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._writer = False
                self._wake()
            else:
                self._write_waiters.remove(fut)
                # Readers queued behind this writer may proceed now.
                self._wake()
            if _checking:
                _note_release(self._owner, self._rank)
            raise

    def release_write(self) -> None:
        if not self._writer:
            raise RuntimeError(f"{self.name}: release_write of a lock not held for writing")
        self._writer = False
        if _checking:
            _note_release(self._owner, self._rank)
        self._wake()

    def _grant_reader(self) -> None:
        fut = self._read_waiters.popleft()
        if not fut.done():
            self._readers += 1
            fut.set_result(None)

    def _wake(self) -> None:
        if self._writer:
            return
        if self._readers == 0:
            while self._write_waiters:
                fut = self._write_waiters.popleft()
                if not fut.done():
                    self._writer = True
                    fut.set_result(None)
                    return
        if not self._write_waiters:
            while self._read_waiters:
                self._grant_reader()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Holds the lock for reading for the duration of the block."""
        await self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Holds the lock for writing for the duration of the block."""
        await self.acquire_write()
        try:
            yield
        finally:
            self.release_write()

    def __repr__(self) -> str:
        return (
            f"RWLock({self.name}, readers={self._readers}, writer={self._writer}, "
            f"waiting={len(self._read_waiters)}r/{len(self._write_waiters)}w)"
        )
