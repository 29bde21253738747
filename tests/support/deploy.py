"""The deployment assets in docker/, read and rendered for tests on 127.0.0.1.

Two kinds of user: tests/integration/test_docker_assets.py checks the files
statically (no Docker engine), and tests/integration/test_topology.py runs
the compose stack as local processes from the same files. Both read the
assets through this module, so a file that drifts from what the renderers
expect fails both.

- Renderers: :func:`render_nginx_conf` (node and listen addresses, temp
  paths), :func:`render_prometheus_config` (scrape targets), and
  :func:`compose_node_environment` (a node's environment from
  docker-compose.yml with its ``${NAME:-default}`` defaults applied).
- Launchers: :func:`running_balancer` (nginx on a rendered nginx.conf) and
  :func:`running_prometheus_config` (Prometheus on a rendered
  prometheus.yml). Every wait is bounded; processes are stopped by PID.
- The dashboard: :func:`load_dashboard`, :func:`dashboard_queries`,
  :func:`metric_names`, and :data:`DESIGN_METRICS`, the metric list DESIGN.md
  fixes; :func:`exposed_metric_names` reads the same names from a live
  ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.contract import METRICS, series_name
from tests.support.prometheus import PROMETHEUS, PrometheusServer
from tests.support.servers import free_port, stop_process, wait_for_http

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
NODES = ("cachesvc1", "cachesvc2", "cachesvc3")
DATA_PORT = 8080
ADMIN_PORT = 9090

# DESIGN.md's metrics as queries name them -> label names.
DESIGN_METRICS: dict[str, frozenset[str]] = {
    series_name(short): labels for short, (_, labels) in METRICS.items()
}
HISTOGRAMS = {series_name(s) for s, (kind, _) in METRICS.items() if kind == "histogram"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})


def require_tool(name: str) -> str:
    """Path of a system tool; skip when absent and not root, fail when root."""
    path = shutil.which(name)
    for directory in ("/usr/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if path is None and candidate.is_file() and os.access(candidate, os.X_OK):
            path = str(candidate)
    if path is not None:
        return path
    if os.geteuid() != 0:
        pytest.skip(f"{name} is not installed and we are not root to install it")
    pytest.fail(f"{name} is missing; `make test` installs it via scripts/install-system-deps.sh")


# --- Renderers for tests on 127.0.0.1 --------------------------------------------------

_NGINX_SERVER = re.compile(r"^(\s*server\s+)cachesvc\d+:\d+(\s[^;]*)?;", re.MULTILINE)
_NGINX_LISTEN = re.compile(r"^(\s*listen\s+)\d+;", re.MULTILINE)


def render_nginx_conf(
    text: str, servers: Sequence[str], listen: str, temp_dir: Path | None = None
) -> str:
    """docker/nginx.conf with its `server cachesvcN:8080` lines replaced by
    `servers` (host:port, in order, one per node line), `listen 8080;` by
    `listen`, and nginx's temporary files under `temp_dir` when given.

    Run the result with `-g 'pid <file>;'`: the file sets no pid path."""
    found = len(_NGINX_SERVER.findall(text))
    if found != len(servers):
        raise ValueError(f"nginx.conf has {found} node lines, {len(servers)} servers given")
    addresses = iter(servers)
    text = _NGINX_SERVER.sub(lambda m: f"{m[1]}{next(addresses)}{m[2] or ''};", text)
    text, listens = _NGINX_LISTEN.subn(lambda m: f"{m[1]}{listen};", text)
    if listens != 1:
        raise ValueError(f"nginx.conf has {listens} `listen <port>;` lines, expected 1")
    if temp_dir is not None:
        paths = "".join(
            f"    {kind}_temp_path {temp_dir / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        text = text.replace("http {\n", "http {\n" + paths, 1)
    return text


def render_prometheus_config(
    text: str, targets: Mapping[str, str], prometheus: str | None = None
) -> str:
    """docker/prometheus.yml with each node's scrape target (`"cachesvcN:9090"`)
    replaced by targets[node] (host:port); node names (the instance label) stay.
    `prometheus` replaces Prometheus's own target (`"localhost:9090"`)."""
    replacements = {f"{node}:{ADMIN_PORT}": address for node, address in targets.items()}
    if prometheus is not None:
        replacements["localhost:9090"] = prometheus
    for old_address, address in replacements.items():
        old = f'targets: ["{old_address}"]'
        if text.count(old) != 1:
            raise ValueError(f"prometheus.yml has no single {old!r}")
        text = text.replace(old, f'targets: ["{address}"]')
    return text


_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_node_environment(node: str) -> dict[str, str]:
    """The environment docker-compose.yml gives service `node`, every
    `${NAME:-default}` replaced by its default (as with no .env file)."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    environment = compose["services"][node]["environment"]
    assert isinstance(environment, dict), "expected the mapping form of `environment`"
    out = {}
    for name, value in environment.items():
        text = _COMPOSE_VARIABLE.sub(lambda m: m[2], str(value))
        assert "$" not in text, f"{node}.{name}: unsupported interpolation in {value!r}"
        out[str(name)] = text
    return out


# --- Launchers -------------------------------------------------------------------------


def _is_ok(status: int) -> bool:
    return status == 200


@contextlib.contextmanager
def running_balancer(
    servers: Sequence[str], workdir: Path, *, timeout: float = 10.0
) -> Iterator[str]:
    """nginx on docker/nginx.conf rendered for `servers` (host:port, one per
    node line) and a free port on 127.0.0.1; yields the balancer's URL.

    The pid file, temp paths and log (nginx's stderr and stdout: the file logs
    there) are under `workdir`."""
    nginx = require_tool("nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    log_path = workdir / "nginx.log"
    argv = [nginx, "-p", str(workdir), "-e", str(log_path), "-c", str(conf)]
    argv += ["-g", f"daemon off; pid {workdir / 'nginx.pid'};"]
    for _attempt in range(3):  # the free port may be taken before nginx binds it
        listen = f"127.0.0.1:{free_port()}"
        conf.write_text(
            render_nginx_conf((DOCKER / "nginx.conf").read_text(), servers, listen, workdir)
        )
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        url = f"http://{listen}"
        try:
            wait_for_http(f"{url}/healthz", timeout, proc, ready=_is_ok)
        except (RuntimeError, TimeoutError):
            stop_process(proc, signal.SIGQUIT, 2.0, group=True)
            continue
        try:
            yield url
        finally:
            stop_process(proc, signal.SIGQUIT, 5.0, group=True)
        return
    raise RuntimeError(f"nginx did not start:\n{log_path.read_text(errors='replace')}")


@contextlib.contextmanager
def running_prometheus_config(
    targets: Mapping[str, str], workdir: Path, *, timeout: float = 30.0
) -> Iterator[PrometheusServer]:
    """Prometheus on docker/prometheus.yml rendered for `targets` (node ->
    host:port of its admin listener), listening on a free port of 127.0.0.1
    (and scraping itself there), its TSDB under `workdir`."""
    binary = PROMETHEUS or require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    log_path = workdir / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken before Prometheus binds it
        port = free_port()
        config.write_text(
            render_prometheus_config(
                (DOCKER / "prometheus.yml").read_text(), targets, f"127.0.0.1:{port}"
            )
        )
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
            )
        server = PrometheusServer(proc, port, log_path)
        try:
            wait_for_http(f"{server.url}/-/ready", timeout, proc, ready=_is_ok)
        except (RuntimeError, TimeoutError):
            stop_process(proc, signal.SIGTERM, 5.0, group=True)
            continue
        try:
            yield server
        finally:
            stop_process(proc, signal.SIGTERM, 15.0, group=True)
        return
    raise RuntimeError(f"prometheus did not start:\n{log_path.read_text(errors='replace')}")


# --- Grafana ---------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "cachesvc.json").read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def dashboard_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """PromQL of every panel target and query variable."""
    queries = [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", text)
            queries.append(match[1] if match else text)
    return queries


def grafana_to_promql(expr: str) -> str:
    """Grafana's template variables replaced by values PromQL accepts."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$instance", ".*")
    )


def metric_names(expr: str) -> set[str]:
    """The DESIGN metric names an expression uses (histogram series suffixes
    stripped)."""
    names = set()
    for name in re.findall(r"\bcachesvc_[a-z_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Label names each metric's `{...}` selectors in `expr` match on."""
    out: dict[str, set[str]] = {}
    for metric, selector in re.findall(r"\b(cachesvc_[a-z_]+)\{([^}]*)\}", expr):
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
        out.setdefault(metric, set()).update(labels)
    return out


def exposed_metric_names(exposition: str) -> dict[str, set[str]]:
    """Series names in a text exposition, with the label names seen on each:
    every sample name (`..._total`, `..._bucket`), plus a histogram's base
    name as :func:`metric_names` gives it."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            names = [sample.name]
            if family.type == "histogram":
                names.append(family.name)
            for name in names:
                out.setdefault(name, set()).update(sample.labels)
    return out
