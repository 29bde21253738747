"""What one data request did, and how it is recorded: both front ends
(aiohttp's handler and the fast connection) count and log through here, so
their access log lines and metrics are the same.

Every request is logged once on ``cachesvc.access`` (INFO) with method,
path, status, body bytes sent, duration and cache hit/miss, and counted in
``cachesvc_http_requests_total`` / ``cachesvc_http_request_duration_seconds``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cachesvc.api.metrics import Metrics
from cachesvc.core.mapping import Mapping

access_log = logging.getLogger("cachesvc.access")

# Methods counted under their own name in metrics; others are "OTHER".
KNOWN_METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"})
# What the access log and metrics say of a request whose client went away
# before it was answered (its handler or fast answer was cancelled).
CLIENT_GONE = 499


@dataclass(slots=True)
class Transfer:
    """What one request sent, for the access log."""

    bytes_sent: int = 0
    missed: int | None = None  # bytes filled from the origin; None: no cache read
    bypassed: int = 0  # bytes read pass-through (no room in the cache)
    aborted: str = ""  # why the body was cut short, if it was

    def note(self, mapping: Mapping) -> None:
        self.missed = (self.missed or 0) + mapping.missed

    def note_hit(self) -> None:
        self.missed = self.missed or 0

    def note_bypass(self, length: int) -> None:
        self.note_hit()
        self.bypassed += length

    @property
    def cache_status(self) -> str:
        """hit (every byte from the cache), miss (some filled from the
        origin), bypass (some read pass-through), or - (no body read)."""
        if self.missed is None:
            return "-"
        if self.bypassed:
            return "bypass"
        return "miss" if self.missed else "hit"


def record_request(
    metrics: Metrics,
    method: str,
    target: str,
    status: int,
    sent: int,
    seconds: float,
    transfer: Transfer,
) -> None:
    """Counts one answered request and writes its access log line."""
    method = method if method in KNOWN_METHODS else "OTHER"
    metrics.observe_request(method, status, seconds, transfer.cache_status)
    if access_log.isEnabledFor(logging.INFO):  # skip building the record
        path = target[:1024]
        access_log.info(
            "%s %s %d",
            method,
            path,
            status,
            extra={
                "method": method,
                "path": path,
                "status": status,
                "bytes": sent,
                "duration": round(seconds, 6),
                "cache": transfer.cache_status,
                **({"aborted": transfer.aborted} if transfer.aborted else {}),
            },
        )
