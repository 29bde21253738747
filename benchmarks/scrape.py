"""cachesvc's ``/metrics`` read as numbers, for the memory benchmarks.

A :class:`Scrape` answers None for a metric the server does not export.
:class:`PeakSampler` polls ``memory_allocated_bytes`` every 20 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "cachesvc_"
SAMPLE_INTERVAL = 0.020  # seconds between PeakSampler's scrapes

LabelSet = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample's value by name (prefix included) and labels."""

    samples: dict[tuple[str, LabelSet], float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[tuple[str, LabelSet], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return cls(samples)

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of ``cachesvc_<name>`` whose labels include
        ``labels``; None if the build exports no such sample."""
        full = PREFIX + name
        found = [
            v
            for (n, ls), v in self.samples.items()
            if n == full and all((k, labels[k]) in ls for k in labels)
        ]
        return sum(found) if found else None

    def has(self, name: str) -> bool:
        full = PREFIX + name
        return any(n == full for n, _ in self.samples)

    def delta(self, before: Scrape, name: str, **labels: str) -> float | None:
        """This scrape's value minus ``before``'s (a counter's growth), or None."""
        now, then = self.value(name, **labels), before.value(name, **labels)
        if now is None:
            return None
        return now - (then or 0.0)


def scrape_sync(admin_url: str, timeout: float = 10.0) -> Scrape:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=timeout) as resp:
        return Scrape.parse(resp.read().decode())


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> Scrape:
    async with session.get(f"{admin_url}/metrics") as resp:
        resp.raise_for_status()
        return Scrape.parse(await resp.text())


class PeakSampler:
    """Polls ``memory_allocated_bytes`` every SAMPLE_INTERVAL while entered
    (an async context manager); ``peak`` is the highest value seen.

    A sampled peak can miss a spike shorter than the interval: it is a lower
    bound, used only where the build has no ``memory_allocated_peak_bytes``.
    """

    def __init__(self, session: aiohttp.ClientSession, admin_url: str) -> None:
        self._session = session
        self._admin_url = admin_url
        self.peak = 0.0  # bytes; written by the sampling task only
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            got = (await scrape(self._session, self._admin_url)).value("memory_allocated_bytes")
            if got is not None:
                self.peak = max(self.peak, got)
                self.samples += 1
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def __aenter__(self) -> PeakSampler:
        self._task = asyncio.create_task(self._run(), name="peak sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        # One last look: the run's final state counts too.
        got = (await scrape(self._session, self._admin_url)).value("memory_allocated_bytes")
        if got is not None:
            self.peak = max(self.peak, got)
