"""Starting and stopping a real Prometheus server for integration tests.

The server listens on 127.0.0.1 on a free port, scrapes the given targets
every second with a generated configuration, and keeps its TSDB in a
temporary directory. Every wait is bounded; it is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.servers import free_port, stop_process, wait_for_http

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: cachesvc
    metrics_path: /metrics
    static_configs:
      - targets: [{targets}]
"""


@dataclass
class PrometheusServer:
    """A running ``prometheus``."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The result vector of an instant query (empty if nothing matched)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Polls ``expr`` until it returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr!r} returned nothing within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        return stop_process(self.proc, signal.SIGTERM, timeout)


def start_prometheus(
    targets: Sequence[str], workdir: Path, *, interval: str = "1s", timeout: float = 30.0
) -> PrometheusServer:
    """Starts Prometheus scraping ``targets`` (``host:port``) and waits for /-/ready."""
    if PROMETHEUS is None:
        raise RuntimeError("prometheus is not installed (Debian package 'prometheus')")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        CONFIG.format(interval=interval, targets=", ".join(f"'{t}'" for t in targets))
    )
    port = free_port()
    argv = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir)
    server = PrometheusServer(proc, port, log_path)
    try:
        # /-/ready answers 503 while Prometheus starts.
        wait_for_http(f"{server.url}/-/ready", timeout, proc, ready=lambda status: status == 200)
    except BaseException:
        server.proc.kill()
        server.proc.wait(timeout=10)
        raise RuntimeError(f"prometheus did not start:\n{server.log()}") from None
    return server


@contextlib.contextmanager
def running_prometheus(
    targets: Sequence[str], workdir: Path, **kwargs: Any
) -> Iterator[PrometheusServer]:
    """``start_prometheus`` as a context manager that always stops the process."""
    server = start_prometheus(targets, workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()
