"""Prometheus metrics of one cachesvc process (prefix ``cachesvc_``).

Gauges and cache counters come from a custom collector that reads the live,
incrementally kept figures of the FileCache and MemoryFile at scrape time:
a scrape is O(1) and never scans pages or blocks the loop. Data requests
are counted by :class:`RequestCollector` in plain integers on the event
loop (prometheus-client's counters and histograms take a lock per update:
about 5 us of a 4 KiB cached read's 95). Origin metrics are ordinary
prometheus-client counters and histograms. No label ever carries a file
path.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cachesvc.core.cache import FileCache
from cachesvc.core.memfile import MemoryKind

PREFIX = "cachesvc"
# The cache results of a read, as the access log writes them.
CACHE_RESULTS = ("hit", "miss", "bypass")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# The "le" labels of those buckets, formatted as prometheus-client's Histogram does.
_BUCKET_LABELS = [
    *(floatToGoString(bound) for bound in _LATENCY_BUCKETS),  # type: ignore[no-untyped-call]
    "+Inf",
]


class CacheCollector(Collector):
    """Reads memory figures and cache counters at scrape time."""

    def __init__(self, cache: FileCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        memfile = cache.memfile
        counters = cache.counters

        committed = GaugeMetricFamily(
            f"{PREFIX}_memory_committed_bytes",
            "Memory-file bytes the host has committed, by kind.",
            labels=["kind"],
        )
        for kind in MemoryKind:
            committed.add_metric([kind.value], memfile.committed_bytes(kind))
        yield committed

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield gauge("memory_mapped_bytes", "Cache bytes held by mappings.", counters.mapped_bytes)
        yield gauge(
            "memory_evictable_bytes", "Cache bytes that may be evicted.", cache.evictable_bytes
        )
        yield gauge(
            "memory_dirty_bytes", "Cached bytes newer than the origin.", counters.dirty_bytes
        )
        yield gauge(
            "memory_allocated_bytes",
            "Memory-file bytes allocated (all kinds).",
            sum(memfile.allocated_bytes(kind) for kind in MemoryKind),
        )
        yield gauge("memory_file_size_bytes", "Size of the backing memory file.", memfile.file_size)
        yield gauge(
            "memory_allocated_peak_bytes",
            "The most page-cache bytes allocated at once since the start.",
            memfile.peak_allocated_bytes(MemoryKind.PAGE_CACHE),
        )
        yield gauge(
            "memory_limit_bytes", "The page-cache budget (--cache-size).", cache.options.cache_size
        )
        yield gauge("memory_pinned_bytes", "Cache bytes held by operator pins.", cache.pinned_bytes)
        yield gauge(
            "memory_prefetched_bytes",
            "Cache bytes read ahead and not read by a client yet.",
            cache.policy.prefetched_bytes,
        )
        yield gauge(
            "memory_reserved_bytes",
            "Budget bytes reserved by fills and writes, not allocated yet.",
            cache.budget.reserved,
        )
        yield gauge("open_files", "Files with an in-memory inode.", len(cache.files()))
        yield counter("cache_hit_bytes", "Bytes served from the cache.", counters.hit_bytes)
        yield counter("cache_miss_bytes", "Bytes filled from the origin.", counters.miss_bytes)
        yield counter(
            "cache_bypass_bytes",
            "Origin bytes served pass-through, without caching (no room in the budget).",
            counters.bypass_bytes,
        )
        yield counter(
            "cache_room_refusals",
            "Reservations refused for lack of room (reads then go pass-through; pins and"
            " writes get 507).",
            counters.room_refusals,
        )
        yield counter("evictions", "Evictions that dropped pages.", counters.evictions)
        yield counter("evicted_bytes", "Bytes dropped by eviction.", counters.evicted_bytes)
        yield counter(
            "reclaimed_bytes", "Bytes returned to the host.", memfile.reclaimed_bytes_total
        )
        yield counter("writeback_bytes", "Bytes written back.", counters.writeback_bytes)
        yield counter("writeback_errors", "Failed write-backs.", counters.writeback_errors)


@dataclass(slots=True)
class _Durations:
    """One method's duration histogram: a count per bucket (not cumulative;
    the last bucket is +Inf) and the sum."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(_LATENCY_BUCKETS) + 1))
    total: float = 0.0


class RequestCollector(Collector):
    """``http_requests_total`` and ``http_request_duration_seconds`` of the
    data listener. All fields are protected by the event loop (requests are
    answered and scrapes are collected on it)."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], int] = {}  # (method, status) -> count
        self._durations: dict[str, _Durations] = {}  # method -> histogram
        # Reads of file bytes by cache result (hit, miss, bypass) -> count.
        self._results: dict[str, int] = dict.fromkeys(CACHE_RESULTS, 0)

    def observe(self, method: str, status: int, seconds: float, cache_result: str) -> None:
        if cache_result in self._results:
            self._results[cache_result] += 1
        key = (method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        durations = self._durations.get(method)
        if durations is None:
            durations = self._durations[method] = _Durations()
        # The first bucket whose upper bound is >= seconds, as Histogram does.
        durations.buckets[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        durations.total += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_http_requests",
            "HTTP requests on the data listener.",
            labels=["method", "status"],
        )
        for (method, status), count in sorted(self._requests.items()):
            requests.add_metric([method, str(status)], count)
        yield requests
        durations = HistogramMetricFamily(
            f"{PREFIX}_http_request_duration_seconds",
            "Time to answer a data request.",
            labels=["method"],
        )
        for method, histogram in sorted(self._durations.items()):
            cumulative, running = [], 0
            for bound, count in zip(_BUCKET_LABELS, histogram.buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            durations.add_metric([method], cumulative, sum_value=histogram.total)
        yield durations
        results = CounterMetricFamily(
            f"{PREFIX}_cache_requests",
            "Data requests that read file bytes, by cache result: hit (all from the cache),"
            " miss (some filled from the origin), bypass (some read pass-through).",
            labels=["result"],
        )
        for result, count in self._results.items():
            results.add_metric([result], count)
        yield results


class Metrics:
    """The metric objects of one server, in their own registry."""

    def __init__(self) -> None:
        # No ``*_created`` series: they would double the series of every
        # labelled counter and histogram, as gauges no dashboard uses. The
        # switch is process-wide; cachesvc has no other registry.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestCollector()
        self.registry.register(self.requests)
        self.origin_requests = Counter(
            f"{PREFIX}_origin_requests",
            "Calls to the origin.",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.origin_bytes = Counter(
            f"{PREFIX}_origin_bytes",
            "Bytes moved to or from the origin.",
            ["direction"],
            registry=self.registry,
        )
        self.origin_duration = Histogram(
            f"{PREFIX}_origin_request_duration_seconds",
            "Duration of origin calls.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        for direction in ("in", "out"):
            self.origin_bytes.labels(direction)

    def watch_cache(self, cache: FileCache) -> None:
        """Adds the gauges and counters read from ``cache`` at scrape time."""
        self.registry.register(CacheCollector(cache))

    # OriginObserver
    def observe(self, op: str, outcome: str, seconds: float) -> None:
        self.origin_requests.labels(op, outcome).inc()
        self.origin_duration.labels(op).observe(seconds)

    def transferred(self, direction: str, nbytes: int) -> None:
        if nbytes:
            self.origin_bytes.labels(direction).inc(nbytes)

    def observe_request(self, method: str, status: int, seconds: float, cache_result: str) -> None:
        self.requests.observe(method, status, seconds, cache_result)

    def exposition(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
