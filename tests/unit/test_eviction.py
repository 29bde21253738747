"""The eviction policies (S3-FIFO, LRU) against models, and the one driver
with in-process owners."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesvc.core.accounting import CacheCounters
from cachesvc.core.eviction import POLICIES, make_policy
from cachesvc.core.eviction.driver import EvictionDriver, ExtentOwner, ExtentState, ghost_key
from cachesvc.core.eviction.policy import (
    FREQ_MASK,
    MAIN,
    EvictionPolicy,
    extent_key,
    pack,
    size_of,
)
from cachesvc.core.eviction.prefetch import PREFETCH_TTL
from cachesvc.core.eviction.s3fifo import GhostHistory, S3Fifo
from cachesvc.core.pages import EXTENT_SIZE

E = EXTENT_SIZE


def drain(policy: EvictionPolicy, n: int) -> list[int]:
    """Evicts ``n`` victims (or all there are), in the policy's order."""
    out = []
    for _ in range(n):
        key = policy.victim()
        if key is None:
            break
        policy.evicted(key, key)
        out.append(key)
    return out


def test_packed_state_sizes() -> None:
    assert size_of(pack(1)) == 4096
    assert size_of(pack(4096)) == 4096
    assert size_of(pack(4097)) == 8192
    assert size_of(pack(E)) == E
    assert pack(E) | MAIN | FREQ_MASK < 256  # shared small ints
    with pytest.raises(ValueError):
        pack(0)
    with pytest.raises(ValueError):
        pack(E + 1)


def test_make_policy() -> None:
    assert [make_policy(name, 1 << 20).name for name in POLICIES] == list(POLICIES)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("mru", 1 << 20)


def test_lru_evicts_least_recently_read_first() -> None:
    lru = make_policy("lru", 10 * E)
    for key in range(5):
        lru.admit(key, E, key, prefetched=False)
    lru.touch(0)
    lru.touch(2)
    assert drain(lru, 5) == [1, 3, 4, 0, 2]


def test_s3fifo_one_hit_wonders_leave_through_the_small_queue() -> None:
    s3 = S3Fifo(100 * E)
    # A hot set read three times, then a scan of one-time extents much larger.
    for key in range(10):
        s3.admit(key, E, key, prefetched=False)
        s3.touch(key)
        s3.touch(key)
    for key in range(100, 300):
        s3.admit(key, E, key, prefetched=False)
        while s3.tracked_bytes > 100 * E:
            drain(s3, 1)
    survivors = {key for key in range(10) if key in s3}
    assert survivors == set(range(10))
    s3.check_invariants()
    # Under LRU the same scan pushes out the hot set.
    lru = make_policy("lru", 100 * E)
    for key in range(10):
        lru.admit(key, E, key, prefetched=False)
        lru.touch(key)
    for key in range(100, 300):
        lru.admit(key, E, key, prefetched=False)
        while lru.tracked_bytes > 100 * E:
            drain(lru, 1)
    assert not any(key in lru for key in range(10))


def test_s3fifo_ghost_hits_go_to_the_main_queue() -> None:
    s3 = S3Fifo(20 * E)
    s3.admit(1, E, ghost=1, prefetched=False)
    assert drain(s3, 1) == [1]  # evicted from the small queue, remembered
    s3.admit(1, E, ghost=1, prefetched=False)
    assert s3.stats()["ghost_hits_total"] == 1
    assert s3.stats()["main_bytes"] == E
    s3.check_invariants()


@pytest.mark.parametrize("name", POLICIES)
def test_readahead_waits_outside_the_order_until_it_is_read(name: str) -> None:
    policy = make_policy(name, 10 * E)
    policy.admit(1, E, 1, prefetched=True)
    policy.admit(2, E, 2, prefetched=True)
    assert policy.prefetched(1) and policy.prefetched_bytes == 2 * E
    assert policy.victim() is None  # not a victim while it waits for its reader
    assert list(policy.prefetched_keys()) == [2, 1]  # furthest ahead first
    policy.touch(1)  # the reader reaches it: ranked as a newly read extent
    assert not policy.prefetched(1) and policy.prefetched_bytes == E
    assert policy.victim() == 1
    policy.evicted(2, 2)  # readahead giving way to a reader's fill
    assert 2 not in policy and policy.prefetched_bytes == 0
    policy.check_invariants()


@pytest.mark.parametrize("name", POLICIES)
def test_readahead_nobody_reads_goes_first(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make_policy(name, 10 * E)
    policy.admit(1, E, 1, prefetched=False)
    policy.touch(1)
    policy.admit(2, E, 2, prefetched=True)
    later = time.monotonic() + PREFETCH_TTL + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert policy.victim() == 2
    assert not policy.prefetched(2)
    policy.check_invariants()


def test_s3fifo_counts_a_prefetched_extents_first_read_once() -> None:
    s3 = S3Fifo(10 * E)  # the small queue's share: one extent
    s3.admit(1, E, 1, prefetched=True)
    s3.touch(1)  # the reader reaches it: used once, not twice
    s3.admit(2, E, 2, prefetched=True)
    s3.touch(2)
    s3.touch(2)
    s3.touch(2)  # read twice more
    s3.admit(3, E, 3, prefetched=False)
    # 1 leaves like a one-time read; 2 moves to the main queue; 3 goes.
    assert drain(s3, 2) == [1, 3]
    assert 2 in s3 and s3.stats()["main_bytes"] == E
    s3.check_invariants()


def test_s3fifo_skip_keeps_a_busy_extent_in_the_main_queue() -> None:
    s3 = S3Fifo(100 * E)
    for key in (1, 2, 3):
        s3.admit(key, E, key, prefetched=False)
    assert s3.victim() == 1
    s3.skip(1)
    assert s3.stats()["main_bytes"] == E
    # The main queue is within its share: the small queue goes first.
    assert drain(s3, 3) == [2, 3, 1]
    s3.check_invariants()


def test_s3fifo_evicts_from_the_main_queue_over_its_share() -> None:
    s3 = S3Fifo(10 * E)  # shares: small 1 extent, main 9
    for key in range(11):
        s3.admit(key, E, key, prefetched=False)  # before any eviction, overflow goes to main
    assert (s3.stats()["small_bytes"], s3.stats()["main_bytes"]) == (E, 10 * E)
    assert drain(s3, 1) == [1]  # main over its share: its oldest goes
    s3.admit(11, E, 11, prefetched=False)  # after an eviction, new extents go to small
    assert drain(s3, 1) == [0]  # main within its share: the small queue goes
    s3.check_invariants()


def test_resizing_and_removing_keep_the_byte_counts() -> None:
    for name in POLICIES:
        policy = make_policy(name, 100 * E)
        policy.admit(7, 4096, 7, prefetched=True)
        policy.admit(7, E, 7, prefetched=False)  # more of it cached: resized
        assert policy.tracked_bytes == E and policy.prefetched_bytes == E
        policy.remove(7)
        policy.remove(7)
        assert policy.tracked_bytes == 0 and policy.prefetched_bytes == 0 and len(policy) == 0
        policy.check_invariants()


def test_ghost_history_forgets_after_two_generations_of_bytes() -> None:
    ghosts = GhostHistory(10 * E)
    ghosts.add(12345, E)
    assert 12345 in ghosts
    for key in range(19):
        ghosts.add(1_000_000 + key, E)
    assert 12345 in ghosts  # 20 extents: two generations
    ghosts.add(2_000_000, E)
    assert 12345 not in ghosts
    assert 1_000_000 + 18 in ghosts and 2_000_000 in ghosts
    # Small extents count for their size: a generation holds more of them.
    small = GhostHistory(10 * E)
    for key in range(300):
        small.add(key, 4096)
    assert 0 in small


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(POLICIES),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "touch", "remove", "evict", "skip"]),
            st.integers(0, 30),
            st.integers(1, E),
            st.booleans(),
        ),
        max_size=200,
    ),
)
def test_policies_track_exactly_what_they_were_told(
    name: str, ops: list[tuple[str, int, int, bool]]
) -> None:
    policy = make_policy(name, 8 * E)
    model: dict[int, int] = {}  # key -> size
    waiting: set[int] = set()  # keys prefetched and not read yet
    for op, key, size, flag in ops:
        if op == "admit":
            if key not in model and flag:
                waiting.add(key)
            policy.admit(key, size, key, prefetched=flag)
            model[key] = -(-size // 4096) * 4096
        elif op == "touch":
            policy.touch(key)
            waiting.discard(key)
        elif op == "remove":
            policy.remove(key)
            model.pop(key, None)
            waiting.discard(key)
        else:
            victim = policy.victim()
            if victim is None:
                assert set(model) == waiting
            elif op == "evict":
                assert victim not in waiting
                policy.evicted(victim, victim)
                del model[victim]
            else:
                policy.skip(victim)
        policy.check_invariants()
        assert len(policy) == len(model)
        assert policy.tracked_bytes == sum(model.values())
        assert policy.prefetched_bytes == sum(model[k] for k in waiting)
        assert all(key in policy for key in model)
        assert all(policy.prefetched(key) == (key in waiting) for key in model)
    assert sorted(drain(policy, len(model) + 1)) == sorted(set(model) - waiting)
    assert sorted(policy.prefetched_keys()) == sorted(waiting)


class Owner:
    """An in-process ExtentOwner: extents with states, evictions recorded."""

    def __init__(self, slot: int, states: dict[int, ExtentState]) -> None:
        self.path = f"file{slot}"
        self.slot = slot
        self.states = states
        self.evicted: list[int] = []
        self.writebacks = 0

    def extent_state(self, index: int) -> ExtentState:
        return self.states.get(index, ExtentState.GONE)

    async def evict_extents(self, indexes: Sequence[int]) -> int:
        for index in indexes:
            self.evicted.append(index)
            self.states[index] = ExtentState.GONE
        return E * len(indexes)

    def start_writeback(self) -> None:
        self.writebacks += 1


def driver_with(owners: list[Owner], name: str = "s3fifo") -> EvictionDriver:
    policy = make_policy(name, 100 * E)
    for owner in owners:
        for index in owner.states:
            policy.admit(extent_key(owner.slot, index), E, ghost_key(owner.path, index), False)
    by_slot: dict[int, ExtentOwner] = {owner.slot: owner for owner in owners}
    return EvictionDriver(policy, by_slot.get, CacheCounters())


async def test_driver_passes_over_busy_and_dirty_extents() -> None:
    a = Owner(0, {0: ExtentState.BUSY, 1: ExtentState.DIRTY, 2: ExtentState.EVICTABLE})
    b = Owner(1, {0: ExtentState.EVICTABLE})
    driver = driver_with([a, b])
    assert await driver.evict(2 * E) == 2 * E
    assert (a.evicted, b.evicted) == ([2], [0])
    assert a.writebacks == 1  # the dirty extent is written back to go next time
    # What is left cannot go now: one pass over them, then the driver gives up.
    assert await driver.evict(E) == 0
    assert len(driver.policy) == 2
    driver.policy.check_invariants()


async def test_driver_takes_victims_off_the_policy_before_evicting() -> None:
    seen: list[bool] = []
    owner = Owner(3, {0: ExtentState.EVICTABLE})
    driver = driver_with([owner])

    async def evict_extents(indexes: Sequence[int]) -> int:
        seen.extend(extent_key(3, index) in driver.policy for index in indexes)
        return E * len(indexes)

    owner.evict_extents = evict_extents  # type: ignore[method-assign]
    assert await driver.evict_all() == E
    assert seen == [False]


async def test_driver_forgets_extents_of_gone_owners() -> None:
    owner = Owner(5, {0: ExtentState.EVICTABLE, 1: ExtentState.GONE})
    driver = driver_with([owner], "lru")
    driver.policy.admit(extent_key(9, 0), E, 0, False)  # a slot nobody holds
    assert await driver.evict_all() == E
    assert len(driver.policy) == 0
