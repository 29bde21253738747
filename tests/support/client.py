"""A blocking HTTP client for tests that talk to a real server process.

:func:`call` sends one request with urllib and returns the response read
whole as a :class:`Reply`, error statuses included (no exception for 4xx
and 5xx).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from typing import Any


@dataclass
class Reply:
    """A response read whole."""

    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    method: str, url: str, *, headers: dict[str, str] | None = None, data: bytes | None = None
) -> Reply:
    """One request to ``url``; a 30 s timeout."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read())
