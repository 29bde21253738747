"""The data listener's connections: the fast read path first, aiohttp after.

:class:`FastConnection` is the protocol of every accepted connection (see
:mod:`cachesvc.api.fastpath` for what it answers and why). It keeps the
bytes received but not yet answered; requests are answered strictly in
order, one at a time, so pipelined requests keep their order, also across
the hand-off to aiohttp, which receives the unanswered bytes as if they had
just arrived. :class:`FastSite` listens with it in place of aiohttp's
protocol, as a site of the data app's runner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from aiohttp import web

from cachesvc.api.fastpath import FastReads, Reply
from cachesvc.api.http.simple import HEAD_END, SimpleRequest, parse_simple
from cachesvc.api.streaming import until_sent

# Unanswered bytes buffered before a connection stops reading.
MAX_BUFFERED = 64 << 10
# Answers held for the batch beyond this are written at once, so that the
# transport's flow control (pause_writing) bounds what a client that sends
# many requests without reading the answers can make us hold.
MAX_UNSENT = 256 << 10


class WriteBatch:
    """Connections with answers to write once the event loop has handled
    every connection that was readable: the answers go out back to back.

    Written one by one, between two requests' Python work, each answer woke
    the client's thread on the other CPU, and in a VM such a wake-up costs
    about as much as the send itself. Back to back, one wake-up serves
    several. Random 4 KiB cached reads, 64 connections, 2026-11-22, nine
    wrk runs each way, interleaved: a median of 14,683 against 8,778
    requests/s, and of 18 against 35 us of kernel time per request.
    Protected by the event loop.
    """

    def __init__(self) -> None:
        self._connections: list[FastConnection] = []

    def add(self, connection: FastConnection) -> None:
        if not self._connections:
            asyncio.get_running_loop().call_soon(self._flush)
        self._connections.append(connection)

    def _flush(self) -> None:
        connections, self._connections = self._connections, []
        for connection in connections:
            connection.flush()


class FastConnection(asyncio.Protocol):
    """One client connection until it is handed to aiohttp. All fields are
    protected by the event loop."""

    def __init__(
        self,
        reads: FastReads,
        fallback: Callable[[], asyncio.Protocol],
        connections: set[FastConnection],
        batch: WriteBatch,
    ) -> None:
        self._reads = reads
        self._connections = connections  # the listener's open fast connections
        self._batch = batch  # writes the answers at the end of the iteration
        self._unsent: list[bytes | bytearray] = []  # answers not written yet
        self._unsent_bytes = 0
        self._fallback = fallback  # makes aiohttp's protocol for a hand-off
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None  # None once closed or handed off
        self._buffer = bytearray()  # received, not yet answered
        self._answering: asyncio.Task[None] | None = None  # an answer that awaits
        self._reading = True
        self._writing = True  # False while the transport's buffer is full
        self._writable: asyncio.Future[None] | None = None  # a streamed body waits on it
        self._eof = False
        self._last_active = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        # Done once the transport has let go of the connection (and of the
        # buffers it was still sending).
        self.lost: asyncio.Future[None] = self._loop.create_future()

    # Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without
        # deriving from it.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)
        self._idle_timer = self._loop.call_later(self._reads.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._answering is None:
            self._answer_buffered()
        elif len(self._buffer) > MAX_BUFFERED:
            self._pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        # Keep the transport open while an answer is being prepared.
        return self._answering is not None

    def pause_writing(self) -> None:
        self._writing = False
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing = True
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._answering is None and self._transport is not None:
            self._resume_reading()
            self._answer_buffered()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._forget()
        if self._answering is not None:
            self._answering.cancel()

    # Answering

    def _answer_buffered(self) -> None:
        """Answers the complete requests buffered, in order, until one needs
        an await, the client stops reading, or a hand-off."""
        while self._transport is not None and self._writing:
            end = self._buffer.find(HEAD_END)
            if end < 0:
                if self._buffer:
                    self._hand_off()  # an incomplete head: aiohttp's deadlines apply
                elif self._eof:
                    self._close()
                else:
                    self._resume_reading()
                return
            request = parse_simple(bytes(self._buffer[:end]))
            if request is None:
                self._hand_off()
                return
            started = time.monotonic()
            reply = self._reads.answer_now(request)
            if reply is None:
                self._pause_reading()
                self._answering = self._loop.create_task(
                    self._answer_later(request, started), name="fast read"
                )
                return
            self._send(request, reply, end + len(HEAD_END), started)

    async def _answer_later(self, request: SimpleRequest, started: float) -> None:
        in_flight = self._reads.in_flight
        in_flight.enter()
        try:
            reply = await self._reads.answer(request, self)
        except asyncio.CancelledError:  # the connection was lost, or shutdown
            self._answering = None  # else the task and its traceback keep each other
            if self._transport is not None:
                self._transport.abort()  # an answer begun cannot be finished
            self._reads.record(request, None, started)
            raise
        finally:
            in_flight.leave()
        self._answering = None
        if self._transport is None:
            return
        if reply is None:
            self._hand_off()
            return
        self._send(request, reply, self._buffer.find(HEAD_END) + len(HEAD_END), started)
        self._answer_buffered()

    def _send(self, request: SimpleRequest, reply: Reply, consumed: int, started: float) -> None:
        """Writes ``reply`` to the request whose head is the first
        ``consumed`` bytes of the buffer."""
        transport = self._transport
        assert transport is not None
        del self._buffer[:consumed]
        close = self._reads.closes(request)
        if reply.streamed:
            # Written already; cut short if the body was aborted.
            close = close or bool(reply.transfer.aborted)
        else:
            # uvloop sends both buffers with one writev(2).
            head = self._reads.encode(reply, close)
            self._unsent += (head, reply.body)
            self._unsent_bytes += len(head) + len(reply.body)
            if self._unsent_bytes > MAX_UNSENT:
                self.flush()
            else:
                self._batch.add(self)
        self._last_active = self._loop.time()
        self._reads.record(request, reply, started)
        if close:
            self._close()

    # A streamed body's target (fastpath.StreamTarget)

    def write_head(self, head: bytes) -> None:
        self.flush()
        self._live_transport().write(head)

    async def write(self, data: bytes | memoryview) -> None:
        self._live_transport().write(data)
        await self._until_writable()

    def unsent(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    async def drain(self) -> None:
        await until_sent(self._live_transport(), self._until_writable)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _live_transport(self) -> asyncio.Transport:
        if self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        return self._transport

    async def _until_writable(self) -> None:
        """Waits for resume_writing if writing is paused (connection_lost
        cancels the waiting task)."""
        if self._writing:
            return
        self._writable = self._loop.create_future()
        try:
            await self._writable
        finally:
            self._writable = None

    # Connection state

    def flush(self) -> None:
        """Writes the answers not written yet."""
        unsent, self._unsent, self._unsent_bytes = self._unsent, [], 0
        if unsent and self._transport is not None:
            self._transport.writelines(unsent)

    def _hand_off(self) -> None:
        """Gives the connection, and every byte not answered, to aiohttp."""
        self.flush()
        transport = self._transport
        assert transport is not None
        self._forget()
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not self._writing:
            protocol.pause_writing()  # resume_writing now goes to aiohttp
        if self._buffer:
            protocol.data_received(bytes(self._buffer))
            self._buffer.clear()
        if self._eof:
            protocol.eof_received()
        if not self._reading:
            transport.resume_reading()

    def close_if_idle(self) -> None:
        """Closes the connection unless it is answering (shutdown)."""
        if self._answering is None:
            self._close()

    def cancel_answer(self) -> list[asyncio.Future[None]]:
        """Aborts the connection and cancels the answer in progress, if any
        (shutdown, once the grace period is over); returns what to wait for:
        the answer's task, and the transport letting go of its buffers."""
        task, transport = self._answering, self._transport
        self._forget()
        if transport is None:
            return []
        transport.abort()
        if task is None:
            return [self.lost]
        task.cancel()
        return [task, self.lost]

    def _check_idle(self) -> None:
        """Closes a connection that has had no request for the idle timeout."""
        if self._transport is None:
            return
        due = self._last_active + self._reads.idle_timeout
        if self._answering is None and self._loop.time() >= due:
            self._close()
            return
        self._idle_timer = self._loop.call_at(max(due, self._loop.time() + 1.0), self._check_idle)

    def _close(self) -> None:
        self.flush()
        transport = self._transport
        self._forget()
        if transport is not None:
            transport.close()

    def _forget(self) -> None:
        """Detaches from the transport and the listener's connection set."""
        self._transport = None
        self._connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _pause_reading(self) -> None:
        if self._reading and self._transport is not None:
            self._reading = False
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self._transport is not None:
            self._reading = True
            self._transport.resume_reading()


class FastSite(web.TCPSite):
    """A TCP site of the data runner whose connections start on the fast path."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, reads: FastReads, **kwargs: object
    ) -> None:
        super().__init__(runner, host, port, **kwargs)  # type: ignore[arg-type]
        self._reads = reads
        self.connections: set[FastConnection] = set()  # open, not handed off

    def close_idle(self) -> None:
        """Closes every fast connection that is not answering a request."""
        for connection in list(self.connections):
            connection.close_if_idle()

    async def cancel_answers(self) -> None:
        """Aborts the connections still answering and waits for their answers
        to end (and release their mappings)."""
        waits = [w for connection in list(self.connections) for w in connection.cancel_answer()]
        if waits:
            await asyncio.wait(waits)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        reads, connections, batch = self._reads, self.connections, WriteBatch()
        self._server = await asyncio.get_running_loop().create_server(
            lambda: FastConnection(reads, server, connections, batch),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
