"""Write requests of the data API: PUT, PATCH, POST and DELETE of a file,
who may write, and reading their bodies.

- ``PUT``: a whole file (atomic replace, 201 or 204 with the new ETag), or
  a part of one with ``Content-Range: bytes a-b/*``;
- ``PATCH``: a partial write of an existing file at ``Content-Range``, or at
  SabreDAV's ``X-Update-Range`` (``append`` included); 204 with the new ETag;
- ``POST``: ``?truncate=N`` and/or ``?fsync``;
- ``DELETE``.

Preconditions (If-Match ...) are evaluated against the file as it is
(:func:`cachesvc.api.webrequest.check_preconditions`); ``?sync`` makes a
write reach the origin before the answer.

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
from cachesvc.api.http import HeaderError
from cachesvc.api.http.conditions import format_etag
from cachesvc.api.http.ranges import (
    WriteRange,
    parse_content_range,
    parse_decimal,
    parse_update_range,
)
from cachesvc.api.listener import DataState
from cachesvc.api.reads import Snapshot
from cachesvc.api.webrequest import check_preconditions, conditions, sync_requested
from cachesvc.config import Config
from cachesvc.core.cache import FileCache
from cachesvc.core.ranges import MAX_OFFSET, Range
from cachesvc.origins.base import OriginNotFound

BODY_IDLE_TIMEOUT = 60.0
# Bytes asked for per read of a streamed body.
READ_CHUNK = 1 << 20

SABREDAV_PARTIAL_UPDATE = "application/x-sabredav-partialupdate"


# ---------------------------------------------------------------------------
# Handlers


async def _current(cache: FileCache, path: str) -> Snapshot | None:
    """The file's attributes now, or None when it does not exist."""
    try:
        async with cache.open(path) as inode:
            return Snapshot.of(inode)
    except OriginNotFound:
        return None


async def put_file(request: web.Request, state: DataState, path: str) -> web.Response:
    """Full PUT (atomic replace), or a partial one with ``Content-Range``."""
    content_ranges = request.headers.getall("Content-Range", [])
    if content_ranges:
        if len(content_ranges) > 1:
            raise ApiError(400, "bad_range", "more than one Content-Range")
        try:
            rng = parse_content_range(content_ranges[0])
        except HeaderError as exc:
            raise ApiError(400, "bad_range", str(exc)) from exc
        return await _partial_put(request, state, path, rng)
    sync = sync_requested(request)
    check_preconditions(request, await _current(state.cache, path))
    failures: list[BaseException] = []

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream_body_chunks(request):
                yield chunk
        except BaseException as exc:
            failures.append(exc)
            raise

    try:
        inode, created = await state.cache.replace(path, chunks())
    except Exception:
        # The origin may wrap the body's error: report the body's own.
        if failures and isinstance(failures[0], Exception):
            raise failures[0] from None
        raise
    if sync:
        await inode.fsync()
    return web.Response(
        status=201 if created else 204, headers={"ETag": format_etag(inode.attr.etag)}
    )


async def _partial_put(
    request: web.Request, state: DataState, path: str, rng: Range
) -> web.Response:
    sync = sync_requested(request)
    check_preconditions(request, await _current(state.cache, path))
    body = await stage_body(request, rng.length, state.config.max_partial_write)
    created = False
    try:
        async with state.cache.open(path) as inode:
            check_preconditions(request, Snapshot.of(inode))
            await state.cache.write(inode, rng.start, memoryview(body), sync=sync)
    except OriginNotFound:
        check_preconditions(request, None)
        created = True
        async with state.cache.open(path, create=True) as inode:
            await state.cache.write(inode, rng.start, memoryview(body), sync=sync)
    return web.Response(status=201 if created else 204)


def _patch_range(request: web.Request, size: int) -> WriteRange:
    """Where a PATCH writes: ``Content-Range``, or SabreDAV's ``X-Update-Range``."""
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    try:
        if content_type == SABREDAV_PARTIAL_UPDATE:
            values = request.headers.getall("X-Update-Range", [])
            if len(values) != 1:
                raise HeaderError(f"{SABREDAV_PARTIAL_UPDATE} needs one X-Update-Range header")
            return parse_update_range(values[0], size)
        values = request.headers.getall("Content-Range", [])
        if len(values) != 1:
            raise HeaderError(
                "PATCH needs one 'Content-Range: bytes a-b/*' header"
                f" (or Content-Type: {SABREDAV_PARTIAL_UPDATE} with X-Update-Range)"
            )
        rng = parse_content_range(values[0])
    except HeaderError as exc:
        raise ApiError(400, "bad_range", str(exc)) from exc
    return WriteRange(rng.start, rng.end)


async def patch_file(request: web.Request, state: DataState, path: str) -> web.Response:
    """A partial write to an existing file; 204 with the new ETag."""
    sync = sync_requested(request)
    async with state.cache.open(path) as inode:
        check_preconditions(request, Snapshot.of(inode))
        where = _patch_range(request, inode.attr.size)
        limit = state.config.max_partial_write
        body = await stage_body(request, where.expected_length, limit)
        # The file may have grown while the body arrived: "append" means now.
        check_preconditions(request, Snapshot.of(inode))
        try:
            rng = _patch_range(request, inode.attr.size).resolve(len(body))
        except HeaderError as exc:
            raise ApiError(400, "bad_range", str(exc)) from exc
        if rng.end > MAX_OFFSET:
            raise ApiError(400, "bad_range", "write would end beyond the largest file offset")
        await state.cache.write(inode, rng.start, memoryview(body), sync=sync)
        return web.Response(status=204, headers={"ETag": format_etag(inode.attr.etag)})


async def post_file(request: web.Request, state: DataState, path: str) -> web.Response:
    """``?truncate=N`` and/or ``?fsync``."""
    truncates = request.query.getall("truncate", [])
    fsync = sync_requested(request) or "fsync" in request.query
    if len(truncates) > 1:
        raise ApiError(400, "bad_request", "truncate given more than once")
    if not truncates and "fsync" not in request.query:
        raise ApiError(400, "bad_request", "POST needs ?fsync or ?truncate=N")
    size = None
    if truncates:
        try:
            size = parse_decimal(truncates[0], name="truncate", maximum=MAX_OFFSET)
        except HeaderError as exc:
            raise ApiError(400, "bad_request", str(exc)) from exc
    async with state.cache.open(path) as inode:
        check_preconditions(request, Snapshot.of(inode))
        if size is not None:
            await inode.truncate(size)
        if fsync:
            await inode.fsync()
        headers = {"ETag": format_etag(inode.attr.etag)} if size is not None else {}
        return web.Response(status=204, headers=headers)


async def delete_file(request: web.Request, state: DataState, path: str) -> web.Response:
    if conditions(request):
        check_preconditions(request, await _current(state.cache, path))
    await state.cache.remove(path)
    return web.Response(status=204)


# ---------------------------------------------------------------------------
# Who may write


def check_writable(request: web.Request, state: DataState) -> None:
    """Raises the 401/403/405/415 ApiError unless ``request`` may write."""
    check_write_allowed(request, state.config)
    check_body_coding(request)
    if not state.cache.origin.capabilities.writable:
        raise ApiError(
            405,
            "not_supported",
            f"the origin {state.cache.origin.description} is read-only: writes are not possible"
            " (an http(s):// origin takes writes only with --http-origin-writes)",
            {"Allow": "GET, HEAD"},
        )


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


# ---------------------------------------------------------------------------
# Request bodies


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
