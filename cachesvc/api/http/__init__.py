"""HTTP semantics for the API layer: pure functions, no I/O, no aiohttp.

- :mod:`.ranges`: ``Range`` requests, ``Content-Range``, write ranges
  (``Content-Range``, SabreDAV's ``X-Update-Range``) and decimal parameters;
- :mod:`.multipart`: the framing of multipart/byteranges bodies;
- :mod:`.conditions`: entity tags, RFC 9110 §13.2.2 precondition
  evaluation and If-Range;
- :mod:`.paths`: the request path rules (decoded once, no escape from the
  root);
- :mod:`.simple`: the plain request heads the fast read path answers.

HTTP dates, the files prefix and the instance header are in
:mod:`cachesvc.wire`, which the HTTP origin shares.
"""

from __future__ import annotations

__all__ = ["HeaderError"]


class HeaderError(ValueError):
    """A request header or parameter value is malformed or out of bounds."""
