"""The fast read path: plain GET and HEAD of files, without aiohttp.

Every connection of the data listener starts on
:class:`~cachesvc.api.fastconn.FastConnection`, which reads request heads
itself. A head that :func:`~cachesvc.api.http.simple.parse_simple` calls
simple, naming a file whose answer is 200 or a 206 of one range, is
answered by :class:`FastReads`: at once from the cache when the body is at
most :data:`~cachesvc.api.responses.SMALL_BODY` bytes and cached (no task,
no await); else in a task that fills what is missing from the origin, and
that streams a larger body from mappings of the cache as aiohttp's handler
does (:class:`~cachesvc.api.responses.BodyStreamer`, with the connection as
its sink). The origin's errors (404, 502, 504 ...) are answered here too,
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
from 256 KiB to 1 MiB (copied, as in responses).

The answers match aiohttp's byte for byte but for ``Date``: the same status
lines, headers in the same order (``X-Cachesvc-Instance`` included), the
same metrics and access log line (but for a client that goes away before
its answer is complete: 499 here, the answer's status with ``aborted``
there); tests/integration/test_fastpath.py compares both paths.
Deadlines match too: an idle connection is closed
:data:`~cachesvc.api.writes.HEADER_TIMEOUT` after it opened or last
answered, like aiohttp's ``keepalive_timeout``; a client that stops reading
stops the reading of further requests.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple, Protocol

from aiohttp.http import SERVER_SOFTWARE

from cachesvc.api.data import INSTANCE_ID, READ_ATTEMPTS, DataState, content_type, record_request
from cachesvc.api.errors import ERROR_CONTENT_TYPE, error_body, mapped_error
from cachesvc.api.http.paths import BadPath, decode_raw_path
from cachesvc.api.http.ranges import RangeKind, format_content_range, parse_range
from cachesvc.api.http.simple import SimpleRequest
from cachesvc.api.inflight import InFlight
from cachesvc.api.responses import (
    SMALL_BODY,
    BodyAborted,
    BodySink,
    BodyStreamer,
    Snapshot,
    SnapshotChanged,
    Transfer,
    map_first_chunk,
    range_bytes,
    validator_headers,
)
from cachesvc.api.writes import HEADER_TIMEOUT
from cachesvc.core.inode import CachingInode
from cachesvc.core.ranges import Range
from cachesvc.wire import FILES_PREFIX, INSTANCE_HEADER

log = logging.getLogger("cachesvc.api")
# What the access log and metrics say of a request whose client went away.
CLIENT_GONE = 499
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

    status: int  # 200 or 206
    fields: str  # the header lines before Content-Length, each ending in CRLF
    length: int  # Content-Length (a HEAD reply has no body)
    body: bytes  # empty if streamed
    transfer: Transfer
    streamed: bool = False  # its head and body were written by FastReads.answer

    @property
    def body_bytes(self) -> int:
        """Body bytes sent, for the access log."""
        return self.transfer.bytes_sent if self.streamed else len(self.body)


class StreamTarget(BodySink, Protocol):
    """The connection a streamed answer is written to."""

    def write_head(self, head: bytes) -> None:
        """Writes a streamed answer's status line and headers, after the
        answers before it."""


class _Plan(NamedTuple):
    """What a simple request is answered with, but the body. Immutable."""

    status: int
    fields: str
    body: Range  # the file bytes sent by GET (empty for an empty file)


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
    # keepalive_timeout does (see writes.runner_options).
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
        plan = self._plan(request, inode.attr.size, _fixed_fields(inode, path))
        if plan is None:
            return None
        rng = plan.body
        transfer = Transfer()
        if request.method == "HEAD" or not rng.length:
            return Reply(plan.status, plan.fields, rng.length, b"", transfer)
        if rng.length > SMALL_BODY:
            return None  # streamed, which awaits
        body = inode.read_cached_now(rng.start, rng.length)
        if body is None or len(body) != rng.length:
            return None
        transfer.note_hit()
        return Reply(plan.status, plan.fields, rng.length, body, transfer)

    async def answer(self, request: SimpleRequest, target: StreamTarget) -> Reply | None:
        """The answer, filling from the origin as needed; None to hand the
        request to aiohttp, which reports unexpected errors. A body larger
        than SMALL_BODY is streamed to ``target`` here, and the reply says so."""
        path = _file_path(request)
        if path is None:
            return None
        try:
            # Kept: a request handed to aiohttp finds the file's attributes.
            async with self.state.cache.open(path, keep=True) as inode:
                return await self._read(request, inode, path, target)
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

    async def _read(
        self, request: SimpleRequest, inode: CachingInode, path: str, target: StreamTarget
    ) -> Reply | None:
        transfer = Transfer()
        for _ in range(READ_ATTEMPTS):
            snap = Snapshot.of(inode)
            plan = self._plan(request, snap.size, _fields(snap.token, snap.mtime, path))
            if plan is None:
                return None
            rng = plan.body
            if request.method == "HEAD" or not rng.length:
                return Reply(plan.status, plan.fields, rng.length, b"", transfer)
            try:
                if rng.length > SMALL_BODY:
                    return await self._stream(request, inode, snap, plan, transfer, target)
                body = await range_bytes(inode, rng, snap, transfer)
            except SnapshotChanged:
                continue  # written meanwhile: answer for the new version
            return Reply(plan.status, plan.fields, rng.length, body, transfer)
        return None

    async def _stream(
        self,
        request: SimpleRequest,
        inode: CachingInode,
        snap: Snapshot,
        plan: _Plan,
        transfer: Transfer,
        target: StreamTarget,
    ) -> Reply:
        """Writes the answer with a large body to ``target``, as aiohttp's
        handler would (see responses.stream_body); SnapshotChanged if the
        file changed before the head was out."""
        pieces = (plan.body,)
        first = await map_first_chunk(inode, pieces, snap, transfer)
        reply = Reply(plan.status, plan.fields, plan.body.length, b"", transfer, streamed=True)
        try:
            target.write_head(self.encode(reply, self.closes(request)))
        except BaseException:
            await first.release()
            raise
        try:
            await BodyStreamer(target, inode, snap, transfer).send(pieces, first)
        except BodyAborted as exc:
            transfer.aborted = str(exc) or "aborted"
        return reply

    def _plan(self, request: SimpleRequest, size: int, fields: str) -> _Plan | None:
        """A 200 or single-range 206 of a file of ``size`` bytes whose fixed
        header lines are ``fields``, else None."""
        if request.range is not None:
            outcome = parse_range(request.range, size, self.state.config.max_ranges)
            if outcome.kind is RangeKind.SATISFIABLE:
                if len(outcome.ranges) > 1:
                    return None
                rng = outcome.ranges[0]
                content_range = format_content_range(rng, size)
                return _Plan(206, f"{fields}Content-Range: {content_range}\r\n", rng)
            if outcome.kind is RangeKind.UNSATISFIABLE:
                return None
        return _Plan(200, fields, Range(0, size))

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


def _fixed_fields(inode: CachingInode, path: str) -> str:
    """:func:`_fields` of the inode's current version."""
    attr = inode.attr
    return _fields(attr.etag, attr.mtime, path)


@functools.lru_cache(maxsize=4096)
def _fields(token: str, mtime: float, path: str) -> str:
    """The header lines every answer of one version of a file starts with,
    in the order the aiohttp handler sends them (see Snapshot.headers)."""
    fields = {**validator_headers(token, mtime), "Content-Type": content_type(path)}
    return "".join(f"{name}: {value}\r\n" for name, value in fields.items())


def _file_path(request: SimpleRequest) -> str | None:
    """The origin path a simple request names, if it names a file."""
    try:
        target = decode_raw_path(request.raw_path)
    except BadPath:
        return None
    return None if target.is_dir else target.path
