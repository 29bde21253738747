"""The read policy: what a GET or HEAD of a file is answered with, decided
once for both front ends.

aiohttp's handler (:mod:`cachesvc.api.webreads`) and the fast read path
(:mod:`cachesvc.api.fastpath`) are thin adapters over this module: both call
:func:`plan_read` for the status, the headers and the body of an answer,
and :func:`read` to send it; a change of read behaviour is made here, once.
The fast path takes only the plans it can answer without aiohttp (200 and
single-range 206) and hands the others to aiohttp, which answers them with
the same functions.

- :func:`plan_read` decides for one version of the file (a
  :class:`Snapshot`): RFC 9110 §13.2.2 preconditions (304, 412), If-Range
  and Range (200, 206 of one range or multipart/byteranges, 416), and the
  header block in the one order both front ends send it, encoded as
  sent (:attr:`ReadPlan.fields`; the part fixed for a version is built
  once per version).
- :func:`read` answers a plan from the cache through a :class:`FrontEnd`:
  bodies of at most :data:`SMALL_BODY` bytes are copied out of the cache
  into one buffer and sent with the headers in one write; larger ones are
  streamed from mappings (:mod:`cachesvc.api.streaming`), their first chunk
  mapped before the headers go out. A write that changes the bytes being
  copied, or the first chunk, makes it plan again for the new version, at
  most :data:`READ_ATTEMPTS` times (then :class:`KeptChanging`, a 503).

Every byte sent comes from the cache as the response's version has it; the
response's ``ETag`` describes exactly the bytes sent. A small body is
checked after its copy (:func:`range_bytes`), a streamed one chunk by chunk
(:class:`~cachesvc.api.streaming.BodyStreamer`).
"""

from __future__ import annotations

import functools
import mimetypes
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol, TypeVar

from cachesvc.api.access import Transfer
from cachesvc.api.http.conditions import evaluate_preconditions, format_etag, if_range_allows
from cachesvc.api.http.multipart import MultipartPlan
from cachesvc.api.http.ranges import (
    RangeKind,
    format_content_range,
    parse_range,
    unsatisfied_content_range,
)
from cachesvc.api.streaming import (
    BodyAborted,
    BodySink,
    BodyStreamer,
    Piece,
    SnapshotChanged,
    chunk_of,
    first_chunk,
)
from cachesvc.core import mapping
from cachesvc.core.inode import CachingInode
from cachesvc.core.ranges import Range
from cachesvc.wire import format_http_date

# Bodies up to this size are copied and sent with the headers in one write.
# A copy costs memory until sent, a stream costs bookkeeping and a wait
# for the socket to drain: 1 MiB responses cost 220-250 us of server CPU
# copied against 379-416 us streamed (benchmarks/http_bench.py, 16
# connections, 2026-12-02).
SMALL_BODY = 1 << 20
# A read whose file keeps changing under it is started over at most this often.
READ_ATTEMPTS = 5
PRECONDITION_FAILED = "a precondition of the request failed"

R_co = TypeVar("R_co", covariant=True)


class KeptChanging(Exception):
    """The file changed under every one of READ_ATTEMPTS reads (a 503)."""


@functools.lru_cache(maxsize=4096)
def content_type(path: str) -> str:
    """The ``Content-Type`` of a file, by its name."""
    return mimetypes.guess_type(path, strict=False)[0] or "application/octet-stream"


def _line(name: str, value: str) -> str:
    """One header field as it is sent."""
    return f"{name}: {value}\r\n"


@functools.lru_cache(maxsize=4096)
def _validators(token: str, mtime: float) -> str:
    """The validator fields every response of one version of a file carries.

    Formatted once per version rather than once per response: formatting
    the date took about 5% of the time of a small cached GET.
    """
    return (
        _line("Accept-Ranges", "bytes")
        + _line("ETag", format_etag(token))
        + _line("Last-Modified", format_http_date(mtime))
    )


@functools.lru_cache(maxsize=4096)
def _version_fields(token: str, mtime: float, content_type: str) -> str:
    """The fields a 200 or 206 of one version starts with: built (and
    encoded) once per version, not once per response."""
    return _validators(token, mtime) + _line("Content-Type", content_type)


class Snapshot(NamedTuple):
    """The attributes of the version of a file a response describes. Immutable.

    (A NamedTuple: made for every read, and a frozen dataclass costs twice
    as much to make: 0.75 against 0.36 us, 2026-12-04.)
    """

    size: int
    mtime: float
    token: str  # inode.attr.etag at the time of the snapshot
    epoch: int  # inode.epoch and inode.attr.version then
    version: int

    @classmethod
    def of(cls, inode: CachingInode) -> Snapshot:
        attr = inode.attr
        return cls(attr.size, attr.mtime, attr.etag, inode.epoch, attr.version)

    def holds(self, inode: CachingInode, rng: Range) -> bool:
        """Whether the inode's bytes of ``rng`` are still this version's: a
        write elsewhere in the file leaves a reader of ``rng`` undisturbed."""
        return inode.unchanged_since(self.epoch, self.version, rng)

    @property
    def etag(self) -> str:
        return format_etag(self.token)


def check_conditions(
    method: str, conditions: Mapping[str, str], snap: Snapshot | None
) -> int | None:
    """RFC 9110 §13.2.2 for ``snap`` (None: no such file): None to proceed,
    304 or 412. ``conditions`` holds the conditional fields sent, each
    field's lines joined with commas."""
    return evaluate_preconditions(
        method,
        conditions,
        snap.etag if snap else None,
        snap.mtime if snap else None,
        snap is not None,
    )


class ReadPlan(NamedTuple):
    """The answer to a GET or HEAD of one version of a file. Immutable."""

    status: int  # 200, 206, 304, 412 or 416
    # Every header field before Content-Length, in the one order both front
    # ends send them, as sent: "Name: value" and CRLF each.
    fields: str
    pieces: tuple[Piece, ...]  # the body a GET sends: framing bytes and file ranges
    length: int  # Content-Length (of the GET's body, also for HEAD)
    head: bool  # HEAD: no body is sent
    reason: str = ""  # for 412 and 416: why

    def headers(self) -> dict[str, str]:
        """:attr:`fields` as a dict, in their order."""
        pairs = (line.split(": ", 1) for line in self.fields.split("\r\n")[:-1])
        return {name: value for name, value in pairs}

    @property
    def sends_body(self) -> bool:
        return not self.head and bool(self.pieces)

    @property
    def streamed(self) -> bool:
        """Whether the body is streamed from mappings rather than copied."""
        return self.length > SMALL_BODY


def plan_read(
    snap: Snapshot,
    content_type: str,
    max_ranges: int,
    method: str = "GET",
    range_header: str | None = None,
    if_range: str | None = None,
    conditions: Mapping[str, str] | None = None,
) -> ReadPlan:
    """The answer to a ``method`` (GET or HEAD) of version ``snap`` of a file.

    ``range_header`` is the one ``Range`` field (None: none, or several);
    ``if_range`` and ``conditions`` are the conditional fields, each field's
    lines joined with commas. Preconditions come first (304, 412), then
    If-Range and Range.
    """
    head = method == "HEAD"
    if conditions:
        conditional = check_conditions(method, conditions, snap)
        if conditional == 412:
            return ReadPlan(412, "", (), 0, head, PRECONDITION_FAILED)
        if conditional == 304:
            return ReadPlan(304, _validators(snap.token, snap.mtime), (), 0, head)
    size = snap.size
    if range_header is not None and (
        if_range is None or if_range_allows(if_range, snap.etag, snap.mtime)
    ):
        requested = parse_range(range_header, size, max_ranges)
        if requested.kind is RangeKind.SATISFIABLE:
            ranges = requested.ranges
            if len(ranges) > 1:
                return _multipart(snap, ranges, content_type, head)
            rng = ranges[0]
            fields = _version_fields(snap.token, snap.mtime, content_type)
            fields += _line("Content-Range", format_content_range(rng, size))
            return ReadPlan(206, fields, (rng,), rng.length, head)
        if requested.kind is RangeKind.UNSATISFIABLE:
            fields = _validators(snap.token, snap.mtime)
            fields += _line("Content-Range", unsatisfied_content_range(size))
            return ReadPlan(416, fields, (), 0, head, requested.reason)
    fields = _version_fields(snap.token, snap.mtime, content_type)
    return ReadPlan(200, fields, (Range(0, size),) if size else (), size, head)


def _multipart(
    snap: Snapshot, ranges: tuple[Range, ...], content_type: str, head: bool
) -> ReadPlan:
    """A 206 of several ranges: a multipart/byteranges body."""
    plan = MultipartPlan.build(ranges, snap.size, content_type)
    fields = _validators(snap.token, snap.mtime) + _line("Content-Type", plan.content_type)
    pieces: list[Piece] = []
    for part in plan.parts:
        pieces += [part.header, part.rng]
    pieces.append(plan.trailer)
    return ReadPlan(206, fields, tuple(pieces), plan.content_length, head)


# ---------------------------------------------------------------------------
# Answering a plan


class FrontEnd(Protocol[R_co]):
    """How one front end sends the answer to one request."""

    def complete(self, plan: ReadPlan, body: bytes | bytearray) -> R_co:
        """The answer to ``plan`` with its whole ``body`` (empty when the
        plan sends none: HEAD, an empty file, 304, 412, 416)."""

    async def begin_stream(self, plan: ReadPlan) -> tuple[R_co, BodySink | None]:
        """Sends the status line and headers of ``plan``; returns the answer
        and the sink its body goes to (None: the client went away before the
        headers were out, and the answer records it)."""


async def read(
    inode: CachingInode,
    transfer: Transfer,
    front: FrontEnd[R_co],
    plan_for: Callable[[Snapshot], ReadPlan],
) -> R_co:
    """Answers a read of ``inode`` with the plan ``plan_for`` makes for its
    current version, through ``front``; starts over for the new version
    when a write changes the bytes of the body before it is copied or its
    headers are out. Raises KeptChanging after READ_ATTEMPTS tries."""
    for _ in range(READ_ATTEMPTS):
        snap = Snapshot.of(inode)
        plan = plan_for(snap)
        if not plan.sends_body:
            return front.complete(plan, b"")
        try:
            if not plan.streamed:
                return front.complete(plan, await copy_body(inode, snap, plan, transfer))
            return await _stream(inode, snap, plan, transfer, front)
        except SnapshotChanged:
            continue  # written meanwhile: answer for the new version
    raise KeptChanging("the file kept changing while being read; try again")


async def _stream(
    inode: CachingInode,
    snap: Snapshot,
    plan: ReadPlan,
    transfer: Transfer,
    front: FrontEnd[R_co],
) -> R_co:
    """Sends a large ``plan``'s headers and body.

    The first chunk is mapped before the headers go out, so a file that
    changed since ``snap`` raises SnapshotChanged while the request can
    still be answered afresh; later changes abort the body.
    """
    first = await first_chunk(inode, plan.pieces, snap, transfer)
    try:
        answer, sink = await front.begin_stream(plan)
    except BaseException:
        if isinstance(first, mapping.Mapping):
            await first.release()
        raise
    if sink is None:
        if isinstance(first, mapping.Mapping):
            await first.release()
        return answer
    try:
        await BodyStreamer(sink, inode, snap, transfer).send(plan.pieces, first)
    except BodyAborted as exc:
        transfer.aborted = str(exc) or "aborted"
    return answer


def copy_now(inode: CachingInode, plan: ReadPlan, transfer: Transfer) -> bytes | None:
    """The body of a copied plan of one range, if the cache holds all of it,
    without awaiting (None: answer with :func:`read`)."""
    if plan.streamed or len(plan.pieces) != 1:
        return None
    rng = plan.pieces[0]
    assert isinstance(rng, Range)
    body = inode.read_cached_now(rng.start, rng.length)
    if body is None or len(body) != rng.length:
        return None
    transfer.note_hit()
    return body


async def copy_body(
    inode: CachingInode, snap: Snapshot, plan: ReadPlan, transfer: Transfer
) -> bytes | bytearray:
    """The whole body of a copied ``plan``, out of the cache.

    A body of one range is that range's copy itself; a multipart body is
    assembled in one buffer. Raises SnapshotChanged if a write changed a
    range before its copy was complete.
    """
    pieces = plan.pieces
    if len(pieces) == 1 and isinstance(pieces[0], Range):
        return await range_bytes(inode, pieces[0], snap, transfer)
    body = bytearray(plan.length)
    out = memoryview(body)
    pos = 0
    for piece in pieces:
        data = (
            piece if isinstance(piece, bytes) else await range_bytes(inode, piece, snap, transfer)
        )
        out[pos : pos + len(data)] = data
        pos += len(data)
    return body


async def range_bytes(inode: CachingInode, rng: Range, snap: Snapshot, transfer: Transfer) -> bytes:
    """A copy of ``rng`` as version ``snap`` has it: from the cache under
    data_mu, or through a mapping on a miss, or pass-through when the cache
    has no room; SnapshotChanged if a write changed its bytes first.
    (Nothing awaits between either copy and its check, so the check sees
    the state the copy was made in.)"""
    cached = await inode.read_cached(rng.start, rng.length)
    if cached is not None and len(cached) == rng.length:
        # Cached: one copy under data_mu, no mapping bookkeeping.
        if not snap.holds(inode, rng):
            raise SnapshotChanged(f"{inode.path} changed while being read")
        transfer.note_hit()
        return cached
    part = await chunk_of(inode, rng, snap, transfer)
    if isinstance(part, bytes):
        return part
    try:
        return b"".join(part.views())
    finally:
        await part.release()
