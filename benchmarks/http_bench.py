"""cachesvc against nginx serving the same files over HTTP, side by side.

Run with ``python -m benchmarks.http_bench [--rounds N] [--seconds S]``.
Prints a markdown table and returns the figures as a dict.

Both servers run over one directory for the whole run, each pinned to CPU
0 with ``taskset``; ``wrk`` (one thread) is pinned to CPU 1:

- cachesvc: ``cachesvc serve --cache-size 1GiB --log-level warning`` (no
  access log), its cache warmed by reading every file once, so all
  workloads are hot;
- nginx: ``worker_processes 1; sendfile on; access_log off``. The files are
  mapped and locked in memory by this driver for the whole run (the VM
  drops idle page cache within seconds), so nginx is hot too.

Workloads (4 KiB-aligned random offsets; a Lua script per workload):

- (a) random 4 KiB ranges of a 512 MiB file, 64 connections;
- (b) random 1 MiB ranges of the same file, 16 connections;
- (c) full GETs of 1 MiB files, a random one of 64 per request, 16 connections.

Every round runs each workload on both servers, the server order
alternating between rounds; the median round of each server is reported
(req/s, MB/s of body bytes with MB = 10^6 bytes, p50/p99 latency from wrk)
with the ratio cachesvc/nginx. Every run must be free of errors and non-2xx
answers, and its bytes per response must match the workload's body size.
Targets: (a) >= 0.25x nginx req/s; (b) and (c) >= 0.7x nginx MB/s.

The machine is usually shared, and wall-clock figures swing with what
else runs (the share of CPU time the host stole is printed). So each run
also records the server's own CPU time per response (user + system, from
/proc, nginx's worker included): a figure that other load barely moves,
and the better one for comparing two versions of cachesvc.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.peers import (
    Peer,
    WrkResult,
    cachesvc_server,
    cpu_seconds,
    nginx_server,
    resident,
    run_wrk,
)

KiB = 1 << 10
MiB = 1 << 20
BIG_NAME = "big.bin"
BIG_SIZE = 512 * MiB
SMALL_DIR = "small"
SMALL_COUNT = 64
SMALL_SIZE = MiB
SERVER_CPUS = "0"
CLIENT_CPUS = "1"
# A response's headers are shorter than this, so bytes per response must lie
# in [body, body + HEADER_ALLOWANCE).
HEADER_ALLOWANCE = 1024
SEED = 20261122

_RANGE_SCRIPT = """
local size = {size}
local length = {length}
local slots = math.floor((size - length) / 4096) + 1
init = function(args)
  math.randomseed({seed})
end
request = function()
  local first = math.random(0, slots - 1) * 4096
  local range = "bytes=" .. first .. "-" .. (first + length - 1)
  return wrk.format("GET", wrk.path, {{["Range"] = range}})
end
"""

_FILES_SCRIPT = """
local count = {count}
init = function(args)
  math.randomseed({seed})
end
request = function()
  return wrk.format("GET", wrk.path .. string.format("f%02d.bin", math.random(0, count - 1)))
end
"""


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    connections: int
    path: str  # below the server's file prefix
    body: int  # bytes of body per response
    script: str
    target: str  # "req/s" or "MB/s": the figure the target applies to
    target_ratio: float


WORKLOADS = [
    Workload(
        "a",
        "random 4 KiB ranges of a 512 MiB file, 64 conns",
        64,
        BIG_NAME,
        4 * KiB,
        _RANGE_SCRIPT.format(size=BIG_SIZE, length=4 * KiB, seed=SEED),
        "req/s",
        0.25,
    ),
    Workload(
        "b",
        "random 1 MiB ranges of a 512 MiB file, 16 conns",
        16,
        BIG_NAME,
        MiB,
        _RANGE_SCRIPT.format(size=BIG_SIZE, length=MiB, seed=SEED),
        "MB/s",
        0.7,
    ),
    Workload(
        "c",
        f"full GETs of {SMALL_COUNT} 1 MiB files, 16 conns",
        16,
        f"{SMALL_DIR}/",
        SMALL_SIZE,
        _FILES_SCRIPT.format(count=SMALL_COUNT, seed=SEED),
        "MB/s",
        0.7,
    ),
]


@dataclass(frozen=True)
class Run:
    """One wrk run of one workload against one server."""

    requests_per_second: float
    mb_per_second: float  # body bytes, 10^6 bytes per MB
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float  # the server's CPU time (user + system) per response
    requests: int
    seconds: float

    @classmethod
    def of(cls, result: WrkResult, cpu: float, workload: Workload, server: str) -> Run:
        if result.errors:
            raise RuntimeError(f"{server} workload ({workload.key}): {result.errors} errors")
        per_response = result.bytes_per_request
        if not workload.body <= per_response < workload.body + HEADER_ALLOWANCE:
            raise RuntimeError(
                f"{server} workload ({workload.key}): {per_response:.0f} bytes per response,"
                f" expected a {workload.body}-byte body"
            )
        rate = result.requests_per_second
        return cls(
            requests_per_second=rate,
            mb_per_second=rate * workload.body / 1e6,
            p50_ms=result.p50_ms,
            p99_ms=result.p99_ms,
            cpu_us_per_request=cpu / max(1, result.requests) * 1e6,
            requests=result.requests,
            seconds=result.seconds,
        )


def cpu_times() -> tuple[int, int]:
    """(all, steal) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return sum(fields[:8]), fields[7]


def make_files(root: Path) -> list[Path]:
    """The benchmark's files (random bytes, written in 64 MiB pieces)."""
    big = root / BIG_NAME
    with open(big, "wb") as f:
        for _ in range(BIG_SIZE // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    small_dir = root / SMALL_DIR
    small_dir.mkdir()
    paths = [big]
    for i in range(SMALL_COUNT):
        path = small_dir / f"f{i:02d}.bin"
        path.write_bytes(os.urandom(SMALL_SIZE))
        paths.append(path)
    return paths


def read_through(peer: Peer, names: list[str]) -> None:
    """Reads every file once through ``peer`` (warms its cache) and checks the lengths."""
    for name in names:
        total = 0
        with urllib.request.urlopen(peer.file_url(name), timeout=120) as resp:
            while chunk := resp.read(4 * MiB):
                total += len(chunk)
        expected = BIG_SIZE if name == BIG_NAME else SMALL_SIZE
        if total != expected:
            raise RuntimeError(f"{peer.name} sent {total} bytes of {name}, not {expected}")


def _median_run(runs: list[Run], key: Callable[[Run], float]) -> Run:
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def run_rounds(
    peers: dict[str, Peer], rounds: int, seconds: float
) -> dict[str, dict[str, list[Run]]]:
    """workload key -> server name -> runs, interleaving servers and workloads."""
    runs: dict[str, dict[str, list[Run]]] = {w.key: {name: [] for name in peers} for w in WORKLOADS}
    order = list(peers)
    for round_index in range(rounds):
        for workload in WORKLOADS:
            for name in order:
                peer = peers[name]
                cpu_before = cpu_seconds(peer.pid)
                result = run_wrk(
                    peer.file_url(workload.path),
                    workload.script,
                    connections=workload.connections,
                    seconds=seconds,
                    cpus=CLIENT_CPUS,
                )
                cpu = cpu_seconds(peer.pid) - cpu_before
                run = Run.of(result, cpu, workload, name)
                runs[workload.key][name].append(run)
                print(
                    f"round {round_index + 1} ({workload.key}) {name:8s}"
                    f" {run.requests_per_second:9.0f} req/s {run.mb_per_second:8.1f} MB/s"
                    f" p50 {run.p50_ms:7.2f} ms p99 {run.p99_ms:7.2f} ms"
                    f" cpu {run.cpu_us_per_request:6.0f} us/req",
                    flush=True,
                )
        order.reverse()
    return runs


def summarize(runs: dict[str, dict[str, list[Run]]]) -> dict[str, Any]:
    """Prints the table; returns the figures.

    Per server and workload the median run (by the figure the target is
    about) is shown; the CPU time per response is the median of all runs.
    ``cpu ratio`` is nginx's CPU time per response over cachesvc's: the
    throughput ratio both would reach if each had a core to itself.
    """
    out: dict[str, Any] = {}
    print(
        "\n| workload | server | req/s | MB/s | p50 ms | p99 ms | CPU us/req"
        " | cachesvc/nginx | cpu ratio | target |"
        "\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for workload in WORKLOADS:
        by_server = runs[workload.key]

        def figure(run: Run, target: str = workload.target) -> float:
            return run.requests_per_second if target == "req/s" else run.mb_per_second

        medians = {
            name: _median_run(server_runs, figure) for name, server_runs in by_server.items()
        }
        cpu = {
            name: statistics.median(run.cpu_us_per_request for run in server_runs)
            for name, server_runs in by_server.items()
        }
        ratio = figure(medians["cachesvc"]) / figure(medians["nginx"])
        cpu_ratio = cpu["nginx"] / cpu["cachesvc"]
        met = ratio >= workload.target_ratio
        for name in ("nginx", "cachesvc"):
            median = medians[name]
            cells = ["", "", ""]
            if name == "cachesvc":
                verdict = "met" if met else "MISSED"
                cells = [
                    f"{ratio:.2f}x {workload.target}",
                    f"{cpu_ratio:.2f}x",
                    f">= {workload.target_ratio}x: {verdict}",
                ]
            print(
                f"| ({workload.key}) {workload.title} | {name} | {median.requests_per_second:.0f}"
                f" | {median.mb_per_second:.1f} | {median.p50_ms:.2f} | {median.p99_ms:.2f}"
                f" | {cpu[name]:.0f} | {' | '.join(cells)} |"
            )
        out[workload.key] = {
            "title": workload.title,
            "target": f"cachesvc/nginx {workload.target} >= {workload.target_ratio}",
            "ratio": round(ratio, 3),
            "cpu_ratio": round(cpu_ratio, 3),
            "target_met": met,
            **{
                name: {
                    "median": asdict(medians[name]),
                    "cpu_us_per_request": round(cpu[name], 1),
                    "runs": [asdict(run) for run in server_runs],
                }
                for name, server_runs in by_server.items()
            },
        }
    return out


@dataclass(frozen=True)
class Setup:
    root: Path
    paths: list[Path]


@contextlib.contextmanager
def _setup() -> Iterator[Setup]:
    work = Path(tempfile.mkdtemp(prefix="http-bench-"))
    try:
        root = work / "root"
        root.mkdir()
        yield Setup(root, make_files(root))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each workload per server")
    parser.add_argument("--seconds", type=float, default=6.0, help="duration of one wrk run")
    args = parser.parse_args(argv)
    if os.cpu_count() is None or len(os.sched_getaffinity(0)) < 2:
        raise RuntimeError("http_bench needs two CPUs (server on CPU 0, wrk on CPU 1)")
    started = time.monotonic()
    with _setup() as setup:
        names = [BIG_NAME] + [f"{SMALL_DIR}/{p.name}" for p in setup.paths[1:]]
        cachesvc_args = ["--cache-size", "1GiB", "--log-level", "warning"]
        with (
            resident(setup.paths) as locked,
            nginx_server(setup.root, cpus=SERVER_CPUS) as nginx,
            cachesvc_server(setup.root, cachesvc_args, cpus=SERVER_CPUS) as cachesvc,
        ):
            print(
                f"{locked / MiB:.0f} MiB of files locked in memory; nginx pid {nginx.pid},"
                f" cachesvc pid {cachesvc.pid}; warming the cache ...",
                flush=True,
            )
            read_through(cachesvc, names)
            read_through(nginx, names[:1])
            all_before, steal_before = cpu_times()
            runs = run_rounds({"nginx": nginx, "cachesvc": cachesvc}, args.rounds, args.seconds)
            all_after, steal_after = cpu_times()
    out = summarize(runs)
    steal = (steal_after - steal_before) / max(1, all_after - all_before)
    elapsed = time.monotonic() - started
    print(
        f"\nserver on CPU {SERVER_CPUS}, wrk (1 thread) on CPU {CLIENT_CPUS};"
        f" median of {args.rounds} rounds of {args.seconds:g} s; total {elapsed:.0f} s;"
        f" {steal:.0%} of the machine's CPU time was stolen by the host meanwhile"
    )
    out["steal_fraction"] = round(steal, 3)
    out["rounds"] = args.rounds
    out["seconds_per_run"] = args.seconds
    return out


if __name__ == "__main__":
    main()
