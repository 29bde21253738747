"""Bounded waits on real conditions, for integration and e2e tests.

A test that must reach a state (an upload under way, a connection closed, a
server idle, a download stalled on a client that reads nothing) polls the
condition that shows it instead of sleeping a fixed time: fast when the
machine is fast, still right when it is loaded. Every wait has a deadline
and fails naming what it waited for and the last value seen.

:func:`wait_until` blocks (threads, subprocess tests) until an ``accept``
test takes a probed value; :func:`until` waits on an event loop until a
condition holds. :func:`steady` is an ``accept`` for "stopped changing",
which is how :func:`wait_stalled` / :func:`until_stalled` tell that a peer
has filled our receive queue and is now blocked on us.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import struct
import termios
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

# A stall is the receive queue unchanged over this many polls this far apart.
STALL_POLLS = 5
STALL_INTERVAL = 0.05
_STALLED = "the peer stalling with bytes unread"


class _Poll(Generic[T]):
    """One bounded poll: ``done()`` probes once and says whether ``accept``
    took the value (then in ``result``); past the deadline it raises."""

    def __init__(
        self, probe: Callable[[], T], accept: Callable[[T], bool], timeout: float, what: str
    ) -> None:
        self._probe = probe
        self._accept = accept
        self._timeout = timeout
        self._what = what
        self._deadline = time.monotonic() + timeout
        self.result: T

    def done(self) -> bool:
        self.result = self._probe()
        if self._accept(self.result):
            return True
        if time.monotonic() >= self._deadline:
            raise TimeoutError(f"{self._what} not within {self._timeout}s; last: {self.result!r}")
        return False


def wait_until(
    probe: Callable[[], T],
    accept: Callable[[T], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
) -> T:
    """Calls ``probe()`` until ``accept`` takes its result, which it returns.
    Raises TimeoutError naming ``what`` and the last result."""
    poll = _Poll(probe, accept, timeout, what)
    while not poll.done():
        time.sleep(interval)
    return poll.result


async def until(
    condition: Callable[[], object], what: str, timeout: float = 10.0, *, interval: float = 0.01
) -> None:
    """Waits on an event loop until ``condition()`` is true; other tasks run
    between two calls. Raises TimeoutError naming ``what``."""
    poll = _Poll(condition, bool, timeout, what)
    # The conditions polled here have no event to wait on (a peer's socket,
    # another thread's counters): the sleep is the poll interval.
    while not poll.done():  # noqa: ASYNC110
        await asyncio.sleep(interval)


def steady(polls: int) -> Callable[[T], bool]:
    """An ``accept`` that takes a value once the last ``polls`` probes gave
    it, and it is not zero (or empty): the state has stopped changing."""
    seen: list[T] = []

    def accept(value: T) -> bool:
        seen.append(value)
        return bool(value) and len(seen) >= polls and seen[-polls:].count(value) == polls

    return accept


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def receive_queue(sock: _HasFileno) -> int:
    """Bytes that have arrived on TCP socket ``sock`` and not been read (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4)
    return int(struct.unpack("i", raw)[0])


def wait_stalled(sock: _HasFileno, timeout: float = 10.0) -> int:
    """Waits until the peer has stopped sending on ``sock`` with bytes
    unread (our receive queue is full, or the peer has nothing more to
    send); returns the bytes queued."""
    probe = functools.partial(receive_queue, sock)
    return wait_until(probe, steady(STALL_POLLS), timeout, _STALLED, interval=STALL_INTERVAL)


async def until_stalled(sock: _HasFileno, timeout: float = 10.0) -> None:
    """:func:`wait_stalled` on an event loop."""
    accept = steady(STALL_POLLS)
    await until(lambda: accept(receive_queue(sock)), _STALLED, timeout, interval=STALL_INTERVAL)
