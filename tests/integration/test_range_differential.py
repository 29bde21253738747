"""Differential test of ``Range`` handling: a real ``cachesvc serve`` against nginx.

Both serve the same directory: a file of 1 MiB + 7 bytes (so ranges cross
the response code's 256 KiB copy threshold and its 1 MiB mapping chunks), a
10-byte file and an empty file. Each Range header is sent byte for byte by a
raw socket client (no ``Accept-Encoding``, no normalisation), and the two
answers must agree on the status, ``Content-Range`` and body bytes; for
``multipart/byteranges`` the parsed parts (their ``Content-Range`` and
bytes) are compared, not the boundaries. Every body is also checked against
the file itself, so agreeing on a wrong answer fails too.

nginx runs with ``max_ranges 64``, the same limit as cachesvc's default
``--max-ranges``. 416 bodies are not compared: ours is the JSON error body
of DESIGN.md, nginx's an HTML page.

:data:`DIVERGENCES` lists, with a reason each, the headers where DESIGN.md
(and the notes of ``cachesvc/api/http/ranges.py``) choose differently from
nginx; for those the test asserts nginx's behaviour as recorded and ours as
documented.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from tests.integration.nginx_fixture import nginx_available, start_nginx
from tests.support.content import pattern
from tests.support.servers import ServerProcess, running_cachesvc

pytestmark = pytest.mark.skipif(not nginx_available(), reason="nginx is not installed")

MiB = 1 << 20
BIG = "big.bin"
BIG_SIZE = MiB + 7
SMALL = "small.bin"
SMALL_SIZE = 10
EMPTY = "empty.bin"
SIZES = {BIG: BIG_SIZE, SMALL: SMALL_SIZE, EMPTY: 0}
SEEDS = {BIG: 11, SMALL: 12, EMPTY: 13}
MAX_RANGES = 64
TIMEOUT = 15.0
LAST = BIG_SIZE - 1


def file_bytes(name: str) -> bytes:
    return pattern(SEEDS[name], 0, SIZES[name])


# ---------------------------------------------------------------------------
# Servers


@dataclass(frozen=True)
class Peers:
    nginx_port: int
    cachesvc: ServerProcess
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    base = tmp_path_factory.mktemp("range-differential")
    root = base / "root"
    root.mkdir()
    files = {name: file_bytes(name) for name in SIZES}
    for name, data in files.items():
        (root / name).write_bytes(data)
    nginx_port, stop_nginx = start_nginx(root, f"max_ranges {MAX_RANGES};", workdir=base / "nginx")
    try:
        with running_cachesvc(
            str(root),
            ["--cache-size", "64MiB", "--max-ranges", str(MAX_RANGES)],
            log_dir=base / "logs",
        ) as server:
            yield Peers(nginx_port, server, files)
    finally:
        stop_nginx()


# ---------------------------------------------------------------------------
# A raw HTTP/1.1 client


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, list[str]]  # lower-case name -> values
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name, [])
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


def request(port: int, method: str, target: str, range_header: bytes | None) -> RawResponse:
    """Sends exactly one request (the Range value byte for byte) and reads the response."""
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    if range_header is not None:
        head += b"Range: " + range_header + b"\r\n"
    head += b"Connection: close\r\n\r\n"
    deadline = time.monotonic() + TIMEOUT
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {target} took longer than {TIMEOUT}s")
    data = b"".join(chunks)
    raw_head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"incomplete response head: {data[:200]!r}"
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    response = RawResponse(int(status_line.split()[1]), headers, body)
    length = response.header("content-length")
    if method == "HEAD":
        assert body == b""
    elif response.status != 416:
        assert length is not None and int(length) == len(body), "Content-Length is not exact"
    return response


# ---------------------------------------------------------------------------
# What a response says, checked against the file


class Part(NamedTuple):
    content_range: str
    digest: str  # sha256 of the part's bytes


@dataclass(frozen=True)
class Observed:
    """A response reduced to what must agree: status, Content-Range, parts' bytes."""

    status: int
    content_range: str | None
    multipart: bool
    parts: tuple[Part, ...]  # 200: one part with content_range "", 416: none


_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")


def _checked_part(content_range: str, data: bytes, file: bytes) -> tuple[int, int, Part]:
    match = _CONTENT_RANGE.fullmatch(content_range)
    assert match is not None, f"bad Content-Range {content_range!r}"
    first, last, size = (int(g) for g in match.groups())
    assert size == len(file) and first <= last < size, content_range
    assert data == file[first : last + 1], f"wrong bytes for {content_range}"
    return first, last, Part(content_range, hashlib.sha256(data).hexdigest())


def _multipart_parts(response: RawResponse) -> list[tuple[str, bytes]]:
    content_type = response.header("content-type") or ""
    match = re.fullmatch(r'multipart/byteranges;\s*boundary="?([^";]+)"?', content_type)
    assert match is not None, f"not multipart/byteranges: {content_type!r}"
    delimiter = b"--" + match[1].encode()
    pieces = response.body.split(delimiter)
    preamble, *sections, epilogue = pieces
    assert preamble in (b"", b"\r\n"), f"unexpected preamble {preamble!r}"
    assert epilogue in (b"--\r\n", b"--"), f"unexpected close delimiter {epilogue!r}"
    parts: list[tuple[str, bytes]] = []
    for section in sections:
        assert section.startswith(b"\r\n") and section.endswith(b"\r\n")
        raw_headers, sep, data = section[2:-2].partition(b"\r\n\r\n")
        assert sep, "part without a blank line after its headers"
        ranges = [
            line.split(b":", 1)[1].strip().decode()
            for line in raw_headers.split(b"\r\n")
            if line.lower().startswith(b"content-range:")
        ]
        assert len(ranges) == 1, f"part headers {raw_headers!r}"
        parts.append((ranges[0], data))
    return parts


def observe(response: RawResponse, file: bytes) -> Observed:
    """Reduces ``response`` to an :class:`Observed`, checking every byte against ``file``."""
    content_range = response.header("content-range")
    size = len(file)
    if response.status == 200:
        assert content_range is None, "Content-Range on a 200"
        assert response.body == file, "200 without the whole file"
        return Observed(200, None, False, (Part("", hashlib.sha256(file).hexdigest()),))
    if response.status == 416:
        assert content_range == f"bytes */{size}"
        return Observed(416, content_range, False, ())
    assert response.status == 206, f"unexpected status {response.status}"
    assert response.header("content-encoding") is None, "content coding on a 206"
    if content_range is not None:
        *_, part = _checked_part(content_range, response.body, file)
        return Observed(206, content_range, False, (part,))
    parts = tuple(
        _checked_part(part_range, data, file)[2] for part_range, data in _multipart_parts(response)
    )
    assert parts, "multipart/byteranges without parts"
    return Observed(206, None, True, parts)


class Expect(NamedTuple):
    """A behaviour in the divergence table: status and inclusive ranges sent.

    ``ranges`` is None for the whole file (200), empty for 416, and has
    more than one element exactly when the body is multipart.
    """

    status: int
    ranges: tuple[tuple[int, int], ...] | None


def summary(observed: Observed) -> Expect:
    if observed.status == 200:
        return Expect(200, None)
    ranges: list[tuple[int, int]] = []
    for part in observed.parts:
        match = _CONTENT_RANGE.fullmatch(part.content_range)
        assert match is not None
        ranges.append((int(match[1]), int(match[2])))
    assert observed.multipart == (len(ranges) > 1)
    return Expect(observed.status, tuple(ranges))


def fetch_both(peers: Peers, name: str, header: bytes | None) -> tuple[Observed, Observed]:
    file = peers.files[name]
    theirs = request(peers.nginx_port, "GET", f"/{name}", header)
    ours = request(peers.cachesvc.port, "GET", f"/files/{name}", header)
    return observe(theirs, file), observe(ours, file)


# ---------------------------------------------------------------------------
# Headers on which both agree


def _list(*specs: str) -> str:
    return "bytes=" + ",".join(specs)


DISJOINT_64 = _list(*(f"{i * 100}-{i * 100 + 9}" for i in range(MAX_RANGES)))

AGREE_BIG: list[str | None] = [
    None,
    # Single ranges.
    "bytes=0-0",
    "bytes=0-1",
    "bytes=1-1",
    "bytes=100-199",
    "bytes=0-4095",
    "bytes=4096-8191",
    "bytes=0-262143",  # exactly the copy threshold
    "bytes=0-262144",  # one byte more: streamed
    "bytes=262143-262145",
    "bytes=1048575-1048577",  # across a 1 MiB mapping chunk
    "bytes=1048576-1048582",
    f"bytes={LAST}-{LAST}",
    f"bytes={LAST - 1}-{LAST}",
    # Open and clamped ranges.
    "bytes=0-",
    "bytes=1-",
    "bytes=524288-",
    f"bytes={LAST}-",
    "bytes=1048000-2000000",
    f"bytes=0-{BIG_SIZE}",
    "bytes=0-9223372036854775806",
    "bytes=0-9223372036854775807",
    # Suffix ranges.
    "bytes=-1",
    "bytes=-100",
    "bytes=-262145",
    f"bytes=-{BIG_SIZE}",
    f"bytes=-{BIG_SIZE + 1}",
    "bytes=-9223372036854775807",
    # Unsatisfiable.
    "bytes=-0",
    "bytes=-0,-0",
    f"bytes={BIG_SIZE}-",
    f"bytes={BIG_SIZE}-{BIG_SIZE + 100}",
    "bytes=2000000-3000000",
    f"bytes={BIG_SIZE}-,2000000-",
    "bytes=9223372036854775807-",
    "bytes=99999999999999999999-",
    # Unit and spaces.
    "Bytes=0-9",
    "BYTES=0-9",
    "bYtEs=10-20",
    "bytes= 5-9",
    "bytes=5 -9",
    "bytes=5- 9",
    "bytes=0-1 ",
    "bytes=0-1, 5-6",
    "bytes=0-1 ,5-6",
    "bytes= 0 - 1 , 5 - 6",
    # Leading zeros.
    "bytes=000000000000000000000000001-2",
    "bytes=0000-0000",
    # Several ranges (disjoint, in ascending order, summing to less than the file).
    "bytes=0-1,5-6",
    "bytes=0-0,2-2,4-4",
    "bytes=0-99,200-299,400-499,600-699",
    "bytes=0-4095,8192-12287,1048000-",
    f"bytes=0-0,{LAST}-{LAST}",
    "bytes=0-599999,700000-",  # multipart, streamed over several chunks
    "bytes=10-19,-5",
    DISJOINT_64,  # exactly the limit
    # Unsatisfiable elements dropped from a list.
    "bytes=0-1,2000000-3000000",
    "bytes=2000000-,-5",
    "bytes=-0,0-0",
    "bytes=0-0,-0",
    f"bytes=0-1,{BIG_SIZE}-",
    # Not a bytes range, or no range-set: ignored.
    "",
    "bytes",
    "bytes=",
    "bytes =0-1",
    "items=0-1",
    "x-bytes=0-1",
    "none",
]

AGREE_SMALL: list[str | None] = [
    None,
    "bytes=0-9",
    "bytes=0-",
    "bytes=9-",
    "bytes=3-4",
    "bytes=5-100",
    "bytes=-3",
    "bytes=-10",
    "bytes=-20",
    "bytes=10-",
    "bytes=10-20",
    "bytes=0-0,9-9",
    "bytes=2-3,6-7",
    "bytes=-0",
]

AGREE_EMPTY: list[str | None] = [
    None,
    "bytes=0-0",
    "bytes=0-",
    "bytes=-1",
    "bytes=-0",
    "bytes=",
]

AGREE = (
    [(BIG, h) for h in AGREE_BIG]
    + [(SMALL, h) for h in AGREE_SMALL]
    + [(EMPTY, h) for h in AGREE_EMPTY]
)


def _encode(header: str | None) -> bytes | None:
    return None if header is None else header.encode()


def _case_id(case: tuple[str, str | None]) -> str:
    name, header = case
    shown = "no Range" if header is None else repr(header)
    return f"{name.split('.')[0]}:{shown[:60]}"


@pytest.mark.parametrize("case", AGREE, ids=[_case_id(c) for c in AGREE])
def test_same_as_nginx(peers: Peers, case: tuple[str, str | None]) -> None:
    name, header = case
    theirs, ours = fetch_both(peers, name, _encode(header))
    assert ours == theirs


def test_enough_variants_on_one_file() -> None:
    headers = [h for h in AGREE_BIG if h is not None]
    assert len(set(headers)) == len(headers) >= 50


# ---------------------------------------------------------------------------
# Where DESIGN.md chooses differently


@dataclass(frozen=True)
class Divergence:
    """One row of the table: (header, nginx behaviour, our behaviour, reason)."""

    header: bytes
    nginx: Expect
    ours: Expect
    reason: str
    file: str = BIG


WHOLE = Expect(200, None)
UNSATISFIABLE = Expect(416, ())


def partial(*ranges: tuple[int, int]) -> Expect:
    return Expect(206, ranges)


EMPTY_ELEMENT = "empty list elements are skipped (RFC 9110 §5.6.1); nginx rejects them"
INVALID = "a syntactically invalid Range is ignored (RFC 9110 §14.2); nginx answers 416"
TAB = "OWS includes tabs (RFC 9110 §5.6.3); nginx accepts only spaces"
HUGE_LAST = "a last-pos or suffix beyond any file is clamped to the file; nginx 416s an overflow"
COALESCE = "overlapping or adjacent ranges are coalesced, in ascending order; nginx sends as asked"
TOO_MANY = f"--max-ranges ({MAX_RANGES}) counts ranges after coalescing, and more is 416"
EMPTY_FILE = "any Range on an empty file is ignored; nginx 416s one it finds invalid"

DISJOINT_65 = _list(*(f"{i * 100}-{i * 100 + 9}" for i in range(MAX_RANGES + 1)))
ADJACENT_65 = _list(*(f"{i}-{i}" for i in range(MAX_RANGES + 1)))
OVERLAPPING_65 = _list(*(f"{i * 100}-{i * 100 + 9}" for i in range(MAX_RANGES)), "0-0")

DIVERGENCES: list[Divergence] = [
    Divergence(b"bytes=0-1,,5-6", UNSATISFIABLE, partial((0, 1), (5, 6)), EMPTY_ELEMENT),
    Divergence(b"bytes=0-1,", UNSATISFIABLE, partial((0, 1)), EMPTY_ELEMENT),
    Divergence(b"bytes=,0-1", UNSATISFIABLE, partial((0, 1)), EMPTY_ELEMENT),
    Divergence(b"bytes=5-2", UNSATISFIABLE, WHOLE, INVALID + " (last-pos before first-pos)"),
    Divergence(b"bytes=0--1", UNSATISFIABLE, WHOLE, INVALID),
    Divergence(b"bytes=+0-1", UNSATISFIABLE, WHOLE, INVALID + " (ASCII digits only)"),
    Divergence(b"bytes=0x10-20", UNSATISFIABLE, WHOLE, INVALID),
    Divergence(b"bytes=1_0-20", UNSATISFIABLE, WHOLE, INVALID),
    Divergence("bytes=\u0660-1".encode(), UNSATISFIABLE, WHOLE, INVALID + " (non-ASCII digit)"),
    Divergence(b"bytes=1-2-3", UNSATISFIABLE, WHOLE, INVALID),
    Divergence(b"bytes=0-1;x", UNSATISFIABLE, WHOLE, INVALID),
    Divergence(b"bytes=-", UNSATISFIABLE, WHOLE, INVALID),
    Divergence(b"bytes=\t0-1", UNSATISFIABLE, partial((0, 1)), TAB),
    Divergence(b"bytes=0\t-1", UNSATISFIABLE, partial((0, 1)), TAB),
    Divergence(b"bytes=0-1,\t5-6", UNSATISFIABLE, partial((0, 1), (5, 6)), TAB),
    Divergence(b"bytes=0-99999999999999999999", UNSATISFIABLE, partial((0, LAST)), HUGE_LAST),
    Divergence(b"bytes=0-9223372036854775808", UNSATISFIABLE, partial((0, LAST)), HUGE_LAST),
    Divergence(b"bytes=-99999999999999999999", UNSATISFIABLE, partial((0, LAST)), HUGE_LAST),
    Divergence(b"bytes=0-1,2-3", partial((0, 1), (2, 3)), partial((0, 3)), COALESCE),
    Divergence(b"bytes=0-9,5-14", partial((0, 9), (5, 14)), partial((0, 14)), COALESCE),
    Divergence(b"bytes=10-19,0-4", partial((10, 19), (0, 4)), partial((0, 4), (10, 19)), COALESCE),
    Divergence(
        b"bytes=0-,0-",
        WHOLE,
        partial((0, LAST)),
        COALESCE + "; nginx serves 200 when the ranges add up to more than the file",
    ),
    Divergence(
        f"bytes=0-{LAST},0-0".encode(),
        WHOLE,
        partial((0, LAST)),
        COALESCE + "; nginx serves 200 when the ranges add up to more than the file",
    ),
    Divergence(DISJOINT_65.encode(), WHOLE, UNSATISFIABLE, TOO_MANY + "; nginx serves 200 instead"),
    Divergence(
        ADJACENT_65.encode(),
        WHOLE,
        partial((0, MAX_RANGES)),
        TOO_MANY + ": 65 adjacent ranges are one; nginx counts 65 and serves 200",
    ),
    Divergence(
        OVERLAPPING_65.encode(),
        WHOLE,
        partial(*((i * 100, i * 100 + 9) for i in range(MAX_RANGES))),
        TOO_MANY + ": a duplicate does not count; nginx counts it and serves 200",
    ),
    Divergence(b"bytes=5-2", UNSATISFIABLE, WHOLE, EMPTY_FILE, file=EMPTY),
    Divergence(b"bytes=1-", UNSATISFIABLE, WHOLE, EMPTY_FILE, file=EMPTY),
    Divergence(b"bytes=5-2", UNSATISFIABLE, WHOLE, INVALID, file=SMALL),
    Divergence(b"bytes=0-3,2-5", partial((0, 3), (2, 5)), partial((0, 5)), COALESCE, file=SMALL),
]


def _divergence_id(row: Divergence) -> str:
    return _case_id((row.file, row.header.decode(errors="replace")))


@pytest.mark.parametrize("row", DIVERGENCES, ids=[_divergence_id(r) for r in DIVERGENCES])
def test_documented_divergence(peers: Peers, row: Divergence) -> None:
    theirs, ours = fetch_both(peers, row.file, row.header)
    assert summary(theirs) == row.nginx, f"nginx no longer behaves as recorded: {row.reason}"
    assert summary(ours) == row.ours, row.reason


def test_divergences_are_not_also_agreements() -> None:
    agreed = {(name, _encode(h)) for name, h in AGREE}
    assert not agreed & {(row.file, row.header) for row in DIVERGENCES}


# ---------------------------------------------------------------------------
# HEAD: the headers of the GET (DESIGN.md: "with Range, the 206 headers, as nginx does")

HEAD_CASES: list[str | None] = [
    None,
    "bytes=0-99",
    "bytes=-1",
    "bytes=1048000-",
    f"bytes={BIG_SIZE}-",
    "items=0-1",
]


@pytest.mark.parametrize("header", HEAD_CASES, ids=[_case_id((BIG, h)) for h in HEAD_CASES])
def test_head_same_as_nginx(peers: Peers, header: str | None) -> None:
    raw = _encode(header)
    theirs = request(peers.nginx_port, "HEAD", f"/{BIG}", raw)
    ours = request(peers.cachesvc.port, "HEAD", f"/files/{BIG}", raw)
    assert ours.status == theirs.status
    assert ours.header("content-range") == theirs.header("content-range")
    if theirs.status != 416:
        assert ours.header("content-length") == theirs.header("content-length")
    assert ours.header("accept-ranges") == "bytes"


def test_service_still_serves(peers: Peers) -> None:
    """After every odd header above, a plain GET is still answered in full."""
    got = request(peers.cachesvc.port, "GET", f"/files/{BIG}", None)
    assert got.status == 200 and got.body == peers.files[BIG]
