"""The host's memory limit and the default cache size it implies.

The limit is the cgroup's (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``,
the smallest along the process's cgroup path) or else the machine's
MemTotal, whichever is smaller; the default ``--cache-size`` is min(1 GiB, a
quarter of it). Everything here reads files and never raises: what cannot
be read counts as unknown.
"""

from __future__ import annotations

import re
from pathlib import Path

from cachesvc.config.values import GiB, KiB, MiB
from cachesvc.core.memfile import PAGE_SIZE

# The smallest --cache-size: below it the cache cannot do useful work.
MIN_CACHE_SIZE = 1 * MiB
DEFAULT_CACHE_SIZE_CAP = 1 * GiB

# cgroup v1 reports "no limit" as a huge page-rounded number; anything at or
# above this is treated as unlimited.
_CGROUP_V1_UNLIMITED = 1 << 60


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_dirs(root: Path, cgroup_path: str) -> list[Path]:
    """``root/cgroup_path`` and each of its ancestors up to ``root`` itself.

    In a container the path in /proc/self/cgroup may name the host's view of
    the hierarchy while the container sees its own cgroup at the mount root;
    walking up to the root covers both.
    """
    parts = [part for part in cgroup_path.split("/") if part and part not in (".", "..")]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _cgroup_limit(cgroup_root: Path, proc_cgroup: Path) -> int | None:
    """The smallest memory limit along this process's cgroup path (v2, then
    v1 hierarchy); None when unlimited or unknown."""
    text = _read_text(proc_cgroup) or ""
    v2_path: str | None = None
    v1_path: str | None = None
    for line in text.splitlines():
        hierarchy_id, _, rest = line.partition(":")
        controllers, _, cgroup_path = rest.partition(":")
        if hierarchy_id == "0" and controllers == "":
            v2_path = cgroup_path
        elif "memory" in controllers.split(","):
            v1_path = cgroup_path
    limits: list[int] = []
    candidates = [(d / "memory.max", False) for d in _cgroup_dirs(cgroup_root, v2_path or "/")]
    candidates += [
        (d / "memory.limit_in_bytes", True)
        for d in _cgroup_dirs(cgroup_root / "memory", v1_path or "/")
    ]
    for limit_file, is_v1 in candidates:
        value = (_read_text(limit_file) or "").strip()
        if not value.isascii() or not value.isdigit():  # missing, unreadable, or "max"
            continue
        limit = int(value)
        if limit > 0 and not (is_v1 and limit >= _CGROUP_V1_UNLIMITED):
            limits.append(limit)
    return min(limits) if limits else None


def _mem_total(meminfo: Path) -> int | None:
    for line in (_read_text(meminfo) or "").splitlines():
        match = re.fullmatch(r"MemTotal:\s+(\d+)\s+kB", line.strip())
        if match:
            return int(match.group(1)) * KiB
    return None


def detect_memory_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> int | None:
    """The memory this process may use: the smaller of its cgroup limit
    (v2 or v1) and the machine's MemTotal; None when neither can be read."""
    found = [
        limit
        for limit in (_cgroup_limit(cgroup_root, proc_cgroup), _mem_total(meminfo))
        if limit is not None
    ]
    return min(found) if found else None


def default_cache_size(memory_limit: int | None) -> int:
    """min(1 GiB, a quarter of ``memory_limit``), page-aligned, at least 1 MiB;
    1 GiB when the limit is unknown."""
    if memory_limit is None:
        return DEFAULT_CACHE_SIZE_CAP
    quarter = memory_limit // 4 // PAGE_SIZE * PAGE_SIZE
    return max(MIN_CACHE_SIZE, min(DEFAULT_CACHE_SIZE_CAP, quarter))


def detected_cache_size() -> int:
    """The default cache size for this process's memory limit."""
    return default_cache_size(detect_memory_limit())
