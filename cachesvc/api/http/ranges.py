"""HTTP byte ranges and write ranges: pure functions, no I/O.

This is the only module that converts HTTP's inclusive ``first-last``
positions to the half-open :class:`Range` used everywhere else
(:mod:`cachesvc.api.http.multipart` frames its parts with
:func:`format_content_range`).

Range requests (RFC 9110 §14.1-14.2), as :func:`parse_range` reads them:

- The unit is ``bytes``, case-insensitive, followed directly by ``=``.
  Whitespace between the unit and ``=`` makes it an unknown unit, so the
  header is ignored (nginx does the same).
- OWS (spaces and tabs) is accepted around list elements and around the
  ``-`` of a range-spec (nginx accepts spaces there too); empty list
  elements are skipped (``bytes=0-1,,2-3``, a trailing comma), as RFC 9110
  §5.6.1 asks. nginx answers 416 to empty elements; we follow the RFC.
- Numbers are ASCII digits only. A number of more than 19 significant
  digits is larger than any file: as a first-byte-pos it makes its range
  unsatisfiable, as a last-byte-pos or suffix-length it is clamped to the
  file. nginx answers 416 to any overflowing number.
- A syntactically invalid header (including ``last < first``) is ignored
  as a whole (200 with the full body), as RFC 9110 allows; nginx answers
  416 instead. Any Range on an empty file is ignored.
- Satisfiable ranges are clamped to the file, sorted, and overlapping or
  adjacent ones coalesced (nginx does not coalesce). None left, or more
  than ``max_ranges`` left, is unsatisfiable (nginx serves 200 when there
  are too many).

Writes take ``Content-Range: bytes a-b/*`` (:func:`parse_content_range`) or
SabreDAV's ``X-Update-Range`` (:func:`parse_update_range`); both are strict,
and errors raise :class:`~cachesvc.api.http.HeaderError` (a 400 in the API
layer), as do bad decimal parameters (:func:`parse_decimal`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

from cachesvc.api.http import HeaderError
from cachesvc.core.ranges import MAX_OFFSET, Range

__all__ = [
    "RangeKind",
    "RangeOutcome",
    "WriteRange",
    "format_content_range",
    "parse_content_range",
    "parse_decimal",
    "parse_range",
    "parse_update_range",
    "unsatisfied_content_range",
]

# A number with more significant digits than this exceeds MAX_OFFSET (19 digits).
_MAX_DIGITS = len(str(MAX_OFFSET))
# Stands for any number of more than _MAX_DIGITS digits: larger than every file size.
_HUGE: int = 10**_MAX_DIGITS

_OWS = " \t"
# One range-spec: "first-[last]" or "-suffix", OWS allowed around each token.
# [0-9] (not \d) so that only ASCII digits match.
_RANGE_SPEC = re.compile(r"[ \t]*(?:([0-9]+)[ \t]*-[ \t]*([0-9]*)|-[ \t]*([0-9]+))[ \t]*")
# "bytes=first-last" with numbers below 10**18 (so below MAX_OFFSET).
_FIRST_LAST = re.compile(r"bytes=([0-9]{1,18})-([0-9]{1,18})")
_CONTENT_RANGE = re.compile(r"bytes[ \t]+([0-9]+)-([0-9]+)/([0-9]+|\*)", re.ASCII | re.IGNORECASE)
_UPDATE_RANGE = re.compile(r"bytes=(?:([0-9]+)-([0-9]*)|-([0-9]+))", re.ASCII | re.IGNORECASE)
_DIGITS = re.compile(r"[0-9]+")


def _number(digits: str) -> int:
    """Value of an ASCII digit string; _HUGE when it has too many digits."""
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        return _HUGE
    return int(significant or "0")


# ---------------------------------------------------------------------------
# Range


class RangeKind(enum.Enum):
    """What a GET does with its Range header."""

    IGNORE = "ignore"  # serve 200 with the whole body
    UNSATISFIABLE = "unsatisfiable"  # 416 with Content-Range: bytes */size
    SATISFIABLE = "satisfiable"  # 206 with these ranges


class RangeOutcome(NamedTuple):
    """The result of :func:`parse_range`. Immutable."""

    kind: RangeKind
    # Non-empty, ascending, disjoint, non-adjacent and within the file iff
    # kind is SATISFIABLE; empty otherwise.
    ranges: tuple[Range, ...] = ()
    # Why the header was ignored or is unsatisfiable (for logs and 416 bodies).
    reason: str = ""


def _ignore(reason: str) -> RangeOutcome:
    return RangeOutcome(RangeKind.IGNORE, reason=reason)


def _coalesce(ranges: list[Range]) -> list[Range]:
    """Sorts ranges and merges the overlapping or adjacent ones."""
    ranges.sort()
    merged: list[Range] = []
    for rng in ranges:
        if merged and rng.start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Range(last.start, max(last.end, rng.end))
        else:
            merged.append(rng)
    return merged


def parse_range(header: str, size: int, max_ranges: int) -> RangeOutcome:
    """Interprets a ``Range`` header against a file of ``size`` bytes.

    See the module docstring for the rules. ``max_ranges`` (at least 1)
    caps the number of ranges left after coalescing.
    """
    if not 0 <= size <= MAX_OFFSET:
        raise ValueError(f"file size {size} out of bounds")
    if max_ranges < 1:
        raise ValueError(f"max_ranges must be at least 1, not {max_ranges}")
    simple = _FIRST_LAST.fullmatch(header)
    if simple is not None:
        # The common "bytes=first-last": the rules below in one step.
        low, high = int(simple[1]), int(simple[2])
        if low <= high and low < size:
            return RangeOutcome(RangeKind.SATISFIABLE, (Range(low, min(high + 1, size)),))
    unit, equals, range_set = header.strip(_OWS).partition("=")
    if not equals or not unit.isascii() or unit.lower() != "bytes":
        return _ignore("not a bytes range")
    if size == 0:
        return _ignore("range of an empty file")
    # Syntax first: one bad element makes the whole header ignored.
    specs: list[tuple[int, int | None, int | None]] = []  # (first, last, suffix)
    for element in range_set.split(","):
        if not element.strip(_OWS):
            continue
        match = _RANGE_SPEC.fullmatch(element)
        if match is None:
            return _ignore("malformed range-spec")
        first, last, suffix = match.groups()
        if suffix is not None:
            specs.append((0, None, _number(suffix)))
            continue
        first_pos = _number(first)
        last_pos = _number(last) if last else None
        if last_pos is not None and last_pos < first_pos:
            return _ignore("range-spec with last-pos before first-pos")
        specs.append((first_pos, last_pos, None))
    if not specs:
        return _ignore("empty range-set")
    satisfiable: list[Range] = []
    for first_pos, last_pos, suffix_length in specs:
        if suffix_length is not None:
            if suffix_length > 0:
                satisfiable.append(Range(max(0, size - suffix_length), size))
        elif first_pos < size:
            end = size if last_pos is None else min(last_pos + 1, size)
            satisfiable.append(Range(first_pos, end))
    if not satisfiable:
        return RangeOutcome(
            RangeKind.UNSATISFIABLE, reason=f"no range overlaps the {size}-byte file"
        )
    merged = _coalesce(satisfiable)
    if len(merged) > max_ranges:
        return RangeOutcome(
            RangeKind.UNSATISFIABLE,
            reason=f"{len(merged)} ranges after coalescing, more than the limit of {max_ranges}",
        )
    return RangeOutcome(RangeKind.SATISFIABLE, tuple(merged))


def format_content_range(rng: Range, size: int) -> str:
    """``Content-Range`` of a 206 part: ``bytes first-last/size`` (inclusive)."""
    if not 0 <= rng.start < rng.end <= size:
        raise ValueError(f"{rng} is empty or outside a {size}-byte file")
    return f"bytes {rng.start}-{rng.end - 1}/{size}"


def unsatisfied_content_range(size: int) -> str:
    """``Content-Range`` of a 416: ``bytes */size``."""
    return f"bytes */{size}"


# ---------------------------------------------------------------------------
# Write ranges


def _write_offset(digits: str, what: str) -> int:
    value = _number(digits)
    if value >= MAX_OFFSET:
        raise HeaderError(f"{what} {digits} is too large")
    return value


def parse_content_range(header: str) -> Range:
    """Reads the ``Content-Range`` of a partial write: ``bytes a-b/*`` or ``bytes a-b/N``.

    Returns the half-open range ``[a, b+1)``. The complete-length ``N`` must
    be digits or ``*`` and is otherwise ignored (curl sends its upload size
    there). Raises :class:`HeaderError` on anything else, including the
    ``bytes */N`` form of a 416.
    """
    match = _CONTENT_RANGE.fullmatch(header.strip(_OWS))
    if match is None:
        raise HeaderError("Content-Range must look like 'bytes first-last/*'")
    first = _write_offset(match[1], "Content-Range first-pos")
    last = _write_offset(match[2], "Content-Range last-pos")
    if last < first:
        raise HeaderError("Content-Range last-pos is before first-pos")
    return Range(first, last + 1)


@dataclass(frozen=True, slots=True)
class WriteRange:
    """Where a partial write goes, before the body length is known. Immutable.

    ``end`` is None when the body decides where the write ends (SabreDAV's
    ``append``, ``bytes=a-`` and ``bytes=-n``); otherwise the body must be
    exactly ``end - start`` bytes long.
    """

    start: int
    end: int | None

    @property
    def expected_length(self) -> int | None:
        """The body length the range demands, or None when any length fits."""
        return None if self.end is None else self.end - self.start

    def resolve(self, body_length: int) -> Range:
        """The written range for a body of ``body_length`` bytes.

        Raises :class:`HeaderError` when the body does not fit the range.
        """
        if self.end is None:
            if body_length > MAX_OFFSET - self.start:
                raise HeaderError("write would end beyond the largest file offset")
            return Range(self.start, self.start + body_length)
        if body_length != self.end - self.start:
            raise HeaderError(
                f"body is {body_length} bytes but the range holds {self.end - self.start}"
            )
        return Range(self.start, self.end)


def parse_update_range(header: str, size: int) -> WriteRange:
    """Reads SabreDAV's ``X-Update-Range`` for a file of ``size`` bytes.

    - ``bytes=a-b``: bytes a to b inclusive; the body must be b-a+1 bytes.
    - ``bytes=a-``: the body is written at a.
    - ``bytes=-n``: the body is written at size-n (n <= size), so it
      replaces the last n bytes and may extend the file (SabreDAV's table:
      ``bytes=-2`` with 4 bytes on ``1234567890`` gives ``12345678----``).
    - ``append``: the body is written at size.

    The unit and ``append`` are case-insensitive. Raises :class:`HeaderError`
    on anything else.
    """
    value = header.strip(_OWS)
    if value.isascii() and value.lower() == "append":
        return WriteRange(size, None)
    match = _UPDATE_RANGE.fullmatch(value)
    if match is None:
        raise HeaderError("X-Update-Range must be 'bytes=a-b', 'bytes=a-', 'bytes=-n' or 'append'")
    first, last, suffix = match.groups()
    if suffix is not None:
        suffix_length = _number(suffix)
        if suffix_length > size:
            raise HeaderError(f"X-Update-Range suffix {suffix} is longer than the file ({size})")
        return WriteRange(size - suffix_length, None)
    start = _write_offset(first, "X-Update-Range first-pos")
    if not last:
        return WriteRange(start, None)
    last_pos = _write_offset(last, "X-Update-Range last-pos")
    if last_pos < start:
        raise HeaderError("X-Update-Range last-pos is before first-pos")
    return WriteRange(start, last_pos + 1)


def parse_decimal(text: str, *, name: str, maximum: int) -> int:
    """Reads a non-negative decimal of ASCII digits no larger than ``maximum``.

    For query parameters such as ``?truncate=N``; no sign, spaces or
    separators. Raises :class:`HeaderError` naming ``name``.
    """
    if _DIGITS.fullmatch(text) is None:
        raise HeaderError(f"{name} must be a decimal number of ASCII digits")
    significant = text.lstrip("0")
    if len(significant) > len(str(maximum)) or int(significant or "0") > maximum:
        raise HeaderError(f"{name} must be at most {maximum}")
    return int(significant or "0")
