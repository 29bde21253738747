"""Micro-benchmarks of MemoryFile: allocation and copying through its views.

Run with ``python -m benchmarks.memfile_bench``. Prints a markdown table and
returns the figures as a dict:

- allocate + dec_ref of 4 KiB and 64 KiB ranges, in operations per second
  (the time includes waiting for the reclaimer to punch the freed pages);
- copying 1 MiB out of ``map_internal`` views into a bytearray, against a
  plain bytearray-to-bytearray copy of the same size in the same run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from cachesvc.core.memfile import MemoryFile, MemoryKind
from cachesvc.core.pages import copy_into_views

MiB = 1 << 20
ALLOC_OPS = 20_000
COPY_ROUNDS = 1_000
REPEATS = 5


async def _allocate_free(memfile: MemoryFile, length: int) -> float:
    """Best allocate+dec_ref rate (ops/s) over REPEATS runs of ALLOC_OPS."""
    best = 0.0
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(ALLOC_OPS):
            rng = await memfile.allocate(length, MemoryKind.PAGE_CACHE)
            memfile.dec_ref(rng)
        await memfile.wait_reclaimed()
        best = max(best, ALLOC_OPS / (time.perf_counter() - start))
    return best


def _best_copy_rate(copy: Callable[[], None], rounds: int) -> float:
    """Best rate (MiB/s) of calling ``copy`` (which copies 1 MiB) ``rounds`` times."""
    best = 0.0
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(rounds):
            copy()
        best = max(best, rounds / (time.perf_counter() - start))
    return best


async def run() -> dict[str, float]:
    memfile = await MemoryFile.create()
    try:
        alloc_4k = await _allocate_free(memfile, 4 << 10)
        alloc_64k = await _allocate_free(memfile, 64 << 10)

        rng = await memfile.allocate(MiB, MemoryKind.PAGE_CACHE)
        source = bytearray(bytes(range(256)) * (MiB // 256))
        copy_into_views(memfile.map_internal(rng, write=True), memoryview(source))
        destination = bytearray(MiB)
        dest_view = memoryview(destination)

        def copy_from_memfile() -> None:
            pos = 0
            for view in memfile.map_internal(rng, write=False):
                end = pos + len(view)
                dest_view[pos:end] = view
                pos = end

        def copy_plain() -> None:
            dest_view[:] = source

        copy_from_memfile()
        assert destination == source
        memfile_rate = _best_copy_rate(copy_from_memfile, COPY_ROUNDS)
        plain_rate = _best_copy_rate(copy_plain, COPY_ROUNDS)
        memfile.dec_ref(rng)
    finally:
        await memfile.close()
    return {
        "allocate_free_4k_ops_per_s": alloc_4k,
        "allocate_free_64k_ops_per_s": alloc_64k,
        "copy_1m_memfile_mib_per_s": memfile_rate,
        "copy_1m_bytearray_mib_per_s": plain_rate,
        "copy_ratio": memfile_rate / plain_rate,
    }


def main() -> dict[str, float]:
    results = asyncio.run(run())
    rows = [
        ("allocate + dec_ref 4 KiB", f"{results['allocate_free_4k_ops_per_s']:,.0f} ops/s"),
        ("allocate + dec_ref 64 KiB", f"{results['allocate_free_64k_ops_per_s']:,.0f} ops/s"),
        (
            "copy 1 MiB from map_internal views",
            f"{results['copy_1m_memfile_mib_per_s']:,.0f} MiB/s",
        ),
        (
            "copy 1 MiB bytearray -> bytearray",
            f"{results['copy_1m_bytearray_mib_per_s']:,.0f} MiB/s",
        ),
        ("copy ratio (target >= 0.8)", f"{results['copy_ratio']:.2f}"),
    ]
    print("| benchmark | result |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return results


if __name__ == "__main__":
    main()
