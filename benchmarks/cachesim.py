"""Simulated eviction policies on a trace, at cachesvc's extent granularity,
with libCacheSim (PyPI ``libcachesim``, the ``bench`` extra).

Every read becomes the 64 KiB extents it touches (see
:mod:`benchmarks.traces`), in trace order; each extent is one libCacheSim
object whose id names (file, extent) and whose size is the extent's bytes
within the file. A read is a *miss* if any of its extents is; its *missed
bytes* are its bytes that lie in missed extents; a missed extent is fetched
whole, so the *origin bytes* are the sizes of the missed extents (no
readahead). The cache holds ``cache_size`` bytes of extents.

Policies, all with libCacheSim's default parameters: LRU, S3-FIFO (small
queue 10 %, ghost 90 %, move to main at frequency 2), SIEVE, ARC, and
Belady's MIN ("Belady", fed the next access time of each extent). MIN is
optimal for objects of one size; with the smaller last extents of files it
is a near-optimal reference rather than a strict bound. The first four are
online; MIN is not.

Python API notes (libcachesim 0.3.5): a policy is a class
(``libcachesim.LRU(cache_size, hashpower=...)``, ``S3FIFO``, ``Sieve``,
``ARC``, ``Belady``); ``cache.get(Request)`` looks the object up, admits it
on a miss and returns whether it hit. A ``Request`` is mutable and reused
here: ``obj_id``, ``obj_size``, ``clock_time`` and, for Belady,
``next_access_vtime`` (the position of the object's next request, INT64_MAX
for none; -2, the default, means unknown). ``process_trace`` only returns
the object and byte miss ratios of a reader's requests, not the per-read
outcome this module needs, so reads are fed one extent at a time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.traces import EXTENT, Trace, extent_id, extent_size, extent_span

ONLINE = ("LRU", "S3-FIFO", "SIEVE", "ARC")
POLICIES = (*ONLINE, "Belady")
NEVER = 2**63 - 1  # libCacheSim's "no next access"
HASHPOWER = 20  # 2**20 hash buckets: ample for these traces, cheap to create


def libcachesim_version() -> str | None:
    """The installed libcachesim's version, or None if it is missing."""
    if importlib.util.find_spec("libcachesim") is None:
        return None
    return importlib.metadata.version("libcachesim")


def _make_cache(policy: str, cache_size: int) -> Any:
    import libcachesim as lcs  # type: ignore[import-untyped, import-not-found, unused-ignore]

    classes: dict[str, Callable[..., Any]] = {
        "LRU": lcs.LRU,
        "S3-FIFO": lcs.S3FIFO,
        "SIEVE": lcs.Sieve,
        "ARC": lcs.ARC,
        "Belady": lcs.Belady,
    }
    return classes[policy](cache_size, hashpower=HASHPOWER)


@dataclass
class SimResult:
    """One policy on one trace at one cache size."""

    policy: str
    requests: int = 0
    missed_requests: int = 0
    requested_bytes: int = 0
    missed_bytes: int = 0  # requested bytes lying in missed extents
    origin_bytes: int = 0  # sizes of the missed extents
    hot_requests: int = 0  # hot-set reads during scans
    hot_missed_requests: int = 0
    hot_bytes: int = 0
    hot_missed_bytes: int = 0

    @property
    def request_miss_ratio(self) -> float:
        return self.missed_requests / max(1, self.requests)

    @property
    def byte_miss_ratio(self) -> float:
        return self.missed_bytes / max(1, self.requested_bytes)

    @property
    def origin_per_requested(self) -> float:
        return self.origin_bytes / max(1, self.requested_bytes)

    @property
    def hot_hit_ratio(self) -> float | None:
        if not self.hot_requests:
            return None
        return 1 - self.hot_missed_requests / self.hot_requests


@dataclass(frozen=True)
class ExtentStream:
    """A trace flattened to extent accesses, computed once for all policies."""

    ids: list[int]
    sizes: list[int]
    next_access: list[int]  # position of the same extent's next access, or NEVER
    overlap: list[int]  # bytes of the read within this extent
    read_ends: list[int]  # read i's accesses are [read_ends[i-1], read_ends[i])
    hot: list[bool]  # read i is a hot-set read during a scan

    @classmethod
    def of(cls, trace: Trace) -> ExtentStream:
        ids: list[int] = []
        sizes: list[int] = []
        overlap: list[int] = []
        read_ends: list[int] = []
        hot: list[bool] = []
        for phase in trace.phases:
            for r in phase.reads:
                size = trace.files[r.file].size
                end = r.offset + r.length
                for k in extent_span(r.offset, r.length):
                    ids.append(extent_id(r.file, k))
                    sizes.append(extent_size(size, k))
                    lo = max(r.offset, k * EXTENT)
                    overlap.append(min(end, (k + 1) * EXTENT) - lo)
                read_ends.append(len(ids))
                hot.append(trace.is_hot(phase, r))
        next_access = [NEVER] * len(ids)
        seen: dict[int, int] = {}
        for i in range(len(ids) - 1, -1, -1):
            next_access[i] = seen.get(ids[i], NEVER)
            seen[ids[i]] = i
        return cls(ids, sizes, next_access, overlap, read_ends, hot)


def simulate(stream: ExtentStream, policy: str, cache_size: int) -> SimResult:
    """Runs ``policy`` with ``cache_size`` bytes over ``stream``."""
    import libcachesim as lcs  # type: ignore[import-untyped, import-not-found, unused-ignore]

    cache = _make_cache(policy, cache_size)
    req = lcs.Request()
    out = SimResult(policy)
    ids, sizes, next_access, overlap = stream.ids, stream.sizes, stream.next_access, stream.overlap
    start = 0
    for i, end in enumerate(stream.read_ends):
        missed_bytes = 0
        fetched = 0
        requested = 0
        for j in range(start, end):
            req.obj_id = ids[j]
            req.obj_size = sizes[j]
            req.clock_time = j
            req.next_access_vtime = next_access[j]
            requested += overlap[j]
            if not cache.get(req):
                missed_bytes += overlap[j]
                fetched += sizes[j]
        start = end
        out.requests += 1
        out.requested_bytes += requested
        out.missed_bytes += missed_bytes
        out.origin_bytes += fetched
        if fetched:
            out.missed_requests += 1
        if stream.hot[i]:
            out.hot_requests += 1
            out.hot_bytes += requested
            out.hot_missed_bytes += missed_bytes
            out.hot_missed_requests += 1 if fetched else 0
    return out
