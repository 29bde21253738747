"""The HTTP origin's response-head parsing, body framing and buffer sink (no sockets)."""

from __future__ import annotations

import pytest

from cachesvc.origins.base import OriginUnavailable
from cachesvc.origins.http.parse import parse_response_head
from cachesvc.origins.http.reads import BufferSink, _framing


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


def test_parse_response_head() -> None:
    h = parse_response_head(
        head("HTTP/1.1 206 Partial Content", "Content-Range: bytes 0-9/10", "X-A:  1 ", "x-a: 2"),
        "GET f",
    )
    assert (h.minor_version, h.status) == (1, 206)
    assert h.headers["content-range"] == "bytes 0-9/10"
    assert h.headers.getall("X-A") == ["1", "2"]
    assert h.keep_alive
    assert parse_response_head(head("HTTP/1.1 200"), "GET f").status == 200  # no reason phrase


@pytest.mark.parametrize(
    ("lines", "keep_alive"),
    [
        (["HTTP/1.1 200 OK", "Connection: close"], False),
        (["HTTP/1.1 200 OK", "Connection: Upgrade, Close"], False),
        (["HTTP/1.0 200 OK"], False),
        (["HTTP/1.0 200 OK", "Connection: keep-alive"], True),
    ],
)
def test_keep_alive(lines: list[str], keep_alive: bool) -> None:
    assert parse_response_head(head(*lines), "GET f").keep_alive is keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        head("HTTP/2 200 OK"),
        head("HTTP/1.1 20 OK"),
        head("ICY 200 OK"),
        head("HTTP/1.1 200 OK", "No colon here"),
        head("HTTP/1.1 200 OK", "Bad Name: x"),
        head("HTTP/1.1 200 OK", "X-A: 1", " folded"),
    ],
)
def test_malformed_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(OriginUnavailable, match="malformed"):
        parse_response_head(raw, "GET f")


@pytest.mark.parametrize(
    ("lines", "framing", "left", "done"),
    [
        (["HTTP/1.1 206 Partial", "Content-Length: 10"], "length", 10, False),
        (["HTTP/1.1 200 OK", "Content-Length: 0"], "length", 0, True),
        (["HTTP/1.1 200 OK", "Content-Length: 7", "Content-Length: 7"], "length", 7, False),
        (
            ["HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Length: 7"],
            "chunked",
            0,
            False,
        ),
        (["HTTP/1.1 200 OK", "Transfer-Encoding: gzip"], "close", 0, False),
        (["HTTP/1.1 200 OK"], "close", 0, False),
        (["HTTP/1.1 204 No Content", "Content-Length: 5"], "length", 0, True),
    ],
)
def test_body_framing(lines: list[str], framing: str, left: int, done: bool) -> None:
    body = _framing(parse_response_head(head(*lines), "GET f"), "GET f")
    assert (body.framing, body.left, body.done) == (framing, left, done)


@pytest.mark.parametrize("values", [["7", "8"], ["-1"], ["1e3"], ["٣"]])
def test_bad_content_length_is_refused(values: list[str]) -> None:
    lines = ["HTTP/1.1 200 OK", *(f"Content-Length: {v}" for v in values)]
    raw = "\r\n".join(lines).encode("utf-8")
    with pytest.raises(OriginUnavailable, match="Content-Length"):
        _framing(parse_response_head(raw, "GET f"), "GET f")


def test_buffer_sink_fills_consecutive_buffers_from_an_offset() -> None:
    bufs = [bytearray(3), bytearray(0), bytearray(4), bytearray(5)]
    sink = BufferSink([memoryview(b) for b in bufs], 2)
    assert sink.room == 10
    sink.write(memoryview(b"abcd"))  # crosses the empty buffer
    window = sink.window(6)
    assert len(window) == 1  # the rest of the current buffer only
    window[:] = b"e"
    sink.advance(1)
    assert sink.room == 5
    assert len(sink.window(2)) == 2
    sink.write(memoryview(b"fghij"))
    assert sink.room == 0
    assert [bytes(b) for b in bufs] == [b"\0\0a", b"", b"bcde", b"fghij"]
