"""An origin served over HTTP(S): ``--origin http(s)://host[:port]/prefix/``.

Reads are ``Range`` GETs over a pool of keep-alive connections of
:class:`~cachesvc.origins.http.reads.RangeClient`, which receives the bodies
straight into the cache's pages (why: see that module; a cold read's CPU on
the event loop went from 183 to 81 ms per 64 MiB). Everything else
(HEAD, listings, writes) goes over one pooled :class:`aiohttp.ClientSession`
(keep-alive, a connection limit, connect and read timeouts), created lazily in
the running loop (:mod:`cachesvc.origins.http.session`). Each pool has the
same limits and timeouts. Any static file server with byte ranges works
(nginx, another cachesvc's ``/files/``, an object store's public URL).

Version tokens. ``stat`` returns, as ``OriginStat.etag``:

* the origin's strong ``ETag`` when it sends one; reads pinned to it carry
  ``If-Match`` (RFC 9110: a 412 means the object changed -> OriginConflict);
* otherwise ``lm:<size>:<Last-Modified>``; reads carry
  ``If-Unmodified-Since`` (second granularity: a change within the same
  second as the previous one goes unnoticed, as it would for any HTTP cache);
* otherwise ``size:<size>``: nothing to send, only the size is checked.

Every pinned answer is also checked against the token (``ETag``,
``Last-Modified``, complete length), so an origin that ignores the
preconditions still never gets pages of two versions mixed.

Ranges on the wire are HTTP's inclusive ``a-b``; everything else here is
half-open. A 206 must carry exactly the ``Content-Range`` that was asked for
(starting at the requested offset, ending inside the request); a short 206
is continued with another request. A 200 to a range request (the origin
ignores ranges) is skipped up to the offset and the rest taken. A body that
ends before its announced length is OriginUnavailable, never short data.

Retries with exponential backoff (0.05 s, 0.2 s, 0.8 s, ...) cover only
idempotent reads (HEAD, GET) that failed on the connection, timed out or got
a 5xx/408/429; a retried range read overwrites the same buffer bytes.

Writes. Read-only by default. With ``writes=True`` (``--http-origin-writes``)
the origin is taken to speak cachesvc's data API, so one cachesvc can front
another: partial ``PUT`` with ``Content-Range: bytes a-b/*``, ``POST
?truncate=N``, ``POST ?fsync``, ``DELETE``, whole ``PUT`` (atomic there).
``allocate`` grows the file with a truncate pinned to the stat it read (never
shrinks). ``rewrite`` streams a whole new object in one pinned ``PUT``
(unchanged bytes read back pinned from the origin), so it stays atomic.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from yarl import URL

from cachesvc.origins.base import (
    Capabilities,
    ChangedReader,
    DirEntry,
    OriginConflict,
    OriginError,
    OriginNotFound,
    OriginPermissionDenied,
    OriginStat,
    OriginUnavailable,
    OriginUnsupported,
    base_changed,
)
from cachesvc.origins.http.parse import (
    ERROR_BODY_LIMIT,
    TRANSIENT,
    TransientUnavailable,
    Validator,
    content_range,
    error_for_status,
    parse_listing,
    stat_from,
    status_error,
    unsatisfied_size,
)
from cachesvc.origins.http.reads import BufferSink, RangeClient, Response
from cachesvc.origins.http.session import Session
from cachesvc.wire import INSTANCE_HEADER

# Named after the package: one logger for the whole origin.
logger = logging.getLogger("cachesvc.origins.http")

T = TypeVar("T")

READ_ONLY_MESSAGE = (
    "the HTTP origin is read-only; start cachesvc with --http-origin-writes "
    "if it accepts partial PUT"
)

_BACKOFF_BASE = 0.05  # seconds before the first retry; multiplied by 4 per attempt
_LISTING_LIMIT = 64 << 20  # a directory listing larger than this is refused
_STREAM_PIECE = 1 << 20  # bytes per chunk when rewrite() streams a new object
_ALLOCATE_ATTEMPTS = 3


class HttpOrigin:
    """Files under one HTTP(S) base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        writes: bool = False,
        token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_connections: int = 64,
        retries: int = 3,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {base_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"an HTTP origin URL takes no query or fragment: {base_url!r}")
        if max_connections < 2:
            # rewrite() reads old bytes while its PUT holds a connection.
            raise ValueError("the HTTP origin needs max_connections >= 2")
        host = parts.netloc.rpartition("@")[2]
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        # Immutable: the base URL (no credentials), always ending in '/'.
        self._base = f"{parts.scheme.lower()}://{host}{path}"
        # Headers sent with every request, by both pools.
        headers = {"Accept-Encoding": "identity", "User-Agent": "cachesvc"}
        if parts.username is not None:
            if token is not None:
                raise ValueError("give either credentials in the origin URL or a token, not both")
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {basic}"
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._writes = writes  # Immutable.
        self._retries = retries  # Immutable.
        # Range reads (read_into): their own pool, bodies received into the
        # caller's buffers (see cachesvc.origins.http.reads). Immutable.
        tls = parts.scheme.lower() == "https"
        self._ranges = RangeClient(
            parts.hostname,
            parts.port or (443 if tls else 80),
            tls=tls,
            host_header=host,
            headers=headers,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
        )
        # Everything else: HEAD, listings, writes. Immutable.
        self._session = Session(
            headers,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
        )
        # Per path with writes not yet synced: the origin instance that took
        # the first of them, and the paths whose writes went to more than one
        # instance (the origin restarted). Changed only between awaits.
        self._unsynced: dict[str, str | None] = {}
        self._restarted: set[str] = set()

    # ------------------------------------------------------------ properties

    @property
    def capabilities(self) -> Capabilities:
        # No prefaulting: RangeClient has the kernel receive into the pages.
        # With cachesvc on one core (benchmarks/origin_bench.py, 2026-11-22,
        # 5 rounds twice each) cold 64 MiB reads took 0.141-0.197 s without
        # and 0.160-0.272 s with a thread faulting the same pages meanwhile.
        return Capabilities(
            writable=self._writes,
            partial_writes=self._writes,
            durable_sync=self._writes,
            prefault_fills=False,
        )

    @property
    def description(self) -> str:
        return self._base

    # --------------------------------------------------------------- reading

    async def stat(self, path: str) -> OriginStat:
        url = self._url(path)
        return await self._retrying(lambda: self._stat_once(url, path))

    async def _stat_once(self, url: URL, path: str) -> OriginStat:
        async with self._session.exchange("HEAD", url) as resp:
            if resp.status == 200 and resp.content_length is not None:
                return stat_from(resp.headers, resp.content_length)
            if 300 <= resp.status < 400 and resp.headers.get("Location", "").endswith("/"):
                raise OriginNotFound(f"{path!r} is a directory at {self._base}")
            if resp.status not in (200, 405, 501):
                raise await status_error(resp, "HEAD", url)
        # HEAD refused or without a length: ask for one byte instead.
        what = f"GET {url}"
        async with self._session.exchange("GET", url, headers={"Range": "bytes=0-0"}) as resp:
            if resp.status == 206:
                first, _, size = content_range(resp.headers, what)
                if first != 0 or size is None:
                    raise OriginUnavailable(f"{what}: 206 without the file size")
            elif resp.status == 200:
                if resp.content_length is None:
                    raise OriginUnavailable(f"{what}: 200 without Content-Length")
                size = resp.content_length
            elif resp.status == 416:
                # bytes=0-0 is unsatisfiable only for an empty file.
                size = unsatisfied_size(resp.headers) or 0
            else:
                raise await status_error(resp, "GET", url)
            return stat_from(resp.headers, size)

    async def read_into(
        self, path: str, offset: int, buffers: Sequence[memoryview], etag: str | None = None
    ) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        validator = Validator.parse(etag) if etag is not None else None
        url = self._url(path)
        total = sum(len(b) for b in buffers)
        filled = 0
        while filled < total:
            got, at_eof = await self._retrying(
                functools.partial(self._read_once, url, offset, buffers, filled, validator)
            )
            filled += got
            if at_eof:
                break
        return filled

    async def _read_once(
        self,
        url: URL,
        offset: int,
        buffers: Sequence[memoryview],
        filled: int,
        validator: Validator | None,
    ) -> tuple[int, bool]:
        """One range GET for what ``buffers`` lack after ``filled`` bytes.

        Returns (bytes filled by this request, end of file reached). A retry
        calls it again with the same ``filled`` and overwrites the same bytes.
        """
        sink = BufferSink(buffers, filled)
        pos = offset + filled
        last_wanted = pos + sink.room - 1
        headers = {"Range": f"bytes={pos}-{last_wanted}"}
        if validator is not None:
            headers.update(validator.headers())
        what = f"GET {url} bytes={pos}-{last_wanted}"
        async with self._ranges.get(url.raw_path_qs, headers, what) as resp:
            if resp.status == 206:
                first, last, complete = content_range(resp.headers, what)
                if first != pos or last > last_wanted:
                    raise OriginUnavailable(
                        f"{what}: 206 for another range {resp.headers['Content-Range']!r}"
                    )
                if validator is not None:
                    validator.check(resp.headers, complete, what)
                length = last - first + 1
                got = await resp.read_into(sink, 0, length)
                if got < length:
                    raise TransientUnavailable(f"{what}: body ended after {got} of {length} bytes")
                return got, complete is not None and last + 1 == complete
            if resp.status == 200:
                # The origin ignored Range: the body is the whole object.
                if validator is not None:
                    validator.check(resp.headers, _content_length(resp), what)
                return await resp.read_into(sink, pos, sink.room), True
            if resp.status == 416:
                size = unsatisfied_size(resp.headers)
                if size is not None and size > pos:
                    raise OriginUnavailable(f"{what}: 416 although the size is {size}")
                if validator is not None:
                    validator.check(resp.headers, size, what)
                return 0, True
            raise await _range_error(resp, url, pinned=validator is not None)

    async def list_dir(self, path: str) -> list[DirEntry]:
        url = self._url(path, directory=True)
        return await self._retrying(lambda: self._list_once(url))

    async def _list_once(self, url: URL) -> list[DirEntry]:
        what = f"GET {url}"
        async with self._session.exchange(
            "GET", url, headers={"Accept": "application/json"}
        ) as resp:
            if resp.status != 200:
                raise await status_error(resp, "GET", url)
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > _LISTING_LIMIT:
                    raise OriginUnavailable(f"{what}: listing larger than {_LISTING_LIMIT} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise OriginUnavailable(
                f"{what}: listing is not JSON (nginx needs 'autoindex_format json;')"
            ) from exc
        return parse_listing(data, what)

    async def check(self) -> None:
        url = URL(self._base, encoded=True)
        async with self._session.exchange("HEAD", url) as resp:
            if resp.status >= 500:
                raise await status_error(resp, "HEAD", url)

    async def close(self) -> None:
        self._ranges.close()
        await self._session.close()

    # --------------------------------------------------------------- writing

    async def write_from(self, path: str, offset: int, buffers: Sequence[memoryview]) -> int:
        self._require_writes()
        total = sum(len(b) for b in buffers)
        if total == 0:
            return 0
        headers = {
            "Content-Range": f"bytes {offset}-{offset + total - 1}/*",
            "Content-Length": str(total),
            "Content-Type": "application/octet-stream",
        }
        body: object = buffers[0] if len(buffers) == 1 else _iterate(buffers)
        await self._unsynced_write(path, self._url(path), "PUT", headers=headers, data=body)
        return total

    async def set_size(self, path: str, size: int) -> None:
        self._require_writes()
        await self._unsynced_write(path, self._url(path, query=f"truncate={size}"), "POST")

    async def allocate(self, path: str, offset: int, length: int) -> None:
        """Grows the file to ``offset + length`` if shorter, like fallocate.

        The truncate is pinned to the stat it is based on, so a concurrent
        writer's growth is never undone; on a conflict the stat is redone.
        """
        self._require_writes()
        end = offset + length
        for _ in range(_ALLOCATE_ATTEMPTS):
            stat = await self.stat(path)
            if stat.size >= end:
                return
            url = self._url(path, query=f"truncate={end}")
            with contextlib.suppress(OriginConflict):
                headers = Validator.parse(stat.etag).headers()
                await self._unsynced_write(path, url, "POST", headers=headers)
                return
        raise OriginConflict(f"{path!r} kept changing while allocating at {self._base}")

    async def sync(self, path: str) -> None:
        """Syncs ``path`` at the origin; fails if the origin restarted after
        taking writes that were not yet synced (they may be lost), as an NFS
        client does when the server's write verifier changes."""
        self._require_writes()
        instance = await self._write(self._url(path, query="fsync"), "POST")
        first = self._unsynced.pop(path, instance)
        restarted = path in self._restarted or first != instance
        self._restarted.discard(path)
        if restarted:
            raise OriginUnavailable(
                f"{self._base} restarted after taking unsynced writes to {path!r}; they may be lost"
            )

    async def rewrite(
        self,
        path: str,
        size: int,
        changed: Sequence[tuple[int, int]],
        read_changed: ChangedReader,
        base_etag: str | None = None,
    ) -> OriginStat:
        """Streams the whole new object in one PUT pinned to the old version (atomic)."""
        self._require_writes()
        try:
            old: OriginStat | None = await self.stat(path)
        except OriginNotFound:
            old = None
        if base_etag is not None and (old is None or old.etag != base_etag):
            raise base_changed(path)
        pin = Validator.parse(old.etag).headers() if old is not None else {"If-None-Match": "*"}
        headers = {"Content-Length": str(size), **pin}
        body = self._rewritten(path, size, changed, read_changed, old)
        await self._streamed_put(self._url(path), body, headers)
        return await self.stat(path)

    async def _rewritten(
        self,
        path: str,
        size: int,
        changed: Sequence[tuple[int, int]],
        read_changed: ChangedReader,
        old: OriginStat | None,
    ) -> AsyncIterator[bytes | memoryview]:
        """The bytes of the new version: changed ranges, old bytes, then zeros."""
        old_size = old.size if old is not None else 0
        pos = 0
        for start, end in [*changed, (size, size)]:
            for piece_start in range(pos, min(start, old_size), _STREAM_PIECE):
                assert old is not None
                piece = memoryview(
                    bytearray(min(_STREAM_PIECE, min(start, old_size) - piece_start))
                )
                got = await self.read_into(path, piece_start, [piece], old.etag)
                if got != len(piece):
                    raise OriginConflict(f"{path!r} shrank at {self._base} during a rewrite")
                yield piece
            for piece_start in range(max(pos, old_size), start, _STREAM_PIECE):
                yield bytes(min(_STREAM_PIECE, start - piece_start))
            for piece_start in range(start, min(end, size), _STREAM_PIECE):
                length = min(_STREAM_PIECE, min(end, size) - piece_start)
                data = await read_changed(piece_start, length)
                if len(data) != length:
                    raise RuntimeError(f"read_changed gave {len(data)} bytes, not {length}")
                yield data
            pos = max(pos, end)

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> OriginStat:
        self._require_writes()
        await self._streamed_put(self._url(path), chunks, {})
        return await self.stat(path)

    async def create(self, path: str) -> OriginStat:
        """Creates an empty file unless one exists.

        Stats first, because a PUT that ignores ``If-None-Match: *`` would
        empty an existing file; the conditional PUT narrows the race to
        origins that ignore the header.
        """
        self._require_writes()
        with contextlib.suppress(OriginNotFound):
            return await self.stat(path)
        url = self._url(path)
        headers = {"If-None-Match": "*", "Content-Length": "0"}
        async with self._session.exchange("PUT", url, headers=headers, data=b"") as resp:
            if resp.status // 100 != 2 and resp.status != 412:  # 412: created meanwhile
                raise await status_error(resp, "PUT", url, write=True)
        return await self.stat(path)

    async def remove(self, path: str) -> None:
        self._require_writes()
        await self._write(self._url(path), "DELETE")

    def _require_writes(self) -> None:
        if not self._writes:
            raise OriginUnsupported(READ_ONLY_MESSAGE)

    async def _write(
        self, url: URL, method: str, *, headers: dict[str, str] | None = None, data: object = None
    ) -> str | None:
        """One non-idempotent request; any non-2xx answer is an error (no retries).

        Returns the origin's instance verifier (INSTANCE_HEADER), if it sends one.
        """
        async with self._session.exchange(method, url, headers=headers, data=data) as resp:
            if resp.status // 100 != 2:
                raise await status_error(resp, method, url, write=True, pinned=True)
            return resp.headers.get(INSTANCE_HEADER)

    async def _unsynced_write(
        self,
        path: str,
        url: URL,
        method: str,
        *,
        headers: dict[str, str] | None = None,
        data: object = None,
    ) -> None:
        """A write the origin may hold in memory until the next sync of ``path``:
        remembers which instance of the origin took it."""  # fmt: skip
        instance = await self._write(url, method, headers=headers, data=data)
        first = self._unsynced.setdefault(path, instance)
        if first != instance:
            self._restarted.add(path)

    async def _streamed_put(
        self, url: URL, chunks: AsyncIterable[bytes | memoryview], headers: dict[str, str]
    ) -> None:
        """PUTs the chunks as the body; if they raise, re-raises their error.

        aiohttp wraps an error of the body iterator into a connection error,
        so it is caught on the way out and raised again as it was.
        """
        failures: list[Exception] = []

        async def body() -> AsyncIterator[bytes | memoryview]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:
                failures.append(exc)
                raise

        headers = {"Content-Type": "application/octet-stream", **headers}
        try:
            await self._write(url, "PUT", headers=headers, data=body())
        except OriginError:
            if failures:
                raise failures[0] from None
            raise
        if failures:
            raise failures[0]

    # ------------------------------------------------------------- plumbing

    def _url(self, path: str, *, directory: bool = False, query: str = "") -> URL:
        """The URL of an origin-relative path; refuses paths that leave the base."""
        segments = path.split("/") if path else []
        for segment in segments:
            if segment in ("", ".", "..") or "\0" in segment:
                raise OriginPermissionDenied(f"path {path!r} is not inside {self._base}")
        if not segments and not directory:
            raise OriginNotFound(f"the root of {self._base} is not a file")
        url = self._base + "/".join(urllib.parse.quote(s, safe="") for s in segments)
        if directory and segments:
            url += "/"
        if query:
            url += "?" + query
        return URL(url, encoded=True)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Runs an idempotent request, retrying transient failures with backoff."""
        tries = 0
        while True:
            try:
                return await attempt()
            except TRANSIENT as exc:
                if tries >= self._retries:
                    raise
                delay = _BACKOFF_BASE * 4**tries
                tries += 1
                logger.debug("retrying in %.2fs (%d/%d): %s", delay, tries, self._retries, exc)
                await asyncio.sleep(delay)


def _content_length(resp: Response) -> int | None:
    """The Content-Length of ``resp`` if it has one valid value."""
    values = resp.headers.getall("Content-Length", [])
    return int(values[0]) if len(values) == 1 and values[0].isdigit() else None


async def _range_error(resp: Response, url: URL, *, pinned: bool) -> OriginError:
    """The OriginError for a range GET's unwanted status."""
    try:
        body_start = await resp.read(ERROR_BODY_LIMIT)
    except OriginError:
        body_start = b""
    return error_for_status(resp.status, resp.headers, body_start, "GET", url, pinned=pinned)


async def _iterate(buffers: Sequence[memoryview]) -> AsyncIterator[memoryview]:
    """The buffers as a request body, without joining them."""
    for buf in buffers:
        yield buf
