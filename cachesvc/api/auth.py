"""Bearer-token checks shared by the data and admin listeners."""

from __future__ import annotations

import hmac


def bearer_token_matches(authorization: str, token: str) -> bool:
    """True if an ``Authorization`` value is ``Bearer <token>``.

    The scheme is case-insensitive (RFC 9110 section 11.1); the credentials
    are compared in constant time, as bytes: a header aiohttp decoded with
    surrogate escapes (non-UTF-8 bytes) is a mismatch, not an error.
    """
    scheme, _, credentials = authorization.partition(" ")
    given = credentials.lstrip(" ").encode("utf-8", "surrogateescape")
    matches = hmac.compare_digest(given, token.encode())
    return matches and scheme.lower() == "bearer"
