"""Deterministic test content: the byte at each offset is a function of
(seed, offset), so any range can be checked without storing files."""

from __future__ import annotations

import hashlib

_BLOCK = 4096


def _block(seed: int, index: int) -> bytes:
    return hashlib.shake_256(f"{seed}:{index}".encode()).digest(_BLOCK)


def pattern(seed: int, offset: int, length: int) -> bytes:
    """``length`` bytes of stream ``seed`` starting at ``offset``."""
    out = bytearray()
    pos = offset
    end = offset + length
    while pos < end:
        index, skip = divmod(pos, _BLOCK)
        take = min(_BLOCK - skip, end - pos)
        out += _block(seed, index)[skip : skip + take]
        pos += take
    return bytes(out)
