"""What the HTTP origin's responses mean: response heads, the
``Content-Range`` of 206 and 416 answers, version tokens and the validators
that pin requests to them, nginx JSON directory listings, and unwanted
statuses as OriginErrors (with the error body's message).

Nothing here sends a request: :mod:`cachesvc.origins.http.origin` and
:mod:`cachesvc.origins.http.reads` do and hand the heads (or the aiohttp
responses) in; only ``status_error`` reads from a body (the start of an
error body). Ranges here are HTTP's inclusive ``first-last``, as on the wire.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cachesvc.origins.base import (
    DirEntry,
    OriginConflict,
    OriginError,
    OriginNoSpace,
    OriginNotFound,
    OriginPermissionDenied,
    OriginStat,
    OriginTimeout,
    OriginUnavailable,
    OriginUnsupported,
)
from cachesvc.wire import parse_http_date

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?", re.ASCII)
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)", re.ASCII | re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes \*/([0-9]+)", re.ASCII | re.IGNORECASE)
ERROR_BODY_LIMIT = 1024  # bytes of an error body kept for the message


class TransientUnavailable(OriginUnavailable):
    """An OriginUnavailable that an idempotent request may retry."""


class TransientTimeout(OriginTimeout):
    """An OriginTimeout that an idempotent request may retry."""


TRANSIENT = (TransientUnavailable, TransientTimeout)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed HTTP/1.x response head. Immutable."""

    minor_version: int  # 1 for HTTP/1.1, 0 for HTTP/1.0
    status: int
    headers: CIMultiDictProxy[str]

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this response."""
        values = self.headers.getall("Connection", [])
        tokens = {t.strip().lower() for v in values for t in v.split(",")}
        if self.minor_version == 0:
            return "keep-alive" in tokens
        return "close" not in tokens


def parse_response_head(head: bytes, what: str) -> ResponseHead:
    """The status line and header fields of ``head`` (without the blank line).

    Strict where a mistake would misplace bytes: a malformed status line or
    field, or an obsolete line folding, is an OriginUnavailable.
    """
    status_line, *lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise OriginUnavailable(f"{what}: malformed status line {status_line[:100]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            raise OriginUnavailable(f"{what}: malformed header field {line[:100]!r}")
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    return ResponseHead(int(match.group(1)), int(match.group(2)), CIMultiDictProxy(headers))


@dataclass(frozen=True, slots=True)
class Validator:
    """What a version token pins a request to. Immutable."""

    etag: str | None  # strong ETag, sent as If-Match
    last_modified: str | None  # HTTP-date, sent as If-Unmodified-Since
    size: int | None  # the complete length the object must have

    @classmethod
    def parse(cls, token: str) -> Validator:
        if token.startswith('"'):
            return cls(token, None, None)
        kind, _, rest = token.partition(":")
        if kind == "lm":
            size, _, date = rest.partition(":")
            if size.isdigit() and date:
                return cls(None, date, int(size))
        elif kind == "size" and rest.isdigit():
            return cls(None, None, int(rest))
        raise ValueError(f"not a version token of the HTTP origin: {token!r}")

    def headers(self) -> dict[str, str]:
        if self.etag is not None:
            return {"If-Match": self.etag}
        if self.last_modified is not None:
            return {"If-Unmodified-Since": self.last_modified}
        return {}

    def check(self, headers: CIMultiDictProxy[str], complete: int | None, what: str) -> None:
        """OriginConflict unless an answer's validators agree with this token."""
        etag = headers.get("ETag")
        if self.etag is not None and etag is not None and etag != self.etag:
            raise OriginConflict(f"{what}: ETag is now {etag}, expected {self.etag}")
        modified = headers.get("Last-Modified")
        if (
            self.last_modified is not None
            and modified is not None
            and parse_http_date(modified) != parse_http_date(self.last_modified)
        ):
            raise OriginConflict(f"{what}: Last-Modified is now {modified}")
        if self.size is not None and complete is not None and complete != self.size:
            raise OriginConflict(f"{what}: size is now {complete}, expected {self.size}")


def _is_strong_etag(etag: str) -> bool:
    return len(etag) >= 2 and etag.startswith('"') and etag.endswith('"')


def stat_from(headers: CIMultiDictProxy[str], size: int) -> OriginStat:
    """The stat (and version token) that a file's response headers describe."""
    etag = headers.get("ETag")
    modified = headers.get("Last-Modified")
    mtime = parse_http_date(modified) if modified is not None else None
    if etag is not None and _is_strong_etag(etag):
        token = etag
    elif modified is not None and mtime is not None:
        token = f"lm:{size}:{modified}"
    else:
        token = f"size:{size}"
    return OriginStat(size=size, mtime=mtime or 0.0, etag=token)


def content_range(headers: CIMultiDictProxy[str], what: str) -> tuple[int, int, int | None]:
    """``(first, last, complete)`` of a 206's single ``Content-Range`` (inclusive)."""
    values = headers.getall("Content-Range", [])
    match = _CONTENT_RANGE.fullmatch(values[0].strip()) if len(values) == 1 else None
    if match is None:
        raise OriginUnavailable(f"{what}: 206 with bad or missing Content-Range {values!r}")
    first, last, complete = match.groups()
    total = None if complete == "*" else int(complete)
    if int(last) < int(first) or (total is not None and int(last) >= total):
        raise OriginUnavailable(f"{what}: 206 with impossible Content-Range {values[0]!r}")
    return int(first), int(last), total


def unsatisfied_size(headers: CIMultiDictProxy[str]) -> int | None:
    """The complete length a 416's ``Content-Range: bytes */N`` states, if any."""
    match = _UNSATISFIED_RANGE.fullmatch(headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def parse_listing(data: object, what: str) -> list[DirEntry]:
    """Entries of an nginx ``autoindex_format json`` listing (cachesvc uses the same form)."""
    if not isinstance(data, list):
        raise OriginUnavailable(f"{what}: listing is not a JSON list")
    entries = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise OriginUnavailable(f"{what}: malformed listing entry {item!r}")
        name, kind = item["name"], item.get("type")
        if kind not in ("file", "directory"):
            continue  # sockets, devices, dangling links: nothing to serve
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise OriginUnavailable(f"{what}: listing entry with invalid name {name!r}")
        size = item.get("size", 0) if kind == "file" else 0
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OriginUnavailable(f"{what}: listing entry {name!r} with bad size {size!r}")
        mtime = item.get("mtime")
        seconds = parse_http_date(mtime) if isinstance(mtime, str) else None
        if mtime is not None and seconds is None:
            raise OriginUnavailable(f"{what}: listing entry {name!r} with bad mtime {mtime!r}")
        entries.append(DirEntry(name, kind == "directory", size, seconds or 0.0))
    return entries


async def status_error(
    resp: aiohttp.ClientResponse,
    method: str,
    url: URL,
    *,
    pinned: bool = False,
    write: bool = False,
) -> OriginError:
    """The OriginError for an aiohttp response's unwanted status (see error_for_status)."""
    try:
        raw = await resp.content.read(ERROR_BODY_LIMIT)
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    return error_for_status(resp.status, resp.headers, raw, method, url, pinned=pinned, write=write)


def error_for_status(
    status: int,
    headers: CIMultiDictProxy[str],
    body_start: bytes,
    method: str,
    url: URL,
    *,
    pinned: bool = False,
    write: bool = False,
) -> OriginError:
    """The OriginError for an unwanted status (``pinned``: a 412 is a conflict),
    with a message from the first ERROR_BODY_LIMIT bytes of the error body."""
    message = f"{method} {url}: HTTP {status}"
    detail = _error_detail(body_start)
    if detail:
        message += f": {detail}"
    if status in (404, 410):
        return OriginNotFound(message)
    if status in (401, 403):
        return OriginPermissionDenied(message)
    if status == 412 and pinned:
        return OriginConflict(message)
    if status in (413, 507):
        return OriginNoSpace(message)
    if write and status in (405, 501):
        return OriginUnsupported(message)
    if status == 504:  # a lower cachesvc tier's origin timed out
        return TransientTimeout(message)
    if status in (408, 429) or (status >= 500 and status != 501):
        return TransientUnavailable(message)
    if 300 <= status < 400:
        message += f" (redirect to {headers.get('Location', '?')} not followed)"
    return OriginUnavailable(message)


def _error_detail(raw: bytes) -> str:
    """A short text from an error body: cachesvc's JSON ``message``, else its first line."""
    text = raw.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return str(data["message"])[:200]
    return text.split("\n", 1)[0][:200] if text and not text.startswith("<") else ""
