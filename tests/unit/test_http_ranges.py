"""Tests of cachesvc.api.http.ranges: Range, Content-Range, write ranges, decimals."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesvc.api.http import HeaderError
from cachesvc.api.http.ranges import (
    RangeKind,
    RangeOutcome,
    WriteRange,
    format_content_range,
    parse_content_range,
    parse_decimal,
    parse_range,
    parse_update_range,
    unsatisfied_content_range,
)
from cachesvc.core.ranges import MAX_OFFSET, Range

IGNORE = "ignore"
UNSAT = "unsat"
HUGE = "9" * 40


# ---------------------------------------------------------------------------
# parse_range

RangeExpectation = str | list[tuple[int, int]]

# (header, size, max_ranges, expected); size 100 and max 64 unless stated.
RANGE_CASES: list[tuple[str, int, int, RangeExpectation]] = [
    # Plain forms, inclusive -> half-open.
    ("bytes=0-0", 100, 64, [(0, 1)]),
    ("bytes=0-99", 100, 64, [(0, 100)]),
    ("bytes=10-19", 100, 64, [(10, 20)]),
    ("bytes=50-", 100, 64, [(50, 100)]),
    ("bytes=99-", 100, 64, [(99, 100)]),
    ("bytes=0-", 100, 64, [(0, 100)]),
    ("bytes=-1", 100, 64, [(99, 100)]),
    ("bytes=-100", 100, 64, [(0, 100)]),
    ("bytes=-10", 100, 64, [(90, 100)]),
    ("bytes=0-0", 1, 64, [(0, 1)]),
    ("bytes=-1", 1, 64, [(0, 1)]),
    # Clamping.
    ("bytes=0-100", 100, 64, [(0, 100)]),
    ("bytes=90-1000", 100, 64, [(90, 100)]),
    ("bytes=-101", 100, 64, [(0, 100)]),
    ("bytes=0-9999999999999999999", 100, 64, [(0, 100)]),
    (f"bytes=0-{HUGE}", 100, 64, [(0, 100)]),
    (f"bytes=-{HUGE}", 100, 64, [(0, 100)]),
    ("bytes=00000000000000000000000000005-00000000000000000000000006", 100, 64, [(5, 7)]),
    # Case of the unit.
    ("BYTES=0-1", 100, 64, [(0, 2)]),
    ("Bytes=0-1", 100, 64, [(0, 2)]),
    ("bYtEs=0-1", 100, 64, [(0, 2)]),
    # Whitespace.
    (" bytes=0-1 ", 100, 64, [(0, 2)]),
    ("bytes= 0-1", 100, 64, [(0, 2)]),
    ("bytes=\t0-1", 100, 64, [(0, 2)]),
    ("bytes=0 - 1", 100, 64, [(0, 2)]),
    ("bytes=5 -", 100, 64, [(5, 100)]),
    ("bytes=- 5", 100, 64, [(95, 100)]),
    ("bytes=0-1 , 5-6", 100, 64, [(0, 2), (5, 7)]),
    ("bytes=0-1,\t5-6", 100, 64, [(0, 2), (5, 7)]),
    # Empty list elements.
    ("bytes=0-1,,5-6", 100, 64, [(0, 2), (5, 7)]),
    ("bytes=0-1,", 100, 64, [(0, 2)]),
    ("bytes=,0-1", 100, 64, [(0, 2)]),
    ("bytes= , 0-1 , ,", 100, 64, [(0, 2)]),
    # Lists, sorting and coalescing.
    ("bytes=0-1,5-6", 100, 64, [(0, 2), (5, 7)]),
    ("bytes=5-6,0-1", 100, 64, [(0, 2), (5, 7)]),
    ("bytes=0-5,3-8", 100, 64, [(0, 9)]),
    ("bytes=0-4,5-9", 100, 64, [(0, 10)]),
    ("bytes=0-4,6-9", 100, 64, [(0, 5), (6, 10)]),
    ("bytes=0-1,,2-3", 100, 64, [(0, 4)]),
    ("bytes=0-0,0-0,0-0", 100, 64, [(0, 1)]),
    ("bytes=10-20,12-15", 100, 64, [(10, 21)]),
    ("bytes=0-,-10", 100, 64, [(0, 100)]),
    ("bytes=90-,-5", 100, 64, [(90, 100)]),
    ("bytes=-5,0-0", 100, 64, [(0, 1), (95, 100)]),
    ("bytes=50-59,0-9,20-29", 100, 64, [(0, 10), (20, 30), (50, 60)]),
    # Ranges beyond the end are dropped, the rest kept.
    ("bytes=0-1,200-300", 100, 64, [(0, 2)]),
    (f"bytes={HUGE}-,0-0", 100, 64, [(0, 1)]),
    ("bytes=-0,5-5", 100, 64, [(5, 6)]),
    # max_ranges applies after coalescing.
    ("bytes=0-0,2-2,4-4", 100, 3, [(0, 1), (2, 3), (4, 5)]),
    ("bytes=0-0,2-2,4-4", 100, 2, UNSAT),
    ("bytes=0-0,1-1,2-2", 100, 1, [(0, 3)]),
    # Largest file.
    ("bytes=9223372036854775806-", MAX_OFFSET, 64, [(MAX_OFFSET - 1, MAX_OFFSET)]),
    ("bytes=-9223372036854775807", MAX_OFFSET, 64, [(0, MAX_OFFSET)]),
    (f"bytes=0-{HUGE}", MAX_OFFSET, 64, [(0, MAX_OFFSET)]),
    # Unsatisfiable.
    ("bytes=100-", 100, 64, UNSAT),
    ("bytes=100-200", 100, 64, UNSAT),
    ("bytes=-0", 100, 64, UNSAT),
    ("bytes=-0,-0", 100, 64, UNSAT),
    ("bytes=100-100,200-", 100, 64, UNSAT),
    ("bytes=1-1", 1, 64, UNSAT),
    (f"bytes={HUGE}-", 100, 64, UNSAT),
    (f"bytes={HUGE}-{HUGE}", 100, 64, UNSAT),
    ("bytes=9223372036854775807-", MAX_OFFSET, 64, UNSAT),
    # Ignored: not a bytes range.
    ("", 100, 64, IGNORE),
    ("bytes", 100, 64, IGNORE),
    ("items=0-1", 100, 64, IGNORE),
    ("byte=0-1", 100, 64, IGNORE),
    ("bytesx=0-1", 100, 64, IGNORE),
    ("bytes =0-1", 100, 64, IGNORE),
    ("bytes:0-1", 100, 64, IGNORE),
    ("byte\u017f=0-1", 100, 64, IGNORE),  # LATIN SMALL LETTER LONG S folds to "s"
    # Ignored: empty range-set.
    ("bytes=", 100, 64, IGNORE),
    ("bytes=,", 100, 64, IGNORE),
    ("bytes= , ,", 100, 64, IGNORE),
    # Ignored: syntax.
    ("bytes==0-1", 100, 64, IGNORE),
    ("bytes=abc", 100, 64, IGNORE),
    ("bytes=1", 100, 64, IGNORE),
    ("bytes=-", 100, 64, IGNORE),
    ("bytes=--1", 100, 64, IGNORE),
    ("bytes=1-2-3", 100, 64, IGNORE),
    ("bytes=0-1 2-3", 100, 64, IGNORE),
    ("bytes=0-1;", 100, 64, IGNORE),
    ("bytes=0-1,abc", 100, 64, IGNORE),
    ("bytes=0-1\n", 100, 64, IGNORE),
    ("bytes=\u00a00-1", 100, 64, IGNORE),  # NO-BREAK SPACE is not OWS
    ("bytes=0x10-20", 100, 64, IGNORE),
    ("bytes=1.5-2", 100, 64, IGNORE),
    # Ignored: last-pos before first-pos, anywhere in the list.
    ("bytes=5-3", 100, 64, IGNORE),
    ("bytes=0-1,5-3", 100, 64, IGNORE),
    (f"bytes={HUGE}-5", 100, 64, IGNORE),
    # Ignored: non-digits in numbers.
    ("bytes=+1-2", 100, 64, IGNORE),
    ("bytes=1-+2", 100, 64, IGNORE),
    ("bytes=-+2", 100, 64, IGNORE),
    ("bytes=1_0-20", 100, 64, IGNORE),
    ("bytes=1 0-20", 100, 64, IGNORE),
    ("bytes=\u0663-5", 100, 64, IGNORE),  # ARABIC-INDIC DIGIT THREE
    ("bytes=0-\u0663", 100, 64, IGNORE),
    ("bytes=-\u0663", 100, 64, IGNORE),
    ("bytes=\uff10-1", 100, 64, IGNORE),  # FULLWIDTH DIGIT ZERO
    ("bytes=\u00b2-5", 100, 64, IGNORE),  # SUPERSCRIPT TWO
    # Ignored: any Range of an empty file.
    ("bytes=0-1", 0, 64, IGNORE),
    ("bytes=-5", 0, 64, IGNORE),
    ("bytes=0-", 0, 64, IGNORE),
    ("bytes=garbage", 0, 64, IGNORE),
]


def expectation(outcome: RangeOutcome) -> RangeExpectation:
    if outcome.kind is RangeKind.IGNORE:
        return IGNORE
    if outcome.kind is RangeKind.UNSATISFIABLE:
        return UNSAT
    return [(rng.start, rng.end) for rng in outcome.ranges]


def test_range_table_is_large() -> None:
    assert len(RANGE_CASES) >= 60


@pytest.mark.parametrize(("header", "size", "max_ranges", "expected"), RANGE_CASES)
def test_parse_range(header: str, size: int, max_ranges: int, expected: RangeExpectation) -> None:
    outcome = parse_range(header, size, max_ranges)
    assert expectation(outcome) == expected
    if outcome.kind is RangeKind.SATISFIABLE:
        assert all(isinstance(rng, Range) for rng in outcome.ranges)
        assert outcome.reason == ""
    else:
        assert outcome.ranges == ()
        assert outcome.reason


def test_parse_range_limit_of_64_ranges() -> None:
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 128, 2))
    assert len(parse_range(header, 200, 64).ranges) == 64
    assert parse_range(header + ",130-130", 200, 64).kind is RangeKind.UNSATISFIABLE


@pytest.mark.parametrize(("size", "max_ranges"), [(-1, 64), (MAX_OFFSET + 1, 64), (10, 0)])
def test_parse_range_rejects_bad_arguments(size: int, max_ranges: int) -> None:
    with pytest.raises(ValueError):
        parse_range("bytes=0-1", size, max_ranges)


def test_parse_range_long_header_is_fast() -> None:
    # 8 KiB of digits (aiohttp's header limit) must neither raise nor take long.
    header = "bytes=" + "9" * 8000 + "-"
    started = time.monotonic()
    assert parse_range(header, 100, 64).kind is RangeKind.UNSATISFIABLE
    assert parse_range("bytes=0-" + "9" * 8000, 100, 64).ranges == (Range(0, 100),)
    assert parse_range("bytes=" + "0-0," * 2000, 100, 64).ranges == (Range(0, 1),)
    assert time.monotonic() - started < 1.0


_ows = st.sampled_from(["", " ", "\t", "  "])
_spec = st.one_of(
    st.tuples(st.just("pair"), st.integers(0, 1200), st.integers(0, 1200)),
    st.tuples(st.just("open"), st.integers(0, 1200), st.just(0)),
    st.tuples(st.just("suffix"), st.integers(0, 1200), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 1000),
    specs=st.lists(_spec, min_size=1, max_size=8),
    spaces=st.lists(_ows, min_size=32, max_size=32),
    unit=st.sampled_from(["bytes", "BYTES", "Bytes"]),
)
def test_parse_range_matches_byte_model(
    size: int, specs: list[tuple[str, int, int]], spaces: list[str], unit: str
) -> None:
    """Coalesced ranges cover exactly the bytes the specs name, in canonical form."""
    elements: list[str] = []
    covered: set[int] = set()
    for i, (kind, a, b) in enumerate(specs):
        sp = spaces[i % len(spaces)]
        if kind == "pair":
            first, last = min(a, b), max(a, b)
            elements.append(f"{sp}{first}-{last}{sp}")
            covered.update(range(first, min(last + 1, size)))
        elif kind == "open":
            elements.append(f"{sp}{a}-")
            covered.update(range(a, size))
        else:
            elements.append(f"-{a}{sp}")
            covered.update(range(max(0, size - a), size) if a else ())
    outcome = parse_range(f"{unit}={','.join(elements)}", size, 1000)
    if not covered:
        assert outcome.kind is RangeKind.UNSATISFIABLE
        return
    assert outcome.kind is RangeKind.SATISFIABLE
    got: set[int] = set()
    for rng in outcome.ranges:
        assert 0 <= rng.start < rng.end <= size
        got.update(range(rng.start, rng.end))
    assert got == covered
    # Sorted, disjoint and not adjacent: each gap is at least one byte.
    for left, right in zip(outcome.ranges, outcome.ranges[1:], strict=False):
        assert left.end < right.start


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("0123456789-, \t=bytesBYTES\u0663+x"), max_size=40))
def test_parse_range_never_raises(text: str) -> None:
    outcome = parse_range(text, 50, 4)
    assert (outcome.kind is RangeKind.SATISFIABLE) == bool(outcome.ranges)
    assert len(outcome.ranges) <= 4


def test_format_content_range() -> None:
    assert format_content_range(Range(0, 1), 100) == "bytes 0-0/100"
    assert format_content_range(Range(10, 20), 100) == "bytes 10-19/100"
    assert format_content_range(Range(0, 100), 100) == "bytes 0-99/100"
    assert unsatisfied_content_range(100) == "bytes */100"
    assert unsatisfied_content_range(0) == "bytes */0"
    for bad in (Range(5, 5), Range(0, 101), Range(-1, 3), Range(6, 5)):
        with pytest.raises(ValueError):
            format_content_range(bad, 100)


# ---------------------------------------------------------------------------
# Write ranges

CONTENT_RANGE_OK: list[tuple[str, tuple[int, int]]] = [
    ("bytes 0-0/*", (0, 1)),
    ("bytes 0-99/100", (0, 100)),
    ("bytes 5-9/*", (5, 10)),
    ("BYTES 1-2/*", (1, 3)),
    ("Bytes 1-2/*", (1, 3)),
    ("bytes  1-2/*", (1, 3)),
    ("bytes\t1-2/*", (1, 3)),
    (" bytes 1-2/* ", (1, 3)),
    ("bytes 1-2/0", (1, 3)),  # complete-length is ignored, even when inconsistent
    ("bytes 1-2/" + HUGE, (1, 3)),
    ("bytes 007-009/*", (7, 10)),
    ("bytes 9223372036854775805-9223372036854775806/*", (MAX_OFFSET - 2, MAX_OFFSET)),
]

CONTENT_RANGE_BAD = [
    "",
    "bytes",
    "bytes 1-2",
    "bytes 1-2/",
    "bytes 2-1/*",
    "bytes */100",
    "bytes=1-2/*",
    "bytes1-2/*",
    "items 1-2/*",
    "bytes -2/*",
    "bytes 1-/*",
    "bytes +1-2/*",
    "bytes 1-2/+5",
    "bytes 1-2/x",
    "bytes 1-2/**",
    "bytes 1 -2/*",
    "bytes 1- 2/*",
    "bytes 1-2 /*",
    "bytes \u0663-5/*",
    "bytes 1-\u0663/*",
    "bytes 1-2/\u0663",
    "bytes 1-2/*,3-4/*",
    "bytes 1_0-20/*",
    "bytes 0-9223372036854775807/*",
    f"bytes {HUGE}-{HUGE}/*",
    "byte\u017f 1-2/*",
]


@pytest.mark.parametrize(("header", "expected"), CONTENT_RANGE_OK)
def test_parse_content_range(header: str, expected: tuple[int, int]) -> None:
    assert parse_content_range(header) == Range(*expected)


@pytest.mark.parametrize("header", CONTENT_RANGE_BAD)
def test_parse_content_range_rejects(header: str) -> None:
    with pytest.raises(HeaderError):
        parse_content_range(header)


# SabreDAV's own table: file "1234567890", body "----" ("." is a NUL byte).
SABREDAV_TABLE = [
    ("bytes=0-3", b"----567890"),
    ("bytes=1-4", b"1----67890"),
    ("bytes=0-", b"----567890"),
    ("bytes=-4", b"123456----"),
    ("bytes=-2", b"12345678----"),
    ("bytes=2-", b"12----7890"),
    ("bytes=12-", b"1234567890\0\0----"),
    ("append", b"1234567890----"),
    ("APPEND", b"1234567890----"),
    (" append\t", b"1234567890----"),
    ("BYTES=0-3", b"----567890"),
    ("bytes=-0", b"1234567890----"),
    ("bytes=-10", b"----567890"),
]


def apply_write(data: bytes, rng: Range, body: bytes) -> bytes:
    out = bytearray(data)
    if rng.start > len(out):
        out.extend(bytes(rng.start - len(out)))
    out[rng.start : rng.end] = body
    return bytes(out)


@pytest.mark.parametrize(("header", "expected"), SABREDAV_TABLE)
def test_parse_update_range_sabredav_table(header: str, expected: bytes) -> None:
    data, body = b"1234567890", b"----"
    write = parse_update_range(header, len(data))
    assert apply_write(data, write.resolve(len(body)), body) == expected


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=3-6", 10, WriteRange(3, 7)),
        ("bytes=3-3", 10, WriteRange(3, 4)),
        ("bytes=20-29", 10, WriteRange(20, 30)),
        ("bytes=3-", 10, WriteRange(3, None)),
        ("bytes=-3", 10, WriteRange(7, None)),
        ("append", 10, WriteRange(10, None)),
        ("append", 0, WriteRange(0, None)),
        ("bytes=0009-0010", 10, WriteRange(9, 11)),
    ],
)
def test_parse_update_range(header: str, size: int, expected: WriteRange) -> None:
    assert parse_update_range(header, size) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",
        "bytes=",
        "bytes=-",
        "bytes=3-1",
        "bytes=-11",
        f"bytes=-{HUGE}",
        "bytes=1-2,3-4",
        "bytes = 1-2",
        "bytes= 1-2",
        "bytes=+1-",
        "bytes=1-+2",
        "bytes=\u0663-",
        "bytes=1_0-20",
        "appendx",
        "append=1",
        "items=1-2",
        "bytes 1-2/*",
        f"bytes={HUGE}-",
        "bytes=0-9223372036854775807",
        "\u0430ppend",  # CYRILLIC SMALL LETTER A
    ],
)
def test_parse_update_range_rejects(header: str) -> None:
    with pytest.raises(HeaderError):
        parse_update_range(header, 10)


def test_write_range_resolve() -> None:
    fixed = WriteRange(3, 7)
    assert fixed.expected_length == 4
    assert fixed.resolve(4) == Range(3, 7)
    for wrong in (0, 3, 5):
        with pytest.raises(HeaderError, match="body is"):
            fixed.resolve(wrong)
    open_ended = WriteRange(5, None)
    assert open_ended.expected_length is None
    assert open_ended.resolve(0) == Range(5, 5)
    assert open_ended.resolve(10) == Range(5, 15)
    assert WriteRange(0, None).resolve(MAX_OFFSET) == Range(0, MAX_OFFSET)
    with pytest.raises(HeaderError):
        WriteRange(1, None).resolve(MAX_OFFSET)


@pytest.mark.parametrize(
    ("text", "maximum", "expected"),
    [
        ("0", 100, 0),
        ("5", 100, 5),
        ("0005", 100, 5),
        ("100", 100, 100),
        ("0" * 5000, 100, 0),
        ("9223372036854775807", MAX_OFFSET, MAX_OFFSET),
    ],
)
def test_parse_decimal(text: str, maximum: int, expected: int) -> None:
    assert parse_decimal(text, name="truncate", maximum=maximum) == expected


@pytest.mark.parametrize(
    ("text", "maximum"),
    [
        ("101", 100),
        ("1000", 100),
        ("9" * 5000, 100),  # beyond int()'s digit limit: must not raise ValueError from int
        ("9223372036854775808", MAX_OFFSET),
        ("", 100),
        (" 5", 100),
        ("5 ", 100),
        ("+5", 100),
        ("-5", 100),
        ("5_0", 100),
        ("\u0663", 100),
        ("1e3", 100),
        ("0x10", 100),
        ("5.0", 100),
    ],
)
def test_parse_decimal_rejects(text: str, maximum: int) -> None:
    with pytest.raises(HeaderError, match="truncate"):
        parse_decimal(text, name="truncate", maximum=maximum)


@given(
    first=st.integers(0, 10**19),
    last=st.integers(0, 10**19),
    size=st.integers(0, 10**6),
    zeros=st.integers(0, 3),
)
def test_plain_first_last_range_agrees_with_the_general_rules(
    first: int, last: int, size: int, zeros: int
) -> None:
    # "bytes=a-b" takes a shortcut; a leading space sends the same header
    # through the general parser.
    header = f"bytes={'0' * zeros}{first}-{last}"
    assert parse_range(header, size, 3) == parse_range(" " + header, size, 3)
