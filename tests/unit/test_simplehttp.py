"""Which request heads the fast read path may answer itself."""

from __future__ import annotations

import pytest

from cachesvc.api.http.simple import MAX_HEAD, SimpleRequest, parse_simple

BASE = "GET /files/a/b.bin HTTP/1.1\r\nHost: h"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (BASE, SimpleRequest("GET", "a/b.bin", None, True)),
        (BASE.replace("GET", "HEAD", 1), SimpleRequest("HEAD", "a/b.bin", None, True)),
        (BASE + "\r\nRange: bytes=0-9", SimpleRequest("GET", "a/b.bin", "bytes=0-9", True)),
        (BASE + "\r\nrange:bytes=0-9  ", SimpleRequest("GET", "a/b.bin", "bytes=0-9", True)),
        (BASE + "\r\nConnection: Close", SimpleRequest("GET", "a/b.bin", None, False)),
        (
            BASE + "\r\nUser-Agent: curl/8\r\nAccept: */*\r\nAccept-Encoding: gzip",
            SimpleRequest("GET", "a/b.bin", None, True),
        ),
        ("GET /files/a%20b HTTP/1.1\r\nHost: h", SimpleRequest("GET", "a%20b", None, True)),
    ],
)
def test_simple_heads(head: str, expected: SimpleRequest) -> None:
    assert parse_simple(head.encode()) == expected


@pytest.mark.parametrize(
    "head",
    [
        BASE.replace("GET", "PUT", 1),
        BASE.replace("GET", "get", 1),
        BASE.replace("HTTP/1.1", "HTTP/1.0"),
        BASE.replace("/files/a/b.bin", "/healthz"),
        BASE.replace("b.bin", "b.bin?x=1"),
        BASE.replace("b.bin", "b.bin#f"),
        BASE.replace("GET ", "GET  "),
        "GET /files/a HTTP/1.1",  # no Host
        BASE + "\r\nHost: h2",  # repeated
        BASE + "\r\nRange: bytes=0-1\r\nRange: bytes=2-3",
        BASE + "\r\nContent-Length: 0",
        BASE + "\r\nTransfer-Encoding: chunked",
        BASE + "\r\nIf-None-Match: *",
        BASE + '\r\nIf-Range: "x"',
        BASE + "\r\nAuthorization: Bearer t",
        BASE + "\r\nX-Other: 1",
        BASE + "\r\nRange : bytes=0-1",  # space before the colon
        BASE + "\r\n Range: bytes=0-1",  # obs-fold
        BASE + "\r\nRange: bytes=0-1\tx",  # a tab
        BASE + "\r\nRange bytes=0-1",  # no colon
        BASE + "\r\nConnection: upgrade",
        BASE + "\nRange: bytes=0-1",  # a bare LF
        BASE + "\r\nUser-Agent: \x7f",
        BASE.replace("b.bin", "b\x01.bin"),
        BASE + "\r\nUser-Agent: " + "x" * MAX_HEAD,
    ],
)
def test_anything_else_is_not_simple(head: str) -> None:
    assert parse_simple(head.encode()) is None


def test_non_ascii_is_not_simple() -> None:
    assert parse_simple(BASE.encode() + b"\r\nUser-Agent: \xc3\xa9") is None
