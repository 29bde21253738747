"""Write requests of the data API: who may write, and reading their bodies.

Authorization (DESIGN.md): ``--read-only`` refuses every write with 403;
with ``--write-token`` a write needs ``Authorization: Bearer <token>``
(compared with ``hmac.compare_digest``; 401 with ``WWW-Authenticate: Bearer``
otherwise); without a token, a data listener on a non-loopback address
refuses writes with 403 unless ``--allow-anonymous-writes``.

Bodies are never read whole with ``request.read()`` (aiohttp's
``client_max_size`` does not apply here): a full PUT streams
``request.content`` in chunks straight to the origin, and a partial write
is staged in memory, bounded by ``--max-partial-write`` (413), so that a
body that ends early or a client that goes away changes nothing.
Multipart and content-coded bodies are refused with 415.

A deadline, so that a slow client cannot hold a connection (and cache
pages) forever: :data:`BODY_IDLE_TIMEOUT` (60 s), each read of a request
body must deliver some bytes within this time, else the request fails with
408. (The deadline for a request head is
:data:`cachesvc.api.listener.HEADER_TIMEOUT`.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from cachesvc.api.auth import bearer_token_matches
from cachesvc.api.errors import ApiError
from cachesvc.config import Config

BODY_IDLE_TIMEOUT = 60.0
# Bytes asked for per read of a streamed body.
READ_CHUNK = 1 << 20

SABREDAV_PARTIAL_UPDATE = "application/x-sabredav-partialupdate"


def check_write_allowed(request: web.Request, config: Config) -> None:
    """Raises the 401/403 ApiError unless ``request`` may write."""
    if config.read_only:
        raise ApiError(403, "read_only", "the server is read-only (--read-only)")
    if config.write_token:
        given = request.headers.get("Authorization", "")
        if not bearer_token_matches(given, config.write_token):
            raise ApiError(
                401,
                "unauthorized",
                "writes need 'Authorization: Bearer <write token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        return
    if not config.listen.is_loopback and not config.allow_anonymous_writes:
        raise ApiError(
            403,
            "forbidden",
            "writes are refused on a non-loopback listener without --write-token"
            " (or --allow-anonymous-writes)",
        )


def check_body_coding(request: web.Request) -> None:
    """Raises 415 for multipart or content-coded request bodies."""
    content_type = request.headers.get("Content-Type", "")
    if content_type.strip().lower().startswith("multipart/"):
        raise ApiError(415, "unsupported_media_type", "multipart request bodies are not accepted")
    for value in request.headers.getall("Content-Encoding", []):
        for coding in value.split(","):
            if coding.strip().lower() not in ("", "identity"):
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"content-coded request bodies are not accepted ({coding.strip()})",
                )


async def _read_some(request: web.Request) -> bytes:
    """The next piece of the body (b"" at its end), within the idle deadline.

    Raises ApiError 408 on the deadline and 400 when the body ends before
    its announced length or the connection breaks.
    """
    try:
        async with asyncio.timeout(BODY_IDLE_TIMEOUT):
            return await request.content.readany()
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"no request body bytes for {BODY_IDLE_TIMEOUT:g} s"
        ) from None
    except web.HTTPException:
        raise
    except Exception as exc:
        # The connection broke, or one of aiohttp's payload errors
        # (ContentLengthError, TransferEncodingError ...).
        raise ApiError(400, "incomplete_body", f"request body incomplete: {exc}") from exc


async def stream_body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in pieces of at most :data:`READ_CHUNK` bytes."""
    while True:
        data = await _read_some(request)
        if not data:
            return
        for pos in range(0, len(data), READ_CHUNK):
            yield data[pos : pos + READ_CHUNK]


async def stage_body(request: web.Request, expected: int | None, limit: int) -> bytearray:
    """Reads a whole partial-write body into memory.

    ``expected`` is the length the write range demands (None: any length).
    A ``Content-Length`` that cannot fit is refused before reading (413
    above ``limit``, 400 when it differs from ``expected``); so is a body
    that turns out longer than ``limit``, shorter or longer than
    ``expected``, or incomplete.
    """
    declared = request.content_length
    if declared is not None:
        if declared > limit:
            raise ApiError(
                413, "too_large", f"partial write of {declared} bytes exceeds {limit} bytes"
            )
        if expected is not None and declared != expected:
            raise ApiError(
                400,
                "bad_length",
                f"body is {declared} bytes but the range holds {expected}",
            )
    if expected is not None and expected > limit:
        raise ApiError(413, "too_large", f"partial write of {expected} bytes exceeds {limit} bytes")
    body = bytearray()
    while True:
        data = await _read_some(request)
        if not data:
            break
        if len(body) + len(data) > limit:
            raise ApiError(413, "too_large", f"partial write body exceeds {limit} bytes")
        body += data
    if expected is not None and len(body) != expected:
        raise ApiError(
            400, "bad_length", f"body is {len(body)} bytes but the range holds {expected}"
        )
    return body
