"""Entity tags and conditional requests (RFC 9110 §8.8.3, §13): pure
functions, no I/O.

Conditional requests follow the evaluation order of RFC 9110 §13.2.2
(:func:`evaluate_preconditions`); If-Range (§13.1.5) is
:func:`if_range_allows`. HTTP dates are read by
:func:`cachesvc.wire.parse_http_date`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple

from cachesvc.api.http import HeaderError
from cachesvc.wire import parse_http_date

__all__ = [
    "EntityTag",
    "evaluate_preconditions",
    "format_etag",
    "if_range_allows",
    "parse_entity_tags",
]

_OWS = " \t"
# etagc = %x21 / %x23-7E / obs-text; obs-text (%x80-FF) is accepted as any non-ASCII.
_ETAG_OPAQUE = re.compile(r"[\x21\x23-\x7e\x80-\U0010ffff]*")
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class EntityTag(NamedTuple):
    """A parsed entity-tag (RFC 9110 §8.8.3); ``opaque`` is without quotes."""

    weak: bool
    opaque: str

    def strong_match(self, other: EntityTag) -> bool:
        """Both strong and character-for-character equal."""
        return not self.weak and not other.weak and self.opaque == other.opaque

    def weak_match(self, other: EntityTag) -> bool:
        """Equal opaque tags, whether weak or not."""
        return self.opaque == other.opaque


def format_etag(token: str) -> str:
    """The strong ``ETag`` header value for ``token``: the token in double quotes."""
    if not token.isascii() or _ETAG_OPAQUE.fullmatch(token) is None:
        raise ValueError(f"invalid entity-tag characters in {token!r}")
    return f'"{token}"'


def parse_entity_tags(value: str) -> list[EntityTag]:
    """Parses a ``#entity-tag`` list (If-Match, If-None-Match, ETag).

    Commas inside quotes belong to the tag; empty list elements are
    skipped; ``W/`` is case-sensitive. The ``*`` form is the caller's to
    handle. Raises :class:`HeaderError` when the value is malformed.
    """
    tags: list[EntityTag] = []
    pos, length = 0, len(value)
    while True:
        while pos < length and value[pos] in " \t,":
            pos += 1
        if pos == length:
            return tags
        weak = value.startswith("W/", pos)
        if weak:
            pos += 2
        if not value.startswith('"', pos):
            raise HeaderError("entity-tag must be a quoted string")
        close = value.find('"', pos + 1)
        if close < 0:
            raise HeaderError("unterminated entity-tag")
        opaque = value[pos + 1 : close]
        if _ETAG_OPAQUE.fullmatch(opaque) is None:
            raise HeaderError("invalid character in entity-tag")
        tags.append(EntityTag(weak, opaque))
        pos = close + 1
        while pos < length and value[pos] in _OWS:
            pos += 1
        if pos < length and value[pos] != ",":
            raise HeaderError("entity-tags must be separated by commas")


def _resource_tag(etag: str | None) -> EntityTag | None:
    """The representation's own entity-tag; a malformed one is a bug."""
    if etag is None:
        return None
    tags = parse_entity_tags(etag)
    if len(tags) != 1:
        raise ValueError(f"not a single entity-tag: {etag!r}")
    return tags[0]


# ---------------------------------------------------------------------------
# Preconditions


def _candidates(value: str) -> list[EntityTag] | None:
    """The entity-tags of a request's list, or None when it is malformed."""
    try:
        return parse_entity_tags(value)
    except HeaderError:
        return None


def _list_matches(value: str, tag: EntityTag | None, exists: bool, *, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match value matches the representation.

    A malformed list matches nothing.
    """
    if value.strip(_OWS) == "*":
        return exists
    candidates = _candidates(value)
    if tag is None or candidates is None:
        return False
    if weak:
        return any(tag.weak_match(candidate) for candidate in candidates)
    return any(tag.strong_match(candidate) for candidate in candidates)


def evaluate_preconditions(
    method: str,
    headers: Mapping[str, str],
    etag: str | None,
    last_modified: float | None,
    exists: bool,
) -> int | None:
    """Evaluates conditional headers in RFC 9110 §13.2.2 order.

    ``headers`` is looked up by canonical name (``If-Match`` ...), so it
    should be case-insensitive, as aiohttp's request headers are; a field
    sent several times should be passed joined with commas. ``etag`` is the
    representation's ``ETag`` header value and ``last_modified`` its
    modification time (compared in whole seconds, as ``Last-Modified``
    carries it); both are None when the file does not exist.

    Returns None to proceed, 304 (Not Modified, GET/HEAD) or 412
    (Precondition Failed). If-Range is separate: :func:`if_range_allows`.
    """
    tag = _resource_tag(etag)
    modified = None if last_modified is None else math.floor(last_modified)
    # Step 1 and 2: If-Match, else If-Unmodified-Since.
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not _list_matches(if_match, tag, exists, weak=False):
            return 412
    else:
        unmodified_since = headers.get("If-Unmodified-Since")
        if unmodified_since is not None and modified is not None:
            date = parse_http_date(unmodified_since)
            if date is not None and modified > date:
                return 412
    # Step 3 and 4: If-None-Match, else If-Modified-Since on GET/HEAD.
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if _list_matches(if_none_match, tag, exists, weak=True):
            return 304 if method in _SAFE_METHODS else 412
    elif method in _SAFE_METHODS:
        modified_since = headers.get("If-Modified-Since")
        if modified_since is not None and modified is not None:
            date = parse_http_date(modified_since)
            if date is not None and modified <= date:
                return 304
    return None


def if_range_allows(header: str | None, etag: str | None, last_modified: float | None) -> bool:
    """Whether a Range may be honoured under this ``If-Range`` value (RFC 9110 §13.1.5).

    True without If-Range. An entity-tag must match strongly (a weak one
    never does); a date must equal ``Last-Modified`` exactly (in whole
    seconds). A malformed value does not match, so the full body is sent.
    """
    if header is None:
        return True
    value = header.strip(_OWS)
    if value.startswith(('"', "W/")):
        tag, candidates = _resource_tag(etag), _candidates(value)
        if tag is None or candidates is None:
            return False
        return len(candidates) == 1 and tag.strong_match(candidates[0])
    date = parse_http_date(value)
    return date is not None and last_modified is not None and math.floor(last_modified) == date
