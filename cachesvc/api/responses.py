"""Sending cached file bytes: whole files, single ranges, multipart/byteranges.

Every byte sent comes from a :class:`Mapping` of the inode, held until the
bytes are on the socket; the response's ``ETag`` describes exactly the bytes
sent. A body is planned as a list of pieces (framing bytes or file ranges)
and sent one of two ways:

- small bodies (at most :data:`SMALL_BODY` bytes) are copied out of the
  cache into one buffer, the mapping released, and sent with the headers in
  one write. The copy happens after the ``ETag`` snapshot is checked, so a
  concurrent write makes the handler start over rather than send a mix.
- larger bodies are streamed in :data:`CHUNK`-byte mappings by a
  :class:`BodyStreamer`, handing the mapping's memoryviews to a
  :class:`BodySink` (aiohttp's response, or a fast-path connection) without
  copying; uvloop keeps a reference to a buffer it could not send at once,
  so each mapping is released only once the transport has sent every byte
  of it.

Why memoryviews and not ``os.sendfile`` from the memory file: uvloop has no
``loop.sendfile``, so sendfile needs the raw socket (a dup of it, with its
own writability waits, after flushing the transport). Measured on 2 cores
with wrk (server on one core, wrk on the other, 2026-11-22): random 1 MiB
ranges with 16 connections ran at 243-291 MB/s with views and 261-315 MB/s
with sendfile, full GETs of a 1 MiB file at 304-329 vs 310-326 MB/s (equal
within noise), but full GETs of a 64 MiB file at 381-459 vs 262-283 MB/s
(4 connections) and 336-538 vs 275-403 MB/s (one curl): Linux sendfile from
shmem goes through a 64 KiB internal pipe per step. Views win or tie, with
less code.

A response describes one version of the file (its ``ETag``). A write that
changes the bytes being sent (or a new origin version) in the middle of a
streamed response means it cannot be answered any more: the connection is
aborted (:class:`BodyAborted`), so the client sees an incomplete body, never
a mix of two versions. Writes to other bytes of the file, appends included,
leave it alone: the bytes it sends are still those of its version
(:meth:`Snapshot.holds`). Small bodies are checked the same way after their
copy, and answered afresh if their bytes changed meanwhile. A client that
reads nothing for :data:`SEND_IDLE_TIMEOUT` seconds is disconnected the
same way, releasing its mappings.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from cachesvc.api.http.conditions import format_etag
from cachesvc.api.http.multipart import MultipartPlan
from cachesvc.api.http.ranges import format_content_range
from cachesvc.core.inode import CachingInode
from cachesvc.core.mapping import Mapping, release_all
from cachesvc.core.ranges import Range
from cachesvc.wire import format_http_date

log = logging.getLogger("cachesvc.api")

# Bodies up to this size are copied and sent with the headers in one write.
# A copy costs memory until sent, a stream costs bookkeeping and a wait
# for the socket to drain: 1 MiB responses cost 220-250 us of server CPU
# copied against 379-416 us streamed (benchmarks/http_bench.py, 16
# connections, 2026-12-02).
SMALL_BODY = 1 << 20
# Bytes mapped (and held) per step of a streamed body.
CHUNK = 4 << 20
# A streamed response whose client takes longer than this to accept one
# chunk is aborted.
SEND_IDLE_TIMEOUT = 60.0


class SnapshotChanged(Exception):
    """The file changed (ETag or size) between planning and mapping a body."""


class BodyAborted(Exception):
    """The connection was closed mid-body (client gone, file changed, too slow)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The attributes a response describes. Immutable."""

    size: int
    mtime: float
    token: str  # inode.attr.etag at the time of the snapshot
    epoch: int  # inode.epoch and inode.attr.version then
    version: int

    @classmethod
    def of(cls, inode: CachingInode) -> Snapshot:
        attr = inode.attr
        return cls(attr.size, attr.mtime, attr.etag, inode.epoch, attr.version)

    def holds(self, inode: CachingInode, rng: Range) -> bool:
        """Whether the inode's bytes of ``rng`` are still this version's: a
        write elsewhere in the file leaves a reader of ``rng`` undisturbed."""
        return inode.unchanged_since(self.epoch, self.version, rng)

    @property
    def etag(self) -> str:
        return _validators(self.token, self.mtime)[0]

    @property
    def last_modified(self) -> str:
        return _validators(self.token, self.mtime)[1]

    def headers(self) -> dict[str, str]:
        return validator_headers(self.token, self.mtime)


def validator_headers(token: str, mtime: float) -> dict[str, str]:
    """The validator headers every response of one version of a file carries."""
    etag, last_modified = _validators(token, mtime)
    return {"Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": last_modified}


@functools.lru_cache(maxsize=4096)
def _validators(token: str, mtime: float) -> tuple[str, str]:
    """The ``ETag`` and ``Last-Modified`` values of one version of a file.

    Formatted once per version rather than once per response: formatting
    the date took about 5% of the time of a small cached GET.
    """
    return format_etag(token), format_http_date(mtime)


@dataclass(slots=True)
class Transfer:
    """What one request sent, for the access log."""

    bytes_sent: int = 0
    missed: int | None = None  # bytes filled from the origin; None: no cache read
    aborted: str = ""  # why the body was cut short, if it was

    def note(self, mapping: Mapping) -> None:
        self.missed = (self.missed or 0) + mapping.missed

    def note_hit(self) -> None:
        self.missed = self.missed or 0

    @property
    def cache_status(self) -> str:
        if self.missed is None:
            return "-"
        return "miss" if self.missed else "hit"


Piece = bytes | Range


@dataclass(frozen=True, slots=True)
class BodyPlan:
    """A response body: framing bytes and file ranges, in order. Immutable."""

    status: int
    headers: dict[str, str]
    pieces: tuple[Piece, ...]
    length: int

    @classmethod
    def build(cls, snap: Snapshot, ranges: Sequence[Range] | None, content_type: str) -> BodyPlan:
        """200 for ``ranges`` None, else 206 (single or multipart)."""
        headers = snap.headers()
        if ranges is None:
            headers["Content-Type"] = content_type
            pieces: tuple[Piece, ...] = (Range(0, snap.size),) if snap.size else ()
            return cls(200, headers, pieces, snap.size)
        if len(ranges) == 1:
            rng = ranges[0]
            headers["Content-Type"] = content_type
            headers["Content-Range"] = format_content_range(rng, snap.size)
            return cls(206, headers, (rng,), rng.length)
        plan = MultipartPlan.build(ranges, snap.size, content_type)
        headers["Content-Type"] = plan.content_type
        multipart: list[Piece] = []
        for part in plan.parts:
            multipart += [part.header, part.rng]
        multipart.append(plan.trailer)
        return cls(206, headers, tuple(multipart), plan.content_length)


def head_response(plan: BodyPlan) -> web.Response:
    """The headers of ``plan`` without a body (HEAD)."""
    return web.Response(
        status=plan.status, headers={**plan.headers, "Content-Length": str(plan.length)}
    )


async def map_exact(inode: CachingInode, rng: Range, snap: Snapshot) -> Mapping:
    """Maps ``rng``; SnapshotChanged if the file is no longer ``snap``."""
    mapping = await inode.map_range(rng.start, rng.length)
    if mapping.length != rng.length or not snap.holds(inode, rng):
        await mapping.release()
        raise SnapshotChanged(f"{inode.path} changed while being read")
    return mapping


async def map_first_chunk(
    inode: CachingInode, pieces: Sequence[Piece], snap: Snapshot, transfer: Transfer
) -> Mapping:
    """Maps the first CHUNK of the first file range of a streamed body, before
    its headers go out: a file that changed since ``snap`` raises
    SnapshotChanged while the request can still be answered afresh."""
    rng = next(piece for piece in pieces if isinstance(piece, Range))
    first = await map_exact(inode, Range(rng.start, min(rng.end, rng.start + CHUNK)), snap)
    transfer.note(first)
    return first


async def small_body(
    inode: CachingInode, snap: Snapshot, plan: BodyPlan, transfer: Transfer
) -> bytes | bytearray:
    """The whole body of a small ``plan``, copied out of the cache.

    A body of one range is that range's copy itself; a multipart body is
    assembled in one buffer. Raises SnapshotChanged if a write changed a
    range before its copy was complete.
    """
    pieces = plan.pieces
    body: bytes | bytearray
    if len(pieces) == 1 and isinstance(pieces[0], Range):
        body = await range_bytes(inode, pieces[0], snap, transfer)
    else:
        body = bytearray(plan.length)
        out = memoryview(body)
        pos = 0
        for piece in pieces:
            data = (
                piece
                if isinstance(piece, bytes)
                else await range_bytes(inode, piece, snap, transfer)
            )
            out[pos : pos + len(data)] = data
            pos += len(data)
    return body


async def range_bytes(inode: CachingInode, rng: Range, snap: Snapshot, transfer: Transfer) -> bytes:
    """A copy of ``rng`` as version ``snap`` has it: from the cache under
    data_mu, or through a mapping on a miss; SnapshotChanged if a write
    changed its bytes first. (Nothing awaits between either copy and its
    check, so the check sees the state the copy was made in.)"""
    cached = await inode.read_cached(rng.start, rng.length)
    if cached is not None and len(cached) == rng.length:
        # Cached: one copy under data_mu, no mapping bookkeeping.
        if not snap.holds(inode, rng):
            raise SnapshotChanged(f"{inode.path} changed while being read")
        transfer.note_hit()
        return cached
    mapping = await map_exact(inode, rng, snap)
    try:
        transfer.note(mapping)
        return b"".join(mapping.views())
    finally:
        await mapping.release()


class BodySink(Protocol):
    """Where a streamed body goes: a connection's transport, as seen by one response."""

    async def write(self, data: bytes | memoryview) -> None:
        """Hands ``data`` to the transport (which may keep a reference to it
        until sent); returns once the transport takes more."""

    def unsent(self) -> int:
        """Bytes handed over and not sent yet."""

    async def drain(self) -> None:
        """Returns once every byte handed over has been sent."""

    def abort(self) -> None:
        """Closes the connection at once, unsent bytes dropped."""


class ResponseSink:
    """A BodySink writing through an aiohttp response."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection closed before the response")
        self._response = response  # Immutable.
        self._writer = request.writer  # the response's payload writer. Immutable.
        self._transport = transport  # Immutable.

    async def write(self, data: bytes | memoryview) -> None:
        await self._response.write(data)

    def unsent(self) -> int:
        return self._transport.get_write_buffer_size()

    async def drain(self) -> None:
        await until_sent(self._transport, self._writer.drain)

    def abort(self) -> None:
        self._transport.abort()


async def until_sent(transport: asyncio.Transport, resumed: Callable[[], Awaitable[None]]) -> None:
    """Returns once ``transport`` has sent every byte handed to it.

    A high-water mark of 0 pauses the protocol until the buffer is empty;
    ``resumed`` waits for its resume_writing (or returns if it is not paused).
    """
    if transport.get_write_buffer_size() == 0 or transport.is_closing():
        return
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        await resumed()
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


class BodyStreamer:
    """Streams the file ranges and framing bytes of a large body to a sink,
    releasing each mapping once the sink has sent it."""

    def __init__(
        self, sink: BodySink, inode: CachingInode, snap: Snapshot, transfer: Transfer
    ) -> None:
        self._sink = sink
        self._inode = inode
        self._snap = snap
        self._transfer = transfer
        # Mappings handed to the sink, with the body offset they end at.
        self._held: collections.deque[tuple[int, Mapping]] = collections.deque()
        self._written = 0  # body bytes handed to the sink

    async def send(self, pieces: Sequence[Piece], first: Mapping | None) -> None:
        """Sends ``pieces``; ``first``, if given, maps the start of the first
        range. Raises BodyAborted if the body could not be sent whole."""
        try:
            for piece in pieces:
                if isinstance(piece, bytes):
                    await self._write(piece)
                    continue
                for start in range(piece.start, piece.end, CHUNK):
                    rng = Range(start, min(start + CHUNK, piece.end))
                    if first is not None:
                        mapping, first = first, None
                    else:
                        mapping = await map_exact(self._inode, rng, self._snap)
                        self._transfer.note(mapping)
                    self._held.append((self._written + rng.length, mapping))
                    for view in mapping.views():
                        await self._write(view)
                    await self._release_sent()
            async with asyncio.timeout(SEND_IDLE_TIMEOUT):
                await self._sink.drain()
        except ConnectionError as exc:
            raise BodyAborted(f"client went away: {exc}") from exc
        except TimeoutError:
            self._abort(f"the client accepted nothing for {SEND_IDLE_TIMEOUT:g} s")
            raise BodyAborted("send timeout") from None
        except Exception as exc:
            # The headers are out: an error (file changed, origin failed) can
            # only end the connection.
            self._abort(str(exc))
            raise BodyAborted(str(exc)) from exc
        except asyncio.CancelledError:
            # Shutdown, or the client went away: the body cannot be finished,
            # and the transport must drop the views it still holds.
            self._sink.abort()
            raise
        finally:
            held = [mapping for _, mapping in self._held]
            self._held.clear()
            await release_all([first, *held] if first is not None else held)

    async def _write(self, data: bytes | memoryview) -> None:
        async with asyncio.timeout(SEND_IDLE_TIMEOUT):
            await self._sink.write(data)
        self._written += len(data)
        self._transfer.bytes_sent += len(data)

    async def _release_sent(self) -> None:
        # The transport sends in order: everything but its unsent tail is out.
        sent = self._written - self._sink.unsent()
        done = []
        while self._held and self._held[0][0] <= sent:
            done.append(self._held.popleft()[1])
        await release_all(done)

    def _abort(self, why: str) -> None:
        log.warning("aborting the response for %s mid-body: %s", self._inode.path, why)
        self._sink.abort()


async def stream_body(
    request: web.Request,
    inode: CachingInode,
    snap: Snapshot,
    plan: BodyPlan,
    transfer: Transfer,
) -> web.StreamResponse:
    """Sends a large ``plan``'s headers and body.

    The first range is mapped before the headers go out, so a file that
    changed since ``snap`` raises SnapshotChanged while the handler can
    still start over; later changes raise BodyAborted.
    """
    first = await map_first_chunk(inode, plan.pieces, snap, transfer)
    response = web.StreamResponse(status=plan.status, headers=plan.headers)
    response.content_length = plan.length
    try:
        streamer = BodyStreamer(ResponseSink(request, response), inode, snap, transfer)
        await response.prepare(request)
    except ConnectionError as exc:
        # The client went away before the headers were out: aiohttp ends it.
        await first.release()
        transfer.aborted = f"client went away: {exc}"
        return response
    except BaseException:
        await first.release()
        raise
    try:
        await streamer.send(plan.pieces, first)
    except BodyAborted as exc:
        transfer.aborted = str(exc) or "aborted"
    return response
