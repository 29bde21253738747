"""What an aiohttp request of the data API asks: its target, its
conditional fields and its flags; and the keys the data app keeps its
state and each request's transfer record under.

The fast read path reads its plain requests with
:mod:`cachesvc.api.http.simple` instead; both hand the same values to the
read policy (:mod:`cachesvc.api.reads`).
"""

from __future__ import annotations

from aiohttp import web

from cachesvc.api.access import Transfer
from cachesvc.api.errors import ApiError
from cachesvc.api.http.paths import RequestPath, decode_raw_path
from cachesvc.api.listener import DataState
from cachesvc.api.reads import PRECONDITION_FAILED, Snapshot, check_conditions
from cachesvc.wire import FILES_PREFIX

STATE_KEY = web.AppKey("data_state", DataState)
TRANSFER_KEY = web.RequestKey("transfer", Transfer)

_CONDITIONAL = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
_TRUE = frozenset({"", "1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


def files_target(request: web.Request) -> RequestPath:
    """The path after ``/files/`` of the raw request target, decoded once."""
    raw = request.rel_url.raw_path
    if not raw.startswith(FILES_PREFIX):
        raise ApiError(404, "not_found", "no such resource")
    return decode_raw_path(raw[len(FILES_PREFIX) :])


def joined(request: web.Request, name: str) -> str | None:
    """The field ``name``, its lines joined with commas; None if absent."""
    values = request.headers.getall(name, [])
    return ", ".join(values) if values else None


def conditions(request: web.Request) -> dict[str, str]:
    """The conditional fields (but If-Range), each field's lines joined with commas."""
    out = {}
    for name in _CONDITIONAL:
        value = joined(request, name)
        if value is not None:
            out[name] = value
    return out


def check_preconditions(request: web.Request, snap: Snapshot | None) -> int | None:
    """RFC 9110 §13.2.2 for ``snap`` (None: no such file). Raises 412; returns 304 or None."""
    sent = conditions(request)
    if not sent:
        return None
    outcome = check_conditions(request.method, sent, snap)
    if outcome == 412:
        raise ApiError(412, "precondition_failed", PRECONDITION_FAILED)
    return outcome


def sync_requested(request: web.Request) -> bool:
    """Whether ``?sync`` asks for the write to reach the origin before the answer."""
    values = request.query.getall("sync", [])
    if not values:
        return False
    value = values[-1].strip().lower()
    if len(values) > 1 or value not in _TRUE | _FALSE:
        raise ApiError(400, "bad_request", "sync must be given once, as 1/true/yes or 0/false/no")
    return value in _TRUE
