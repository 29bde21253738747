"""The one place errors become HTTP responses.

Every error body is JSON: ``{"error": "<code>", "message": "<text>"}``.
:data:`ERROR_TABLE` maps exception types to statuses; the middleware applies
it, turns aiohttp's own HTTP errors (404 route, 405 method, 413 ...) into
the same JSON form, and answers anything unexpected with a bare-bones 500
(the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from cachesvc.api.http.paths import BadPath
from cachesvc.api.reads import KeptChanging
from cachesvc.core.budget import NoRoom
from cachesvc.core.cache import PinLimit
from cachesvc.core.errors import CacheFull
from cachesvc.core.memfile import MemoryFileFull
from cachesvc.origins.base import (
    OriginConflict,
    OriginError,
    OriginNoSpace,
    OriginNotFound,
    OriginPermissionDenied,
    OriginTimeout,
    OriginUnavailable,
    OriginUnsupported,
)

log = logging.getLogger("cachesvc.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error the API layer raises itself, with its status and code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


# Exception type -> (status, code). First match wins: subclasses first.
ERROR_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (BadPath, 400, "bad_path"),
    (OriginNotFound, 404, "not_found"),
    (OriginPermissionDenied, 403, "forbidden"),
    (OriginUnsupported, 405, "not_supported"),
    (OriginNoSpace, 507, "insufficient_storage"),
    (PinLimit, 507, "pin_limit"),
    (NoRoom, 507, "no_room"),
    (CacheFull, 507, "cache_full"),
    (MemoryFileFull, 507, "cache_full"),
    (OriginTimeout, 504, "origin_timeout"),
    (OriginConflict, 502, "origin_changed"),
    (OriginUnavailable, 502, "origin_error"),
    (OriginError, 502, "origin_error"),
    (KeptChanging, 503, "busy"),
)

_REASON_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    412: "precondition_failed",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    431: "headers_too_large",
}


def reason_code(status: int) -> str:
    """The error code of an error status the API answers by itself."""
    return _REASON_CODES.get(status, "error")


# The Content-Type of every error body.
ERROR_CONTENT_TYPE = "application/json; charset=utf-8"


def error_body(code: str, message: str) -> bytes:
    """The JSON body of an error."""
    return json.dumps({"error": code, "message": message}).encode()


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON error response."""
    return web.Response(
        body=error_body(code, message),
        status=status,
        headers={**(headers or {}), "Content-Type": ERROR_CONTENT_TYPE},
    )


def mapped_error(exc: Exception) -> tuple[int, str, str] | None:
    """The (status, code, message) an exception of ERROR_TABLE is answered
    with, or None for any other exception."""
    for cls, status, code in ERROR_TABLE:
        if isinstance(exc, cls):
            return status, code, str(exc) or code
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every error into a JSON error response."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, str(exc), exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")
        }
        code = reason_code(exc.status)
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return error_response(exc.status, code, message or exc.reason, headers)
    except ConnectionError:
        # The client went away; there is nobody to answer.
        log.info("client disconnected during %s %s", request.method, request.path)
        raise
    except Exception as exc:
        mapped = mapped_error(exc)
        if mapped is None:
            log.exception("unexpected error on %s %s", request.method, request.path)
            return error_response(500, "internal", "internal error; see the server log")
        return error_response(*mapped)
