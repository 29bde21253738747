"""Read traces for the hit-ratio benchmark: libCacheSim csv files and a
seeded synthetic suite, seen at cachesvc's 64 KiB extent granularity.

A :class:`Trace` is a list of files (path under the origin root, size) and
phases of :class:`Read` s (file, offset, length); a phase is a stretch that
is measured on its own (the scans of ``zipf-scan``). Ranges are half-open
``[offset, offset + length)`` and lie inside their file.

**Extents.** The cache fills whole 64 KiB extents: extent ``k`` of a file is
``[k * 65536, (k + 1) * 65536)`` clipped to the file's end, so its size is
65536 except for a file's last one, which takes whole 4 KiB pages in the
cache (and in the simulation). A read touches the extents its range
overlaps. The *working set* of a trace is the size of the distinct extents
its reads touch; cache sizes are fractions of it.

**csv traces** (:func:`read_csv_trace`), libCacheSim's csv format with a
header row naming the columns (comma- or tab-separated; names are
case-insensitive, other columns are ignored, and so is time: a replay goes
as fast as it can):

- block traces have ``lbn`` (the first 512-byte sector) and ``size``
  (bytes): every read is on one file, ``device.img``, as large as the
  furthest read's end, created sparse;
- object traces have ``obj_id`` (any text) and ``obj_size`` (bytes): one
  file per object, as large as the largest size seen for it, and a request
  reads the first ``obj_size`` bytes (the whole object); the content is
  zeros (sparse files): any deterministic bytes do for hit ratios.

An ``op`` column may mark writes. They are **skipped**, in the replay and in
the simulation alike, and counted by op value in ``Trace.skipped``: the
benchmark measures the read cache, and a write has no counterpart in the
simulated policies (cachesvc writes an uncached range straight through to a
local origin, and a cached one in place), so replaying writes as ``PATCH``
would measure something the simulation does not model. Ops read as reads:
empty, ``r``, ``read``, ``get``, ``gets``, ``nop`` and libCacheSim's numeric
codes 0 (nop), 1 (get), 2 (gets) and 12 (read). Zero-size requests are
skipped too.

**The synthetic suite** (:func:`synthetic_suite`), generated from a seed, the
same on every run. Files have mixed sizes, log-uniform within three bands:
70 % 4-64 KiB, 25 % 64 KiB-1 MiB, 5 % 1-8 MiB. A read of a file up to 1 MiB
reads all of it; a read of a larger file reads a log-uniform 64 KiB-1 MiB
range at a random 4 KiB-aligned offset. Popularity is independent of size.

- ``zipf-0.8``, ``zipf-1.0``, ``zipf-1.2``: reads of Zipf-distributed
  files (rank r drawn with probability proportional to r**-alpha).
- ``zipf-scan``: Zipf 1.0 in three phases, with a one-pass scan of fresh
  files (64-512 KiB, each read whole once) totalling twice the cache
  between them. During a scan, every scan read is followed by two reads of
  the *hot set* (the most popular files whose bytes fill half the cache,
  drawn by their Zipf weights): those
  are the reads whose hit ratio through scans is reported. This trace
  depends on the cache size (its scans do), and its working set counts the
  Zipf phases only (scans read each byte once, and counting them would make
  "twice the cache" circular).
- ``loop``: the same files read whole in the same order, over and over;
  the cache is set to 1/1.1 of the loop (a loop 10 % larger than the cache)
  instead of the usual fractions.
- ``seq-random``: 8 MiB files streamed in 256 KiB reads, four at a time,
  spread among as many Zipf 1.0 reads as half a Zipf trace has. A
  stream's reads carry its id: the replay sends them in order, one at a
  time, as one reader would.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
EXTENT = 64 * KiB
PAGE = 4 * KiB
SECTOR = 512
WHOLE_READ_MAX = 1 * MiB  # files up to this size are read whole
SEED = 20261218

# libCacheSim csv op values that are reads (see the module docstring).
READ_OPS = frozenset({"", "r", "read", "get", "gets", "nop", "0", "1", "2", "12"})


@dataclass(frozen=True, slots=True)
class Read:
    """One read request: ``length`` bytes of file ``file`` at ``offset``.
    Reads with the same ``stream`` (>= 0) are sent in order, one at a time."""

    file: int
    offset: int
    length: int
    stream: int = -1


@dataclass(frozen=True, slots=True)
class TraceFile:
    name: str  # path under the origin root
    size: int


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    reads: list[Read]
    scan: bool = False  # a scan: hot-set reads in it are measured; not in the working set


@dataclass
class Trace:
    """Files and phases of reads; see the module docstring."""

    name: str
    description: str
    files: list[TraceFile]
    phases: list[Phase]
    hot_files: frozenset[int] = frozenset()
    skipped: dict[str, int] = field(default_factory=dict)  # why -> requests left out

    def reads(self) -> Iterator[Read]:
        for phase in self.phases:
            yield from phase.reads

    @property
    def requests(self) -> int:
        return sum(len(p.reads) for p in self.phases)

    @property
    def requested_bytes(self) -> int:
        return sum(r.length for r in self.reads())

    def working_set_bytes(self) -> int:
        """The size of the distinct extents that reads outside scans touch."""
        seen: set[int] = set()
        total = 0
        for phase in self.phases:
            if phase.scan:
                continue
            for r in phase.reads:
                size = self.files[r.file].size
                for k in extent_span(r.offset, r.length):
                    key = extent_id(r.file, k)
                    if key not in seen:
                        seen.add(key)
                        total += extent_size(size, k)
        return total

    def is_hot(self, phase: Phase, read: Read) -> bool:
        """Whether ``read`` is one whose hit ratio through scans is reported."""
        return phase.scan and read.file in self.hot_files


def extent_span(offset: int, length: int) -> range:
    """The indexes of the extents ``[offset, offset + length)`` overlaps."""
    if length <= 0:
        return range(0)
    return range(offset // EXTENT, (offset + length - 1) // EXTENT + 1)


def extent_size(file_size: int, index: int) -> int:
    """Bytes extent ``index`` of a file of ``file_size`` bytes takes in the
    cache: whole 4 KiB pages, as cachesvc holds it (a 5,000-byte file takes
    8 KiB), so that a simulated cache of the same size holds the same."""
    within = max(0, min(EXTENT, file_size - index * EXTENT))
    return -(-within // PAGE) * PAGE


def extent_id(file: int, index: int) -> int:
    """A number naming extent ``index`` of file ``file`` (simulator object id)."""
    return (file << 32) | index


def materialize(trace: Trace, root: Path) -> None:
    """Creates the trace's files under ``root``, sparse (all zeros)."""
    for f in trace.files:
        path = root / f.name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            os.truncate(out.fileno(), f.size)


# ---------------------------------------------------------------------------
# csv traces


def read_csv_trace(path: Path, max_requests: int | None = None) -> Trace:
    """A libCacheSim csv trace (block or object, see the module docstring),
    cut after ``max_requests`` replayed reads if given."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()
        delimiter = "\t" if "\t" in first and "," not in first else ","
        header = [h.strip().lower() for h in next(csv.reader([first], delimiter=delimiter))]
        cols = {name: i for i, name in enumerate(header)}
        op_col = cols.get("op")
        if "lbn" in cols and "size" in cols:
            kind, id_col, size_col = "block", cols["lbn"], cols["size"]
        elif "obj_id" in cols and "obj_size" in cols:
            kind, id_col, size_col = "object", cols["obj_id"], cols["obj_size"]
        else:
            raise ValueError(
                f"{path}: the header names neither lbn,size (block) nor obj_id,obj_size"
                f" (object): {header}"
            )
        skipped: dict[str, int] = {}
        ids: dict[str, int] = {}
        sizes: list[int] = []
        reads: list[Read] = []
        for row in csv.reader(f, delimiter=delimiter):
            if not row:
                continue
            if max_requests is not None and len(reads) >= max_requests:
                break
            op = row[op_col].strip().lower() if op_col is not None else ""
            if op not in READ_OPS:
                key = f"op {op}"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            size = int(float(row[size_col]))
            if size <= 0:
                skipped["size 0"] = skipped.get("size 0", 0) + 1
                continue
            if kind == "block":
                offset = int(float(row[id_col])) * SECTOR
                if not sizes:
                    sizes.append(0)
                sizes[0] = max(sizes[0], offset + size)
                reads.append(Read(0, offset, size))
            else:
                index = ids.setdefault(row[id_col].strip(), len(ids))
                if index == len(sizes):
                    sizes.append(0)
                sizes[index] = max(sizes[index], size)
                reads.append(Read(index, 0, size))
    if kind == "block":
        files = [TraceFile("device.img", sizes[0] if sizes else 0)]
    else:
        files = [TraceFile(f"obj/{i // 1000:05d}/{i:08d}", s) for i, s in enumerate(sizes)]
    what = f"{kind} trace {path.name}: {len(reads):,} reads"
    return Trace(path.stem, what, files, [Phase("trace", reads)], skipped=skipped)


# ---------------------------------------------------------------------------
# The synthetic suite


@dataclass(frozen=True)
class Scale:
    """How big the synthetic traces are."""

    files: int  # Zipf population
    requests: int  # reads of a Zipf trace
    loop_bytes: int  # extents' bytes of the loop
    loop_passes: int
    streams: int  # 8 MiB streams in seq-random
    stream_file: int


FULL = Scale(
    files=4000, requests=18_000, loop_bytes=48 * MiB, loop_passes=6, streams=32,
    stream_file=8 * MiB,
)  # fmt: skip
QUICK = Scale(
    files=1500, requests=6_000, loop_bytes=16 * MiB, loop_passes=4, streams=8,
    stream_file=8 * MiB,
)  # fmt: skip


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _file_size(rng: random.Random) -> int:
    u = rng.random()
    if u < 0.70:
        return _log_uniform(rng, 4 * KiB, 64 * KiB)
    if u < 0.95:
        return _log_uniform(rng, 64 * KiB, 1 * MiB)
    return _log_uniform(rng, 1 * MiB, 8 * MiB)


def _read_of(rng: random.Random, file: int, size: int) -> Read:
    """A whole read of a small file, a 64 KiB-1 MiB range of a large one."""
    if size <= WHOLE_READ_MAX:
        return Read(file, 0, size)
    length = _log_uniform(rng, 64 * KiB, 1 * MiB)
    offset = rng.randrange(0, (size - length) // (4 * KiB) + 1) * 4 * KiB
    return Read(file, offset, length)


class _Zipf:
    """Draws files with Zipf(alpha) popularity; ranks are shuffled over files."""

    def __init__(self, rng: random.Random, files: Sequence[int], alpha: float) -> None:
        self.by_rank = list(files)
        rng.shuffle(self.by_rank)
        self.weights = [(r + 1) ** -alpha for r in range(len(self.by_rank))]
        self._cum = list(accumulate(self.weights))

    def draw(self, rng: random.Random, k: int) -> list[int]:
        return rng.choices(self.by_rank, cum_weights=self._cum, k=k)


def _population(rng: random.Random, count: int, prefix: str) -> list[TraceFile]:
    return [TraceFile(f"{prefix}/{i // 1000:03d}/{i:06d}", _file_size(rng)) for i in range(count)]


def zipf_trace(scale: Scale, alpha: float) -> Trace:
    rng = random.Random(f"{SEED}-zipf-{alpha}")
    files = _population(rng, scale.files, "z")
    zipf = _Zipf(rng, range(len(files)), alpha)
    reads = [_read_of(rng, f, files[f].size) for f in zipf.draw(rng, scale.requests)]
    return Trace(
        f"zipf-{alpha}",
        f"Zipf {alpha} over {len(files):,} files, {len(reads):,} reads",
        files,
        [Phase("zipf", reads)],
    )


HOT_PER_SCAN_READ = 2


def zipf_scan_trace(scale: Scale, cache_fraction: float) -> Trace:
    """Zipf 1.0 with two scans of twice the cache (``cache_fraction`` of the
    Zipf phases' working set) between three Zipf phases."""
    rng = random.Random(f"{SEED}-zipf-scan")
    files = _population(rng, scale.files, "z")
    zipf = _Zipf(rng, range(len(files)), 1.0)
    zipf_phases = [
        Phase(f"zipf {i + 1}", [_read_of(rng, f, files[f].size) for f in zipf.draw(rng, n)])
        for i, n in enumerate([scale.requests // 3] * 3)
    ]
    working_set = Trace("", "", files, zipf_phases).working_set_bytes()
    cache = cache_fraction * working_set
    hot: list[int] = []
    hot_bytes = 0
    for f in zipf.by_rank:
        if hot_bytes + files[f].size > cache / 2:
            break
        hot.append(f)
        hot_bytes += files[f].size
    hot = hot or zipf.by_rank[:1]
    hot_cum = list(accumulate(zipf.weights[: len(hot)]))
    phases = [zipf_phases[0]]
    for n_scan in (1, 2):
        reads: list[Read] = []
        scanned = 0
        while scanned < 2 * cache:
            size = _log_uniform(rng, 64 * KiB, 512 * KiB)
            files.append(TraceFile(f"scan/{n_scan}/{len(files):06d}", size))
            reads.append(Read(len(files) - 1, 0, size))
            scanned += size
            for f in rng.choices(hot, cum_weights=hot_cum, k=HOT_PER_SCAN_READ):
                reads.append(_read_of(rng, f, files[f].size))
        phases += [Phase(f"scan {n_scan}", reads, scan=True), zipf_phases[n_scan]]
    return Trace(
        "zipf-scan",
        f"Zipf 1.0 over {scale.files:,} files, 3 x {scale.requests // 3:,} reads, two scans"
        f" of 2x the cache; hot set {len(hot)} files ({hot_bytes / MiB:.1f} MiB)",
        files,
        phases,
        hot_files=frozenset(hot),
    )


def loop_trace(scale: Scale) -> Trace:
    rng = random.Random(f"{SEED}-loop")
    files: list[TraceFile] = []
    total = 0
    while total < scale.loop_bytes:
        size = _file_size(rng)
        files.append(TraceFile(f"loop/{len(files) // 1000:03d}/{len(files):06d}", size))
        total += size
    reads = [Read(f, 0, files[f].size) for _ in range(scale.loop_passes) for f in range(len(files))]
    return Trace(
        "loop",
        f"{len(files):,} files ({total / MiB:.0f} MiB) read whole in order,"
        f" {scale.loop_passes} passes",
        files,
        [Phase("loop", reads)],
    )


STREAM_READ = 256 * KiB
ACTIVE_STREAMS = 4


def seq_random_trace(scale: Scale) -> Trace:
    """``scale.streams`` streams, read ACTIVE_STREAMS at a time, spread evenly
    (at random) among ``scale.requests // 2`` Zipf 1.0 reads."""
    rng = random.Random(f"{SEED}-seq-random")
    files = _population(rng, scale.files, "z")
    zipf = _Zipf(rng, range(len(files)), 1.0)
    first_stream = len(files)
    files += [TraceFile(f"stream/{i:03d}", scale.stream_file) for i in range(scale.streams)]
    pending = list(range(first_stream, len(files)))
    active: dict[int, int] = {}  # file -> next offset
    stream_reads = scale.streams * -(-scale.stream_file // STREAM_READ)
    random_reads = scale.requests // 2
    p_stream = stream_reads / (stream_reads + random_reads)
    reads: list[Read] = []
    while pending or active:
        while pending and len(active) < ACTIVE_STREAMS:
            active[pending.pop(0)] = 0
        if rng.random() < p_stream:
            f = rng.choice(sorted(active))
            offset = active[f]
            length = min(STREAM_READ, scale.stream_file - offset)
            reads.append(Read(f, offset, length, stream=f))
            if offset + length >= scale.stream_file:
                del active[f]
            else:
                active[f] = offset + length
        else:
            f = zipf.draw(rng, 1)[0]
            reads.append(_read_of(rng, f, files[f].size))
    return Trace(
        "seq-random",
        f"{scale.streams} streams of {scale.stream_file // MiB} MiB in"
        f" {STREAM_READ // KiB} KiB reads ({ACTIVE_STREAMS} at a time) among"
        f" {len(reads) - stream_reads:,} Zipf 1.0 reads over {scale.files:,} files",
        files,
        [Phase("mixed", reads)],
    )


STANDARD_FRACTIONS = (0.05, 0.10, 0.25)
LOOP_FRACTION = 1 / 1.1


@dataclass(frozen=True)
class Workload:
    """A synthetic trace family: ``build(fraction)`` gives the trace to run
    with a cache of ``fraction`` of its working set, for each of ``fractions``."""

    name: str
    fractions: tuple[float, ...]
    build: Callable[[float], Trace]
    per_size: bool = False  # True: the trace itself depends on the cache size


def synthetic_suite(scale: Scale, only: Sequence[str] = ()) -> list[Workload]:
    def fixed(make: Callable[[], Trace]) -> Callable[[float], Trace]:
        made: list[Trace] = []

        def build(_fraction: float) -> Trace:
            if not made:
                made.append(make())
            return made[0]

        return build

    suite = [
        *(
            Workload(f"zipf-{a}", STANDARD_FRACTIONS, fixed(partial(zipf_trace, scale, a)))
            for a in (0.8, 1.0, 1.2)
        ),
        Workload("zipf-scan", STANDARD_FRACTIONS, partial(zipf_scan_trace, scale), per_size=True),
        Workload("loop", (LOOP_FRACTION,), fixed(partial(loop_trace, scale))),
        Workload("seq-random", STANDARD_FRACTIONS, fixed(partial(seq_random_trace, scale))),
    ]
    if only:
        unknown = set(only) - {w.name for w in suite}
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}: {[w.name for w in suite]}")
        suite = [w for w in suite if w.name in only]
    return suite


def cache_size_for(working_set: int, fraction: float) -> int:
    """``fraction`` of ``working_set``, rounded up to 4 KiB pages."""
    return -(-int(working_set * fraction) // (4 * KiB)) * 4 * KiB
