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

import time

from aiohttp import web

from cachesvc.api.access import CLIENT_GONE, Transfer, record_request
from cachesvc.api.errors import ApiError, Handler, error_middleware
from cachesvc.api.listener import INSTANCE_ID, DataState
from cachesvc.api.listing import list_directory
from cachesvc.api.metrics import Metrics
from cachesvc.api.webreads import read_file
from cachesvc.api.webrequest import STATE_KEY, TRANSFER_KEY, files_target
from cachesvc.api.writes import check_writable, delete_file, patch_file, post_file, put_file
from cachesvc.config import Config
from cachesvc.core.cache import FileCache
from cachesvc.wire import INSTANCE_HEADER

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
