"""Streaming a large body from mappings of the cache, with flow control:
transport-neutral, shared by both front ends (no aiohttp here).

As uvicorn's two protocol implementations share ``flow_control``, aiohttp's
handler (:class:`cachesvc.api.webreads.ResponseSink`) and the fast
connection (:class:`cachesvc.api.fastconn.FastConnection`) each give a
:class:`BodySink` over their transport, and one :class:`BodyStreamer`
sends the body through it.

A streamed body is sent in chunks of at most :data:`CHUNK` bytes (less in a
small cache: see :func:`chunk_size`), each a mapping whose memoryviews go
to the sink without copying; uvloop keeps a reference to a buffer it could
not send at once, so each mapping is released only once the transport has
sent every byte of it. When the cache's budget has no room for a chunk
(:class:`~cachesvc.core.budget.NoRoom`), that chunk is read pass-through
(:func:`chunk_of`): origin bytes copied to the sink without caching them.

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

A response describes one version of the file. A write that changes the
bytes being sent (or a new origin version) in the middle of a streamed
response means it cannot be answered any more: the connection is aborted
(:class:`BodyAborted`), so the client sees an incomplete body, never a mix
of two versions. Writes to other bytes of the file, appends included, leave
it alone: the bytes it sends are still those of its version
(:meth:`Version.holds`). A client that reads nothing for
:data:`SEND_IDLE_TIMEOUT` seconds is disconnected the same way, releasing
its mappings.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from cachesvc.api.access import Transfer
from cachesvc.core.budget import NoRoom
from cachesvc.core.inode import CachingInode
from cachesvc.core.mapping import Mapping, release_all
from cachesvc.core.ranges import Range

log = logging.getLogger("cachesvc.api")

# Bytes mapped (and held) per step of a streamed body, at most; and at least,
# however small the cache.
CHUNK = 4 << 20
MIN_CHUNK = 256 << 10
# A response maps at most this share of the page-cache budget at once, so
# that concurrent streams do not hold the whole cache.
CHUNK_SHARE = 32
# A streamed response whose client takes longer than this to accept one
# chunk is aborted.
SEND_IDLE_TIMEOUT = 60.0

# A piece of a response body: framing bytes, or a range of the file.
Piece = bytes | Range


class SnapshotChanged(Exception):
    """The file changed (ETag or size) between planning and mapping a body."""


class BodyAborted(Exception):
    """The connection was closed mid-body (client gone, file changed, too slow)."""


class Version(Protocol):
    """The version of a file a response describes (a
    :class:`cachesvc.api.reads.Snapshot`)."""

    def holds(self, inode: CachingInode, rng: Range) -> bool:
        """Whether the inode's bytes of ``rng`` are still this version's."""


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


def chunk_size(inode: CachingInode) -> int:
    """Bytes one response maps at once: CHUNK, or a 32nd of the budget if
    that is less, at least MIN_CHUNK."""
    return min(CHUNK, max(MIN_CHUNK, inode.host.budget.limit // CHUNK_SHARE))


async def chunk_of(
    inode: CachingInode, rng: Range, version: Version, transfer: Transfer
) -> Mapping | bytes:
    """The bytes of ``rng`` as ``version`` has them: mapped from the cache, or,
    when the budget has no room for them, a pass-through copy. Raises
    SnapshotChanged if they are no longer ``version``'s."""
    try:
        mapping = await inode.map_range(rng.start, rng.length)
    except NoRoom:
        data = await inode.read_through(rng.start, rng.length)
        # Nothing awaits between the copy and the check.
        if len(data) != rng.length or not version.holds(inode, rng):
            raise SnapshotChanged(f"{inode.path} changed while being read") from None
        transfer.note_bypass(len(data))
        return data
    if mapping.length != rng.length or not version.holds(inode, rng):
        await mapping.release()
        raise SnapshotChanged(f"{inode.path} changed while being read")
    transfer.note(mapping)
    return mapping


async def first_chunk(
    inode: CachingInode, pieces: Sequence[Piece], version: Version, transfer: Transfer
) -> Mapping | bytes:
    """The first chunk of the first file range of a streamed body, taken
    before its headers go out: a file that changed since ``version`` raises
    SnapshotChanged while the request can still be answered afresh."""
    rng = next(piece for piece in pieces if isinstance(piece, Range))
    end = min(rng.end, rng.start + chunk_size(inode))
    return await chunk_of(inode, Range(rng.start, end), version, transfer)


class BodyStreamer:
    """Streams the file ranges and framing bytes of a large body to a sink,
    releasing each mapping once the sink has sent it. All fields are
    protected by the event loop (one task streams)."""

    def __init__(
        self, sink: BodySink, inode: CachingInode, version: Version, transfer: Transfer
    ) -> None:
        self._sink = sink
        self._inode = inode
        self._version = version
        self._transfer = transfer
        # Mappings handed to the sink, with the body offset they end at.
        self._held: collections.deque[tuple[int, Mapping]] = collections.deque()
        self._written = 0  # body bytes handed to the sink

    async def send(self, pieces: Sequence[Piece], first: Mapping | bytes | None) -> None:
        """Sends ``pieces``; ``first``, if given, holds the start of the first
        range (see first_chunk). Raises BodyAborted if the body could not be
        sent whole."""
        chunk = chunk_size(self._inode)
        try:
            for piece in pieces:
                if isinstance(piece, bytes):
                    await self._write(piece)
                    continue
                for start in range(piece.start, piece.end, chunk):
                    rng = Range(start, min(start + chunk, piece.end))
                    if first is not None:
                        part, first = first, None
                    else:
                        part = await chunk_of(self._inode, rng, self._version, self._transfer)
                    if isinstance(part, bytes):
                        await self._write(part)  # pass-through: nothing to release
                        continue
                    self._held.append((self._written + rng.length, part))
                    for view in part.views():
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
            if isinstance(first, Mapping):
                held.append(first)
            await release_all(held)

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
