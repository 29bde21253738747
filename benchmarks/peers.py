"""The processes the benchmarks run: cachesvc, nginx and wrk.

The one launcher module of :mod:`benchmarks`; the origin benchmark adds its
own peers (rclone, a latency proxy) in :mod:`benchmarks.origin_peers` on top
of these helpers.

- :func:`cachesvc_server` runs ``python -m cachesvc serve`` and
  :func:`nginx_server` runs nginx (``worker_processes 1``, ``sendfile on``)
  over a directory, each optionally pinned to CPUs with ``taskset``; both
  are context managers that yield a :class:`Peer` and stop their process
  (by PID) on exit. Starting, waiting and stopping use the test suite's
  helpers (:mod:`tests.support.servers`).
- :func:`run_wrk` runs Debian's ``wrk`` (optionally pinned) with a Lua
  script and returns its summary, read from a ``done()`` hook that every
  script gets appended (:data:`WRK_REPORT`), not scraped from its text.
- :func:`cpu_seconds` reads a server's CPU time (its children included).
- :func:`resident` keeps files in memory (``mmap`` + ``mlock``) for as long
  as it is entered: the benchmark VM drops idle page cache within seconds,
  and nginx would otherwise serve from disk.

Everything listens on 127.0.0.1 on a free port; every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.support.servers import free_port, stop_process, wait_for_http

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
TASKSET = shutil.which("taskset") or "/usr/bin/taskset"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """``argv`` run under ``taskset -c cpus`` (unchanged when ``cpus`` is None)."""
    return [TASKSET, "-c", cpus, *argv] if cpus is not None else list(argv)


@dataclass(frozen=True)
class Peer:
    """A running server: its base URL (files are under ``url + prefix``), main
    PID and, for cachesvc, the admin listener's base URL."""

    name: str
    url: str
    prefix: str  # path prefix of the served directory, e.g. "/files/" or "/"
    pid: int
    admin_url: str | None = None  # cachesvc's /metrics is under it

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def file_url(self, path: str) -> str:
        return f"{self.url}{self.prefix}{path}"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all threads) and its live child processes.

    Children are included so that nginx's worker counts toward its master.
    CPU time rather than wall time is what a server spent per request even
    when the machine is shared (stolen time is not counted).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[1] is the parent PID; [11] and [12] are utime and stime.
        if fields is not None and (int(entry) == pid or int(fields[1]) == pid):
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


@contextlib.contextmanager
def cachesvc_server(
    origin: Path | str,
    args: Sequence[str] = (),
    *,
    cpus: str | None = None,
    log_path: Path | None = None,
) -> Iterator[Peer]:
    """``python -m cachesvc serve --origin origin *args`` on free 127.0.0.1 ports."""
    port, admin_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "cachesvc", "serve",
        "--origin", str(origin),
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin_port}",
        *args,
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        log: IO[bytes]
        if log_path is None:
            log = stack.enter_context(tempfile.TemporaryFile())
        else:
            log = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen(pinned(argv, cpus), stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            admin_url = f"http://127.0.0.1:{admin_port}"
            wait_for_http(f"{url}/healthz", START_TIMEOUT, proc)
            wait_for_http(f"{admin_url}/healthz", START_TIMEOUT, proc)
            yield Peer("cachesvc", url, "/files/", proc.pid, admin_url)
        finally:
            stop_process(proc, timeout=STOP_TIMEOUT)


_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {extra_conf}
    }}
}}
"""


@contextlib.contextmanager
def nginx_server(root: Path, *, cpus: str | None = None, extra_conf: str = "") -> Iterator[Peer]:
    """nginx serving ``root`` at ``/`` (one worker, sendfile, no access log).

    ``extra_conf`` goes into the ``server`` block, e.g. a ``location``.
    """
    if not os.access(NGINX, os.X_OK):
        raise RuntimeError(f"nginx not found at {NGINX}")
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as work:
        port = free_port()
        conf = Path(work) / "nginx.conf"
        # As root, the worker would run as 'nobody', which may not read root.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            _NGINX_CONF.format(
                user=user, work=work, port=port, root=root.resolve(), extra_conf=extra_conf
            )
        )
        argv = [NGINX, "-p", work, "-c", str(conf), "-e", f"{work}/error.log"]
        proc = subprocess.Popen(
            pinned(argv, cpus),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/", START_TIMEOUT, proc)
            yield Peer("nginx", url, "/", proc.pid)
        finally:
            stop_process(proc, signal.SIGQUIT, STOP_TIMEOUT, group=True)


# ---------------------------------------------------------------------------
# wrk

# Appended to every script: prints the summary as one JSON line after the
# text report. Latencies are in microseconds.
WRK_REPORT = """
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '\\nWRK_JSON {"requests": %d, "bytes": %d, "duration_us": %d, '
    .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, '
    .. '"status_errors": %d, "timeouts": %d, '
    .. '"p50_us": %d, "p99_us": %d, "mean_us": %f, "max_us": %d}\\n',
    summary.requests, summary.bytes, summary.duration,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run's summary."""

    requests: int
    bytes: int  # response bytes read, headers included
    seconds: float
    errors: int  # connect, read, write, timeouts and non-2xx/3xx statuses
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def bytes_per_request(self) -> float:
        return self.bytes / max(1, self.requests)


def run_wrk(
    url: str,
    script: str,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    cpus: str | None = None,
    timeout: str = "10s",
) -> WrkResult:
    """Runs wrk against ``url`` with the Lua ``script`` (plus :data:`WRK_REPORT`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="wrk-") as lua:
        lua.write(script + "\n" + WRK_REPORT)
        lua.flush()
        argv = [
            WRK, "--latency", "--timeout", timeout,
            "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
            "-s", lua.name, url,
        ]  # fmt: skip
        done = subprocess.run(
            pinned(argv, cpus), capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            raw = json.loads(line[len("WRK_JSON ") :])
            break
    else:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    errors = sum(
        raw[key]
        for key in (
            "connect_errors", "read_errors", "write_errors", "status_errors", "timeouts",
        )
    )  # fmt: skip
    return WrkResult(
        requests=raw["requests"],
        bytes=raw["bytes"],
        seconds=raw["duration_us"] / 1e6,
        errors=errors,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


# ---------------------------------------------------------------------------
# Keeping files resident

_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
    ]  # fmt: skip
    for name in ("munmap", "mlock", "munlock"):
        getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


@contextlib.contextmanager
def resident(paths: Sequence[Path]) -> Iterator[int]:
    """Maps and locks ``paths`` in memory while entered; yields the bytes locked.

    The files are mapped shared and read-only, so locking faults in and
    pins their page-cache pages themselves: a server reading the same files
    (nginx's sendfile) never waits for the disk. Needs CAP_IPC_LOCK or a
    large enough RLIMIT_MEMLOCK.
    """
    libc = _libc()
    mapped: list[tuple[int, int]] = []  # (address, length)
    try:
        for path in paths:
            size = path.stat().st_size
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                address = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
            finally:
                os.close(fd)
            if address is None or address == _MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of {path} failed: {os.strerror(err)}")
            mapped.append((address, size))
            if libc.mlock(address, size) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mlock of {path} failed: {os.strerror(err)}")
        yield sum(size for _, size in mapped)
    finally:
        for address, size in reversed(mapped):
            libc.munlock(address, size)
            libc.munmap(address, size)
