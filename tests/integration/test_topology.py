"""The docker-compose stack, run as local processes from the same files.

What docker/docker-compose.yml deploys, on 127.0.0.1: moto's S3 server in
place of MinIO (the bucket created by a separate client, like the compose
`createbucket` service), three `cachesvc serve` processes with the compose
nodes' environment (origin, endpoint and tokens also given as flags),
nginx on docker/nginx.conf and Prometheus on docker/prometheus.yml, both
rendered for the local addresses by tests/support/deploy.py.

Through the balancer: 50 files are written and fsynced, then read back;
each path must always reach the same node, which nginx's
`X-Cachesvc-Upstream` header, each node's `cachesvc_http_requests_total` and
each node's `/admin/files` agree on. The fsynced files must be in the bucket.
Every metric the Grafana dashboard queries must be in a live `/metrics`, and
every dashboard query must return data from the live Prometheus. Last, one
node is killed with SIGKILL: every file must still read back (nginx retries
on the next node of the ring, which reads the bucket), the other nodes'
paths must not move, and Prometheus must show the node down.

One stack per module; the tests run in file order and the node-loss test,
which kills cachesvc2, comes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
import pytest_asyncio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.moto_fixture import running_moto_server
from tests.support.content import pattern
from tests.support.deploy import (
    DOCKER,
    NODES,
    TARGET_LABELS,
    compose_node_environment,
    dashboard_queries,
    exposed_metric_names,
    grafana_to_promql,
    load_dashboard,
    metric_names,
    require_tool,
    running_balancer,
    running_prometheus_config,
    selector_labels,
)
from tests.support.prometheus import PrometheusServer
from tests.support.servers import ServerProcess, start_cachesvc
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.asyncio(loop_scope="module")

WRITE_TOKEN = "topology-write-token"
ADMIN_TOKEN = "topology-admin-token"
UPSTREAM_HEADER = "X-Cachesvc-Upstream"
FILE_COUNT = 50
KILLED = "cachesvc2"
NGINX_CONF = (DOCKER / "nginx.conf").read_text()
# The passive health check's threshold (the same on every node line).
MAX_FAILS = int(re.findall(r"^\s*server\s.*\bmax_fails=(\d+)", NGINX_CONF, re.MULTILINE)[0])
# Prometheus scrapes every 5 s (docker/prometheus.yml): a few intervals.
PROMETHEUS_WAIT = 30.0
PROMETHEUS_POLL = 0.25  # seconds between two queries while waiting


@dataclass
class Stack:
    """The running processes of the stack and how to reach them."""

    bucket: str
    prefix: str
    s3: S3Client
    nodes: dict[str, ServerProcess]
    balancer: str
    prometheus: PrometheusServer
    http: aiohttp.ClientSession

    def node_of(self, upstream: str) -> str:
        """The node name of an nginx `$upstream_addr` entry (host:port)."""
        for name, node in self.nodes.items():
            if upstream == f"127.0.0.1:{node.port}":
                return name
        raise AssertionError(f"{upstream!r} is not a node's data address")

    def file_url(self, path: str) -> str:
        return f"{self.balancer}/files/{path}"


@dataclass(frozen=True)
class Routed:
    """One request through the balancer and the node(s) nginx says it tried."""

    path: str
    method: str
    upstreams: tuple[str, ...]


def upstreams_of(stack: Stack, response: aiohttp.ClientResponse) -> tuple[str, ...]:
    """The node names in nginx's upstream header (several if it retried)."""
    header = response.headers.get(UPSTREAM_HEADER)
    assert header, f"no {UPSTREAM_HEADER} header from the balancer"
    return tuple(stack.node_of(address.strip()) for address in header.split(","))


async def requests_served(stack: Stack) -> dict[str, float]:
    """Each live node's total `cachesvc_http_requests_total` (all labels)."""
    out = {}
    for name, node in stack.nodes.items():
        if node.proc.poll() is None:
            out[name] = (await scrape(stack, node)).requests
    return out


@dataclass
class Scrape:
    """The parts of one node's /metrics the tests look at."""

    text: str
    requests: float  # cachesvc_http_requests_total, summed over its labels
    origin_bytes_in: float


async def scrape(stack: Stack, node: ServerProcess) -> Scrape:
    async with stack.http.get(f"{node.admin_url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    requests = 0.0
    origin_in = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cachesvc_http_requests_total":
                requests += sample.value
            elif sample.name == "cachesvc_origin_bytes_total" and sample.labels == {
                "direction": "in"
            }:
                origin_in = sample.value
    return Scrape(text, requests, origin_in)


def up_by_instance(prometheus: PrometheusServer) -> dict[str, float]:
    """`up` of every cachesvc target, by instance label."""
    result = prometheus.query('up{job="cachesvc"}')
    return {series["metric"]["instance"]: float(series["value"][1]) for series in result}


# --- The stack -------------------------------------------------------------------------


async def start_nodes(
    moto: str, origin: str, log_dir: Path, exits: contextlib.ExitStack
) -> dict[str, ServerProcess]:
    """The three nodes, started concurrently; each is stopped by `exits`."""
    env_base = {
        # Moto accepts any credentials (the nodes keep MinIO's from compose);
        # nothing from the host's AWS configuration leaks in.
        "AWS_CONFIG_FILE": str(log_dir / "aws-config-missing"),
        "AWS_SHARED_CREDENTIALS_FILE": str(log_dir / "aws-credentials-missing"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    args = [
        "--s3-endpoint", moto,
        "--write-token", WRITE_TOKEN,
        "--admin-token", ADMIN_TOKEN,
    ]  # fmt: skip

    def start(name: str) -> ServerProcess:
        env = {**compose_node_environment(name), **env_base}
        return start_cachesvc(origin, args, log_dir=log_dir / name, env=env)

    results = await asyncio.gather(
        *(asyncio.to_thread(start, name) for name in NODES), return_exceptions=True
    )
    nodes = {}
    for name, result in zip(NODES, results, strict=True):
        if isinstance(result, ServerProcess):
            exits.callback(result.stop)
            nodes[name] = result
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return nodes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    require_tool("nginx")
    require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("topology")
    # The compose nodes' origin, e.g. s3://cachesvc/data.
    origin = compose_node_environment(NODES[0])["CACHESVC_ORIGIN"]
    parsed = urllib.parse.urlsplit(origin)
    assert parsed.scheme == "s3", origin
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    with contextlib.ExitStack() as exits:
        moto = exits.enter_context(running_moto_server(tmp / "moto"))
        async with contextlib.AsyncExitStack() as async_exits:
            s3 = await async_exits.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=moto,
                    region_name="us-east-1",
                    aws_access_key_id="topology",
                    aws_secret_access_key="topology",
                    config=AioConfig(s3={"addressing_style": "path"}),
                )
            )
            await s3.create_bucket(Bucket=bucket)
            nodes = await start_nodes(moto, origin, tmp, exits)
            balancer = exits.enter_context(
                running_balancer([f"127.0.0.1:{n.port}" for n in nodes.values()], tmp / "nginx")
            )
            prometheus = exits.enter_context(
                running_prometheus_config(
                    {name: f"127.0.0.1:{n.admin_port}" for name, n in nodes.items()},
                    tmp / "prometheus",
                )
            )
            http = await async_exits.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            )
            yield Stack(bucket, prefix, s3, nodes, balancer, prometheus, http)


# --- The files -------------------------------------------------------------------------


@dataclass
class Written:
    """The 50 files, written and fsynced through the balancer."""

    sizes: dict[str, int]  # path -> size; the content is pattern(seed_of(path), ...)
    routed: list[Routed]
    served: dict[str, float]  # per node: cachesvc_http_requests_total growth meanwhile


def seed_of(path: str) -> int:
    return int(path.rsplit("-", 1)[1].removesuffix(".bin"))


def file_paths() -> list[str]:
    return [f"topology/d{i % 5}/file-{i:02d}.bin" for i in range(FILE_COUNT)]


async def bounded(calls: list[Callable[[], Awaitable[None]]], limit: int = 8) -> None:
    """Runs the calls concurrently, at most `limit` at a time."""
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await call()

    await asyncio.gather(*(one(call) for call in calls))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def written(stack: Stack) -> Written:
    sizes = {path: 3000 + seed_of(path) * 4111 for path in file_paths()}
    routed: list[Routed] = []
    auth = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    before = await requests_served(stack)

    async def write(path: str) -> None:
        body = pattern(seed_of(path), 0, sizes[path])
        async with stack.http.put(stack.file_url(path), data=body, headers=auth) as response:
            assert response.status == 201, await response.text()
            routed.append(Routed(path, "PUT", upstreams_of(stack, response)))
        url = f"{stack.file_url(path)}?fsync"
        async with stack.http.post(url, headers=auth) as response:
            assert response.status == 204, await response.text()
            routed.append(Routed(path, "POST", upstreams_of(stack, response)))

    await bounded([functools.partial(write, path) for path in sizes])
    after = await requests_served(stack)
    return Written(sizes, routed, {name: after[name] - before[name] for name in after})


# --- Tests -----------------------------------------------------------------------------


async def test_each_path_is_served_by_one_node(stack: Stack, written: Written) -> None:
    routed = list(written.routed)
    before = await requests_served(stack)

    async def read(path: str) -> None:
        seed, size = seed_of(path), written.sizes[path]
        async with stack.http.get(stack.file_url(path)) as response:
            assert response.status == 200
            assert await response.read() == pattern(seed, 0, size), path
            routed.append(Routed(path, "GET", upstreams_of(stack, response)))
        headers = {"Range": "bytes=1000-2999"}
        async with stack.http.get(stack.file_url(path), headers=headers) as response:
            assert response.status == 206
            assert await response.read() == pattern(seed, 1000, 2000), path
            routed.append(Routed(path, "GET", upstreams_of(stack, response)))
        async with stack.http.head(stack.file_url(path)) as response:
            assert response.status == 200
            assert response.content_length == size
            routed.append(Routed(path, "HEAD", upstreams_of(stack, response)))

    await bounded([functools.partial(read, path) for path in written.sizes])
    after = await requests_served(stack)

    # nginx: one node per path, never a retry, across writes, fsyncs and reads.
    owners: dict[str, set[tuple[str, ...]]] = {}
    for entry in routed:
        owners.setdefault(entry.path, set()).add(entry.upstreams)
    for path, seen in owners.items():
        assert len(seen) == 1 and len(next(iter(seen))) == 1, f"{path} went to {seen}"
    owner = {path: next(iter(seen))[0] for path, seen in owners.items()}
    assert set(owner.values()) == set(NODES), f"not every node got paths: {Counter(owner.values())}"

    # The nodes' own request counters agree with nginx, request for request.
    write_phase = Counter(entry.upstreams[0] for entry in written.routed)
    read_phase = Counter(entry.upstreams[0] for entry in routed[len(written.routed) :])
    assert written.served == {name: float(write_phase[name]) for name in NODES}
    assert {name: after[name] - before[name] for name in NODES} == {
        name: float(read_phase[name]) for name in NODES
    }

    # Each node caches exactly the paths nginx sent it, all written back.
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for name, node in stack.nodes.items():
        async with stack.http.get(f"{node.admin_url}/admin/files") as response:
            assert response.status == 401  # the --admin-token is in force
        async with stack.http.get(f"{node.admin_url}/admin/files", headers=auth) as response:
            assert response.status == 200
            files = (await response.json())["files"]
        cached = {str(f["path"]).lstrip("/") for f in files}
        assert cached == {path for path, node_name in owner.items() if node_name == name}
        assert all(f["dirty_bytes"] == 0 for f in files), files


async def test_fsynced_files_are_in_the_bucket(stack: Stack, written: Written) -> None:
    keys = set()
    paginator = stack.s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=stack.bucket, Prefix=f"{stack.prefix}/"):
        keys |= {entry["Key"] for entry in page.get("Contents", [])}
    assert keys == {f"{stack.prefix}/{path}" for path in written.sizes}
    for path, size in written.sizes.items():
        response = await stack.s3.get_object(Bucket=stack.bucket, Key=f"{stack.prefix}/{path}")
        async with response["Body"] as body:
            assert await body.read() == pattern(seed_of(path), 0, size), path


async def test_dashboard_metrics_exist_live(stack: Stack, written: Written) -> None:
    queries = dashboard_queries(load_dashboard())
    assert queries
    # Every metric and selector label the dashboard uses, on every node's
    # /metrics after traffic (labelled series exist only once used).
    for name, node in stack.nodes.items():
        exposed = exposed_metric_names((await scrape(stack, node)).text)
        for expr in queries:
            missing = metric_names(expr) - exposed.keys()
            assert not missing, f"{name}: {missing} not in /metrics (query {expr})"
            for metric, labels in selector_labels(expr).items():
                unknown = labels - TARGET_LABELS - exposed[metric]
                assert not unknown, f"{name}: {metric} has no labels {unknown} ({expr})"

    # And every query returns data from the live Prometheus (rates need two
    # scrapes after the traffic).
    def empty_queries() -> list[str]:
        return [q for q in queries if not stack.prometheus.query(grafana_to_promql(q))]

    await asyncio.to_thread(
        wait_until,
        empty_queries,
        lambda empty: not empty,
        PROMETHEUS_WAIT,
        "data for every dashboard query",
        interval=PROMETHEUS_POLL,
    )
    instances = {
        s["metric"]["instance"] for s in stack.prometheus.query("cachesvc_memory_limit_bytes")
    }
    assert instances == set(NODES)


async def test_node_loss(stack: Stack, written: Written) -> None:
    prometheus = stack.prometheus
    await asyncio.to_thread(
        wait_until,
        lambda: up_by_instance(prometheus),
        lambda up: up == {name: 1.0 for name in NODES},
        PROMETHEUS_WAIT,
        "every node up in Prometheus",
        interval=PROMETHEUS_POLL,
    )
    owner = {entry.path: entry.upstreams[0] for entry in written.routed}
    moved = {path for path, name in owner.items() if name == KILLED}
    assert moved
    survivors = [name for name in NODES if name != KILLED]
    origin_in_before = {
        name: (await scrape(stack, stack.nodes[name])).origin_bytes_in for name in survivors
    }

    stack.nodes[KILLED].kill()

    # Two passes over every file: the killed node's paths go to the next node
    # on the ring (after a failed attempt, until nginx marks it down), the
    # others stay where they were. One connection per request, so that every
    # nginx worker takes some.
    final: dict[str, list[str]] = {path: [] for path in written.sizes}
    retried = 0
    for _ in range(2):
        for path, size in written.sizes.items():
            request = stack.http.get(stack.file_url(path), headers={"Connection": "close"})
            async with request as response:
                assert response.status == 200, (path, await response.text())
                assert await response.read() == pattern(seed_of(path), 0, size), path
                upstreams = upstreams_of(stack, response)
            if path in moved:
                assert upstreams[-1] in survivors and set(upstreams[:-1]) <= {KILLED}, upstreams
                retried += len(upstreams) - 1
            else:
                assert upstreams == (owner[path],), (path, upstreams)
            final[path].append(upstreams[-1])
    for path in moved:
        assert len(set(final[path])) == 1, f"{path} moved between {final[path]}"
    # Passive health check: after max_fails failed attempts (whichever nginx
    # worker made them) the dead node is skipped for fail_timeout.
    assert len(moved) >= MAX_FAILS
    assert retried == MAX_FAILS, f"{retried} requests tried the dead node first"

    # The stand-ins read the moved files from the bucket.
    origin_in = 0.0
    for name in survivors:
        origin_in += (await scrape(stack, stack.nodes[name])).origin_bytes_in
        origin_in -= origin_in_before[name]
    assert origin_in >= sum(written.sizes[path] for path in moved)

    # The stand-in also takes the dead node's writes, durable after fsync.
    path = min(moved)
    body = pattern(FILE_COUNT, 0, 10_000)
    auth = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    async with stack.http.put(stack.file_url(path), data=body, headers=auth) as response:
        assert response.status == 204, await response.text()  # it exists in the bucket
        assert upstreams_of(stack, response)[-1] == final[path][0]
    async with stack.http.post(f"{stack.file_url(path)}?fsync", headers=auth) as response:
        assert response.status == 204, await response.text()
        assert upstreams_of(stack, response)[-1] == final[path][0]
    async with stack.http.get(stack.file_url(path)) as response:
        assert await response.read() == body
    stored = await stack.s3.get_object(Bucket=stack.bucket, Key=f"{stack.prefix}/{path}")
    async with stored["Body"] as stream:
        assert await stream.read() == body

    expected = {name: 0.0 if name == KILLED else 1.0 for name in NODES}
    await asyncio.to_thread(
        wait_until,
        lambda: up_by_instance(prometheus),
        lambda up: up == expected,
        PROMETHEUS_WAIT,
        f"{KILLED} down in Prometheus",
        interval=PROMETHEUS_POLL,
    )
