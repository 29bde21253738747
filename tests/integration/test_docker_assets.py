"""Static checks of the deployment assets in docker/ (no Docker engine needed).

What runs here: `docker-compose config` on the compose file, `nginx -t` on the
balancer config rendered for 127.0.0.1, `promtool` on the Prometheus config
and on every dashboard query, the healthcheck command of the Dockerfile
against a local HTTP server, and parsers for the Dockerfile, .dockerignore,
dashboard JSON and Grafana provisioning files, cross-checked against each
other (service names, ports, mounts) and against DESIGN.md's metric list.

The tools (docker-compose, nginx, promtool) are installed by `make test`
through scripts/install-system-deps.sh when it runs as root; a missing tool
skips its test only when not root, and fails it otherwise.

The readers and renderers of these files (tests/support/deploy.py) are shared
with test_topology.py, which runs the same files as a live stack on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy import (
    ADMIN_PORT,
    COMPOSE_FILE,
    DATA_PORT,
    DESIGN_METRICS,
    DOCKER,
    HISTOGRAMS,
    NODES,
    REPO,
    TARGET_LABELS,
    dashboard_panels,
    dashboard_queries,
    grafana_to_promql,
    load_dashboard,
    metric_names,
    render_nginx_conf,
    render_prometheus_config,
    require_tool,
    selector_labels,
)
from tests.support.servers import free_port

SERVICES = {"minio", "createbucket", *NODES, "lb", "prometheus", "grafana"}


def run_tool(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> str:
    """Runs a checker to completion (bounded); its output, asserting exit 0."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=60, check=False
    )
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


# --- Compose ---------------------------------------------------------------------------


def run_compose_config(env_file: Path, tmp_path: Path) -> dict[str, Any]:
    """`docker-compose config` with a clean environment and the given .env file."""
    binary = require_tool("docker-compose")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    argv = [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"]
    config = yaml.safe_load(run_tool(argv, env=env, cwd=tmp_path))
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The rendered compose config with no .env at all (only the defaults)."""
    tmp = tmp_path_factory.mktemp("compose")
    empty = tmp / "empty.env"
    empty.write_text("")
    return run_compose_config(empty, tmp)


@dataclass(frozen=True)
class Port:
    host_ip: str  # "" means every interface.
    published: str
    target: int


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def ports_of(service: Mapping[str, Any]) -> list[Port]:
    """Published ports, from either the short string or the long mapping form."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, str):
            spec = entry.split("/", 1)[0]
            parts = spec.rsplit(":", 2)
            host_ip = parts[0] if len(parts) == 3 else ""
            out.append(Port(host_ip, parts[-2] if len(parts) > 1 else "", int(parts[-1])))
        else:
            out.append(
                Port(entry.get("host_ip", ""), str(entry.get("published", "")), entry["target"])
            )
    return out


def mounts_of(service: Mapping[str, Any]) -> list[Mount]:
    """Volumes, from either the short string or the long mapping form."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            out.append(Mount(source, target, "ro" in mode))
        else:
            out.append(Mount(entry["source"], entry["target"], bool(entry.get("read_only", False))))
    return out


def bind_source(service: Mapping[str, Any], target: str) -> Path:
    for mount in mounts_of(service):
        if mount.target == target:
            assert mount.read_only, f"{target} should be mounted read-only"
            return Path(mount.source)
    raise AssertionError(f"nothing mounted at {target}: {service.get('volumes')}")


def test_compose_config_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    minio = services["minio"]
    assert minio["command"][:2] == ["server", "/data"]
    assert "healthcheck" in minio
    assert services["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"

    for node in NODES:
        svc = services[node]
        build = svc["build"]
        assert Path(build["context"]) == REPO
        assert (REPO / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        env = svc["environment"]
        assert env["CACHESVC_ORIGIN"].startswith("s3://")
        assert env["CACHESVC_S3_ENDPOINT"] == "http://minio:9000"
        assert env["CACHESVC_CACHE_SIZE"] and svc["mem_limit"]
        for var in ("CACHESVC_WRITE_TOKEN", "CACHESVC_ADMIN_TOKEN"):
            assert env[var], var
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
        dep = svc["depends_on"]["createbucket"]
        assert dep["condition"] == "service_completed_successfully"
        # A node's data and admin listeners are reachable only through the
        # compose network (the balancer, Prometheus).
        assert "ports" not in svc, f"{node} publishes ports"

    lb = services["lb"]
    assert bind_source(lb, "/etc/nginx/nginx.conf") == DOCKER / "nginx.conf"
    assert [p.target for p in ports_of(lb)] == [DATA_PORT]
    assert {n: d["condition"] for n, d in lb["depends_on"].items()} == {
        n: "service_healthy" for n in NODES
    }

    prometheus = services["prometheus"]
    assert bind_source(prometheus, "/etc/prometheus/prometheus.yml") == DOCKER / "prometheus.yml"
    grafana = services["grafana"]
    for kind in ("datasources", "dashboards"):
        provisioning = bind_source(grafana, f"/etc/grafana/provisioning/{kind}")
        assert provisioning == DOCKER / "grafana" / "provisioning" / kind

    # Everything but the balancer is published on loopback only, and every
    # bind-mounted host path exists.
    for name, svc in services.items():
        if name != "lb":
            for port in ports_of(svc):
                assert port.host_ip == "127.0.0.1", f"{name} publishes {port}"
        for mount in mounts_of(svc):
            if mount.source.startswith("/"):
                assert Path(mount.source).exists(), f"{name}: {mount.source} missing"


def test_compose_env_example_matches_defaults(compose: dict[str, Any], tmp_path: Path) -> None:
    """docker/.env.example documents every variable with the compose default,
    and a value set in an .env file reaches every node."""
    example = DOCKER / ".env.example"
    documented = dict(
        line.split("=", 1)
        for line in example.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    text = COMPOSE_FILE.read_text()
    # Every interpolation ($$ is a literal $) is ${NAME:-default}, so
    # `docker compose up` needs no .env file.
    references = [
        re.match(r"\$\{([A-Z0-9_]+):-([^}]*)\}", text[m.start() :])
        for m in re.finditer(r"(?<!\$)\$(?!\$)", text)
    ]
    assert references
    for ref in references:
        assert ref is not None, "a variable without a default"
        name, default = ref.groups()
        assert documented.get(name) == default, f"{name}: .env.example vs compose default"

    assert run_compose_config(example, tmp_path) == compose

    custom = tmp_path / "custom.env"
    custom.write_text("CACHESVC_WRITE_TOKEN=s3cr3t-write\nCACHESVC_BUCKET=other\n")
    services = run_compose_config(custom, tmp_path)["services"]
    for node in NODES:
        env = services[node]["environment"]
        assert env["CACHESVC_WRITE_TOKEN"] == "s3cr3t-write"
        assert env["CACHESVC_ORIGIN"] == "s3://other/data"
    assert services["createbucket"]["environment"]["CACHESVC_BUCKET"] == "other"


# --- nginx -----------------------------------------------------------------------------


def upstream_servers(conf: str) -> list[str]:
    return re.findall(r"^\s*server\s+(cachesvc\d+:\d+)\b", conf, re.MULTILINE)


def test_nginx_conf_upstream_matches_compose(compose: dict[str, Any]) -> None:
    conf = (DOCKER / "nginx.conf").read_text()
    nodes = sorted(n for n in compose["services"] if n.startswith("cachesvc"))
    assert upstream_servers(conf) == [f"{n}:{DATA_PORT}" for n in nodes]
    upstream = conf[conf.index("upstream cachesvc {") :]
    upstream = upstream[: upstream.index("}")]
    # The balancing method must precede keepalive (nginx applies it in order),
    # and the key must not include the query (?fsync goes where the file is).
    assert re.search(r"hash \$uri consistent;.*keepalive \d+;", upstream, re.DOTALL)
    for line in re.findall(r"^\s*server\s.*$", upstream, re.MULTILINE):
        assert "max_fails=" in line and "fail_timeout=" in line, line
    next_upstream = re.findall(r"^\s*proxy_next_upstream\s+([^;]*);", conf, re.MULTILINE)
    assert len(next_upstream) == 1
    # Never retry writes on another node, nor count cachesvc's own 502/504
    # (origin failures) against a node.
    assert not {"non_idempotent", "http_502", "http_504"} & set(next_upstream[0].split())


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    # `nginx -t` binds the listen address: a free one. Nothing connects to
    # the node addresses.
    listen = f"127.0.0.1:{free_port()}"
    nodes = [f"127.0.0.1:{free_port()}" for _ in NODES]
    rendered = render_nginx_conf((DOCKER / "nginx.conf").read_text(), nodes, listen, tmp_path)
    assert "cachesvc1:" not in rendered and f"listen {listen};" in rendered
    conf = tmp_path / "nginx.conf"
    conf.write_text(rendered)
    pid = f"pid {tmp_path / 'nginx.pid'};"
    run_tool(
        [
            nginx,
            "-t",
            "-q",
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-c",
            str(conf),
            "-g",
            pid,
        ]
    )


def test_render_nginx_conf_refuses_drift() -> None:
    conf = (DOCKER / "nginx.conf").read_text()
    with pytest.raises(ValueError, match="node lines"):
        render_nginx_conf(conf, ["127.0.0.1:1"], "127.0.0.1:2")


# --- Prometheus ------------------------------------------------------------------------


def test_prometheus_scrapes_every_node_admin_listener(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["cachesvc"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    scraped = {static["labels"]["node"]: static["targets"] for static in job["static_configs"]}
    nodes = {n for n in compose["services"] if n.startswith("cachesvc")}
    assert scraped == {n: [f"{n}:{ADMIN_PORT}"] for n in nodes}
    assert {"source_labels": ["node"], "target_label": "instance"} in job["relabel_configs"]
    # The admin port scraped is the one the image listens on.
    assert f"CACHESVC_ADMIN_LISTEN=0.0.0.0:{ADMIN_PORT}" in (DOCKER / "Dockerfile").read_text()


def test_prometheus_config_and_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rendered = render_prometheus_config(
        (DOCKER / "prometheus.yml").read_text(),
        {n: f"127.0.0.1:{19090 + i}" for i, n in enumerate(NODES)},
    )
    assert "cachesvc1:9090" not in rendered
    config = tmp_path / "prometheus.yml"
    config.write_text(rendered)
    run_tool([promtool, "check", "config", str(config)])

    # Every dashboard query, with Grafana's variables substituted, as a
    # recording rule: promtool parses each PromQL expression.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(dashboard_queries(load_dashboard()))
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_tool([promtool, "check", "rules", str(rules_file)])


# --- Grafana ---------------------------------------------------------------------------


def test_dashboard_uses_only_design_metrics_and_labels() -> None:
    dashboard = load_dashboard()
    queries = dashboard_queries(dashboard)
    used: set[str] = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, f"query without a cachesvc metric: {expr}"
        unknown = names - DESIGN_METRICS.keys()
        assert not unknown, f"not in DESIGN.md's metric list: {unknown} in {expr}"
        used |= names
        allowed = set(TARGET_LABELS).union(*(DESIGN_METRICS[n] for n in names))
        for metric, labels in selector_labels(expr).items():
            assert labels <= allowed, f"{metric}: unknown labels {labels - allowed}"
        if any(n in HISTOGRAMS for n in names):
            allowed.add("le")
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels = {label.strip() for label in grouping.split(",")}
            assert labels <= allowed, f"grouping by unknown labels {labels - allowed}: {expr}"
    # The panels the deployment promises: memory per node, hit ratio, origin
    # traffic, request rate and latency, write-back errors.
    assert {
        "cachesvc_memory_committed_bytes",
        "cachesvc_memory_mapped_bytes",
        "cachesvc_memory_evictable_bytes",
        "cachesvc_memory_dirty_bytes",
        "cachesvc_cache_hit_bytes_total",
        "cachesvc_cache_miss_bytes_total",
        "cachesvc_origin_bytes_total",
        "cachesvc_origin_requests_total",
        "cachesvc_http_requests_total",
        "cachesvc_http_request_duration_seconds",
        "cachesvc_writeback_errors_total",
    } <= used


def test_metric_name_extraction() -> None:
    assert metric_names(
        "histogram_quantile(0.99, sum by (le) (rate("
        'cachesvc_http_request_duration_seconds_bucket{instance=~"$instance"}[1m])))'
        " / cachesvc_writeback_errors_total"
    ) == {"cachesvc_http_request_duration_seconds", "cachesvc_writeback_errors_total"}
    # A suffix is stripped only from histogram names.
    assert metric_names("cachesvc_open_files_count") == {"cachesvc_open_files_count"}


def test_dashboard_structure_and_provisioning(compose: dict[str, Any]) -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "cachesvc"
    assert dashboard["title"] == "cachesvc"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"

    datasources = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    # The datasource points at the compose Prometheus service.
    assert source["url"] == "http://prometheus:9090"
    prometheus_targets = [p.target for p in ports_of(compose["services"]["prometheus"])]
    assert prometheus_targets == [9090]
    uses = [p["datasource"] for p in panels if p["type"] != "row"]
    uses += [v["datasource"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert uses
    for used in uses:
        assert used == {"type": "prometheus", "uid": source["uid"]}
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]

    providers = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "cachesvc.yml").read_text()
    )
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    grafana = compose["services"]["grafana"]
    assert bind_source(grafana, provider["options"]["path"]) == DOCKER / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/cachesvc.json"


# --- Dockerfile and build context ------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, continuation lines joined."""
    stages: list[Stage] = []
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, arg = logical.strip().partition(" ")
            keyword = keyword.upper()
            arg = " ".join(arg.split())
            if keyword == "FROM":
                words = arg.split()
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                stages.append(Stage(words[0], name))
            else:
                assert stages, f"{keyword} before FROM"
                stages[-1].instructions.append((keyword, arg))
        logical = ""
    assert not logical, "Dockerfile ends in a continuation"
    return stages


def exec_form(arg: str) -> list[str]:
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arg
    return value


def copy_sources(arg: str) -> tuple[dict[str, str], list[str]]:
    """(flags, sources) of a COPY/ADD argument."""
    words = exec_form(arg) if arg.startswith("[") else shlex.split(arg)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words[:-1]


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for arg in stage.args("ENV"):
        for word in shlex.split(arg):
            key, _, value = word.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`) as a regex."""
    out = "^"
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def dockerignore_excludes(patterns: Sequence[str], path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the
    context: the last pattern matching it or one of its parents wins."""
    parents = path.split("/")[:-1]
    candidates = [path] + ["/".join(parents[: i + 1]) for i in range(len(parents))]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        regex = dockerignore_regex(os.path.normpath(raw.lstrip("!").strip()).lstrip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_matcher() -> None:
    patterns = ["*", "!pkg/", "**/__pycache__", "!keep/**/x.py"]
    assert dockerignore_excludes(patterns, "top.txt")
    assert not dockerignore_excludes(patterns, "pkg/a/b.py")
    assert dockerignore_excludes(patterns, "pkg/a/__pycache__/b.pyc")
    assert not dockerignore_excludes(patterns, "keep/x.py")
    assert not dockerignore_excludes(patterns, "keep/deep/er/x.py")
    assert dockerignore_excludes(patterns, "keep/deep/y.py")
    assert not dockerignore_excludes(["a?[bc]"], "ad")
    assert dockerignore_excludes(["a?[bc]"], "adc")


def test_build_context_has_sources_and_no_local_state(dockerfile: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    checked = 0
    for stage in dockerfile:
        for keyword, arg in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            flags, sources = copy_sources(arg)
            if "from" in flags:
                assert flags["from"] in {s.name for s in dockerfile}, arg
                continue
            for source in sources:
                path = REPO / source
                assert path.resolve().is_relative_to(REPO), f"{source} is outside the context"
                assert path.exists(), f"COPY source {source} is missing from the context"
                files = (
                    sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                )
                for file in files:
                    rel = file.relative_to(REPO).as_posix()
                    if "__pycache__" in rel:
                        continue
                    assert not dockerignore_excludes(patterns, rel), f"{rel} is .dockerignored"
                    checked += 1
    assert checked >= 2
    # Secrets, local state and caches never reach the daemon.
    for rel in (
        "docker/.env",
        ".venv/bin/python",
        ".git/config",
        "data/file.bin",
        ".pytest_cache/v/cache/nodeids",
        "cachesvc/__pycache__/server.cpython-311.pyc",
        "tests/conftest.py",
    ):
        assert dockerignore_excludes(patterns, rel), f"{rel} would be in the build context"


def test_dockerfile_final_stage(dockerfile: list[Stage]) -> None:
    final = dockerfile[-1]
    builder = dockerfile[0]
    assert len(dockerfile) == 2 and builder.name
    # The virtualenv copied from the builder links to the builder's interpreter.
    assert final.image == builder.image
    assert re.fullmatch(r"python:3\.(\d+)-slim", final.image)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    minor = int(final.image.split(".")[1].split("-")[0])
    assert requires["requires-python"] == ">=3.11" and minor >= 11

    (user,) = final.args("USER")
    name = user.split(":")[0]
    assert name not in ("root", "0")
    runs = " ".join(final.args("RUN"))
    assert re.search(rf"useradd\b.*--uid 10001\b.*\b{name}\b", runs)
    # The user is set after the last RUN (nothing runs as root afterwards
    # except what precedes USER).
    keywords = [kw for kw, _ in final.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    for tool in ("curl", "wget", "apt-get", "gcc"):
        assert tool not in runs, f"{tool} in the final stage"

    env = env_of(final)
    assert env["CACHESVC_LISTEN"] == f"0.0.0.0:{DATA_PORT}"
    assert env["CACHESVC_ADMIN_LISTEN"] == f"0.0.0.0:{ADMIN_PORT}"
    # Tokens are deployment secrets: never baked into the image.
    assert not {"CACHESVC_WRITE_TOKEN", "CACHESVC_ADMIN_TOKEN"} & env.keys()
    assert {int(p) for arg in final.args("EXPOSE") for p in arg.split()} == {
        DATA_PORT,
        ADMIN_PORT,
    }
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = final.args("ENTRYPOINT")
    assert exec_form(entrypoint) == ["cachesvc"] and "cachesvc" in scripts
    (cmd,) = final.args("CMD")
    assert exec_form(cmd) == ["serve"]
    # Only the builder's virtualenv comes across.
    copies = [copy_sources(arg) for arg in final.args("COPY")]
    assert copies and all(flags.get("from") == builder.name for flags, _ in copies)


def healthcheck_command(stage: Stage) -> list[str]:
    (arg,) = stage.args("HEALTHCHECK")
    _, _, command = arg.partition(" CMD ")
    assert command, f"HEALTHCHECK without CMD: {arg}"
    return exec_form(command)


class _Health:
    """A local stand-in for a node's /healthz."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.paths: list[str] = []


@pytest.fixture
def health_server() -> Iterator[tuple[_Health, int]]:
    state = _Health(200)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.paths.append(self.path)
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()


def test_dockerfile_healthcheck_probes_healthz(
    dockerfile: list[Stage], health_server: tuple[_Health, int]
) -> None:
    state, port = health_server
    command = healthcheck_command(dockerfile[-1])
    assert command[0] == "python"
    listen = env_of(dockerfile[-1])["CACHESVC_LISTEN"]
    # The image's listen address with this test server's port.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CACHESVC_LISTEN": f"{listen.rsplit(':', 1)[0]}:{port}",
    }

    def probe() -> int:
        proc = subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=20, check=False
        )
        return proc.returncode

    assert probe() == 0
    assert state.paths == ["/healthz"]
    state.status = 503
    assert probe() != 0
