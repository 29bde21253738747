"""A live ``/metrics`` read as numbers, for the tests that check it."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import call
from tests.support.servers import ServerProcess

# The usage refresher reads the host's view every ~1 s.
POLL_TIMEOUT = 10.0


class Scrape:
    """One parsed exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample of ``cachesvc_<name>`` with exactly ``labels``."""
        for got, value in self.samples.get(f"cachesvc_{name}", []):
            if got == labels:
                return value
        return 0.0


def scrape(server: ServerProcess) -> Scrape:
    reply = call("GET", f"{server.admin_url}/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(reply.body.decode())


def poll(server: ServerProcess, check: Callable[[Scrape], bool], what: str) -> Scrape:
    """Scrapes until ``check`` holds (bounded)."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while True:
        got = scrape(server)
        if check(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {POLL_TIMEOUT}s; last scrape:\n{got.text}")
        time.sleep(0.2)
