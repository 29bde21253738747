"""Errors the cache core raises itself (origin failures keep their own types)."""

from __future__ import annotations


class CacheError(Exception):
    """Base class of errors raised by the cache core."""


class CacheFull(CacheError):
    """No memory is left for new dirty data: write-back is failing or too slow."""
