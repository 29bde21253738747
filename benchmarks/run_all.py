"""Runs every benchmark and records the results (``make bench``).

Run with ``python -m benchmarks.run_all [NAME ...]``. Every module of this
package whose name ends in ``_bench`` (``memfile_bench``, ``cache_bench``,
...) is a benchmark: it exposes ``main() -> dict``, which runs it, prints a
markdown table and returns its figures. Modules are run one after another in
name order (or only those named on the command line, with or without the
``_bench`` suffix), each under a ``## name`` heading.

The combined results go to ``benchmarks/results/latest.json``::

    {"machine": {"date_utc", "nproc", "cpu_model", "memory_bytes",
                 "python", "platform", "git_commit"},
     "benchmarks": {"cache_bench": {...}, "memfile_bench": {...}, ...},
     "errors": {"name": "traceback", ...}}

A benchmark that raises (or has no ``main``) is recorded under ``errors``,
the others still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
RESULTS_FILE = PACKAGE_DIR / "results" / "latest.json"
SUFFIX = "_bench"


def discover() -> list[str]:
    """Names of the benchmark modules in this package, sorted."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules([str(PACKAGE_DIR)])
        if info.name.endswith(SUFFIX) and not info.ispkg
    )


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file, or None."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def machine_facts() -> dict[str, Any]:
    """Where and when the benchmarks ran."""
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")  # "16314424 kB"
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "memory_bytes": int(mem_kib.split()[0]) * 1024 if mem_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def run(names: list[str]) -> dict[str, Any]:
    """Runs the named benchmark modules; returns the combined record."""
    record: dict[str, Any] = {"machine": machine_facts(), "benchmarks": {}, "errors": {}}
    for name in names:
        print(f"\n## {name}\n", flush=True)
        try:
            module = importlib.import_module(f"{__package__}.{name}")
            main = getattr(module, "main", None)
            if not callable(main):
                raise TypeError(f"{name} has no main() -> dict")
            results = main()
            if not isinstance(results, dict):
                raise TypeError(f"{name}.main() returned {type(results).__name__}, not dict")
        except Exception:
            record["errors"][name] = traceback.format_exc()
            print(f"{name} failed:\n{record['errors'][name]}", file=sys.stderr, flush=True)
            continue
        record["benchmarks"][name] = results
        sys.stdout.flush()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)
    available = discover()
    names = available
    if args.names:
        names = [n if n.endswith(SUFFIX) else n + SUFFIX for n in args.names]
        unknown = sorted(set(names) - set(available))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; available: {available}")
    record = run(names)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nresults written to {RESULTS_FILE}")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
