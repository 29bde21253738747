"""The HTTP origin's range GETs, received straight into the caller's buffers.

:class:`RangeClient` keeps a pool of keep-alive HTTP/1.1 connections to one
origin and sends ``GET`` requests on them; a response's body is received by
the kernel directly into the buffers the caller gives (the cache's memory
file pages), with no copy in between. Everything else the HTTP origin sends
(HEAD, listings, writes) stays on aiohttp.

Why not aiohttp for the reads. A cold sequential read of a 64 MiB file
through cachesvc, from nginx behind a proxy adding 2 ms per request
(``benchmarks/origin_bench.py``), is nearly CPU-bound on the 2-core
benchmark VM: cachesvc, the proxy, nginx and curl leave the cores idle 7% of
the time under ``perf record -a`` and 20-30% without it (2026-11-22). Of the 183 ms cachesvc's event
loop spent on such a read with aiohttp's client, 25 ms went to copying
(uvloop copies each read into a new ``bytes``, aiohttp joins them, the body
was copied into the pages), 26 ms to page faults on the freshly allocated
``bytes`` and 42 ms to the Python of aiohttp's parser and stream reader.
Here the loop's part is a ``recv`` into the page and two small Python calls
per ``recv`` (``get_buffer`` and ``buffer_updated`` of an
:class:`asyncio.BufferedProtocol`, which uvloop supports with and without
TLS): 81 ms for the same read, and the cold pass went from 1.27-1.35x
rclone's time to 1.11-1.15x (together with the overlapped populate in
MemoryFile.allocate_and_fill).

What it handles, as the origin needs it: response heads (1xx answers are
skipped; :func:`~cachesvc.origins.http.parse.parse_response_head`), bodies
framed by ``Content-Length``, by chunked transfer coding or by the end of the
connection, keep-alive (``Connection: close`` and HTTP/1.0 honoured), https
with the default certificate checks, a connect timeout and a read timeout that
counts from the last bytes received. A connection is reused only when its
response was read to the end; one that was idle and turns out closed by the
server before answering is replaced once, at once (the request was not seen).
Failures leave as the origin's transient errors (TransientUnavailable,
TransientTimeout), malformed heads as OriginUnavailable.

Only the body's identity bytes go straight into the caller's buffers; heads,
chunk framing, skipped bytes and error bodies go through a small scratch
buffer. Nothing is written into the caller's buffers once the call that got
them has returned, raised or been cancelled: the protocol forgets them
first, and the connection is closed, not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from cachesvc.origins.base import OriginUnavailable
from cachesvc.origins.http.parse import (
    ResponseHead,
    TransientTimeout,
    TransientUnavailable,
    parse_response_head,
)

# Bytes per receive while not receiving into the caller's buffers.
_SCRATCH = 64 << 10
# A response head (or a chunk-size line or trailer) longer than this is refused.
_HEAD_LIMIT = 64 << 10
# Seconds an idle connection is kept for reuse (aiohttp's keepalive_timeout).
_IDLE_LIMIT = 15.0


class BufferSink:
    """Consecutive buffers, filled in order from a starting offset."""

    def __init__(self, buffers: Sequence[memoryview], start: int) -> None:
        self._buffers = buffers
        self._index = 0
        self._pos = start
        while self._index < len(buffers) and self._pos >= len(buffers[self._index]):
            self._pos -= len(buffers[self._index])
            self._index += 1
        self.room = sum(len(b) for b in buffers) - start  # bytes still to fill

    def window(self, limit: int) -> memoryview:
        """The next at most ``limit`` unfilled bytes of the current buffer.

        Preconditions: ``0 < limit <= room``.
        """
        buf = self._buffers[self._index]
        return buf[self._pos : self._pos + limit]

    def advance(self, n: int) -> None:
        """Counts ``n`` bytes written into the last window as filled."""
        self.room -= n
        self._pos += n
        while self._index < len(self._buffers) and self._pos == len(self._buffers[self._index]):
            self._index += 1
            self._pos = 0

    def write(self, data: memoryview) -> None:
        """Copies ``data`` in. Preconditions: ``len(data) <= room``."""
        while data:
            window = self.window(min(len(data), self.room))
            window[:] = data[: len(window)]
            data = data[len(window) :]
            self.advance(len(window))


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection: bytes arrive into a scratch buffer (kept in
    ``pending``) or, while a body is being read, into the reader's sink.

    Everything runs on the event loop; a reader waits for one thing at a time.
    """

    def __init__(self, read_timeout: float) -> None:
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self._scratch = memoryview(bytearray(_SCRATCH))
        self.pending = bytearray()  # received, not yet consumed
        # While a body is read directly: the sink and the bytes still to go there.
        self._sink: BufferSink | None = None
        self._direct_left = 0
        self.received = 0  # bytes received since the last request was sent
        self.closed = False  # set when the connection ended, either side
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0  # loop time it went back to the pool

    # ------------------------------------------------------- protocol side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop calls this soon after create_connection returns, which sets
        # it already (its transports are not asyncio.Transport subclasses).
        # Both loops set TCP_NODELAY on their own.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct_left:
            assert self._sink is not None
            return self._sink.window(self._direct_left)
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self._direct_left:
            assert self._sink is not None
            self._sink.advance(nbytes)
            self._direct_left -= nbytes
            if self._direct_left:
                return
        else:
            self.pending += self._scratch[:nbytes]
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --------------------------------------------------------- reader side

    def close(self) -> None:
        self.closed = True
        self._forget_sink()
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.received = 0
        self.transport.write(data)

    async def _wait(self, what: str) -> None:
        """Waits for bytes or the end of the connection; TransientTimeout after
        ``read_timeout`` seconds without a byte."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            while True:
                seen = self.received
                await asyncio.wait([waiter], timeout=self._read_timeout)
                if waiter.done():
                    return
                if self.received == seen:
                    raise TransientTimeout(f"{what}: no bytes for {self._read_timeout:g} s")
        finally:
            self._waiter = None
            waiter.cancel()

    def _ended(self, what: str) -> TransientUnavailable:
        why = f": {self._error}" if self._error else ""
        return TransientUnavailable(f"{what}: the connection closed{why}")

    async def read_until(self, marker: bytes, what: str) -> bytes:
        """The pending bytes up to ``marker`` (which is consumed, not returned)."""
        searched = 0
        while True:
            at = self.pending.find(marker, searched)
            if at >= 0:
                data = bytes(self.pending[:at])
                del self.pending[: at + len(marker)]
                return data
            if len(self.pending) > _HEAD_LIMIT:
                raise OriginUnavailable(f"{what}: more than {_HEAD_LIMIT} bytes without {marker!r}")
            if self.closed:
                raise self._ended(what)
            searched = max(0, len(self.pending) - len(marker) + 1)
            await self._wait(what)

    async def read_into(self, sink: BufferSink | None, n: int, what: str) -> int:
        """Reads up to ``n`` bytes into ``sink`` (dropping them without one);
        fewer only when the connection ends."""
        done = 0
        while True:
            take = min(n - done, len(self.pending))
            if take:
                if sink is not None:
                    sink.write(memoryview(self.pending)[:take])
                del self.pending[:take]
                done += take
            if done == n or self.closed:
                return done
            if sink is not None:
                break
            await self._wait(what)
        # The rest goes straight from the socket into the sink.
        self._sink = sink
        self._direct_left = n - done
        try:
            while self._direct_left and not self.closed:
                await self._wait(what)
        finally:
            done = n - self._direct_left
            self._forget_sink()
        return done

    def _forget_sink(self) -> None:
        self._sink = None
        self._direct_left = 0


@dataclass
class _Body:
    """How a response's body is framed, and how much of it is left."""

    framing: str  # "length", "chunked" or "close"
    left: int = 0  # "length": bytes left; "chunked": bytes left in the chunk
    done: bool = False  # the body has been read to its end


class Response:
    """A response whose head has been read; its body is read on demand."""

    def __init__(self, conn: _Connection, head: ResponseHead, what: str) -> None:
        self._conn = conn
        self.head = head
        self.status = head.status
        self.headers = head.headers
        self._what = what
        self._body = _framing(head, what)

    @property
    def reusable(self) -> bool:
        """Whether the body was read to its end and the connection may be reused."""
        return self._body.done and self.head.keep_alive and not self._conn.closed

    async def read_into(self, sink: BufferSink, skip: int, limit: int) -> int:
        """Drops the first ``skip`` body bytes, then reads up to ``limit`` into
        ``sink`` (fewer at the end of the body); returns the bytes read in.

        Preconditions: ``limit <= sink.room``.
        """
        if skip:
            await self._read(None, skip)
        return await self._read(sink, limit)

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (all of it if shorter)."""
        buf = bytearray(limit)
        n = await self._read(BufferSink([memoryview(buf)], 0), limit)
        return bytes(buf[:n])

    async def _read(self, sink: BufferSink | None, n: int) -> int:
        body, conn, what = self._body, self._conn, self._what
        got = 0
        while got < n and not body.done:
            if body.framing == "chunked" and not body.left:
                await self._next_chunk()
                continue
            want = n - got if body.framing == "close" else min(n - got, body.left)
            k = await conn.read_into(sink, want, what)
            got += k
            if body.framing == "close":
                body.done = k < want
                continue
            body.left -= k
            if k < want:
                raise TransientUnavailable(f"{what}: the body ended early (connection closed)")
            if body.left:
                continue
            if body.framing == "length":
                body.done = True
            elif await conn.read_until(b"\r\n", what):  # the CRLF after a chunk
                raise OriginUnavailable(f"{what}: malformed chunked body")
        return got

    async def _next_chunk(self) -> None:
        """Reads the next chunk-size line (and the trailer after the last chunk)."""
        body, conn, what = self._body, self._conn, self._what
        line = await conn.read_until(b"\r\n", what)
        size = line.split(b";", 1)[0].strip()
        if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
            raise OriginUnavailable(f"{what}: malformed chunk size {line[:40]!r}")
        body.left = int(size, 16)
        if not body.left:
            while await conn.read_until(b"\r\n", what):
                pass  # trailer fields, ignored
            body.done = True


def _framing(head: ResponseHead, what: str) -> _Body:
    """The body framing of a response to a GET (RFC 9112, section 6.3)."""
    if head.status in (204, 304):
        return _Body("length", done=True)
    values = head.headers.getall("Transfer-Encoding", [])
    codings = [c.strip().lower() for v in values for c in v.split(",")]
    if codings:
        return _Body("chunked" if codings[-1] == "chunked" else "close")
    values = head.headers.getall("Content-Length", [])
    lengths = {v.strip() for v in values}
    if not lengths:
        return _Body("close")
    value = lengths.pop()
    if lengths or not value.isdigit() or not value.isascii():
        raise OriginUnavailable(f"{what}: bad Content-Length {values}")
    return _Body("length", int(value), done=value.strip("0") == "")


class RangeClient:
    """Pooled HTTP/1.1 GETs to one origin, bodies received into caller buffers."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        host_header: str,
        headers: Mapping[str, str],
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
    ) -> None:
        self._host = host  # Immutable.
        self._port = port  # Immutable.
        self._tls = tls  # Immutable.
        self._connect_timeout = connect_timeout  # Immutable.
        self._read_timeout = read_timeout  # Immutable.
        # Immutable: the request head's fields sent with every request.
        self._fields = _fields({"Host": host_header, **headers})
        self._slots = asyncio.Semaphore(max_connections)  # connections open or opening
        self._ssl: ssl.SSLContext | None = None  # created by the first https connection
        # Idle connections, most recently used last. Changed only between awaits.
        self._idle: list[_Connection] = []
        self._closed = False  # set by close(); never cleared

    @contextlib.asynccontextmanager
    async def get(
        self, target: str, headers: Mapping[str, str], what: str
    ) -> AsyncIterator[Response]:
        """Sends ``GET target`` with ``headers``; yields the response once its
        head has arrived. The connection goes back to the pool if the body was
        read to its end, else it is closed."""
        if self._closed:
            raise RuntimeError("RangeClient used after close()")
        request = f"GET {target} HTTP/1.1\r\n{self._fields}{_fields(headers)}\r\n".encode("latin-1")
        async with self._slots:
            conn, reused = await self._connection(what)
            try:
                conn.send(request)
                try:
                    head = await _read_head(conn, what)
                except TransientUnavailable:
                    if not reused or conn.received:
                        raise
                    # An idle connection the server had closed: try a new one.
                    conn.close()
                    conn, _ = await self._connection(what, fresh=True)
                    conn.send(request)
                    head = await _read_head(conn, what)
                response = Response(conn, head, what)
                yield response
            except BaseException:
                conn.close()
                raise
            if response.reusable and not self._closed:
                conn.idle_since = asyncio.get_running_loop().time()
                self._idle.append(conn)
            else:
                conn.close()

    async def _connection(self, what: str, *, fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle connection (True) or a new one (False)."""
        now = asyncio.get_running_loop().time()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < _IDLE_LIMIT and not conn.pending:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(self._read_timeout),
                    self._host,
                    self._port,
                    ssl=self._ssl_context() if self._tls else None,
                    server_hostname=self._host if self._tls else None,
                )
        except TimeoutError as exc:
            raise TransientTimeout(f"{what}: connect timed out") from exc
        except OSError as exc:
            raise TransientUnavailable(f"{what}: {exc}") from exc
        conn.transport = transport
        return conn, False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def close(self) -> None:
        """Closes the idle connections; those in use are closed when released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


async def _read_head(conn: _Connection, what: str) -> ResponseHead:
    """The next final (non-1xx) response head on ``conn``."""
    while True:
        head = parse_response_head(await conn.read_until(b"\r\n\r\n", what), what)
        if head.status >= 200:
            return head
        if head.status == 101:
            raise OriginUnavailable(f"{what}: unexpected 101 Switching Protocols")


def _fields(headers: Mapping[str, str]) -> str:
    """Header fields as request head lines; refuses values that would split the head."""
    lines = []
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} has a line break or NUL")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)
