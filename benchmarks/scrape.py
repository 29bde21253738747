"""cachesvc's ``/metrics`` read as numbers, for the memory benchmarks.

:func:`scrape` fetches the admin listener's ``/metrics``; a :class:`Scrape`
gives a metric's value or a counter's growth between two scrapes. Every
metric a benchmark reads must be there: one the server does not export is
a :class:`MissingMetric` error (a renamed or dropped metric), never a
figure quietly left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "cachesvc_"

LabelSet = tuple[tuple[str, str], ...]


class MissingMetric(LookupError):
    """The server exports no sample of a metric a benchmark reads."""


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

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``cachesvc_<name>`` whose labels include
        ``labels``; raises MissingMetric if there is none."""
        full = PREFIX + name
        found = [
            v
            for (n, ls), v in self.samples.items()
            if n == full and all((k, labels[k]) in ls for k in labels)
        ]
        if not found:
            wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
            raise MissingMetric(f"/metrics has no {full}" + (f"{{{wanted}}}" if labels else ""))
        return sum(found)

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        """This scrape's value minus ``before``'s (a counter's growth)."""
        return self.value(name, **labels) - before.value(name, **labels)


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> Scrape:
    async with session.get(f"{admin_url}/metrics") as resp:
        resp.raise_for_status()
        return Scrape.parse(await resp.text())
