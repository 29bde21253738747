"""Prometheus metrics of a real ``cachesvc serve`` process.

``promtool check metrics`` accepts the live exposition; every metric of the
contract (tests/support/contract.py) is there with its labels; each memory gauge and counter moves
the right way under a workload driven through the HTTP API; and a real
Prometheus server scrapes the admin listener.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.client import call
from tests.support.content import pattern
from tests.support.contract import METRICS
from tests.support.metrics import poll, scrape
from tests.support.prometheus import PROMETHEUS, PROMTOOL, running_prometheus
from tests.support.servers import ServerProcess, running_cachesvc

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("metrics")
    root = base / "origin"
    root.mkdir()
    for name, seed in (("workload.bin", 1), ("labels.bin", 2)):
        (root / name).write_bytes(pattern(seed, 0, MiB))
    # No background write-back during the test: dirty bytes only go on fsync.
    args = ["--cache-size", "64MiB", "--dirty-expire", "1h"]
    with running_cachesvc(str(root), args, log_dir=base / "logs") as proc:
        yield proc


def test_gauges_and_counters_follow_the_workload(server: ServerProcess) -> None:
    url = f"{server.url}/files/workload.bin"
    base = scrape(server)
    committed0 = base.value("memory_committed_bytes", kind="page_cache")
    assert base.value("memory_mapped_bytes") == 0
    assert base.value("memory_dirty_bytes") == 0

    # A read fills from the origin: allocated, evictable, misses and
    # origin bytes rise at once; committed once the refresher has looked.
    reply = call("GET", url)
    assert reply.status == 200 and reply.body == pattern(1, 0, MiB)
    after_read = poll(
        server,
        lambda s: s.value("memory_committed_bytes", kind="page_cache") >= committed0 + MiB,
        "committed page-cache bytes did not rise by the file read",
    )
    assert after_read.value("memory_evictable_bytes") >= base.value("memory_evictable_bytes") + MiB
    assert after_read.value("memory_allocated_bytes") >= base.value("memory_allocated_bytes") + MiB
    assert after_read.value("cache_miss_bytes_total") - base.value("cache_miss_bytes_total") == MiB
    assert after_read.value("origin_bytes_total", direction="in") >= MiB
    assert after_read.value("open_files") >= 1
    assert after_read.value("http_requests_total", method="GET", status="200") >= 1
    assert after_read.value("http_request_duration_seconds_count", method="GET") >= 1
    assert after_read.value("origin_requests_total", op="read", outcome="ok") >= 1
    assert after_read.value("origin_request_duration_seconds_count", op="read") >= 1

    # A second read is a hit.
    assert call("GET", url, headers={"Range": "bytes=0-65535"}).status == 206
    after_hit = scrape(server)
    hits = after_hit.value("cache_hit_bytes_total") - after_read.value("cache_hit_bytes_total")
    assert hits == 64 * KiB
    assert after_hit.value("cache_miss_bytes_total") == after_read.value("cache_miss_bytes_total")

    # A write to a cached range is dirty until fsync writes it back.
    new = b"N" * (8 * KiB)
    put = call(
        "PUT", url, headers={"Content-Range": f"bytes 4096-{4096 + len(new) - 1}/*"}, data=new
    )
    assert put.status == 204
    dirty = scrape(server)
    assert dirty.value("memory_dirty_bytes") == len(new)
    out_before = dirty.value("origin_bytes_total", direction="out")
    assert call("POST", f"{url}?fsync").status == 204
    synced = scrape(server)
    assert synced.value("memory_dirty_bytes") == 0
    assert synced.value("writeback_bytes_total") - dirty.value("writeback_bytes_total") == len(new)
    assert synced.value("origin_bytes_total", direction="out") - out_before == len(new)
    assert synced.value("writeback_errors_total") == 0

    # A pin maps its pages, which are then no longer evictable.
    pin = call("POST", f"{server.admin_url}/admin/pin?path=workload.bin&range=0-65535")
    assert pin.status == 200, pin.body
    pinned = scrape(server)
    assert pinned.value("memory_mapped_bytes") == 64 * KiB
    evictable_drop = synced.value("memory_evictable_bytes") - pinned.value("memory_evictable_bytes")
    assert evictable_drop == 64 * KiB
    unpin = call("DELETE", f"{server.admin_url}/admin/pin?path=workload.bin&range=0-65535")
    assert unpin.status == 200, unpin.body
    unpinned = scrape(server)
    assert unpinned.value("memory_mapped_bytes") == 0
    assert unpinned.value("memory_evictable_bytes") == synced.value("memory_evictable_bytes")

    # Evicting everything gives the memory back to the host before answering.
    evict = call("POST", f"{server.admin_url}/admin/evict?wait=1")
    assert evict.status == 200, evict.body
    evicted = scrape(server)
    committed_after = evicted.value("memory_committed_bytes", kind="page_cache")
    assert committed_after <= unpinned.value("memory_committed_bytes", kind="page_cache") - MiB
    assert evicted.value("memory_evictable_bytes") == 0
    assert evicted.value("memory_allocated_bytes") <= unpinned.value("memory_allocated_bytes") - MiB
    assert evicted.value("evictions_total") > unpinned.value("evictions_total")
    assert evicted.value("evicted_bytes_total") - unpinned.value("evicted_bytes_total") >= MiB
    assert evicted.value("reclaimed_bytes_total") - unpinned.value("reclaimed_bytes_total") >= MiB
    # The evicted inode is idle, so it is forgotten.
    assert evicted.value("open_files") < after_read.value("open_files")


def test_every_design_metric_is_exposed(server: ServerProcess) -> None:
    # Traffic first, so that the labelled metrics have samples.
    assert call("GET", f"{server.url}/files/labels.bin", headers={"Range": "bytes=0-9"}).status == (
        206
    )
    assert call("GET", f"{server.url}/files/missing.bin").status == 404
    got = scrape(server)
    # Exactly the metrics of the design: nothing missing, no extra series
    # (such as prometheus-client's ``*_created`` gauges).
    assert set(got.types) == {f"cachesvc_{short}" for short in METRICS}
    for short, (kind, labels) in METRICS.items():
        name = f"cachesvc_{short}"
        assert got.types.get(name) == kind, f"{name}: {got.types.get(name)}"
        sample_names = {
            "gauge": [name],
            "counter": [f"{name}_total"],
            "histogram": [f"{name}_bucket", f"{name}_count", f"{name}_sum"],
        }[kind]
        for sample_name in sample_names:
            samples = got.samples.get(sample_name)
            assert samples, f"no samples of {sample_name}"
            for sample_labels, _ in samples:
                assert set(sample_labels) - {"le"} == labels, (sample_name, sample_labels)
    assert {labels["kind"] for labels, _ in got.samples["cachesvc_memory_committed_bytes"]} == {
        "page_cache",
        "system",
    }
    assert got.value("http_requests_total", method="GET", status="404") >= 1
    assert got.value("memory_limit_bytes") == 64 * MiB
    assert got.value("memory_file_size_bytes") > 0
    # No label ever carries a file path.
    for samples in got.samples.values():
        for sample_labels, _ in samples:
            for value in sample_labels.values():
                assert ".bin" not in value and "/" not in value, sample_labels


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_exposition(server: ServerProcess) -> None:
    assert call("GET", f"{server.url}/files/labels.bin").status == 200
    text = scrape(server).text
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), text


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_prometheus_scrapes_the_admin_listener(server: ServerProcess, tmp_path: Path) -> None:
    target = f"127.0.0.1:{server.admin_port}"
    with running_prometheus([target], tmp_path / "prometheus") as prometheus:
        result = prometheus.wait_for('cachesvc_memory_committed_bytes{kind="page_cache"}')
        assert result[0]["metric"]["instance"] == target
        assert float(result[0]["value"][1]) >= 0
        up = prometheus.wait_for('up{job="cachesvc"} == 1')
        assert up[0]["metric"]["instance"] == target
