"""What a cachesvc build offers, and its ``/metrics`` read as numbers.

The memory benchmarks (``hitratio_bench``, ``pressure_bench``) run against
the cache as it is and as issue 18 will make it, so they ask instead of
assuming:

- :func:`serve_flags` lists the flags ``cachesvc serve --help`` documents
  (``--eviction-policy`` comes with the new memory management), and
  :func:`flag_choices` the values one accepts;
- :func:`readahead_off_args` finds how to turn readahead off: ``--readahead
  0`` once it is accepted, else the smallest window the build takes (today
  64 KiB, which still extends every miss by one window: see its note);
- a :class:`Scrape` answers None for a metric the build does not export
  (``cache_requests_total``, ``cache_bypass_bytes_total``,
  ``memory_allocated_peak_bytes`` are new), so a caller prints "n/a" and
  says why instead of failing.

:class:`PeakSampler` polls ``memory_allocated_bytes`` every 20 ms, for
builds without the peak gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.peers import cachesvc_server

PREFIX = "cachesvc_"
SAMPLE_INTERVAL = 0.020  # seconds between PeakSampler's scrapes
HELP_TIMEOUT = 60.0

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


# ---------------------------------------------------------------------------
# What this build of cachesvc accepts


def _serve_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cachesvc", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=HELP_TIMEOUT,
        check=True,
    )
    return done.stdout


def serve_flags() -> frozenset[str]:
    """The long flags ``cachesvc serve --help`` lists (``--cache-size``, ...)."""
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _serve_help()))


def flag_choices(flag: str) -> list[str] | None:
    """The values ``flag`` accepts if its help shows them as ``{a,b}``;
    None if the flag is missing or takes any value."""
    match = re.search(re.escape(flag) + r"\s+\{([^}]*)\}", _serve_help())
    return match.group(1).split(",") if match else None


@dataclass(frozen=True)
class ReadaheadOff:
    """The flags that turn readahead off on this build, and what they mean."""

    args: tuple[str, ...]
    exact: bool  # True: no prefetch beyond the request's own extents
    note: str


_FALLBACK_READAHEAD = "64KiB"


def readahead_off_args() -> ReadaheadOff:
    """``--readahead 0`` if this build accepts it (started once on an empty
    origin to find out: the value is only checked when the server starts),
    else the smallest window, ``--readahead 64KiB``."""
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as work:
        log = Path(work) / "probe.log"
        origin = Path(work) / "origin"
        origin.mkdir()
        try:
            with cachesvc_server(
                origin, ["--readahead", "0", "--log-level", "warning"], log_path=log
            ):
                pass
        except (RuntimeError, TimeoutError):
            reason = log.read_text(errors="replace").strip().splitlines()
            return ReadaheadOff(
                ("--readahead", _FALLBACK_READAHEAD),
                False,
                "this build refuses --readahead 0 ("
                + (reason[-1] if reason else "no message")
                + "); readahead 'off' runs use --readahead 64KiB, its smallest window,"
                " which still extends every miss by up to 64 KiB past the request",
            )
    return ReadaheadOff(("--readahead", "0"), True, "--readahead 0: no prefetch")
