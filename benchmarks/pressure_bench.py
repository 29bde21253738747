"""Memory under pressure: cold reads into a cache a quarter of their size (issue 18).

Run with ``python -m benchmarks.pressure_bench [--quick] [--streams N]
[--file-size SIZE] [--rounds N] [--no-http] [--small-files N]
[--extents N]``. Prints markdown tables and returns the figures as a dict.

**Streams and random ranges.** ``N`` files (default 8) of ``--file-size``
(default 32 MiB, so 256 MiB; 8 MiB with ``--quick``), of seeded content,
are read cold through a fresh cachesvc whose ``--cache-size`` is a quarter
of their total (*bounded*: 64 MiB by default), and again with a cache of
twice their total (*unbounded*), each in two ways:

- *streams*: N clients each ``GET`` one whole file, all at once;
- *random*: the files are cut into 4 KiB-aligned ranges of 64 KiB-1 MiB
  (log-uniform) that 8 clients read in a seeded random order, so every
  byte is asked for exactly once.

Both run on a local origin (the files mlocked in the host's page cache, so
the disk plays no part) and on an HTTP origin: nginx behind the origin
benchmark's :class:`~benchmarks.origin_peers.LatencyProxy`, which delays
every request by 2 ms. cachesvc runs with its default readahead and is
pinned to CPU 0; the clients (this process), nginx and the proxy to CPU 1.
Every body is compared byte for byte with the file. Figures, from
``/metrics`` deltas and the client:

- amplification: ``origin_bytes_total{direction="in"}`` over the unique
  bytes asked for (the files' total): 1.0 means every byte came from the
  origin once; readahead that is evicted before it is read, or refills of
  evicted data, push it up;
- wall: the bounded run's time over the unbounded run's, as the ratio of
  the medians of ``--rounds`` fresh starts; each side's median is printed
  with its spread (min-max), so the noise of a ratio is visible (with 8 MiB
  files a run lasts 0.1-0.3 s, and the ratio is mostly noise);
- peak: ``memory_allocated_peak_bytes`` after the bounded run (the most
  page-cache memory allocated at once since the server started, kept by the
  memory file on every allocation, so no spike is missed), against the
  budget (``memory_limit_bytes``) plus a slack of max(2 MiB, 1 % of the
  cache).

Each round runs the unbounded case first; the bounded run is then stopped
if it takes over 20 times as long (at least 10 s), and its figures so far
are reported as lower bounds (">="). This guards against a regression to
refill storms, which without a hard budget kept 8 streams over the 2 ms
origin busy for more than 5 minutes, instead of hanging the benchmark.

**Heap per cached file.** 100,000 files of 4 KiB (``--small-files``) are
each read once through a cachesvc with room for all of them. The first
1,000 warm the server up (first requests, connections, allocator arenas);
the figure is the growth of the server's ``RssAnon`` (``/proc/PID/status``)
over the other 99,000 reads, divided by those files: the heap (inodes, range
sets, policy entries, Python objects) each cached file costs. Evicted bytes
are shown, so an eviction (by the budget or by the file limit) would show.
The cached bytes themselves live in the memory file (a memfd: shared
memory, ``RssShmem``), so they do not count.

**Heap per cached extent.** One sparse file of twice ``--extents`` 64 KiB
extents (default 16,384 extents cached: a 2 GiB file; 4,096 with
``--quick``) is read through a cachesvc with ``--readahead 0`` and room for
all of them, one 64 KiB read of each even extent, in a seeded random order:
each read fills exactly its own extent, and no two cached extents touch, so
each is a segment of its own in the file's range sets (none merge) and an
entry of its own in the eviction policy: the costliest layout per extent.
The first sixteenth of the reads warm the server up; the figure is the
growth of ``RssAnon`` over the other reads, divided by their number: the
heap each cached extent of a large file costs, beside the file's one inode.
Growth of the server's tables (dicts, lists) is counted where it falls, so
the figure moves a little with ``--extents``. Cached MiB (``--extents`` x
64 KiB) shows that nothing was read ahead.

Targets (issue 18): amplification <= 1.1, peak <= budget + slack, wall <=
1.3 x unbounded, at most 1 KiB of heap per cached file and 128 B per
cached extent. Each is printed beside its figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.loadgen import CLIENTS, own_cpus, replay, session
from benchmarks.origin_peers import NGINX_AUTOINDEX, LatencyProxy
from benchmarks.peers import Peer, cachesvc_server, nginx_server, resident
from benchmarks.scrape import Scrape, scrape
from benchmarks.traces import EXTENT, KiB, MiB, Read
from cachesvc.config.values import parse_size
from tests.support.content import pattern

SERVER_CPUS = "0"
FAR_CPUS = "1"  # the clients, nginx and the latency proxy
ORIGIN_DELAY = 0.002
FILE_SIZE = 32 * MiB
QUICK_FILE_SIZE = 8 * MiB
STREAMS = 8
ROUNDS = 3
SMALL_FILES = 100_000
SMALL_SIZE = 4 * KiB
WARM_FILES = 1_000
EXTENTS = 16_384  # 64 KiB extents cached, every other one of a 2 GiB file
QUICK_EXTENTS = 4_096
WARM_EXTENTS_PART = 16  # the first 1/16 of the extents warm the server up
RANGE_MIN, RANGE_MAX = 64 * KiB, 1 * MiB
SEED = 20261218
AMPLIFICATION_TARGET = 1.1
WALL_TARGET = 1.3
HEAP_TARGETS = {"file": 1 * KiB, "extent": 128}  # heap bytes per cached file, extent
HEAP_ITEMS = {"file": "files of 4 KiB", "extent": "64 KiB extents of one file"}
SERVER_ARGS = ("--log-level", "warning", "--revalidate", "1h")
Content = Callable[[Read], bytes]  # the bytes a read must return
# A bounded run still going after DEADLINE_FACTOR x its unbounded twin (at
# least MIN_DEADLINE seconds) is stopped and reported as such: a regression
# to refill storms would otherwise take minutes.
DEADLINE_FACTOR = 20
MIN_DEADLINE = 10.0
UNBOUNDED_DEADLINE = 120.0


@dataclass
class Run:
    """One fresh cachesvc, one workload."""

    seconds: float
    origin_bytes: float
    unique_bytes: int
    peak_bytes: float
    budget_bytes: float
    evicted_bytes: float
    bypass_bytes: float
    finished: bool  # False: stopped at its deadline (figures are lower bounds)

    @property
    def amplification(self) -> float:
        return self.origin_bytes / max(1, self.unique_bytes)


@dataclass(frozen=True)
class Workload:
    """Reads of some files by some clients; ``content`` holds the files' bytes."""

    name: str
    files: list[str]
    content: list[bytes]
    reads: list[Read]
    clients: int

    @property
    def unique_bytes(self) -> int:
        return sum(r.length for r in self.reads)


def _files(count: int, size: int) -> list[bytes]:
    return [pattern(SEED + i, 0, size) for i in range(count)]


def _random_ranges(count: int, size: int) -> list[Read]:
    """Every byte of ``count`` files of ``size`` in 4 KiB-aligned 64 KiB-1 MiB
    ranges, shuffled."""
    rng = random.Random(SEED)
    reads = []
    for f in range(count):
        offset = 0
        while offset < size:
            length = math.exp(rng.uniform(math.log(RANGE_MIN), math.log(RANGE_MAX)))
            length = min(size - offset, max(RANGE_MIN, int(length) // (4 * KiB) * 4 * KiB))
            reads.append(Read(f, offset, length))
            offset += length
    rng.shuffle(reads)
    return reads


async def _measure(peer: Peer, work: Workload, deadline: float) -> Run:
    assert peer.admin_url is not None
    urls = [peer.file_url(n) for n in work.files]

    def verify(read: Read, offset: int, chunk: bytes) -> None:
        if work.content[read.file][offset : offset + len(chunk)] != chunk:
            raise AssertionError(f"{work.files[read.file]}: wrong bytes at {offset}")

    async with session(work.clients) as http, aiohttp.ClientSession() as admin:
        before = await scrape(admin, peer.admin_url)
        started = time.perf_counter()
        finished = True
        try:
            replay_run = replay(http, urls, work.reads, clients=work.clients, verify=verify)
            seconds = (await asyncio.wait_for(replay_run, deadline)).seconds
        except TimeoutError:
            finished = False
            seconds = time.perf_counter() - started
        after = await scrape(admin, peer.admin_url)
    return _figures(seconds, finished, before, after, work.unique_bytes)


def _figures(seconds: float, finished: bool, before: Scrape, after: Scrape, unique: int) -> Run:
    return Run(
        seconds=seconds,
        origin_bytes=after.delta(before, "origin_bytes_total", direction="in"),
        unique_bytes=unique,
        peak_bytes=after.value("memory_allocated_peak_bytes"),
        budget_bytes=after.value("memory_limit_bytes"),
        evicted_bytes=after.delta(before, "evicted_bytes_total"),
        bypass_bytes=after.delta(before, "cache_bypass_bytes_total"),
        finished=finished,
    )


def run_once(origin: str | Path, cache_size: int, work: Workload, deadline: float) -> Run:
    """A fresh cachesvc with ``cache_size`` over ``origin`` serving ``work``,
    stopped after ``deadline`` seconds if it has not finished."""
    args = ["--cache-size", str(cache_size), *SERVER_ARGS]
    with (
        cachesvc_server(origin, args, cpus=SERVER_CPUS) as peer,
        own_cpus({int(FAR_CPUS)}),
    ):
        return asyncio.run(_measure(peer, work, deadline))


@dataclass
class Result:
    """Bounded and unbounded runs of one workload on one origin."""

    origin: str
    workload: str
    cache_size: int
    bounded: list[Run]
    unbounded: list[Run]

    @property
    def wall_ratio(self) -> float:
        """The bounded runs' median wall over the unbounded runs'."""
        return statistics.median(r.seconds for r in self.bounded) / statistics.median(
            r.seconds for r in self.unbounded
        )

    @property
    def amplification(self) -> float:
        return max(r.amplification for r in self.bounded)

    @property
    def peak(self) -> Run:
        return max(self.bounded, key=lambda r: r.peak_bytes)

    @property
    def slack(self) -> float:
        return max(2 * MiB, 0.01 * self.cache_size)

    @property
    def stopped(self) -> int:
        """Bounded runs stopped at their deadline: their figures are lower bounds."""
        return sum(not r.finished for r in self.bounded)

    @property
    def unbounded_stopped(self) -> bool:
        return not all(r.finished for r in self.unbounded)

    def checks(self) -> dict[str, bool | None]:
        """Each target: met, missed, or None when a stopped run leaves it open."""

        def check(value: float, limit: float, lower_bound: bool) -> bool | None:
            if value > limit:
                return False
            return None if lower_bound else True

        peak = self.peak
        return {
            "amplification": check(self.amplification, AMPLIFICATION_TARGET, self.stopped > 0),
            "wall": (
                None
                if self.unbounded_stopped
                else check(self.wall_ratio, WALL_TARGET, self.stopped > 0)
            ),
            "peak": check(peak.peak_bytes, peak.budget_bytes + self.slack, False),
        }


@contextlib.contextmanager
def _origins(root: Path, paths: Sequence[Path], http: bool) -> Iterator[list[tuple[str, str]]]:
    """(label, --origin) for the local origin (files locked in memory) and,
    with ``http``, nginx behind a 2 ms latency proxy."""
    with resident(paths), contextlib.ExitStack() as stack:
        origins = [("local", str(root))]
        if http:
            nginx = stack.enter_context(
                nginx_server(root, cpus=FAR_CPUS, extra_conf=NGINX_AUTOINDEX)
            )
            proxy = stack.enter_context(
                LatencyProxy(nginx.port, ORIGIN_DELAY, cpus={int(FAR_CPUS)})
            )
            origins.append((f"HTTP, {ORIGIN_DELAY * 1000:g} ms", proxy.url))
        yield origins


def pressure(streams: int, file_size: int, rounds: int, http: bool) -> list[Result]:
    content = _files(streams, file_size)
    total = streams * file_size
    names = [f"big/{i:02d}.bin" for i in range(streams)]
    workloads = [
        Workload(
            "streams", names, content, [Read(i, 0, file_size) for i in range(streams)], streams
        ),
        Workload("random", names, content, _random_ranges(streams, file_size), CLIENTS),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="pressure-bench-") as tmp:
        root = Path(tmp)
        paths = [root / n for n in names]
        for path, data in zip(paths, content, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        with _origins(root, paths, http) as origins:
            for label, origin in origins:
                for work in workloads:
                    result = Result(label, work.name, total // 4, [], [])
                    for _ in range(rounds):
                        unbounded = run_once(origin, total * 2, work, UNBOUNDED_DEADLINE)
                        result.unbounded.append(unbounded)
                        deadline = max(MIN_DEADLINE, DEADLINE_FACTOR * unbounded.seconds)
                        result.bounded.append(run_once(origin, total // 4, work, deadline))
                    print(
                        f"{label} {work.name}: bounded "
                        + ", ".join(_seconds(r) for r in result.bounded)
                        + "; unbounded "
                        + ", ".join(_seconds(r) for r in result.unbounded),
                        flush=True,
                    )
                    results.append(result)
    return results


def _seconds(run: Run) -> str:
    return f"{run.seconds:.2f} s" + ("" if run.finished else " (stopped)")


# ---------------------------------------------------------------------------
# Heap per cached file and per cached extent


def _rss_anon(pid: int) -> int:
    """RssAnon of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


def _mark(index: int) -> bytes:
    """The head of file or extent ``index``: the number in 15 digits and a newline."""
    return f"{index:015d}\n".encode()


def _marked(index: int, size: int) -> bytes:
    """All ``size`` bytes of file or extent ``index``: its mark, then zeros
    (written as the mark alone, so sparse but for its first page)."""
    head = _mark(index)
    return head + bytes(size - len(head))


def _make_small_files(root: Path, prefix: str, count: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"{prefix}/{i // 1000:03d}/{i:06d}"
        path = root / name
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, _mark(i))
            os.ftruncate(fd, SMALL_SIZE)
        finally:
            os.close(fd)
        names.append(name)
    return names


def _make_extent_file(path: Path, extents: int) -> list[Read]:
    """A sparse file of ``2 * extents`` 64 KiB extents, each even one marked
    with its index; returns a read of each even extent, in a seeded random order."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, 2 * extents * EXTENT)
        for k in range(0, 2 * extents, 2):
            os.pwrite(fd, _mark(k), k * EXTENT)
    finally:
        os.close(fd)
    reads = [Read(0, k * EXTENT, EXTENT) for k in range(0, 2 * extents, 2)]
    random.Random(SEED).shuffle(reads)
    return reads


@dataclass
class Heap:
    """RssAnon growth of a server while it cached ``items`` more things."""

    what: str  # "file" or "extent"
    target: int  # bytes of heap per item, at most
    cached: int  # items read, warm-up included
    items: int  # items read between the two RssAnon readings
    rss_anon_before: int
    rss_anon_after: int
    cached_bytes: float  # memory_allocated_bytes after the reads
    evicted_bytes: float
    seconds: float

    @property
    def per_item(self) -> float:
        return (self.rss_anon_after - self.rss_anon_before) / self.items

    @property
    def met(self) -> bool:
        return self.per_item <= self.target


async def _heap_reads(
    peer: Peer, names: list[str], reads: list[Read], warm: int, content: Content
) -> tuple[int, int, Scrape, Scrape, float]:
    """Replays ``reads`` of files ``names``, the first ``warm`` of them
    before the first RssAnon reading; returns RssAnon and a scrape before and
    after the others, and their replay time."""
    assert peer.admin_url is not None
    urls = [peer.file_url(n) for n in names]

    def verify(read: Read, offset: int, chunk: bytes) -> None:
        within = offset - read.offset
        if content(read)[within : within + len(chunk)] != chunk:
            raise AssertionError(f"{names[read.file]}: wrong bytes at {offset}")

    async with session() as http, aiohttp.ClientSession() as admin:
        await replay(http, urls, reads[:warm], verify=verify)
        before_metrics = await scrape(admin, peer.admin_url)
        before = _rss_anon(peer.pid)
        done = await replay(http, urls, reads[warm:], verify=verify)
        after_metrics = await scrape(admin, peer.admin_url)
        after = _rss_anon(peer.pid)
    return before, after, before_metrics, after_metrics, done.seconds


def _heap_run(
    what: str,
    root: Path,
    names: list[str],
    reads: list[Read],
    warm: int,
    content: Content,
    args: Sequence[str],
) -> Heap:
    """A fresh cachesvc over ``root`` with ``args`` and room for all
    ``reads``, measured by :func:`_heap_reads`."""
    # Room for everything read twice over, at least the default 1 GiB.
    cache = max(1 << 30, 2 * sum(r.length for r in reads))
    argv = ["--cache-size", str(cache), *args, *SERVER_ARGS]
    with (
        cachesvc_server(root, argv, cpus=SERVER_CPUS) as peer,
        own_cpus({int(FAR_CPUS)}),
    ):
        before, after, first, last, seconds = asyncio.run(
            _heap_reads(peer, names, reads, warm, content)
        )
    return Heap(
        what=what,
        target=HEAP_TARGETS[what],
        cached=len(reads),
        items=len(reads) - warm,
        rss_anon_before=before,
        rss_anon_after=after,
        cached_bytes=last.value("memory_allocated_bytes"),
        evicted_bytes=last.delta(first, "evicted_bytes_total"),
        seconds=seconds,
    )


def heap_per_file(count: int) -> Heap:
    with tempfile.TemporaryDirectory(prefix="pressure-bench-small-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        names = _make_small_files(root, "small", count)
        print(f"{count:,} small files made in {time.perf_counter() - started:.1f} s")
        reads = [Read(i, 0, SMALL_SIZE) for i in range(count)]
        return _heap_run(
            "file",
            root,
            names,
            reads,
            min(WARM_FILES, count // 10),
            lambda r: _marked(r.file, SMALL_SIZE),
            [],
        )


def heap_per_extent(extents: int) -> Heap:
    with tempfile.TemporaryDirectory(prefix="pressure-bench-extents-") as tmp:
        root = Path(tmp)
        reads = _make_extent_file(root / "extents.bin", extents)
        # --readahead 0: each read fills its own extent and nothing else.
        return _heap_run(
            "extent",
            root,
            ["extents.bin"],
            reads,
            extents // WARM_EXTENTS_PART,
            lambda r: _marked(r.offset // EXTENT, EXTENT),
            ["--readahead", "0"],
        )


# ---------------------------------------------------------------------------
# Report


def _mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def _wall(runs: Sequence[Run]) -> str:
    """Median seconds of ``runs``, and their spread (min-max) if more than one."""
    seconds = [r.seconds for r in runs]
    median = f"{statistics.median(seconds):.2f}"
    if len(seconds) == 1:
        return median
    return f"{median} ({min(seconds):.2f}-{max(seconds):.2f})"


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "open (run stopped)"}[ok]


def report(
    results: Sequence[Result], heaps: Sequence[Heap], streams: int, file_size: int, rounds: int
) -> None:
    total = streams * file_size
    print(
        f"\n{streams} files x {file_size / MiB:g} MiB ({total / MiB:g} MiB); bounded cache"
        f" {total / 4 / MiB:g} MiB, unbounded {total * 2 / MiB:g} MiB; default readahead;"
        f" {rounds} round(s): wall as median (min-max), wall ratio of the medians, worst"
        " amplification and peak.\n"
    )
    print(
        "| origin | workload | amplification (<= 1.1) | bounded s | unbounded s"
        " | wall ratio (<= 1.3) | peak MiB | budget + slack MiB | evicted MiB"
        " | bounded runs stopped |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        peak = r.peak
        checks = r.checks()
        at_least = ">= " if r.stopped else ""
        print(
            f"| {r.origin} | {r.workload} | {at_least}{r.amplification:.3f}"
            f" {_verdict(checks['amplification'])}"
            f" | {at_least}{_wall(r.bounded)} | {_wall(r.unbounded)}"
            f" | {at_least}{r.wall_ratio:.2f} {_verdict(checks['wall'])}"
            f" | {_mib(peak.peak_bytes)} {_verdict(checks['peak'])}"
            f" | {_mib(peak.budget_bytes)} + {_mib(r.slack)}"
            f" | {at_least}{_mib(peak.evicted_bytes)} | {r.stopped} of {len(r.bounded)} |"
        )
    if any(r.stopped for r in results):
        print(
            f"\nA bounded run is stopped after {DEADLINE_FACTOR}x its unbounded twin's time"
            f" (at least {MIN_DEADLINE:g} s); its figures so far are lower bounds (>=)."
        )
    if heaps:
        print(
            "\n| cached once | measured over | RssAnon before MiB | after MiB"
            " | heap per item | target | cached MiB | evicted MiB | read s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for heap in heaps:
        print(
            f"| {heap.cached:,} {HEAP_ITEMS[heap.what]} | {heap.items:,}"
            f" | {_mib(heap.rss_anon_before)} | {_mib(heap.rss_anon_after)}"
            f" | {heap.per_item:,.0f} B per {heap.what} {_verdict(heap.met)}"
            f" | <= {heap.target:,} B | {_mib(heap.cached_bytes)} | {_mib(heap.evicted_bytes)}"
            f" | {heap.seconds:.1f} |"
        )


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Runs the benchmark with command-line ``argv`` (none: the full run);
    prints the tables and returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round, 4 files of 8 MiB, 10,000 small files, 4,096 extents",
    )
    parser.add_argument("--streams", type=int, help=f"files and streams (default {STREAMS})")
    parser.add_argument(
        "--file-size",
        type=parse_size,
        help=f"each file's size (default {FILE_SIZE // MiB}MiB; {QUICK_FILE_SIZE // MiB}MiB quick)",
    )
    parser.add_argument("--rounds", type=int, help=f"fresh starts per figure (default {ROUNDS})")
    parser.add_argument("--small-files", type=int, help=f"default {SMALL_FILES:,}; 0: skip")
    parser.add_argument("--extents", type=int, help=f"default {EXTENTS:,}; 0: skip")
    parser.add_argument("--no-http", action="store_true", help="local origin only")
    args = parser.parse_args(list(argv))
    streams = args.streams or (4 if args.quick else STREAMS)
    file_size = args.file_size or (QUICK_FILE_SIZE if args.quick else FILE_SIZE)
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    small = (
        args.small_files
        if args.small_files is not None
        else (10_000 if args.quick else SMALL_FILES)
    )
    extents = (
        args.extents if args.extents is not None else (QUICK_EXTENTS if args.quick else EXTENTS)
    )
    started = time.perf_counter()
    results = pressure(streams, file_size, rounds, http=not args.no_http)
    heaps = []
    if small:
        heaps.append(heap_per_file(small))
    if extents:
        heaps.append(heap_per_extent(extents))
    report(results, heaps, streams, file_size, rounds)
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s in all")
    out: dict[str, Any] = {
        "streams": streams,
        "file_bytes": file_size,
        "rounds": rounds,
        "seconds": round(elapsed, 1),
        "results": [
            {
                "origin": r.origin,
                "workload": r.workload,
                "cache_size": r.cache_size,
                "amplification": r.amplification,
                "wall_ratio": r.wall_ratio,
                "peak_bytes": r.peak.peak_bytes,
                "budget_bytes": r.peak.budget_bytes,
                "slack_bytes": r.slack,
                "bounded_runs_stopped": r.stopped,
                **{f"{name}_met": ok for name, ok in r.checks().items()},
                "bounded": [asdict(x) for x in r.bounded],
                "unbounded": [asdict(x) for x in r.unbounded],
            }
            for r in results
        ],
    }
    for heap in heaps:
        out[f"heap_per_{heap.what}"] = {**asdict(heap), "per_item": heap.per_item, "met": heap.met}
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
