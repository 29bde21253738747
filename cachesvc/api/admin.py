"""The admin listener: metrics, health, readiness and operator actions.

Everything but ``/metrics``, ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <admin token>`` when a token is configured (compared
with ``hmac.compare_digest``); a missing or wrong token gets 401 with
``WWW-Authenticate: Bearer``. Actions answer 200 with a JSON body saying
what was done.
"""

from __future__ import annotations

import time
import urllib.parse

from aiohttp import web

from cachesvc import __version__
from cachesvc.api.auth import bearer_token_matches
from cachesvc.api.errors import ApiError, Handler, error_middleware
from cachesvc.api.http import HeaderError
from cachesvc.api.http.paths import validate_path
from cachesvc.api.http.ranges import parse_decimal
from cachesvc.api.metrics import CONTENT_TYPE, Metrics
from cachesvc.config import Config
from cachesvc.core.cache import FileCache
from cachesvc.core.memfile import MemoryKind
from cachesvc.core.ranges import MAX_OFFSET

CACHE_KEY = web.AppKey("cache", FileCache)
CONFIG_KEY = web.AppKey("config", Config)
METRICS_KEY = web.AppKey("metrics", Metrics)
STARTED_KEY = web.AppKey("started", float)

_OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def make_admin_app(cache: FileCache, config: Config, metrics: Metrics) -> web.Application:
    app = web.Application(middlewares=[error_middleware, _auth_middleware])
    app[CACHE_KEY] = cache
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics
    app[STARTED_KEY] = time.time()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/stats", stats)
    app.router.add_get("/admin/files", files)
    app.router.add_post("/admin/evict", evict)
    app.router.add_post("/admin/sync", sync)
    app.router.add_post("/admin/drop", drop)
    app.router.add_post("/admin/pin", pin)
    app.router.add_delete("/admin/pin", unpin)
    return app


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[CONFIG_KEY].admin_token
    authorization = request.headers.get("Authorization", "")
    if token and request.path not in _OPEN_PATHS and not bearer_token_matches(authorization, token):
        raise ApiError(401, "unauthorized", "admin token required", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    cache = request.app[CACHE_KEY]
    problems = []
    try:
        await cache.origin.check()
    except Exception as exc:  # any failure means "not ready", reported as text
        problems.append(f"origin: {exc}")
    if cache.memfile.closed:
        problems.append("memory file closed")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def stats(request: web.Request) -> web.Response:
    cache = request.app[CACHE_KEY]
    config = request.app[CONFIG_KEY]
    memfile = cache.memfile
    counters = cache.counters
    served = counters.hit_bytes + counters.miss_bytes
    return web.json_response(
        {
            "version": __version__,
            "uptime_seconds": round(time.time() - request.app[STARTED_KEY], 3),
            "origin": cache.origin.description,
            "memory": {
                "committed_bytes": {k.value: memfile.committed_bytes(k) for k in MemoryKind},
                "allocated_bytes": {k.value: memfile.allocated_bytes(k) for k in MemoryKind},
                "mapped_bytes": counters.mapped_bytes,
                "evictable_bytes": cache.evictable_bytes,
                "dirty_bytes": counters.dirty_bytes,
                "file_size_bytes": memfile.file_size,
                "limit_bytes": config.cache_size,
            },
            "hit_ratio": (counters.hit_bytes / served) if served else None,
            "counters": counters.as_dict(),
            "files": len(cache.files()),
            "config": {
                "cache_size": config.cache_size,
                "write_mode": str(config.write_mode),
                "dirty_expire": config.dirty_expire,
                "max_dirty": config.max_dirty,
                "readahead": config.readahead,
                "read_only": config.read_only,
                "revalidate": config.revalidate,
            },
        }
    )


async def files(request: web.Request) -> web.Response:
    cache = request.app[CACHE_KEY]
    return web.json_response({"files": [inode.stats() for inode in cache.files()]})


async def evict(request: web.Request) -> web.Response:
    cache = request.app[CACHE_KEY]
    wait = request.query.get("wait", "") in ("1", "true", "yes")
    before = cache.memfile.committed_bytes(MemoryKind.PAGE_CACHE)
    freed = await cache.evict_all(wait=wait)
    body: dict[str, object] = {"evicting": not wait, "freed_bytes": freed}
    if wait:
        body["committed_bytes_before"] = before
        body["committed_bytes_after"] = cache.memfile.committed_bytes(MemoryKind.PAGE_CACHE)
    return web.json_response(body)


async def sync(request: web.Request) -> web.Response:
    cache = request.app[CACHE_KEY]
    failures = await cache.sync_all()
    body = {
        "synced": not failures,
        "failures": [
            {"path": f.path, "ranges": [[a, b] for a, b in f.ranges], "error": f.error}
            for f in failures
        ],
    }
    return web.json_response(body, status=200 if not failures else 502)


def _query_param(request: web.Request, name: str) -> str | None:
    """The value of query parameter ``name``, or None if absent.

    Percent-decoded once as strict UTF-8 (``+`` is a space, as urlencode and
    HTML forms write it); 400 if the query is not UTF-8 or ``name`` repeats.
    """
    try:
        pairs = urllib.parse.parse_qsl(
            request.rel_url.raw_query_string, keep_blank_values=True, errors="strict"
        )
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_request", "query is not valid UTF-8") from exc
    values = [value for key, value in pairs if key == name]
    if len(values) > 1:
        raise ApiError(400, "bad_request", f"?{name}= given more than once")
    return values[0] if values else None


def _path_param(request: web.Request) -> str:
    raw = _query_param(request, "path")
    if raw is None:
        raise ApiError(400, "bad_request", "missing ?path=")
    checked = validate_path(raw)
    if checked.is_dir:
        raise ApiError(400, "bad_path", "path names a directory")
    return checked.path


def _range_param(request: web.Request) -> tuple[int, int]:
    raw = _query_param(request, "range")
    if raw is None:
        raise ApiError(400, "bad_request", "missing ?range=a-b")
    first, sep, last = raw.partition("-")
    try:
        if not sep:
            raise HeaderError(f"range {raw!r} is not of the form a-b")
        start = parse_decimal(first, name="range start", maximum=MAX_OFFSET)
        end = parse_decimal(last, name="range end", maximum=MAX_OFFSET - 1) + 1
    except HeaderError as exc:
        raise ApiError(400, "bad_range", str(exc)) from exc
    if end <= start:
        raise ApiError(400, "bad_range", f"range {raw!r} is empty")
    return start, end


async def drop(request: web.Request) -> web.Response:
    path = _path_param(request)
    dropped = await request.app[CACHE_KEY].drop(path)
    return web.json_response({"path": path, "dropped_bytes": dropped})


async def pin(request: web.Request) -> web.Response:
    path = _path_param(request)
    start, end = _range_param(request)
    pinned = await request.app[CACHE_KEY].pin(path, start, end)
    return web.json_response({"path": path, "range": [start, end - 1], "pinned_bytes": pinned})


async def unpin(request: web.Request) -> web.Response:
    path = _path_param(request)
    start, end = _range_param(request)
    if not await request.app[CACHE_KEY].unpin(path, start, end):
        raise ApiError(404, "not_found", f"no pin of {path} range {start}-{end - 1}")
    return web.json_response({"path": path, "range": [start, end - 1], "unpinned": True})
