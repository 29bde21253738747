"""The metric contract (the README's metrics table), in one place for the
tests that check a live /metrics and the Grafana dashboard against it."""

from __future__ import annotations

# Name without the ``cachesvc_`` prefix (counters without ``_total``) ->
# (type, label names).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "memory_committed_bytes": ("gauge", frozenset({"kind"})),
    "memory_mapped_bytes": ("gauge", frozenset()),
    "memory_evictable_bytes": ("gauge", frozenset()),
    "memory_dirty_bytes": ("gauge", frozenset()),
    "memory_allocated_bytes": ("gauge", frozenset()),
    "memory_file_size_bytes": ("gauge", frozenset()),
    "memory_limit_bytes": ("gauge", frozenset()),
    "memory_allocated_peak_bytes": ("gauge", frozenset()),
    "memory_pinned_bytes": ("gauge", frozenset()),
    "memory_prefetched_bytes": ("gauge", frozenset()),
    "memory_reserved_bytes": ("gauge", frozenset()),
    "open_files": ("gauge", frozenset()),
    "cache_hit_bytes": ("counter", frozenset()),
    "cache_miss_bytes": ("counter", frozenset()),
    "cache_bypass_bytes": ("counter", frozenset()),
    "cache_room_refusals": ("counter", frozenset()),
    "cache_requests": ("counter", frozenset({"result"})),
    "origin_requests": ("counter", frozenset({"op", "outcome"})),
    "origin_bytes": ("counter", frozenset({"direction"})),
    "evictions": ("counter", frozenset()),
    "evicted_bytes": ("counter", frozenset()),
    "reclaimed_bytes": ("counter", frozenset()),
    "writeback_bytes": ("counter", frozenset()),
    "writeback_errors": ("counter", frozenset()),
    "http_requests": ("counter", frozenset({"method", "status"})),
    "http_request_duration_seconds": ("histogram", frozenset({"method"})),
    "origin_request_duration_seconds": ("histogram", frozenset({"op"})),
}


def series_name(short: str) -> str:
    """The name a query uses: prefixed, with ``_total`` on counters
    (histograms are queried through their _bucket/_sum/_count series)."""
    kind, _ = METRICS[short]
    return f"cachesvc_{short}_total" if kind == "counter" else f"cachesvc_{short}"
