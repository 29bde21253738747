"""The HTTP(S) origin: files under one base URL of a static file server, an
object store's public URL or another cachesvc.

* :mod:`~cachesvc.origins.http.origin`: :class:`HttpOrigin`: stat, range
  reads pinned to a version, listings, retries, and writes to another
  cachesvc's data API.
* :mod:`~cachesvc.origins.http.reads`: the range GETs' own connection pool,
  which receives bodies straight into the caller's buffers.
* :mod:`~cachesvc.origins.http.session`: every other request, on aiohttp,
  with its failures as OriginErrors.
* :mod:`~cachesvc.origins.http.parse`: what responses mean: heads,
  ``Content-Range``, version tokens and validators, listings, statuses as
  OriginErrors.
"""

from cachesvc.origins.http.origin import HttpOrigin

__all__ = ["HttpOrigin"]
