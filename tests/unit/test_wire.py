"""Tests of cachesvc.wire: HTTP dates."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesvc.wire import format_http_date, parse_http_date


@pytest.fixture
def new_york_time() -> Iterator[None]:
    """A local zone other than UTC, so that naive dates read as local would fail."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


T0 = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.usefixtures("new_york_time")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Sun, 06 Nov 1994 08:49:37 GMT", T0),
        ("Sunday, 06-Nov-94 08:49:37 GMT", T0),
        ("Sun Nov  6 08:49:37 1994", T0),
        ("Sun, 06 Nov 1994 08:49:37 -0000", T0),
        ("Sun, 06 Nov 1994 09:49:37 +0100", T0),
        ("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", None),
        ("garbage", None),
        ("", None),
        ("1", None),
        ("Sun, 31 Feb 1994 08:49:37 GMT", None),
        ("Sun, 06 Nov 1994 25:49:37 GMT", None),
        ("Sun, 06 Nov 99999 08:49:37 GMT", None),
    ],
)
def test_parse_http_date(value: str, expected: int | None) -> None:
    assert parse_http_date(value) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_http_date_never_raises(value: str) -> None:
    result = parse_http_date(value)
    assert result is None or isinstance(result, int)


def test_format_http_date() -> None:
    assert format_http_date(T0 + 0.9) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_http_date(format_http_date(T0 + 0.9)) == T0
