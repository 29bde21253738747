"""What both front ends of the data listener share: the state every handler
reads, the instance id every response carries, and the deadline for a
request head.

The data listener's connections start on the fast read path
(:mod:`cachesvc.api.fastconn`) and may be handed to aiohttp's protocol
(:mod:`cachesvc.api.data`); both answer with the same
:data:`INSTANCE_ID` and close idle connections after the same
:data:`HEADER_TIMEOUT`.

:data:`HEADER_TIMEOUT` (30 s): a connection must deliver a complete request
head within this time of opening or of its previous response, so that a
slow client cannot hold a connection (and cache pages) forever. aiohttp
enforces it as its ``keepalive_timeout`` (see :func:`runner_options`),
which closes a connection still waiting for a request's head once it
expires; the fast connection closes an idle connection itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from cachesvc.api.metrics import Metrics
from cachesvc.config import Config
from cachesvc.core.cache import FileCache

HEADER_TIMEOUT = 30.0

# Unique to this run of the process, sent as INSTANCE_HEADER: a client that
# fronts us (an upper cachesvc tier) notices a restart that lost its
# unsynced writes.
INSTANCE_ID = uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class DataState:
    """What the data handlers share. Immutable."""

    cache: FileCache
    config: Config
    metrics: Metrics


def runner_options(header_timeout: float = HEADER_TIMEOUT) -> dict[str, Any]:
    """Keyword arguments for the data listener's ``web.AppRunner``."""
    return {"keepalive_timeout": header_timeout}
