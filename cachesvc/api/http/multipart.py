"""multipart/byteranges framing (RFC 9110 §14.6): pure functions, no I/O."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cachesvc.api.http.ranges import format_content_range
from cachesvc.core.ranges import Range

__all__ = ["MultipartPart", "MultipartPlan"]

# bchars of RFC 2046 §5.1.1 (the space is left out: it may not end a boundary anyway).
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
_CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class MultipartPart:
    """One body part of a multipart/byteranges response. Immutable."""

    rng: Range
    # Written right before the part's bytes: delimiter, part headers, blank line.
    header: bytes


@dataclass(frozen=True, slots=True)
class MultipartPlan:
    """The exact framing of a multipart/byteranges body (RFC 9110 §14.6). Immutable.

    The body is, for each part, ``part.header`` then the file bytes of
    ``part.rng``; then ``trailer``. Its length is ``content_length``.
    """

    boundary: str
    parts: tuple[MultipartPart, ...]
    # The close delimiter, written after the last part.
    trailer: bytes
    content_length: int

    @property
    def content_type(self) -> str:
        """The response's ``Content-Type`` header value."""
        return f"multipart/byteranges; boundary={self.boundary}"

    @classmethod
    def build(
        cls,
        ranges: Sequence[Range],
        size: int,
        content_type: str | None,
        boundary: str | None = None,
    ) -> MultipartPlan:
        """Frames ``ranges`` of a ``size``-byte file, in the given order.

        ``content_type`` is repeated in every part (left out when None);
        ``boundary`` defaults to 32 random hex digits.
        """
        if not ranges:
            raise ValueError("a multipart/byteranges body needs at least one range")
        if boundary is None:
            boundary = secrets.token_hex(16)
        elif _BOUNDARY.fullmatch(boundary) is None:
            raise ValueError(f"invalid multipart boundary {boundary!r}")
        type_line = b""
        if content_type is not None:
            if _HEADER_VALUE.fullmatch(content_type) is None:
                raise ValueError(f"invalid part content type {content_type!r}")
            type_line = b"Content-Type: " + content_type.encode("ascii") + _CRLF
        delimiter = b"--" + boundary.encode("ascii") + _CRLF
        parts: list[MultipartPart] = []
        length = 0
        for rng in ranges:
            header = (
                (_CRLF if parts else b"")
                + delimiter
                + type_line
                + b"Content-Range: "
                + format_content_range(rng, size).encode("ascii")
                + _CRLF
                + _CRLF
            )
            parts.append(MultipartPart(rng, header))
            length += len(header) + rng.end - rng.start
        trailer = _CRLF + b"--" + boundary.encode("ascii") + b"--" + _CRLF
        return cls(boundary, tuple(parts), trailer, length + len(trailer))
