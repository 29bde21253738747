"""GET and HEAD of a file through aiohttp: a thin adapter over the read
policy (:mod:`cachesvc.api.reads`).

The fast read path (:mod:`cachesvc.api.fastpath`) answers the plain
requests itself; aiohttp's handler answers the rest (conditionals,
If-Range, several ranges, 416, requests the fast path gave up on) with the
same :func:`~cachesvc.api.reads.plan_read` and
:func:`~cachesvc.api.reads.read`, so both send the same status, headers and
bytes. Here a plan becomes an aiohttp response, and a streamed body goes
through :class:`ResponseSink`.
"""

from __future__ import annotations

from aiohttp import web

from cachesvc.api.access import Transfer
from cachesvc.api.errors import ApiError, reason_code
from cachesvc.api.listener import DataState
from cachesvc.api.reads import ReadPlan, Snapshot, content_type, plan_read, read
from cachesvc.api.streaming import BodySink, until_sent
from cachesvc.api.webrequest import TRANSFER_KEY, conditions, joined


async def read_file(request: web.Request, state: DataState, path: str) -> web.StreamResponse:
    """GET and HEAD of one file."""
    values = request.headers.getall("Range", [])
    range_header = values[0] if len(values) == 1 else None  # several: not one valid header
    if_range, sent = joined(request, "If-Range"), conditions(request)
    kind, max_ranges = content_type(path), state.config.max_ranges

    def plan_for(snap: Snapshot) -> ReadPlan:
        return plan_read(snap, kind, max_ranges, request.method, range_header, if_range, sent)

    answer = _WebAnswer(request, request[TRANSFER_KEY])
    async with state.cache.open(path) as inode:
        return await read(inode, answer.transfer, answer, plan_for)


class _WebAnswer:
    """One request's answer as an aiohttp response (a reads.FrontEnd)."""

    def __init__(self, request: web.Request, transfer: Transfer) -> None:
        self._request = request  # Immutable.
        self.transfer = transfer  # Immutable (the object; its fields change).

    def complete(self, plan: ReadPlan, body: bytes | bytearray) -> web.StreamResponse:
        headers = plan.headers()
        if plan.status >= 400:
            raise ApiError(plan.status, reason_code(plan.status), plan.reason, headers)
        if plan.status == 304:
            return web.Response(status=304, headers=headers)
        if plan.head:
            headers["Content-Length"] = str(plan.length)
            return web.Response(status=plan.status, headers=headers)
        self.transfer.bytes_sent = len(body)
        return web.Response(status=plan.status, headers=headers, body=body)

    async def begin_stream(self, plan: ReadPlan) -> tuple[web.StreamResponse, BodySink | None]:
        response = web.StreamResponse(status=plan.status, headers=plan.headers())
        response.content_length = plan.length
        try:
            sink = ResponseSink(self._request, response)
            await response.prepare(self._request)
        except ConnectionError as exc:
            # The client went away before the headers were out: aiohttp ends it.
            self.transfer.aborted = f"client went away: {exc}"
            return response, None
        return response, sink


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
