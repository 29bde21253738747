"""The data listener: ``/files/<path>`` and ``/healthz`` (DESIGN.md "HTTP data API").

Translates HTTP to FileCache calls; errors become JSON responses through
:mod:`cachesvc.api.errors` (the one status table), byte ranges and
preconditions are read by :mod:`cachesvc.api.httpranges`, bodies are sent
by :mod:`cachesvc.api.responses` and read by :mod:`cachesvc.api.writes`.

Paths are taken from the raw request target (the part after ``/files/``,
without the query) and decoded once by :func:`decode_raw_path`. A path
ending in ``/`` (and ``/files/`` itself) names a directory and can only be
listed; a directory named without the trailing slash is 404, like any
other non-file (no redirect: nothing is revealed about what is not a
regular file, and no extra origin request is made on a miss).

Every request is logged once on ``cachesvc.access`` (INFO) with method,
path, status, body bytes sent, duration and cache hit/miss, and counted in
``cachesvc_http_requests_total`` / ``cachesvc_http_request_duration_seconds``.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import mimetypes
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from cachesvc.api.errors import ApiError, Handler, error_middleware
from cachesvc.api.http import HeaderError
from cachesvc.api.http.conditions import evaluate_preconditions, format_etag, if_range_allows
from cachesvc.api.http.paths import BadPath, RequestPath, decode_raw_path, validate_path
from cachesvc.api.http.ranges import (
    RangeKind,
    WriteRange,
    parse_content_range,
    parse_decimal,
    parse_range,
    parse_update_range,
    unsatisfied_content_range,
)
from cachesvc.api.metrics import Metrics
from cachesvc.api.responses import (
    SMALL_BODY,
    BodyPlan,
    Snapshot,
    SnapshotChanged,
    Transfer,
    head_response,
    small_body,
    stream_body,
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

access_log = logging.getLogger("cachesvc.access")

# Methods counted under their own name in metrics; others are "OTHER".
KNOWN_METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"})
FILE_METHODS = "GET, HEAD, PUT, PATCH, POST, DELETE"
# A read whose file keeps changing under it is started over at most this often.
READ_ATTEMPTS = 5
_CONDITIONAL = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
_TRUE = frozenset({"", "1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


@dataclass(frozen=True, slots=True)
class DataState:
    """What the data handlers share. Immutable."""

    cache: FileCache
    config: Config
    metrics: Metrics


STATE_KEY = web.AppKey("data_state", DataState)
TRANSFER_KEY = web.RequestKey("transfer", Transfer)


def make_data_app(cache: FileCache, config: Config, metrics: Metrics) -> web.Application:
    """The data listener's app. Run it with ``writes.runner_options()``."""
    app = web.Application(middlewares=[access_middleware, error_middleware])
    app[STATE_KEY] = DataState(cache, config, metrics)
    app.on_response_prepare.append(_add_instance_header)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/files/{tail:[\\s\\S]*}", files)
    return app


# ---------------------------------------------------------------------------
# Middleware


# Unique to this run of the process: a client that fronts us (an upper
# cachesvc tier) notices a restart that lost its unsynced writes.
INSTANCE_ID = uuid.uuid4().hex


async def _add_instance_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[INSTANCE_HEADER] = INSTANCE_ID


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One access log line and the request metrics per request."""
    started = time.monotonic()
    transfer = Transfer()
    request[TRANSFER_KEY] = transfer
    status = 499  # the client went away (the handler was cancelled)
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


def record_request(
    metrics: Metrics,
    method: str,
    target: str,
    status: int,
    sent: int,
    seconds: float,
    transfer: Transfer,
) -> None:
    """Counts one answered request and writes its access log line."""
    method = method if method in KNOWN_METHODS else "OTHER"
    metrics.observe_request(method, status, seconds)
    if access_log.isEnabledFor(logging.INFO):  # skip building the record
        path = target[:1024]
        access_log.info(
            "%s %s %d",
            method,
            path,
            status,
            extra={
                "method": method,
                "path": path,
                "status": status,
                "bytes": sent,
                "duration": round(seconds, 6),
                "cache": transfer.cache_status,
                **({"aborted": transfer.aborted} if transfer.aborted else {}),
            },
        )


# ---------------------------------------------------------------------------
# Dispatch


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _target(request: web.Request) -> RequestPath:
    raw = request.rel_url.raw_path
    if not raw.startswith(FILES_PREFIX):
        raise ApiError(404, "not_found", "no such resource")
    return decode_raw_path(raw[len(FILES_PREFIX) :])


async def files(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    target = _target(request)
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
    _check_writable(request, state)
    if method == "PUT":
        return await put_file(request, state, target.path)
    if method == "PATCH":
        return await patch_file(request, state, target.path)
    if method == "POST":
        return await post_file(request, state, target.path)
    return await delete_file(request, state, target.path)


def _check_writable(request: web.Request, state: DataState) -> None:
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
# Request details


def _joined(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    return ", ".join(values) if values else None


def _conditions(request: web.Request) -> dict[str, str]:
    """The conditional headers, each field's lines joined with commas."""
    out = {}
    for name in _CONDITIONAL:
        value = _joined(request, name)
        if value is not None:
            out[name] = value
    return out


def _check_preconditions(request: web.Request, snap: Snapshot | None) -> int | None:
    """RFC 9110 §13.2.2 for ``snap`` (None: no such file). Raises 412; returns 304 or None."""
    conditions = _conditions(request)
    if not conditions:
        return None
    outcome = evaluate_preconditions(
        request.method,
        conditions,
        snap.etag if snap else None,
        snap.mtime if snap else None,
        snap is not None,
    )
    if outcome == 412:
        raise ApiError(412, "precondition_failed", "a precondition of the request failed")
    return outcome


def _sync_requested(request: web.Request) -> bool:
    values = request.query.getall("sync", [])
    if not values:
        return False
    value = values[-1].strip().lower()
    if len(values) > 1 or value not in _TRUE | _FALSE:
        raise ApiError(400, "bad_request", "sync must be given once, as 1/true/yes or 0/false/no")
    return value in _TRUE


@functools.lru_cache(maxsize=4096)
def content_type(path: str) -> str:
    return mimetypes.guess_type(path, strict=False)[0] or "application/octet-stream"


async def _current(cache: FileCache, path: str) -> Snapshot | None:
    """The file's attributes now, or None when it does not exist."""
    try:
        async with cache.open(path) as inode:
            return Snapshot.of(inode)
    except OriginNotFound:
        return None


# ---------------------------------------------------------------------------
# Reads


def _requested_ranges(request: web.Request, snap: Snapshot, max_ranges: int) -> list[Range] | None:
    """The ranges to send (None: the whole file); raises 416 when unsatisfiable."""
    values = request.headers.getall("Range", [])
    if len(values) != 1:
        return None  # no Range, or several fields: not one valid header
    if not if_range_allows(_joined(request, "If-Range"), snap.etag, snap.mtime):
        return None
    outcome = parse_range(values[0], snap.size, max_ranges)
    if outcome.kind is RangeKind.IGNORE:
        return None
    if outcome.kind is RangeKind.UNSATISFIABLE:
        raise ApiError(
            416,
            "range_not_satisfiable",
            outcome.reason,
            {**snap.headers(), "Content-Range": unsatisfied_content_range(snap.size)},
        )
    return list(outcome.ranges)


async def read_file(request: web.Request, state: DataState, path: str) -> web.StreamResponse:
    """GET and HEAD of one file."""
    transfer = request[TRANSFER_KEY]
    async with state.cache.open(path) as inode:
        for _ in range(READ_ATTEMPTS):
            snap = Snapshot.of(inode)
            if _check_preconditions(request, snap) == 304:
                return web.Response(status=304, headers=snap.headers())
            ranges = _requested_ranges(request, snap, state.config.max_ranges)
            plan = BodyPlan.build(snap, ranges, content_type(path))
            if request.method == "HEAD":
                return head_response(plan)
            try:
                if plan.length <= SMALL_BODY:
                    body = await small_body(inode, snap, plan, transfer)
                    transfer.bytes_sent = len(body)
                    return web.Response(status=plan.status, headers=plan.headers, body=body)
                return await stream_body(request, inode, snap, plan, transfer)
            except SnapshotChanged:
                continue  # written meanwhile: answer for the new version
    raise ApiError(503, "busy", "the file kept changing while being read; try again")


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
    sync = _sync_requested(request)
    _check_preconditions(request, await _current(state.cache, path))
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
    sync = _sync_requested(request)
    _check_preconditions(request, await _current(state.cache, path))
    body = await stage_body(request, rng.length, state.config.max_partial_write)
    created = False
    try:
        async with state.cache.open(path) as inode:
            _check_preconditions(request, Snapshot.of(inode))
            await state.cache.write(inode, rng.start, memoryview(body), sync=sync)
    except OriginNotFound:
        _check_preconditions(request, None)
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
    sync = _sync_requested(request)
    async with state.cache.open(path) as inode:
        _check_preconditions(request, Snapshot.of(inode))
        where = _patch_range(request, inode.attr.size)
        limit = state.config.max_partial_write
        body = await stage_body(request, where.expected_length, limit)
        # The file may have grown while the body arrived: "append" means now.
        _check_preconditions(request, Snapshot.of(inode))
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
    fsync = _sync_requested(request) or "fsync" in request.query
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
        _check_preconditions(request, Snapshot.of(inode))
        if size is not None:
            await inode.truncate(size)
        if fsync:
            await inode.fsync()
        headers = {"ETag": format_etag(inode.attr.etag)} if size is not None else {}
        return web.Response(status=204, headers=headers)


async def delete_file(request: web.Request, state: DataState, path: str) -> web.Response:
    if _conditions(request):
        _check_preconditions(request, await _current(state.cache, path))
    await state.cache.remove(path)
    return web.Response(status=204)
