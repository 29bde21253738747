"""Starting and stopping real cachesvc processes for integration and e2e tests
(the benchmarks use the same helpers).

Every wait is bounded; processes are stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(
    url: str,
    timeout: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    ready: Callable[[int], bool] = lambda status: status < 500,
) -> None:
    """Polls ``url`` until its status satisfies ``ready`` (default: any answer
    below 500). Raises RuntimeError if ``proc`` exits first, TimeoutError on time out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            exc.close()  # else its socket is only closed, with a warning, when collected
            status = exc.code
        except OSError as exc:
            last = str(exc)
            time.sleep(0.05)
            continue
        if ready(status):
            return
        last = f"status {status}"
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout}s: {last}")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Returns once 127.0.0.1:``port`` accepts connections. Raises
    RuntimeError if ``proc`` exits first, TimeoutError on time out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def stop_process(
    proc: subprocess.Popen[bytes],
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
    *,
    group: bool = False,
) -> int:
    """Sends ``sig``, then SIGKILL after ``timeout``; always reaps the process.

    With ``group`` (a process started in its own session, like nginx and its
    workers), the process group is SIGKILLed at the end in any case, so no
    orphaned child outlives it. Returns the exit status.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


@dataclass
class ServerProcess:
    """A running ``cachesvc serve``."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Sends ``sig`` and waits; SIGKILL after ``timeout``. Returns the exit status."""
        return stop_process(self.proc, sig, timeout)

    def kill(self) -> None:
        """``kill -9``: no shutdown work at all."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_cachesvc(
    origin: str,
    args: Sequence[str] = (),
    *,
    log_dir: Path,
    env: dict[str, str] | None = None,
    port: int | None = None,
    admin_port: int | None = None,
    timeout: float = 30.0,
) -> ServerProcess:
    """Starts ``python -m cachesvc serve`` and waits until /healthz answers."""
    port = port or free_port()
    admin_port = admin_port or free_port()
    argv = [
        sys.executable, "-m", "cachesvc", "serve",
        "--origin", origin,
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin_port}",
        *args,
    ]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"cachesvc-{port}.log"
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, port, admin_port, log_path, argv)
    try:
        wait_for_http(f"{server.url}/healthz", timeout, proc)
        wait_for_http(f"{server.admin_url}/healthz", timeout, proc)
    except BaseException:
        server.stop(signal.SIGKILL, 5)
        raise RuntimeError(f"cachesvc did not start:\n{server.log()}") from None
    return server


@contextlib.contextmanager
def running_cachesvc(
    origin: str, args: Sequence[str] = (), **kwargs: object
) -> Iterator[ServerProcess]:
    """``start_cachesvc`` as a context manager that always stops the process."""
    server = start_cachesvc(origin, args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
