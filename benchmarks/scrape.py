"""cachesvc's ``/metrics`` read as numbers, for the memory benchmarks.

A :class:`Scrape` answers None for a metric the server does not export.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "cachesvc_"

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
