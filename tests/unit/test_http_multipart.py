"""Tests of cachesvc.api.http.multipart: multipart/byteranges framing."""

from __future__ import annotations

import email
import email.policy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesvc.api.http.multipart import MultipartPlan
from cachesvc.core.ranges import Range


def content(size: int) -> bytes:
    """File content as a function of offset."""
    return bytes((i * 7 + 3) % 251 for i in range(size))


def assemble(plan: MultipartPlan, data: bytes) -> bytes:
    out = bytearray()
    for part in plan.parts:
        out += part.header
        out += data[part.rng.start : part.rng.end]
    out += plan.trailer
    return bytes(out)


def decode_byteranges(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """An independent decoder: split on the delimiters of RFC 2046."""
    delimiter = b"\r\n--" + boundary.encode()
    close = delimiter + b"--\r\n"
    # The first delimiter has no CRLF of its own: the preamble is empty.
    framed = b"\r\n" + body
    assert framed.startswith(delimiter + b"\r\n")
    assert framed.endswith(close)
    preamble, *chunks = framed[: -len(close)].split(delimiter)
    assert preamble == b""
    parts = []
    for chunk in chunks:
        assert chunk.startswith(b"\r\n")
        head, sep, payload = chunk[2:].partition(b"\r\n\r\n")
        assert sep
        headers = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n"))
        parts.append((headers, payload))
    return parts


def test_multipart_exact_bytes() -> None:
    data = b"0123456789" * 10
    plan = MultipartPlan.build([Range(0, 2), Range(5, 7)], 100, "text/plain", "B")
    body = assemble(plan, data)
    assert body == (
        b"--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/100\r\n\r\n01"
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 5-6/100\r\n\r\n56"
        b"\r\n--B--\r\n"
    )
    assert plan.content_length == len(body)
    assert plan.content_type == "multipart/byteranges; boundary=B"


def test_multipart_parses_with_the_email_package() -> None:
    data = b"abcdefghijklmnopqrstuvwxyz" * 4
    plan = MultipartPlan.build([Range(1, 4), Range(50, 60), Range(99, 104)], 104, "text/plain")
    body = assemble(plan, data)
    message = email.message_from_bytes(
        f"Content-Type: {plan.content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    assert message.get_content_type() == "multipart/byteranges"
    parts = list(message.iter_parts())
    assert [part["Content-Range"] for part in parts] == [
        "bytes 1-3/104",
        "bytes 50-59/104",
        "bytes 99-103/104",
    ]
    assert [part.get_payload() for part in parts] == ["bcd", "yzabcdefgh", "vwxyz"]


def test_multipart_without_content_type_and_default_boundary() -> None:
    plan = MultipartPlan.build([Range(0, 1), Range(2, 3)], 3, None)
    assert re.fullmatch(r"[0-9a-f]{32}", plan.boundary)
    assert MultipartPlan.build([Range(0, 1)], 3, None).boundary != plan.boundary
    assert b"Content-Type" not in plan.parts[0].header
    assert plan.content_length == len(assemble(plan, b"abc"))


@pytest.mark.parametrize(
    ("ranges", "content_type", "boundary"),
    [
        ([], "text/plain", "B"),
        ([Range(0, 0)], "text/plain", "B"),
        ([Range(0, 101)], "text/plain", "B"),
        ([Range(100, 101)], "text/plain", "B"),
        ([Range(0, 1)], "text/plain\r\nX-Injected: 1", "B"),
        ([Range(0, 1)], "text/plain", ""),
        ([Range(0, 1)], "text/plain", "a" * 71),
        ([Range(0, 1)], "text/plain", "a b"),
        ([Range(0, 1)], "text/plain", "a\r\nb"),
    ],
)
def test_multipart_rejects(ranges: list[Range], content_type: str, boundary: str) -> None:
    with pytest.raises(ValueError):
        MultipartPlan.build(ranges, 100, content_type, boundary)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 3000),
    bounds=st.lists(st.tuples(st.integers(0, 2999), st.integers(1, 600)), min_size=1, max_size=12),
    content_type=st.sampled_from([None, "application/octet-stream", "text/plain; charset=utf-8"]),
)
def test_multipart_length_is_exact(
    size: int, bounds: list[tuple[int, int]], content_type: str | None
) -> None:
    ranges = [Range(s % size, min(s % size + n, size)) for s, n in bounds]
    data = content(size)
    plan = MultipartPlan.build(ranges, size, content_type)
    body = assemble(plan, data)
    assert plan.content_length == len(body)
    parts = decode_byteranges(body, plan.boundary)
    assert len(parts) == len(ranges)
    for (headers, payload), rng in zip(parts, ranges, strict=True):
        match = re.fullmatch(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)", headers["Content-Range"])
        assert match is not None
        first, last, total = (int(group) for group in match.groups())
        assert (first, last + 1, total) == (rng.start, rng.end, size)
        assert payload == data[first : last + 1]
        assert headers.get("Content-Type") == content_type
