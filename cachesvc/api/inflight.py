"""Counts the requests being handled, so that shutdown can wait for them.

Both listeners count through :meth:`InFlight.middleware`; the fast read
path (:mod:`cachesvc.api.fastpath`) counts the requests it answers
asynchronously with :meth:`InFlight.enter` and :meth:`InFlight.leave`.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Middleware

from cachesvc.api.errors import Handler


class InFlight:
    """The number of requests being handled. All fields are protected by
    the event loop."""

    def __init__(self) -> None:
        self.count = 0  # handlers running
        self.stopping = False  # set once shutdown begins
        self._idle = asyncio.Event()  # set whenever count is zero
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def middleware(self) -> Middleware:
        """The outermost middleware of an app: counts its requests."""

        @web.middleware
        async def count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.enter()
            try:
                response = await handler(request)
            finally:
                self.leave()
            if self.stopping:
                # The listener is gone: do not keep the connection alive.
                response.force_close()
            return response

        return count_in_flight

    async def wait_idle(self) -> None:
        """Waits until no request is in flight (the caller bounds the wait)."""
        await self._idle.wait()
