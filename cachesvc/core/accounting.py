"""Counters of the page cache, kept incrementally so reading them is O(1).

Every field is changed only on the event loop, between awaits, by the code
that causes the change (a fill adds miss bytes, a write-back adds written
bytes, ...). The metrics collector and ``/admin/stats`` read them as they
are; nothing here scans pages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class CacheCounters:
    """Running totals for one FileCache. Protected by the event loop."""

    hit_bytes: int = 0  # bytes served from pages already cached
    miss_bytes: int = 0  # bytes that had to be filled from the origin
    bypass_bytes: int = 0  # origin bytes served without caching (no room in the budget)
    room_refusals: int = 0  # reservations refused for lack of room (NoRoom)
    cached_bytes: int = 0  # bytes of cached pages, all files
    mapped_bytes: int = 0  # page-cache bytes held by at least one mapping
    dirty_bytes: int = 0  # cached bytes newer than the origin
    evictions: int = 0  # extents evicted (that dropped at least one page)
    evicted_bytes: int = 0  # bytes dropped by eviction
    writeback_bytes: int = 0  # bytes written back to the origin
    writeback_errors: int = 0  # failed write-backs (the data stayed dirty)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
