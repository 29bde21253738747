"""The data listener's aiohttp app: ``/files/<path>`` and ``/healthz`` (DESIGN.md "HTTP data API").

Translates HTTP to FileCache calls. This module dispatches; the jobs are
done by :mod:`cachesvc.api.webreads` (GET and HEAD of a file, over the read
policy of :mod:`cachesvc.api.reads` that the fast path shares),
:mod:`cachesvc.api.listing` (GET and HEAD of a directory) and
:mod:`cachesvc.api.writes` (PUT, PATCH, POST, DELETE). Errors become JSON
responses through :mod:`cachesvc.api.errors` (the one status table).

Paths are taken from the raw request target (the part after ``/files/``,
without the query) and decoded once by
:func:`~cachesvc.api.http.paths.decode_raw_path`. A path ending in ``/``
(and ``/files/`` itself) names a directory and can only be listed; a
directory named without the trailing slash is 404, like any other non-file
(no redirect: nothing is revealed about what is not a regular file, and no
extra origin request is made on a miss).

Every request is logged and counted once by :func:`access_middleware`
(:mod:`cachesvc.api.access`, as the fast path does), and every response
carries ``X-Cachesvc-Instance``.
"""

from __future__ import annotations

import html
import json
import time
import urllib.parse
from collections.abc import AsyncIterator

from aiohttp import web

from cachesvc.api.access import CLIENT_GONE, Transfer, record_request
from cachesvc.api.errors import ApiError, Handler, error_middleware
from cachesvc.api.http import HeaderError
from cachesvc.api.http.conditions import format_etag
from cachesvc.api.http.paths import BadPath, validate_path
from cachesvc.api.http.ranges import (
    WriteRange,
    parse_content_range,
    parse_decimal,
    parse_update_range,
)
from cachesvc.api.listener import INSTANCE_ID, DataState
from cachesvc.api.metrics import Metrics
from cachesvc.api.reads import Snapshot
from cachesvc.api.webreads import read_file
from cachesvc.api.webrequest import (
    STATE_KEY,
    TRANSFER_KEY,
    check_preconditions,
    conditions,
    files_target,
    sync_requested,
)
from cachesvc.api.writes import (
    SABREDAV_PARTIAL_UPDATE,
    check_body_coding,
    check_write_allowed,
    stage_body,
    stream_body_chunks,
)
from cachesvc.config import Config
from cachesvc.core.cache import FileCache
from cachesvc.core.ranges import MAX_OFFSET, Range
from cachesvc.origins.base import DirEntry, OriginNotFound
from cachesvc.wire import FILES_PREFIX, INSTANCE_HEADER, format_http_date

FILE_METHODS = "GET, HEAD, PUT, PATCH, POST, DELETE"


def make_data_app(cache: FileCache, config: Config, metrics: Metrics) -> web.Application:
    """The data listener's app. Run it with ``listener.runner_options()``."""
    app = web.Application(middlewares=[access_middleware, error_middleware])
    app[STATE_KEY] = DataState(cache, config, metrics)
    app.on_response_prepare.append(_add_instance_header)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/files/{tail:[\\s\\S]*}", files)
    return app


# ---------------------------------------------------------------------------
# Middleware


async def _add_instance_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[INSTANCE_HEADER] = INSTANCE_ID


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One access log line and the request metrics per request."""
    started = time.monotonic()
    transfer = Transfer()
    request[TRANSFER_KEY] = transfer
    status = CLIENT_GONE  # the handler was cancelled
    sent = 0
    try:
        response = await handler(request)
        status = response.status
        sent = transfer.bytes_sent
        if not sent and isinstance(response, web.Response) and request.method != "HEAD":
            sent = response.content_length or 0
        return response
    except Exception:
        status = 500
        raise
    finally:
        record_request(
            request.app[STATE_KEY].metrics,
            request.method,
            request.rel_url.raw_path_qs,
            status,
            sent,
            time.monotonic() - started,
            transfer,
        )


# ---------------------------------------------------------------------------
# Dispatch


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def files(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    target = files_target(request)
    method = request.method
    if method in ("GET", "HEAD"):
        if target.is_dir:
            return await list_directory(request, state, target.path)
        return await read_file(request, state, target.path)
    if method not in ("PUT", "PATCH", "POST", "DELETE"):
        raise ApiError(
            405, "method_not_allowed", f"{method} is not allowed", {"Allow": FILE_METHODS}
        )
    if target.is_dir:
        raise ApiError(
            405, "method_not_allowed", "a directory can only be listed", {"Allow": "GET, HEAD"}
        )
    check_writable(request, state)
    if method == "PUT":
        return await put_file(request, state, target.path)
    if method == "PATCH":
        return await patch_file(request, state, target.path)
    if method == "POST":
        return await post_file(request, state, target.path)
    return await delete_file(request, state, target.path)


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


# ---------------------------------------------------------------------------
# Listings


def _visible(entry: DirEntry) -> bool:
    """Whether a name could be requested at all (valid UTF-8, no control characters ...)."""
    try:
        validate_path(entry.name)
    except BadPath:
        return False
    return "/" not in entry.name


async def list_directory(request: web.Request, state: DataState, path: str) -> web.Response:
    """GET and HEAD of ``/files/<dir>/``: nginx ``autoindex_format json`` or HTML."""
    entries = [e for e in await state.cache.origin.list_dir(path) if _visible(e)]
    entries.sort(key=lambda e: (not e.is_dir, e.name))
    prefix = f"{path}/" if path else ""
    items: list[dict[str, object]] = []
    for entry in entries:
        item: dict[str, object] = {
            "name": entry.name,
            "type": "directory" if entry.is_dir else "file",
        }
        size, mtime = entry.size, entry.mtime
        cached = None if entry.is_dir else state.cache.lookup(prefix + entry.name)
        if cached is not None:  # newer than the origin while dirty here
            size, mtime = cached.attr.size, cached.attr.mtime
        item["mtime"] = format_http_date(mtime)
        if not entry.is_dir:
            item["size"] = size
        items.append(item)
    accept = request.headers.get("Accept", "").lower()
    if "application/json" in accept:
        return web.Response(
            text=json.dumps(items, ensure_ascii=False), content_type="application/json"
        )
    return web.Response(
        text=_html_index(f"{FILES_PREFIX}{prefix}", items), content_type="text/html"
    )


def _html_index(location: str, items: list[dict[str, object]]) -> str:
    title = html.escape(f"Index of {location}")
    lines = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{title}</title></head>",
        f"<body><h1>{title}</h1><hr><pre>",
        '<a href="../">../</a>',
    ]
    for item in items:
        name = str(item["name"])
        is_dir = item["type"] == "directory"
        href = urllib.parse.quote(name) + ("/" if is_dir else "")
        label = html.escape(name + ("/" if is_dir else ""))
        size = "-" if is_dir else str(item["size"])
        lines.append(f'<a href="{href}">{label}</a>  {item["mtime"]}  {size}')
    lines += ["</pre><hr></body></html>", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Writes


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
