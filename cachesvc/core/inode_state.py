"""InodeState: what one cached file holds, and the small steps that change it.

The caching inode follows CachingInodeOperations in the reference design
(inode_cached.go). Its methods are spread over four modules by job, each a
layer of one class built on the one below:

- :mod:`cachesvc.core.inode_state` (this module): fields, locks, versions,
  mappings, and telling the eviction policy what is cached;
- :mod:`cachesvc.core.fills`: reads, fills from the origin and readahead;
- :mod:`cachesvc.core.writeback`: writing dirty data back;
- :mod:`cachesvc.core.inode`: writes, truncation, eviction and revalidation
  (``CachingInode``, the class the cache uses).

Lock order:
    CachingInode.writeback_mu
      CachingInode.attr_mu
        CachingInode.maps_mu
          CachingInode.data_mu

The locks live in an :class:`InodeLocks` made on first use and dropped by
:meth:`InodeState.settle` once no task holds or waits for any of them: a
cache may hold a million idle files. Code evaluates a lock property right
before acquiring it, without an await in between, so a lock is never
dropped while a task is about to take it.

Invariants (protected as the fields say):
  - ``cache_set`` segments are page-aligned file ranges; cached bytes at or
    past ``attr.size`` are zero.
  - Every cached extent that is not wholly pinned is tracked by the eviction
    policy, except after an eviction left some of its pages behind (mapped
    or dirtied meanwhile): those come back when the mapping is released
    (``_evictability_gen``) or the write-back is done.
  - Each cache segment holds one MemoryFile reference on its memory; each
    Mapping holds one more on the memory it covers until released.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from cachesvc.core.accounting import CacheCounters
from cachesvc.core.budget import MemoryBudget
from cachesvc.core.cacheset import FileRangeSet
from cachesvc.core.eviction.driver import ghost_key
from cachesvc.core.eviction.policy import SLOT_SHIFT, EvictionPolicy, extent_key
from cachesvc.core.fillplan import Fill
from cachesvc.core.locks import OrderedLock, RWLock
from cachesvc.core.mapping import Mapping
from cachesvc.core.memfile import MemoryFile
from cachesvc.core.pages import EXTENT_SHIFT, EXTENT_SIZE, extent_indexes, extent_range
from cachesvc.core.ranges import Range
from cachesvc.core.sets import DirtySet, MappingSet, MemoryPieces
from cachesvc.origins.base import Origin, OriginError, OriginStat

# A page-aligned end beyond any file.
END = 1 << 62
# Local changes remembered for readers of older versions (unchanged_since):
# a reader that more changes passed meanwhile starts again.
CHANGES_KEPT = 64


class InodeHost(Protocol):
    """What an inode needs from the cache that holds it."""

    @property
    def origin(self) -> Origin: ...

    @property
    def memfile(self) -> MemoryFile: ...

    @property
    def counters(self) -> CacheCounters: ...

    @property
    def budget(self) -> MemoryBudget: ...

    @property
    def policy(self) -> EvictionPolicy: ...

    @property
    def readahead(self) -> int:
        """The largest readahead window (0: none)."""

    def forget_if_idle(self, inode: InodeState) -> None:
        """Forgets ``inode`` if nothing holds it any more (else settles it)."""

    async def reserve_dirty(self, length: int) -> None:
        """Makes room for ``length`` more dirty bytes (CacheFull if it cannot)."""

    def note_dirty(self, inode: InodeState) -> None:
        """``inode`` has data the origin does not have yet."""

    def spawn(self, coro: Coroutine[object, object, object]) -> None:
        """Runs ``coro`` in the background."""


@functools.lru_cache(maxsize=4096)
def make_etag(etag_base: str, version: int) -> str:
    """The strong ETag of local version ``version`` of origin version ``etag_base``."""
    return hashlib.blake2b(f"{etag_base}/{version}".encode(), digest_size=12).hexdigest()


@dataclass(slots=True)
class Attributes:
    """Attributes of a cached file; see InodeState for protection."""

    size: int
    mtime: float
    etag_base: str  # origin version the cached content started from
    version: int = 0  # local modifications since etag_base

    @property
    def etag(self) -> str:
        """The strong ETag shown to clients."""
        return make_etag(self.etag_base, self.version)


class InodeLocks:
    """The four locks of one inode (see the lock order above)."""

    __slots__ = ("attr_mu", "data_mu", "maps_mu", "writeback_mu")

    def __init__(self, owner: InodeState) -> None:
        self.writeback_mu = OrderedLock("CachingInode.writeback_mu", 0, owner)
        self.attr_mu = OrderedLock("CachingInode.attr_mu", 1, owner)
        self.maps_mu = OrderedLock("CachingInode.maps_mu", 2, owner)
        self.data_mu = RWLock("CachingInode.data_mu", 3, owner)

    def contended(self) -> bool:
        """Whether any of the locks is held or waited for."""
        return (
            self.writeback_mu.contended()
            or self.attr_mu.contended()
            or self.maps_mu.contended()
            or self.data_mu.contended()
        )


class InodeState:
    """The state of one cached file; see the module docstring."""

    __slots__ = (
        "_changes",
        "_dirty",
        "_evictability_gen",
        "_fills",
        "_locks",
        "_mappings",
        "_origin_etag",
        "_origin_valid",
        "_ra_covered",
        "_ra_next",
        "_ra_window",
        "_resizing",
        "_size_dirty_gen",
        "_truncated_to",
        "_uploading",
        "_write_gen",
        "attr",
        "buffered",
        "cache_set",
        "dirty_since",
        "epoch",
        "host",
        "last_error",
        "path",
        "slot",
        "users",
        "validated_at",
    )  # fmt: skip

    def __init__(self, host: InodeHost, path: str, slot: int, stat: OriginStat) -> None:
        self.host = host  # Immutable.
        self.path = path  # Immutable.
        self.slot = slot  # the cache table's slot, for extent keys. Immutable.
        self.buffered = not host.origin.capabilities.partial_writes  # Immutable.
        self._locks: InodeLocks | None = None  # made on first use; see settle()

        # attr.size: reading requires attr_mu or data_mu; changing it requires
        # both (data_mu for writing). Other attributes are protected by attr_mu
        # and are also changed only with data_mu held for writing.
        self.attr = Attributes(size=stat.size, mtime=stat.mtime, etag_base=stat.etag)
        # Write generation of the newest size change not yet at the origin,
        # or None. Protected by attr_mu.
        self._size_dirty_gen: int | None = None
        # The origin's current version as we know it (None: re-learn at the
        # next revalidation, after our own in-place writes). Protected by attr_mu.
        self._origin_etag: str | None = stat.etag
        # Buffered origins only: origin bytes at or past this offset are stale
        # (truncated away here) and read as zeros. Protected by data_mu.
        self._origin_valid = stat.size
        # Lowest truncation since the current write-back took its snapshot.
        # Protected by data_mu.
        self._truncated_to: int | None = None
        # Last write-back failure, for reports. Protected by attr_mu.
        self.last_error: OriginError | None = None
        # Monotonic time the oldest dirty data appeared, or None. Protected by data_mu.
        self.dirty_since: float | None = None
        # When the attributes were last checked against the origin
        # (monotonic). Protected by the event loop.
        self.validated_at = time.monotonic()

        # File range -> memory offset. Protected by data_mu.
        self.cache_set = FileRangeSet()
        # Cached ranges newer than the origin, None while there are none (see
        # the dirty property). Protected by data_mu.
        self._dirty: DirtySet | None = None
        # Mapping counts per page range, None while nothing is mapped (see the
        # mappings property). Protected by maps_mu.
        self._mappings: MappingSet | None = None
        # Fills in flight, in start order. Added with data_mu held, removed with
        # it held for writing, or on failure; changes never span an await.
        self._fills: tuple[Fill, ...] = ()
        # Generation of the newest write. Protected by data_mu.
        self._write_gen = 0
        # Bumped by every eviction call and unpin: a response mapping released
        # after it re-registers its pages with the policy. Protected by the
        # event loop.
        self._evictability_gen = 0
        # Readahead state (only a hint; races are harmless). Protected by the event loop.
        self._ra_next = -1
        self._ra_window = 0
        # Where the pages cached or being filled ahead of the reader ended
        # when readahead last looked: reads whose lookahead ends before it
        # need not look again. Reset (look again) when pages are dropped or
        # a fill ends.
        self._ra_covered = 0
        # Requests using this inode (FileCache.open). Protected by the event loop.
        self.users = 0
        # Truncates of a written-through origin in progress. Protected by the
        # event loop.
        self._resizing = 0
        # Buffered origins, while a write-back replaces the origin's object:
        # resolved with the version it made once the upload is done (None if
        # it failed), until _origin_etag says so too. Fills pinned to the old
        # version wait for it. Protected by the event loop.
        self._uploading: asyncio.Future[str | None] | None = None
        # Bumped when the content is replaced by another origin version, whose
        # attr.version starts again at 0. Protected by data_mu.
        self.epoch = 0
        # (attr.version made, file range whose bytes it changed) of the latest
        # local changes, oldest first; cleared with each new epoch, None while
        # there are none. Lets a reader of an older version tell whether its
        # bytes changed (unchanged_since). Protected by data_mu.
        self._changes: collections.deque[tuple[int, Range]] | None = None

    def __repr__(self) -> str:
        return (
            f"CachingInode({self.path!r}, size={self.attr.size},"
            f" cached={self.cache_set.total_length}, dirty={self.dirty.total_length},"
            f" mapped={self.mappings.total_length}, fills={len(self._fills)})"
        )

    @property
    def memfile(self) -> MemoryFile:
        """The memory file holding the cached pages (MappingOwner)."""
        return self.host.memfile

    @property
    def dirty(self) -> DirtySet:
        """Cached ranges newer than the origin (an empty set, shared and never
        changed, while there are none). Protected by data_mu."""
        return self._dirty if self._dirty is not None else _NO_DIRT

    @property
    def mappings(self) -> MappingSet:
        """Mapping counts per page range (an empty set, shared and never
        changed, while nothing is mapped). Protected by maps_mu."""
        return self._mappings if self._mappings is not None else _NO_MAPPINGS

    # ------------------------------------------------------------------ locks

    def _lock_set(self) -> InodeLocks:
        locks = self._locks
        if locks is None:
            locks = self._locks = InodeLocks(self)
        return locks

    @property
    def writeback_mu(self) -> OrderedLock:
        return self._lock_set().writeback_mu

    @property
    def attr_mu(self) -> OrderedLock:
        return self._lock_set().attr_mu

    @property
    def maps_mu(self) -> OrderedLock:
        return self._lock_set().maps_mu

    @property
    def data_mu(self) -> RWLock:
        return self._lock_set().data_mu

    def _data_writer(self) -> bool:
        """Whether a writer holds data_mu (without making the locks)."""
        return self._locks is not None and self._locks.data_mu.held_for_writing

    def _locked_now(self) -> bool:
        """Whether maps_mu is held or data_mu held for writing (without making
        the locks): what a step that takes neither must not run beside."""
        locks = self._locks
        return locks is not None and (locks.maps_mu.locked() or locks.data_mu.held_for_writing)

    def settle(self) -> None:
        """Drops what an idle inode does not need: its locks, once no task
        holds or waits for any, its mapping set once empty, and its history
        of changes, once no reader can be reading an older version (no user,
        no mapping)."""
        if self._locks is not None and not self._locks.contended():
            self._locks = None
        if self._mappings is not None and not self._mappings:
            self._mappings = None
        if self._changes is not None and not self.users and not self.mappings:
            self._changes = None

    # ------------------------------------------------------------------ state

    @property
    def is_idle(self) -> bool:
        """True when nothing holds this inode: it may be forgotten."""
        return (
            self.users == 0
            and not self.cache_set
            and not self.dirty
            and not self.mappings
            and not self._fills
            and self._size_dirty_gen is None
            and (self._locks is None or not self._locks.contended())
        )

    @property
    def has_dirty(self) -> bool:
        return bool(self.dirty) or self._size_dirty_gen is not None

    def stats(self) -> dict[str, object]:
        return {
            "path": self.path,
            "size": self.attr.size,
            "cached_bytes": self.cache_set.total_length,
            "dirty_bytes": self.dirty.total_length,
            "mapped_bytes": self.mappings.total_length,
            "etag": self.attr.etag,
            "last_error": str(self.last_error) if self.last_error else None,
        }

    def check_invariants(self) -> None:
        """Asserts the structural invariants (tests call this between steps)."""
        self.cache_set.check_invariants()
        self.dirty.check_invariants()
        self.mappings.check_invariants()
        for rng, _ in self.cache_set:
            assert rng.start % 4096 == 0 and rng.end % 4096 == 0, rng
        for rng, _ in self.dirty:
            assert not self.cache_set.gaps(rng), f"dirty {rng} not cached"

    # --------------------------------------------------------------- versions

    def _bump_version_locked(self, changed: Range) -> None:
        """Makes a new local version whose bytes differ from the last in ``changed``.

        Preconditions: attr_mu is held; data_mu is held for writing.
        """
        self.attr_mu.assert_held()
        self.data_mu.assert_held(write=True)
        self.attr.version += 1
        self.attr.mtime = time.time()
        if self._changes is None:
            self._changes = collections.deque(maxlen=CHANGES_KEPT)
        self._changes.append((self.attr.version, changed))

    def unchanged_since(self, epoch: int, version: int, rng: Range) -> bool:
        """Whether the bytes of file range ``rng`` are still those of version
        ``version`` of epoch ``epoch`` (a reader's snapshot): no local change
        since touched them. False when that is not known any more.

        Preconditions: data_mu is held (for reading suffices), or no writer
        holds it and the caller does not suspend.
        """
        if epoch != self.epoch or version > self.attr.version:
            return False
        if version == self.attr.version:
            return True
        changes = self._changes
        if not changes or changes[0][0] > version + 1:
            return False  # some changes since are no longer recorded
        return not any(made > version and changed.overlaps(rng) for made, changed in changes)

    # --------------------------------------------------------- policy updates

    def _track_extents_locked(self, ranges: Iterable[Range], *, prefetched: bool = False) -> None:
        """Tells the eviction policy how much of each extent ``ranges`` touch is
        cached now: new extents are admitted (``prefetched``: by readahead),
        tracked ones resized, uncached ones forgotten. Extents wholly inside
        one of ``ranges`` are known to be whole without a lookup.

        Preconditions: data_mu is held, or no writer holds it and the caller
        does not suspend.
        """
        policy = self.host.policy
        for rng in ranges:
            for index in extent_indexes(rng):
                extent = extent_range(index)
                whole = rng.start <= extent.start and extent.end <= rng.end
                size = EXTENT_SIZE if whole else self.cache_set.cached_bytes(extent)
                key = extent_key(self.slot, index)
                if size:
                    policy.admit(key, size, ghost_key(self.path, index), prefetched)
                else:
                    policy.remove(key)

    def _untrack_extents_within(self, pages: Range) -> None:
        """Takes the extents wholly inside ``pages`` off the policy (a pin)."""
        policy = self.host.policy
        for index in extent_indexes(pages):
            extent = extent_range(index)
            if pages.start <= extent.start and extent.end <= pages.end:
                policy.remove(extent_key(self.slot, index))

    def _touch_extents(self, offset: int, end: int) -> None:
        """Counts a read of ``[offset, end)`` (not empty) with the policy, for
        every extent it touches that is tracked."""
        policy = self.host.policy
        base = self.slot << SLOT_SHIFT
        first, last = offset >> EXTENT_SHIFT, (end - 1) >> EXTENT_SHIFT
        if first == last:  # a small read: one extent
            policy.touch(base | first)
            return
        for index in range(first, last + 1):
            policy.touch(base | index)

    # ----------------------------------------------------------------- dirt

    def _mark_dirty_locked(self, rng: Range) -> None:
        """Preconditions: data_mu is held for writing; ``rng`` is cached."""
        self.data_mu.assert_held(write=True)
        if self._dirty is None:
            self._dirty = DirtySet()
        self.host.counters.dirty_bytes += self._dirty.mark_dirty(rng, self._write_gen)
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()
            self.host.note_dirty(self)

    def _size_changed_locked(self) -> None:
        """The size changed here and the origin must be told.

        Preconditions: attr_mu is held; data_mu is held for writing.
        """
        self._size_dirty_gen = self._write_gen
        self.host.note_dirty(self)

    def _clear_dirty_locked(self, rng: Range) -> None:
        """Preconditions: data_mu is held for writing."""
        self.data_mu.assert_held(write=True)
        if self._dirty is not None:
            self.host.counters.dirty_bytes -= self._dirty.clear(rng)
        self._settle_dirty()

    def _settle_dirty(self) -> None:
        """Drops the dirty set once it is empty.

        Preconditions: data_mu is held for writing.
        """
        if self._dirty is not None and not self._dirty:
            self._dirty = None
        if self._dirty is None:
            self.dirty_since = None

    def _drop_locked(self, rng: Range, *, dirty_too: bool) -> int:
        """Uncaches page-aligned ``rng`` (skipping pages with dirty bytes unless
        ``dirty_too``), telling the policy; returns bytes dropped.

        Preconditions: maps_mu is held; data_mu is held for writing.
        """
        self.maps_mu.assert_held()
        self.data_mu.assert_held(write=True)
        pieces = [rng] if dirty_too else self.dirty.clean_pages(rng)
        memfile = self.host.memfile
        dropped = [d for piece in pieces for d in self.cache_set.drop(memfile, piece)]
        self.host.counters.cached_bytes -= sum(d.length for d in dropped)
        if dropped:
            self._ra_covered = 0
        if dirty_too:
            self._clear_dirty_locked(rng)
        self._track_extents_locked(dropped)
        if dropped:
            self.host.budget.note_released()
        return sum(d.length for d in dropped)

    # --------------------------------------------------------------- mappings

    def _map_locked(self, pages: Range, offset: int, length: int, *, pin: bool) -> Mapping:
        """Maps cached ``pages`` for the bytes ``[offset, offset+length)``: counts
        them mapped and references their memory. A pin also takes the extents
        wholly inside ``pages`` off the policy.

        Preconditions: maps_mu is held; data_mu is held; ``pages`` is cached.
        """
        self.maps_mu.assert_held()
        self.data_mu.assert_held()
        memory = self.cache_set.pieces(pages)
        memfile = self.host.memfile
        for _, mem in memory:
            memfile.inc_ref(mem)
        if self._mappings is None:
            self._mappings = MappingSet()
        self.host.counters.mapped_bytes += self._mappings.add(pages)
        if pin:
            self._untrack_extents_within(pages)
        return Mapping(self, pages, memory, offset, length, pin, self._evictability_gen)

    async def remove_mapping(
        self, pages: Range, memory: MemoryPieces, pinned: bool, evictability_gen: int
    ) -> None:
        """Undoes _map_locked (called by Mapping.release)."""
        async with self.maps_mu, self.data_mu.reading():
            self._remove_mapping_locked(pages, memory, pinned, evictability_gen)
        self.host.forget_if_idle(self)

    def remove_mapping_now(
        self, pages: Range, memory: MemoryPieces, pinned: bool, evictability_gen: int
    ) -> bool:
        """remove_mapping without suspending, when maps_mu is free and no
        writer holds data_mu; else False, and nothing done.

        The locks are not taken: nothing here awaits, so no other task can
        run before it is done (as in read_cached_now).
        """
        if self._locked_now():
            return False
        self._remove_mapping_locked(pages, memory, pinned, evictability_gen, taken=False)
        self.host.forget_if_idle(self)
        return True

    def _remove_mapping_locked(
        self,
        pages: Range,
        memory: MemoryPieces,
        pinned: bool,
        evictability_gen: int,
        *,
        taken: bool = True,
    ) -> None:
        """Gives back the memory references and mapping counts of one mapping.

        Pages no longer mapped go back to the policy if the mapping was a
        pin, or if an eviction or unpin since the mapping was taken may have
        taken them off it.

        Preconditions: maps_mu is held; data_mu is held (for reading suffices);
        or (``taken`` False) neither is held by anyone and the caller does
        not suspend.
        """
        if taken:
            self.maps_mu.assert_held()
            self.data_mu.assert_held()
        memfile = self.host.memfile
        for _, mem in memory:
            memfile.dec_ref(mem)
        if pages.is_empty:
            return
        assert self._mappings is not None, f"{pages} released but nothing is mapped"
        released = self._mappings.remove(pages)
        self.host.counters.mapped_bytes -= sum(rng.length for rng in released)
        if pinned:
            self._evictability_gen += 1
        if pinned or evictability_gen != self._evictability_gen:
            self._track_extents_locked(
                seg.intersect(rng) for rng in released for seg, _ in self.cache_set.segments(rng)
            )
        self.host.budget.note_released()


# The sets an inode with nothing dirty or mapped shows: empty, never changed.
_NO_DIRT: Final = DirtySet()
_NO_MAPPINGS: Final = MappingSet()

__all__ = ["END", "Attributes", "InodeHost", "InodeLocks", "InodeState", "make_etag"]
