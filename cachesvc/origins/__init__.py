"""Origins: where remote files live; nothing here knows about the cache.

:func:`open_origin` turns an ``--origin`` value into an Origin: a local path
or ``file://`` URL, ``http(s)://`` or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from cachesvc.origins.base import Origin


@dataclass(frozen=True, slots=True)
class OriginOptions:
    """Settings that only some origin kinds use. Immutable."""

    http_origin_writes: bool = False
    http_token: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None


def origin_kind(url: str) -> str:
    """``local``, ``http`` or ``s3`` for an ``--origin`` value."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme == "s3":
        return "s3"
    return "local"


def local_root(url: str) -> str:
    """The directory of a local ``--origin`` (a path or a ``file://`` URL)."""
    if url.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return url


def open_origin(url: str, options: OriginOptions) -> Origin:
    """The Origin for ``url``; imports only the package of that kind."""
    kind = origin_kind(url)
    if kind == "http":
        from cachesvc.origins.http import HttpOrigin

        return HttpOrigin(url, writes=options.http_origin_writes, token=options.http_token)
    if kind == "s3":
        from cachesvc.origins.s3 import S3Origin

        return S3Origin.from_url(url, endpoint_url=options.s3_endpoint, region=options.s3_region)
    from cachesvc.origins.local import LocalOrigin

    return LocalOrigin.open(local_root(url))
