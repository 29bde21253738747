"""Miss ratios of cachesvc's page cache beside simulated eviction policies (issue 18).

Run with ``python -m benchmarks.hitratio_bench`` (the synthetic suite, about
10 minutes), ``--quick`` (a smaller suite at one cache size, about a
minute), or ``python -m benchmarks.hitratio_bench TRACE.csv [--cache-size
10%,64MiB]`` (a libCacheSim csv trace; default sizes 5, 10 and 25 % of its
working set). ``--workload NAME`` picks synthetic workloads, ``--policy
NAME`` runs cachesvc with ``--eviction-policy NAME`` (``s3fifo`` or ``lru``;
several may be given; none: the server's default, ``s3fifo``),
``--max-requests N`` cuts a long trace. Needs the ``bench`` extra (``pip
install -e '.[bench]'``) for the simulations; without it cachesvc is still
measured. Prints markdown tables and returns the figures as a dict.

**What runs.** For each trace (see :mod:`benchmarks.traces` for the csv
format and the synthetic suite) and cache size: a fresh ``cachesvc serve``
over a local directory holding the trace's files (sparse), with
``--cache-size`` set, ``--revalidate 1h`` (no revalidation traffic in a run)
and readahead *on* (the default) or *off* (``--readahead 0``: a miss fills
the whole extents its request touches and nothing more, as a simulated miss
does). The
trace's reads are replayed over HTTP by 8 concurrent keep-alive clients
(:mod:`benchmarks.loadgen`, every answer checked for status and length),
cachesvc pinned to CPU 0 and the clients to CPU 1. ``/metrics`` is scraped
before and after each phase; ratios come from the deltas:

- request miss ratio: ``cache_requests_total`` with ``result`` ``miss`` or
  ``bypass`` over all results (a read is a miss if any of its bytes came
  from the origin, cached or passed through);
- byte miss ratio: 1 - ``cache_hit_bytes_total`` / the bytes the clients
  asked for (bytes bypassing the cache count as missed);
- origin / requested: ``origin_bytes_total{direction="in"}`` over the bytes
  asked for: what a user pays the origin per byte read, readahead included;
- hot-set hit ratio during scans (``zipf-scan``): among the hot-set reads
  made during the scan phases, the share that hit
  (``cache_requests_total{result="hit"}`` gained during scans: scan reads
  are all first touches of fresh files, so every hit in a scan phase is a
  hot-set read's), and beside it the same in bytes
  (``cache_hit_bytes_total`` gained during scans over the hot reads' bytes).

A metric missing from ``/metrics`` stops the benchmark
(:class:`~benchmarks.scrape.MissingMetric`).

Beside cachesvc, the same trace at the same size goes through libCacheSim at
64 KiB-extent granularity (:mod:`benchmarks.cachesim`): LRU, S3-FIFO, SIEVE,
ARC and Belady's MIN. A simulated miss fetches its extent whole and nothing
more.

**How to read it.** Lower miss ratios and origin / requested are better; the
simulated rows show what an eviction policy alone achieves on the trace,
Belady what none can beat (near enough: see cachesim). Readahead *off* is
the run to compare with the policies; readahead *on* shows what prefetching
costs or saves in origin bytes. Replay with 8 clients reorders reads a
little and two concurrent misses of one extent both count as misses, which
the one-at-a-time simulation does not see: expect cachesvc a few percent
off a policy it implements exactly. Cold misses are counted everywhere.
Targets (issue 18), in the second table:

- miss ratio with readahead off <= 1.05 x the best online policy
  simulated, and never above LRU's (request and byte ratios each);
- origin bytes / requested with the default readahead <= that of the online
  policy with the lowest byte miss ratio;
- hot-set hit ratio >= 0.9 through scans.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.cachesim import ONLINE, POLICIES, ExtentStream, SimResult, libcachesim_version
from benchmarks.cachesim import simulate as simulate_policy
from benchmarks.loadgen import own_cpus, replay, session
from benchmarks.peers import Peer, cachesvc_server
from benchmarks.scrape import Scrape, scrape
from benchmarks.traces import (
    FULL,
    QUICK,
    STANDARD_FRACTIONS,
    MiB,
    Trace,
    Workload,
    cache_size_for,
    materialize,
    read_csv_trace,
    synthetic_suite,
)
from cachesvc.config.values import parse_size
from cachesvc.core.eviction import DEFAULT_POLICY
from cachesvc.core.eviction import POLICIES as SERVER_POLICIES

SERVER_CPUS = "0"
CLIENT_CPUS = {1}
MIN_CACHE = 1 * MiB  # cachesvc's smallest --cache-size
QUICK_FRACTIONS = (0.10,)
MISS_SLACK = 1.05
HOT_TARGET = 0.9
COUNT_TOLERANCE = 0.05  # of the requested bytes; beyond it the report says so
READAHEAD_OFF = ("--readahead", "0")


@dataclass
class Run:
    """One cachesvc run of one trace at one cache size."""

    mode: str  # "readahead on" / "readahead off", plus the policy if chosen
    seconds: float
    requests: int
    requested_bytes: int
    request_miss_ratio: float
    byte_miss_ratio: float
    origin_per_requested: float
    hot_hit_requests: float | None  # hot-set read hit ratio during scans; None: no scans
    hot_hit_bytes: float | None  # hot-set byte hit ratio during scans; None: no scans
    bypass_bytes: float
    counted_bytes: float  # hit + miss + bypass bytes by the server's count


async def _measure(peer: Peer, trace: Trace, mode: str) -> Run:
    assert peer.admin_url is not None
    urls = [peer.file_url(f.name) for f in trace.files]
    hot_reads = hot_bytes = 0
    scan_hit_requests = scan_hit_bytes = 0.0
    seconds = 0.0
    async with session() as http:
        first = before = await scrape(http, peer.admin_url)
        for phase in trace.phases:
            result = await replay(http, urls, phase.reads)
            seconds += result.seconds
            after = await scrape(http, peer.admin_url)
            if phase.scan:
                hot = [r for r in phase.reads if r.file in trace.hot_files]
                hot_reads += len(hot)
                hot_bytes += sum(r.length for r in hot)
                scan_hit_bytes += after.delta(before, "cache_hit_bytes_total")
                scan_hit_requests += after.delta(before, "cache_requests_total", result="hit")
            before = after
    last = before
    return _run_figures(
        trace, mode, seconds, first, last, hot_reads, hot_bytes, scan_hit_requests, scan_hit_bytes
    )


def _run_figures(
    trace: Trace,
    mode: str,
    seconds: float,
    first: Scrape,
    last: Scrape,
    hot_reads: int,
    hot_bytes: int,
    scan_hit_requests: float,
    scan_hit_bytes: float,
) -> Run:
    requested = trace.requested_bytes
    hit_bytes = last.delta(first, "cache_hit_bytes_total")
    miss_bytes = last.delta(first, "cache_miss_bytes_total")
    bypass = last.delta(first, "cache_bypass_bytes_total")
    hits = last.delta(first, "cache_requests_total", result="hit")
    misses = last.delta(first, "cache_requests_total", result="miss")
    misses += last.delta(first, "cache_requests_total", result="bypass")
    origin_in = last.delta(first, "origin_bytes_total", direction="in")
    return Run(
        mode=mode,
        seconds=seconds,
        requests=trace.requests,
        requested_bytes=requested,
        request_miss_ratio=misses / max(1.0, hits + misses),
        byte_miss_ratio=1 - hit_bytes / max(1, requested),
        origin_per_requested=origin_in / max(1, requested),
        hot_hit_requests=scan_hit_requests / hot_reads if hot_reads else None,
        hot_hit_bytes=scan_hit_bytes / hot_bytes if hot_bytes else None,
        bypass_bytes=bypass,
        counted_bytes=hit_bytes + miss_bytes + bypass,
    )


def run_cachesvc(trace: Trace, root: Path, cache_size: int, args: Sequence[str], mode: str) -> Run:
    """A fresh cachesvc over ``root`` with ``args``, replaying ``trace``."""
    argv = ["--cache-size", str(cache_size), "--revalidate", "1h", "--log-level", "warning"]
    with (
        cachesvc_server(root, [*argv, *args], cpus=SERVER_CPUS) as peer,
        own_cpus(CLIENT_CPUS),
    ):
        return asyncio.run(_measure(peer, trace, mode))


# ---------------------------------------------------------------------------
# Reporting


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class Case:
    """One trace at one cache size: the cachesvc runs and the simulations."""

    trace: str
    description: str
    fraction: float | None  # of the working set; None: an absolute --cache-size
    working_set: int
    cache_size: int
    runs: list[Run]
    sims: dict[str, SimResult]

    @property
    def label(self) -> str:
        share = f"{self.cache_size / max(1, self.working_set):.0%}"
        return f"{self.cache_size / MiB:.1f} MiB ({share} of {self.working_set / MiB:.0f} MiB)"


def _rows(case: Case) -> list[list[str]]:
    rows = []
    for run in case.runs:
        rows.append(
            [
                case.trace,
                case.label,
                f"cachesvc, {run.mode}",
                _ratio(run.request_miss_ratio),
                _ratio(run.byte_miss_ratio),
                _ratio(run.origin_per_requested),
                _ratio(run.hot_hit_requests),
                _ratio(run.hot_hit_bytes),
                f"{run.seconds:.1f}",
            ]
        )
    for sim in case.sims.values():
        hot_bytes = 1 - sim.hot_missed_bytes / sim.hot_bytes if sim.hot_bytes else None
        rows.append(
            [
                case.trace,
                case.label,
                f"sim {sim.policy}",
                _ratio(sim.request_miss_ratio),
                _ratio(sim.byte_miss_ratio),
                _ratio(sim.origin_per_requested),
                _ratio(sim.hot_hit_ratio),
                _ratio(hot_bytes),
                "",
            ]
        )
    return rows


@dataclass
class Target:
    trace: str
    cache: str
    what: str
    value: float
    limit: float
    met: bool


def _targets(case: Case) -> list[Target]:
    """The targets of each run of ``case``; those that compare with the
    simulated policies only when they ran."""
    out: list[Target] = []

    def add(what: str, value: float, limit: float, at_least: bool = False) -> None:
        met = value >= limit if at_least else value <= limit
        out.append(Target(case.trace, case.label, what, value, limit, met))

    online = [case.sims[p] for p in ONLINE if p in case.sims]
    if online:
        kinds: list[tuple[str, Callable[[Run], float], Callable[[SimResult], float]]] = [
            ("request", lambda r: r.request_miss_ratio, lambda s: s.request_miss_ratio),
            ("byte", lambda r: r.byte_miss_ratio, lambda s: s.byte_miss_ratio),
        ]
        for run in (r for r in case.runs if r.mode.startswith("readahead off")):
            for kind, of_run, of_sim in kinds:
                best = min(online, key=of_sim)
                add(
                    f"{kind} miss, {run.mode} <= {MISS_SLACK} x best online ({best.policy})",
                    of_run(run),
                    MISS_SLACK * of_sim(best),
                )
                add(f"{kind} miss, {run.mode} <= LRU", of_run(run), of_sim(case.sims["LRU"]))
        best = min(online, key=lambda s: s.byte_miss_ratio)
        for run in (r for r in case.runs if r.mode.startswith("readahead on")):
            add(
                f"origin / requested, {run.mode} <= {best.policy}'s",
                run.origin_per_requested,
                best.origin_per_requested,
            )
    for run in case.runs:
        if run.hot_hit_requests is not None:
            add(
                f"hot-set hit ratio in scans (reads), {run.mode} >= {HOT_TARGET}",
                run.hot_hit_requests,
                HOT_TARGET,
                at_least=True,
            )
    return out


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i >= numeric_from else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------------------
# Driving


def _cache_sizes(
    spec: str | None, working_set: int, default: Sequence[float]
) -> list[tuple[float | None, int]]:
    """(fraction or None, bytes) for ``--cache-size`` (``10%,64MiB``) or the defaults."""
    if not spec:
        return [(f, cache_size_for(working_set, f)) for f in default]
    out: list[tuple[float | None, int]] = []
    for part in spec.split(","):
        part = part.strip()
        if part.endswith("%"):
            fraction = float(part[:-1]) / 100
            out.append((fraction, cache_size_for(working_set, fraction)))
        else:
            out.append((None, parse_size(part)))
    return out


def run_case(
    trace: Trace,
    root: Path,
    fraction: float | None,
    cache_size: int,
    policies: Sequence[str],
    simulate: bool,
) -> Case:
    working_set = trace.working_set_bytes()
    cache_size = max(cache_size, MIN_CACHE)
    sims: dict[str, SimResult] = {}
    started = time.perf_counter()
    if simulate:
        stream = ExtentStream.of(trace)
        sims = {p: simulate_policy(stream, p, cache_size) for p in POLICIES}
    sim_seconds = time.perf_counter() - started
    runs = []
    policy_args: list[tuple[str, list[str]]] = [("", [])]
    if policies:
        policy_args = [(f", {p}", ["--eviction-policy", p]) for p in policies]
    for suffix, extra in policy_args:
        runs.append(run_cachesvc(trace, root, cache_size, extra, f"readahead on{suffix}"))
        off_args = [*READAHEAD_OFF, *extra]
        runs.append(run_cachesvc(trace, root, cache_size, off_args, f"readahead off{suffix}"))
    case = Case(trace.name, trace.description, fraction, working_set, cache_size, runs, sims)
    print(
        f"{trace.name} at {case.label}: simulation {sim_seconds:.1f} s, cachesvc "
        + ", ".join(f"{r.mode} {r.seconds:.1f} s" for r in runs),
        flush=True,
    )
    return case


def _suite_cases(
    workloads: Sequence[Workload],
    fractions: Sequence[float] | None,
    work: Path,
    policies: Sequence[str],
    simulate: bool,
) -> list[Case]:
    cases = []
    for workload in workloads:
        root = work / workload.name
        made: Trace | None = None
        chosen = workload.fractions
        if fractions and workload.fractions == STANDARD_FRACTIONS:
            chosen = tuple(fractions)
        for fraction in chosen:
            trace = workload.build(fraction)
            if trace is not made:
                materialize(trace, root)
                made = trace
            size = cache_size_for(trace.working_set_bytes(), fraction)
            cases.append(run_case(trace, root, fraction, size, policies, simulate))
    return cases


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Runs the benchmark with command-line ``argv`` (none: the full
    synthetic suite); prints the tables and returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("trace", nargs="?", type=Path, help="libCacheSim csv trace")
    parser.add_argument("--cache-size", help="sizes or % of the working set, comma-separated")
    parser.add_argument("--quick", action="store_true", help="smaller suite, one cache size")
    parser.add_argument("--workload", action="append", default=[], help="synthetic workload")
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        choices=SERVER_POLICIES,
        help="--eviction-policy value",
    )
    parser.add_argument("--max-requests", type=int, help="replay at most N reads of TRACE")
    args = parser.parse_args(list(argv))
    started = time.perf_counter()

    version = libcachesim_version()
    notes = [f"readahead off: {' '.join(READAHEAD_OFF)}"]
    if version is None:
        notes.append(
            "libcachesim is not installed (pip install -e '.[bench]'): no simulated"
            " policies, and the targets that compare with them are not evaluated"
        )
    else:
        notes.append(f"libcachesim {version}")
    notes.append(
        "--eviction-policy: "
        + (", ".join(args.policy) if args.policy else f"the default ({DEFAULT_POLICY})")
    )

    with tempfile.TemporaryDirectory(prefix="hitratio-bench-") as tmp:
        work = Path(tmp)
        if args.trace is not None:
            trace = read_csv_trace(args.trace, args.max_requests)
            if trace.skipped:
                notes.append(f"left out of the replay and the simulation: {trace.skipped}")
            root = work / "origin"
            materialize(trace, root)
            working_set = trace.working_set_bytes()
            cases = [
                run_case(trace, root, f, size, args.policy, version is not None)
                for f, size in _cache_sizes(args.cache_size, working_set, STANDARD_FRACTIONS)
            ]
        else:
            scale = QUICK if args.quick else FULL
            workloads = synthetic_suite(scale, args.workload)
            fractions = QUICK_FRACTIONS if args.quick else None
            cases = _suite_cases(workloads, fractions, work, args.policy, version is not None)

    descriptions = list(dict.fromkeys(f"{c.trace}: {c.description}" for c in cases))
    off_count = [
        f"{c.trace} at {c.label}, {r.mode}: {r.counted_bytes / max(1, r.requested_bytes):.3f}"
        for c in cases
        for r in c.runs
        if abs(r.counted_bytes / max(1, r.requested_bytes) - 1) > COUNT_TOLERANCE
    ]
    if off_count:
        notes.append(
            "the server's hit + miss (+ bypass) bytes differ from the bytes the clients read"
            " (ratio shown; concurrent misses of one range both count): " + "; ".join(off_count)
        )
    elapsed = time.perf_counter() - started
    print()
    for line in descriptions:
        print(f"- {line}")
    for line in notes:
        print(f"- {line}")
    print()
    _print_table(
        [
            "trace",
            "cache",
            "run",
            "request miss",
            "byte miss",
            "origin / requested",
            "hot-set hit, scans (reads)",
            "(bytes)",
            "replay s",
        ],
        [row for case in cases for row in _rows(case)],
        3,
    )
    targets = [t for case in cases for t in _targets(case)]
    print()
    _print_table(
        ["trace", "cache", "target", "value", "limit", "met"],
        [
            [
                t.trace,
                t.cache,
                t.what,
                _ratio(t.value),
                _ratio(t.limit),
                "met" if t.met else "MISSED",
            ]
            for t in targets
        ],
        3,
    )
    met = sum(1 for t in targets if t.met)
    print(f"\ntargets met: {met} of {len(targets)}; {elapsed:.0f} s in all")
    return {
        "libcachesim_version": version,
        "notes": notes,
        "seconds": round(elapsed, 1),
        "cases": [
            {
                "trace": c.trace,
                "fraction": c.fraction,
                "working_set_bytes": c.working_set,
                "cache_size": c.cache_size,
                "cachesvc": [asdict(r) for r in c.runs],
                "simulated": {
                    p: {
                        "request_miss_ratio": s.request_miss_ratio,
                        "byte_miss_ratio": s.byte_miss_ratio,
                        "origin_per_requested": s.origin_per_requested,
                        "hot_hit_ratio": s.hot_hit_ratio,
                    }
                    for p, s in c.sims.items()
                },
            }
            for c in cases
        ],
        "targets": [asdict(t) for t in targets],
        "targets_met": met,
        "targets_evaluated": len(targets),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
