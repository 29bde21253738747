"""The fast read path: plain GET and HEAD of files, without aiohttp.

Every connection of the data listener starts on
:class:`~cachesvc.api.fastconn.FastConnection`, which reads request heads
itself. A head that :func:`~cachesvc.api.http.simple.parse_simple` calls
simple, naming a file whose answer is 200 or a 206 of one range, is
answered by :class:`FastReads`: at once from the cache when the body is at
most :data:`~cachesvc.api.reads.SMALL_BODY` bytes and cached (no task,
no await); else in a task that fills what is missing from the origin, and
that streams a larger body from mappings of the cache
(:class:`~cachesvc.api.streaming.BodyStreamer`, with the connection as
its sink). Which answer, with which headers and body, is decided by the
read policy that aiohttp's handler uses too
(:func:`~cachesvc.api.reads.plan_read`, :func:`~cachesvc.api.reads.read`);
this module takes the plans it can answer and writes them as aiohttp
would. The origin's errors (404, 502, 504 ...) are answered here too,
with aiohttp's JSON error body. The first request this path does not
answer (any other method, a conditional, several ranges, a bad path, an
incomplete head) hands the connection, with every byte still unanswered,
to aiohttp's protocol for the rest of its life. GET and HEAD are safe to
run again, so a request given up on before its head was written (an
unexpected error) is answered there from the beginning.

Why: on 2 cores (server on one, wrk on the other) aiohttp answered a 4 KiB
body from a trivial handler at about 10,000 requests/s, against 33,000 for
nginx; the whole data handler reached 3,200. A bare protocol that parses
heads and writes a fixed answer reached 51,000. With this path, random
4 KiB ranges of a 512 MiB file went from 3,185 to 9,865 requests/s
(``benchmarks/http_bench.py``, 2026-11-22), about 65 us of user and 30 us
of kernel time per request. Taking large bodies too (2026-12-02, same
benchmark, 16 connections) cut the server's CPU per 1 MiB response from
466-501 to 379-416 us streamed, and to 220-250 us with SMALL_BODY raised
from 256 KiB to 1 MiB (copied, as in reads).

The answers match aiohttp's byte for byte but for ``Date``: the same status
lines, the plan's header block as aiohttp's handler sends it, then
``Content-Length``, ``Date``, ``Server`` and ``X-Cachesvc-Instance`` in
aiohttp's order, the same metrics and access log line (but for a client that goes away before
its answer is complete: 499 here, the answer's status with ``aborted``
there); tests/integration/test_fastpath.py compares both paths.
Deadlines match too: an idle connection is closed
:data:`~cachesvc.api.listener.HEADER_TIMEOUT` after it opened or last
answered, like aiohttp's ``keepalive_timeout``; a client that stops reading
stops the reading of further requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple, Protocol

from aiohttp.http import SERVER_SOFTWARE

from cachesvc.api.access import CLIENT_GONE, Transfer, record_request
from cachesvc.api.errors import ERROR_CONTENT_TYPE, error_body, mapped_error
from cachesvc.api.http.paths import BadPath, decode_raw_path
from cachesvc.api.http.simple import SimpleRequest
from cachesvc.api.inflight import InFlight
from cachesvc.api.listener import HEADER_TIMEOUT, INSTANCE_ID, DataState
from cachesvc.api.reads import (
    KeptChanging,
    ReadPlan,
    Snapshot,
    content_type,
    copy_now,
    plan_read,
    read,
)
from cachesvc.api.streaming import BodySink
from cachesvc.wire import FILES_PREFIX, INSTANCE_HEADER

log = logging.getLogger("cachesvc.api")
# Status lines by status, for all it answers with: 200, 206 and errors.
_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus
}
# What follows Date, in aiohttp's order.
_TAIL = f"Server: {SERVER_SOFTWARE}\r\n{INSTANCE_HEADER}: {INSTANCE_ID}\r\n\r\n"
_CLOSE_TAIL = (
    f"Server: {SERVER_SOFTWARE}\r\nConnection: close\r\n{INSTANCE_HEADER}: {INSTANCE_ID}\r\n\r\n"
)


class Reply(NamedTuple):
    """An answer ready to send, or sent already if ``streamed``. Immutable."""

    status: int  # 200 or 206, or an error's
    fields: str  # the header lines before Content-Length, each ending in CRLF
    length: int  # Content-Length (a HEAD reply has no body)
    body: bytes | bytearray  # empty if streamed
    transfer: Transfer
    streamed: bool = False  # its head and body were written by FastReads.answer

    @classmethod
    def of(
        cls, plan: ReadPlan, body: bytes | bytearray, transfer: Transfer, streamed: bool = False
    ) -> Reply:
        """The reply of a read plan."""
        return cls(plan.status, plan.fields, plan.length, body, transfer, streamed)

    @property
    def body_bytes(self) -> int:
        """Body bytes sent, for the access log."""
        return self.transfer.bytes_sent if self.streamed else len(self.body)


class StreamTarget(BodySink, Protocol):
    """The connection a streamed answer is written to."""

    def write_head(self, head: bytes) -> None:
        """Writes a streamed answer's status line and headers, after the
        answers before it."""


class _Declined(Exception):
    """The read plan is not one the fast path answers: aiohttp's handler will."""


@dataclass(slots=True)
class _DateHeader:
    """The ``Date`` value, formatted once per second."""

    second: int = -1
    value: str = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True)
        return self.value


@dataclass(slots=True)
class FastReads:
    """What every fast connection of one listener shares. All fields are
    protected by the event loop."""

    state: DataState
    in_flight: InFlight
    # A connection is closed after this long without a request, as aiohttp's
    # keepalive_timeout does (see listener.runner_options).
    idle_timeout: float = HEADER_TIMEOUT
    _date: _DateHeader = field(default_factory=_DateHeader)

    def answer_now(self, request: SimpleRequest) -> Reply | None:
        """The answer from what is cached, or None if it needs an await."""
        path = _file_path(request)
        if path is None:
            return None
        inode = self.state.cache.peek(path)
        if inode is None:
            return None
        plan = self.plan(request, path, Snapshot.of(inode))
        if plan is None:
            return None
        transfer = Transfer()
        if not plan.sends_body:
            return Reply.of(plan, b"", transfer)
        body = copy_now(inode, plan, transfer)
        return None if body is None else Reply.of(plan, body, transfer)

    async def answer(self, request: SimpleRequest, target: StreamTarget) -> Reply | None:
        """The answer, filling from the origin as needed; None to hand the
        request to aiohttp, which reports unexpected errors. A body larger
        than SMALL_BODY is streamed to ``target`` here, and the reply says so."""
        path = _file_path(request)
        if path is None:
            return None
        answer = _FastAnswer(self, request, path, target)
        try:
            # Kept: a request handed to aiohttp finds the file's attributes.
            async with self.state.cache.open(path, keep=True) as inode:
                return await read(inode, answer.transfer, answer, answer.plan)
        except (_Declined, KeptChanging):
            return None  # aiohttp answers it (and tries again)
        except Exception as exc:
            mapped = mapped_error(exc)
            if mapped is None:  # unexpected: aiohttp asks again and reports it
                log.debug("fast path gives %s up: %r", path, exc)
                return None
            # An origin's answer (404, 502, 504 ...) is given here: asking
            # aiohttp to ask the origin again would double the wait.
            status, code, message = mapped
            body = error_body(code, message)
            fields = f"Content-Type: {ERROR_CONTENT_TYPE}\r\n"
            if request.method == "HEAD":
                return Reply(status, fields, len(body), b"", Transfer())
            return Reply(status, fields, len(body), body, Transfer())

    def plan(self, request: SimpleRequest, path: str, snap: Snapshot) -> ReadPlan | None:
        """The read policy's plan for ``request`` if the fast path answers it
        (200, or 206 of one range); None for aiohttp's handler."""
        plan = plan_read(
            snap, content_type(path), self.state.config.max_ranges, request.method, request.range
        )
        return plan if plan.status < 300 and len(plan.pieces) <= 1 else None

    def closes(self, request: SimpleRequest) -> bool:
        """Whether the connection closes after answering ``request``."""
        return not request.keep_alive or self.in_flight.stopping

    def encode(self, reply: Reply, close: bool) -> bytes:
        """The status line and headers of ``reply``, as aiohttp writes them."""
        return (
            f"{_STATUS_LINES[reply.status]}{reply.fields}Content-Length: {reply.length}\r\n"
            f"Date: {self._date.now()}\r\n{_CLOSE_TAIL if close else _TAIL}"
        ).encode()

    def record(self, request: SimpleRequest, reply: Reply | None, started: float) -> None:
        """Counts and logs one request; ``reply`` None: the client went away."""
        record_request(
            self.state.metrics,
            request.method,
            FILES_PREFIX + request.raw_path,
            reply.status if reply else CLIENT_GONE,
            reply.body_bytes if reply else 0,
            time.monotonic() - started,
            reply.transfer if reply else Transfer(),
        )


@dataclass(frozen=True, slots=True)
class _FastAnswer:
    """One request's answer through the fast connection (a reads.FrontEnd).
    Immutable (the transfer record's fields change)."""

    reads: FastReads
    request: SimpleRequest
    path: str
    target: StreamTarget
    transfer: Transfer = field(default_factory=Transfer)

    def plan(self, snap: Snapshot) -> ReadPlan:
        plan = self.reads.plan(self.request, self.path, snap)
        if plan is None:
            raise _Declined
        return plan

    def complete(self, plan: ReadPlan, body: bytes | bytearray) -> Reply:
        return Reply.of(plan, body, self.transfer)

    async def begin_stream(self, plan: ReadPlan) -> tuple[Reply, BodySink]:
        reply = Reply.of(plan, b"", self.transfer, streamed=True)
        self.target.write_head(self.reads.encode(reply, self.reads.closes(self.request)))
        return reply, self.target


def _file_path(request: SimpleRequest) -> str | None:
    """The origin path a simple request names, if it names a file."""
    try:
        target = decode_raw_path(request.raw_path)
    except BadPath:
        return None
    return None if target.is_dir else target.path
