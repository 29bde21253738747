"""The HTTP origin's requests other than range reads (HEAD, listings, writes),
over one pooled :class:`aiohttp.ClientSession`.

The session keeps connections alive, has a connection limit and connect and
read timeouts (the same as the range reads' own pool in
:mod:`cachesvc.origins.http.reads`), and is created lazily by the first
request, inside the running loop. aiohttp's failures leave a request as
OriginErrors, reading its body included: timeouts and connection or payload
errors as the transient ones an idempotent request may retry
(:data:`~cachesvc.origins.http.parse.TRANSIENT`), anything else as
OriginUnavailable. What a status means is decided by the caller
(:mod:`cachesvc.origins.http.parse`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from yarl import URL

from cachesvc.origins.base import OriginUnavailable
from cachesvc.origins.http.parse import TransientTimeout, TransientUnavailable


class Session:
    """HttpOrigin's aiohttp requests to its base URL's server."""

    def __init__(
        self,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
    ) -> None:
        self._headers = headers  # Immutable: sent with every request.
        self._connect_timeout = connect_timeout  # Immutable.
        self._read_timeout = read_timeout  # Immutable.
        self._max_connections = max_connections  # Immutable.
        # Created by the first request, inside the running loop; changed only
        # between awaits (no lock needed).
        self._session: aiohttp.ClientSession | None = None
        self._closed = False  # Set by close(); never cleared.

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("HttpOrigin used after close()")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
                ),
                headers=self._headers,
                auto_decompress=False,
            )
        return self._session

    @contextlib.asynccontextmanager
    async def exchange(
        self, method: str, url: URL, *, headers: dict[str, str] | None = None, data: object = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request; aiohttp's failures leave as OriginErrors (body reading included)."""
        what = f"{method} {url}"
        kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": False}
        if data is not None:
            kwargs["data"] = data
        try:
            async with self._client().request(method, url, **kwargs) as resp:
                yield resp
        except TimeoutError as exc:
            raise TransientTimeout(f"{what}: timed out") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise TransientUnavailable(f"{what}: {exc or type(exc).__name__}") from exc
        except aiohttp.ClientError as exc:
            raise OriginUnavailable(f"{what}: {exc or type(exc).__name__}") from exc

    async def close(self) -> None:
        """Closes the session's connections; a request after this is a RuntimeError."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
