"""What an eviction policy is: a ranking of cached extents, nothing more.

A policy tracks *extents* (see :mod:`cachesvc.core.pages`) by an integer
key and knows, for each, its size, how it was used and where it stands in
the policy's order. It never touches an inode: :meth:`EvictionPolicy.victim`
names the extent it would evict next without side effects outside the
policy, and the eviction driver (:mod:`cachesvc.core.eviction.driver`)
decides and acts. The tracked extents are the *evictable set* of the
reference design's MemoryFile: the driver takes an extent off it
(:meth:`~EvictionPolicy.evicted`) before it evicts it, and an extent that
stays cached afterwards (a response mapped it meanwhile) comes back only
when its owner admits it again.

Every operation is O(1) (amortized) and a tracked extent costs one dict
entry and at most one queue slot: its state is packed into one small
integer (:func:`pack`), below 256 so that CPython shares the int objects.

Keys: an extent of a file is ``(slot << SLOT_SHIFT) | index``, ``slot``
being the file's slot in the cache's table and ``index`` the extent's
(file offset >> EXTENT_SHIFT). A *ghost key* identifies an extent across
the file's forgetting and re-opening (a hash of path and index): policies
that remember evicted extents (S3-FIFO's ghost queue) use it.

Protected by the event loop: policies are used only on the loop thread and
never await.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Protocol

from cachesvc.core.hostmem import PAGE_SIZE
from cachesvc.core.pages import EXTENT_SIZE

# Keys are (slot << SLOT_SHIFT) | extent index: offsets below 2**63 have
# extent indexes below 2**47.
SLOT_SHIFT: Final = 47
INDEX_MASK: Final = (1 << SLOT_SHIFT) - 1

# Packed state: bits 0-3 hold the extent's cached pages minus one (1..16),
# bits 4-5 a capped access count, bit 6 "in the main queue" (policies with
# two queues).
_PAGES_MASK: Final = 0x0F
FREQ_ONE: Final = 0x10
FREQ_MASK: Final = 0x30
MAX_FREQ: Final = 3
MAIN: Final = 0x40
_PAGES_PER_EXTENT: Final = EXTENT_SIZE // PAGE_SIZE


def extent_key(slot: int, index: int) -> int:
    """The key of extent ``index`` of the file in table slot ``slot``."""
    return (slot << SLOT_SHIFT) | index


def pack(size: int) -> int:
    """The state of a newly tracked extent of ``size`` cached bytes (1..EXTENT_SIZE)."""
    if not 0 < size <= EXTENT_SIZE:
        raise ValueError(f"extent size {size} out of range")
    return -(-size // PAGE_SIZE) - 1


def size_of(state: int) -> int:
    """Bytes an extent of packed ``state`` counts for (whole pages)."""
    return ((state & _PAGES_MASK) + 1) * PAGE_SIZE


def resized(state: int, size: int) -> int:
    """``state`` with its size replaced by ``size`` bytes (1..EXTENT_SIZE)."""
    return (state & ~_PAGES_MASK) | pack(size)


class EvictionPolicy(Protocol):
    """The ranking of the cache's extents; see the module docstring."""

    name: str

    def admit(self, key: int, size: int, ghost: int, prefetched: bool) -> None:
        """Tracks extent ``key`` holding ``size`` cached bytes (1..EXTENT_SIZE):
        a new extent (``prefetched`` if no reader asked for it: readahead),
        or a tracked one whose size changed (it keeps its standing)."""

    def touch(self, key: int) -> None:
        """A read of tracked extent ``key`` (no effect if it is not tracked).
        The first read of a prefetched extent counts as its first use."""

    def remove(self, key: int) -> None:
        """Stops tracking ``key`` (uncached, or pinned); no effect if untracked."""

    def victim(self) -> int | None:
        """The tracked extent the policy would evict next, or None if none is
        but readahead not read yet (see prefetch.py). It stays tracked: the
        caller either evicts it (:meth:`evicted`) or passes it over
        (:meth:`skip`) before doing anything else."""

    def skip(self, key: int) -> None:
        """The victim ``key`` cannot go now (mapped or dirty): keeps it
        tracked, behind the others."""

    def evicted(self, key: int, ghost: int) -> None:
        """The victim ``key`` is being evicted: stops tracking it, remembering
        ``ghost`` if the policy keeps a history."""

    def size(self, key: int) -> int:
        """Bytes tracked extent ``key`` counts for (0 if untracked)."""

    def prefetched(self, key: int) -> bool:
        """Whether tracked extent ``key`` was prefetched and is not read yet."""

    def prefetched_keys(self) -> Iterator[int]:
        """The tracked extents prefetched and not read yet, most recently
        prefetched first: when readahead must give way, what was read
        furthest ahead goes first (a sequential reader reaches the rest
        sooner). The policy must not change while the iterator is used;
        the driver evicts them with :meth:`evicted`."""

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""

    def __len__(self) -> int:
        """Tracked extents."""

    @property
    def tracked_bytes(self) -> int:
        """Bytes of all tracked extents."""

    @property
    def prefetched_bytes(self) -> int:
        """Bytes of tracked extents prefetched and not read yet."""

    def stats(self) -> dict[str, int]:
        """Figures for /admin/stats and tests."""

    def check_invariants(self) -> None:
        """Asserts the policy's bookkeeping (tests call it between steps)."""
