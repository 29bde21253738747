"""Eviction: which cached extents go when the budget is short, and the one
driver that evicts them.

:mod:`~cachesvc.core.eviction.policy` says what a policy is; the policies
are sibling modules (S3-FIFO, the default, and LRU); :func:`make_policy`
builds one by name; :mod:`~cachesvc.core.eviction.driver` is the one place
evictions happen.
"""

from __future__ import annotations

from cachesvc.core.eviction.lru import Lru
from cachesvc.core.eviction.policy import EvictionPolicy
from cachesvc.core.eviction.s3fifo import S3Fifo

POLICIES = ("s3fifo", "lru")
DEFAULT_POLICY = "s3fifo"


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy called ``name`` (one of POLICIES) for a budget of ``capacity`` bytes."""
    if name == "s3fifo":
        return S3Fifo(capacity)
    if name == "lru":
        return Lru(capacity)
    raise ValueError(f"unknown eviction policy {name!r} (choose from {', '.join(POLICIES)})")
