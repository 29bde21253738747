"""Tests of cachesvc.api.http.conditions: entity tags, preconditions, If-Range."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from cachesvc.api.http import HeaderError
from cachesvc.api.http.conditions import (
    EntityTag,
    evaluate_preconditions,
    format_etag,
    if_range_allows,
    parse_entity_tags,
)

T0 = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT


# ---------------------------------------------------------------------------
# Entity tags


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"a"', [EntityTag(False, "a")]),
        ('W/"a"', [EntityTag(True, "a")]),
        ('""', [EntityTag(False, "")]),
        ('"a,b"', [EntityTag(False, "a,b")]),
        ('"a", W/"b"', [EntityTag(False, "a"), EntityTag(True, "b")]),
        ('"a",,"b",', [EntityTag(False, "a"), EntityTag(False, "b")]),
        (' \t"a" , "b" ', [EntityTag(False, "a"), EntityTag(False, "b")]),
        ('"W/a"', [EntityTag(False, "W/a")]),
        ('"\u00e9"', [EntityTag(False, "\u00e9")]),  # obs-text
        ("", []),
    ],
)
def test_parse_entity_tags(value: str, expected: list[EntityTag]) -> None:
    assert parse_entity_tags(value) == expected


@pytest.mark.parametrize(
    "value",
    ["a", '"a', 'w/"a"', '"a" "b"', '"a"b', 'W/ "a"', '"a b"', '"a\x7f"', "*", 'W/"a'],
)
def test_parse_entity_tags_rejects(value: str) -> None:
    with pytest.raises(HeaderError):
        parse_entity_tags(value)


def test_entity_tag_comparison() -> None:
    # The table of RFC 9110 §8.8.3.2.
    strong1, weak1, weak2 = EntityTag(False, "1"), EntityTag(True, "1"), EntityTag(True, "2")
    assert not weak1.strong_match(weak1) and weak1.weak_match(weak1)
    assert not weak1.strong_match(weak2) and not weak1.weak_match(weak2)
    assert not weak1.strong_match(strong1) and weak1.weak_match(strong1)
    assert strong1.strong_match(strong1) and strong1.weak_match(strong1)


def test_format_etag() -> None:
    assert format_etag("abc-123") == '"abc-123"'
    assert parse_entity_tags(format_etag("x")) == [EntityTag(False, "x")]
    for bad in ('a"b', "a b", "\u00e9", "a\n"):
        with pytest.raises(ValueError):
            format_etag(bad)


# ---------------------------------------------------------------------------
# Preconditions

ETAG = '"v1"'
LM = T0 + 0.75  # sub-second mtime: compared in whole seconds
D_EQ = "Sun, 06 Nov 1994 08:49:37 GMT"
D_BEFORE = "Sun, 06 Nov 1994 08:49:36 GMT"
D_AFTER = "Sun, 06 Nov 1994 08:49:38 GMT"

# (method, headers, exists, expected)
PRECONDITION_CASES: list[tuple[str, dict[str, str], bool, int | None]] = [
    ("GET", {}, True, None),
    ("PUT", {}, False, None),
    # If-Match: strong comparison.
    ("PUT", {"If-Match": '"v1"'}, True, None),
    ("PUT", {"If-Match": '"v2"'}, True, 412),
    ("PUT", {"If-Match": 'W/"v1"'}, True, 412),
    ("PUT", {"If-Match": '"v2", "v1"'}, True, None),
    ("PUT", {"If-Match": "*"}, True, None),
    ("PUT", {"If-Match": "*"}, False, 412),
    ("PUT", {"If-Match": '"v1"'}, False, 412),
    ("PUT", {"If-Match": "v1"}, True, 412),
    ("GET", {"If-Match": '"v2"'}, True, 412),
    # If-Unmodified-Since, only without If-Match.
    ("PUT", {"If-Unmodified-Since": D_EQ}, True, None),
    ("PUT", {"If-Unmodified-Since": D_AFTER}, True, None),
    ("PUT", {"If-Unmodified-Since": D_BEFORE}, True, 412),
    ("GET", {"If-Unmodified-Since": D_BEFORE}, True, 412),
    ("PUT", {"If-Unmodified-Since": "garbage"}, True, None),
    ("PUT", {"If-Unmodified-Since": f"{D_BEFORE}, {D_BEFORE}"}, True, None),
    ("PUT", {"If-Unmodified-Since": D_BEFORE}, False, None),
    ("PUT", {"If-Match": '"v1"', "If-Unmodified-Since": D_BEFORE}, True, None),
    # If-None-Match: weak comparison; 304 on GET/HEAD, 412 otherwise.
    ("GET", {"If-None-Match": '"v1"'}, True, 304),
    ("HEAD", {"If-None-Match": '"v1"'}, True, 304),
    ("GET", {"If-None-Match": 'W/"v1"'}, True, 304),
    ("GET", {"If-None-Match": '"a", "v1"'}, True, 304),
    ("GET", {"If-None-Match": '"v2"'}, True, None),
    ("GET", {"If-None-Match": "v1"}, True, None),
    ("GET", {"If-None-Match": "*"}, True, 304),
    ("GET", {"If-None-Match": "*"}, False, None),
    ("PUT", {"If-None-Match": '"v1"'}, True, 412),
    ("DELETE", {"If-None-Match": '"v1"'}, True, 412),
    ("PATCH", {"If-None-Match": "*"}, True, 412),
    ("PUT", {"If-None-Match": "*"}, True, 412),
    ("PUT", {"If-None-Match": "*"}, False, None),
    ("PUT", {"If-None-Match": '"v2"'}, True, None),
    # If-Modified-Since: GET/HEAD only, only without If-None-Match.
    ("GET", {"If-Modified-Since": D_EQ}, True, 304),
    ("HEAD", {"If-Modified-Since": D_AFTER}, True, 304),
    ("GET", {"If-Modified-Since": D_BEFORE}, True, None),
    ("GET", {"If-Modified-Since": "garbage"}, True, None),
    ("GET", {"If-Modified-Since": D_EQ}, False, None),
    ("PUT", {"If-Modified-Since": D_EQ}, True, None),
    ("POST", {"If-Modified-Since": D_AFTER}, True, None),
    ("GET", {"If-None-Match": '"v2"', "If-Modified-Since": D_EQ}, True, None),
    ("GET", {"If-None-Match": '"v1"', "If-Modified-Since": D_BEFORE}, True, 304),
    # Order of evaluation.
    ("GET", {"If-Match": '"v2"', "If-None-Match": '"v1"'}, True, 412),
    ("GET", {"If-Match": '"v1"', "If-None-Match": '"v1"'}, True, 304),
    ("PUT", {"If-Match": '"v1"', "If-None-Match": '"v1"'}, True, 412),
    ("GET", {"If-Unmodified-Since": D_BEFORE, "If-Modified-Since": D_EQ}, True, 412),
    ("GET", {"If-Unmodified-Since": D_EQ, "If-Modified-Since": D_EQ}, True, 304),
    ("GET", {"If-Match": "*", "If-None-Match": "*"}, True, 304),
]


@pytest.mark.parametrize(("method", "headers", "exists", "expected"), PRECONDITION_CASES)
def test_evaluate_preconditions(
    method: str, headers: dict[str, str], exists: bool, expected: int | None
) -> None:
    etag, last_modified = (ETAG, LM) if exists else (None, None)
    assert evaluate_preconditions(method, headers, etag, last_modified, exists) == expected


def test_evaluate_preconditions_with_case_insensitive_headers() -> None:
    headers = CIMultiDict({"if-none-match": '"v1"'})
    assert evaluate_preconditions("GET", headers, ETAG, LM, True) == 304


def test_evaluate_preconditions_rejects_malformed_resource_etag() -> None:
    with pytest.raises(ValueError):
        evaluate_preconditions("GET", {}, "v1", LM, True)


@pytest.mark.parametrize(
    ("header", "etag", "last_modified", "expected"),
    [
        (None, ETAG, LM, True),
        (None, None, None, True),
        ('"v1"', ETAG, LM, True),
        (' "v1" ', ETAG, LM, True),
        ('"v2"', ETAG, LM, False),
        ('W/"v1"', ETAG, LM, False),
        ('"v1"', 'W/"v1"', LM, False),
        ('"v1", "v2"', ETAG, LM, False),
        ('"v1', ETAG, LM, False),
        ('"v1"', None, LM, False),
        (D_EQ, ETAG, LM, True),
        ("Sunday, 06-Nov-94 08:49:37 GMT", ETAG, LM, True),
        (D_BEFORE, ETAG, LM, False),
        (D_AFTER, ETAG, LM, False),
        (D_EQ, ETAG, None, False),
        ("garbage", ETAG, LM, False),
        ("", ETAG, LM, False),
    ],
)
def test_if_range_allows(
    header: str | None, etag: str | None, last_modified: float | None, expected: bool
) -> None:
    assert if_range_allows(header, etag, last_modified) is expected
