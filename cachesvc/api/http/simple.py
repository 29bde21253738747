"""Recognizes the simplest HTTP/1.1 request heads, for the fast read path.

A head is *simple* when it is ``GET`` or ``HEAD`` in HTTP/1.1 of a
``/files/`` target without a query, carrying a ``Host`` and otherwise only
headers from :data:`SIMPLE_HEADERS`, each at most once, all in printable
ASCII. :mod:`cachesvc.api.fastpath` may answer such a request without
aiohttp. Anything else (another method or version, a query, a header
outside the list or repeated, body framing such as ``Content-Length`` or
``Transfer-Encoding``, obs-fold, tabs, bytes outside printable ASCII) is
not simple, and the connection goes to aiohttp's full parser, which accepts
or rejects it by its own rules. So this module never decides whether a
request is valid, only whether it is one of the plain ones; strictness
costs a fallback, never a wrong answer.
"""

from __future__ import annotations

from typing import NamedTuple

from cachesvc.wire import FILES_PREFIX

# A longer head goes to aiohttp, whose default line limit is 8190 bytes.
MAX_HEAD = 8190
HEAD_END = b"\r\n\r\n"
# Headers a simple request may carry besides Host. Conditional headers,
# If-Range, Authorization and all body framing are absent on purpose.
SIMPLE_HEADERS = frozenset({"user-agent", "accept", "accept-encoding", "connection", "range"})


class SimpleRequest(NamedTuple):
    """One simple request head. Immutable."""

    method: str  # "GET" or "HEAD"
    raw_path: str  # the target after "/files/", still percent-encoded
    range: str | None  # the Range header's value
    keep_alive: bool  # False if the client sent "Connection: close"


def parse_simple(head: bytes) -> SimpleRequest | None:
    """The request of ``head`` (up to, not including, the blank line), or
    None if it is not simple."""
    if len(head) > MAX_HEAD or not head.isascii():
        return None
    lines = head.decode("ascii").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3:
        return None
    method, target, version = request_line
    if (
        method not in ("GET", "HEAD")
        or version != "HTTP/1.1"
        or not target.startswith(FILES_PREFIX)
        or "?" in target
        or "#" in target
        or not target.isprintable()
    ):
        return None
    seen: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        name = name.lower()
        if not colon or (name != "host" and name not in SIMPLE_HEADERS) or name in seen:
            return None
        if not value.isprintable():  # tabs and other controls
            return None
        seen[name] = value.strip(" ")
    if "host" not in seen:
        return None
    connection = seen.get("connection", "keep-alive").lower()
    if connection not in ("keep-alive", "close"):
        return None
    return SimpleRequest(
        method,
        target[len(FILES_PREFIX) :],
        seen.get("range"),
        keep_alive=connection == "keep-alive",
    )
