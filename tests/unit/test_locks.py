"""Tests of the asyncio lock primitives and the lock-order checker."""

from __future__ import annotations

import asyncio

import pytest

from cachesvc.core.locks import LockOrderError, OrderedLock, RWLock, lock_order_checking


class Owner:
    def __init__(self) -> None:
        self.attr_mu = OrderedLock("attr_mu", 1, self)
        self.maps_mu = OrderedLock("maps_mu", 2, self)
        self.data_mu = RWLock("data_mu", 3, self)


def test_checker_is_on_for_the_suite() -> None:
    assert lock_order_checking()


async def test_in_order_acquisition_is_allowed() -> None:
    owner = Owner()
    async with owner.attr_mu, owner.maps_mu, owner.data_mu.writing():
        assert owner.data_mu.held_for_writing
    assert not owner.data_mu.held


async def test_out_of_order_acquisition_raises() -> None:
    owner = Owner()
    async with owner.data_mu.reading():
        with pytest.raises(LockOrderError, match="attr_mu while holding data_mu"):
            await owner.attr_mu.acquire()
    async with owner.maps_mu:
        with pytest.raises(LockOrderError):
            await owner.attr_mu.acquire()
    # The failed attempts left nothing held.
    assert not owner.attr_mu.locked()
    async with owner.attr_mu, owner.maps_mu:
        pass


async def test_same_rank_twice_raises() -> None:
    owner = Owner()
    async with owner.data_mu.reading():
        with pytest.raises(LockOrderError):
            await owner.data_mu.acquire_read()


async def test_locks_of_different_owners_are_independent() -> None:
    a, b = Owner(), Owner()
    async with a.data_mu.writing(), b.attr_mu:
        pass


async def test_child_tasks_do_not_inherit_held_locks() -> None:
    owner = Owner()
    async with owner.data_mu.reading():

        async def child() -> None:
            async with owner.attr_mu:
                pass

        await asyncio.wait_for(asyncio.create_task(child()), 1)


async def test_readers_share_and_writer_excludes() -> None:
    lock = RWLock("data_mu", 3, object())
    events: list[str] = []
    await lock.acquire_read()

    async def reader(name: str) -> None:
        async with lock.reading():
            events.append(f"{name}+")
            await asyncio.sleep(0.01)
            events.append(f"{name}-")

    async def writer() -> None:
        async with lock.writing():
            events.append("w+")
            await asyncio.sleep(0.01)
            events.append("w-")

    w = asyncio.create_task(writer())
    await asyncio.sleep(0)
    assert events == []  # writer waits for the held read lock
    r = asyncio.create_task(reader("r1"))
    await asyncio.sleep(0)
    assert events == []  # a reader queues behind the waiting writer
    lock.release_read()
    await asyncio.wait_for(asyncio.gather(w, r), 1)
    assert events == ["w+", "w-", "r1+", "r1-"]


async def test_cancelled_writer_lets_queued_readers_in() -> None:
    lock = RWLock("data_mu", 3, object())
    await lock.acquire_read()
    w = asyncio.create_task(lock.acquire_write())
    await asyncio.sleep(0)
    r = asyncio.create_task(lock.acquire_read())
    await asyncio.sleep(0)
    assert not r.done()
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    await asyncio.wait_for(r, 1)
    assert lock.held_for_reading and not lock.held_for_writing
    lock.release_read()
    lock.release_read()
    assert not lock.held


async def test_release_of_unheld_lock_is_an_error() -> None:
    lock = RWLock("data_mu", 3, object())
    with pytest.raises(RuntimeError):
        lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_write()
