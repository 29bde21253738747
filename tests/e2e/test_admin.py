"""The admin listener of a real ``cachesvc serve`` process: bearer-token
auth, open health and metrics endpoints, 405s, the non-loopback refusal, and
every operator action with its JSON answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import Reply, call
from tests.support.content import pattern
from tests.support.servers import ServerProcess, free_port, running_cachesvc

KiB = 1 << 10
TOKEN = "admin-s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIZE = 256 * KiB
# Every admin route that needs the token: (method, path and query).
PROTECTED = [
    ("GET", "/admin/stats"),
    ("GET", "/admin/files"),
    ("POST", "/admin/evict"),
    ("POST", "/admin/sync"),
    ("POST", "/admin/drop?path=a.bin"),
    ("POST", "/admin/pin?path=a.bin&range=0-4095"),
    ("DELETE", "/admin/pin?path=a.bin&range=0-4095"),
]


def admin(server: ServerProcess, method: str, target: str) -> Reply:
    return call(method, server.admin_url + target, headers=AUTH)


def partial_put(server: ServerProcess, path: str, offset: int, data: bytes) -> None:
    reply = call(
        "PUT",
        f"{server.url}/files/{path}",
        headers={"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"},
        data=data,
    )
    assert reply.status == 204, reply.body


def file_stats(server: ServerProcess, path: str) -> dict[str, Any] | None:
    reply = admin(server, "GET", "/admin/files")
    assert reply.status == 200
    for entry in reply.json()["files"]:
        if entry["path"] == path:
            return dict(entry)
    return None


def seed(root: Path, names: list[str]) -> None:
    for index, name in enumerate(names):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pattern(index, 0, SIZE))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("admin")
    root = base / "origin"
    seed(root, ["a.bin", "files.bin", "sync.bin", "drop.bin", "pin.bin", "sub/b.bin"])
    args = ["--admin-token", TOKEN, "--dirty-expire", "1h", "--cache-size", "64MiB"]
    with running_cachesvc(str(root), args, log_dir=base / "logs") as proc:
        proc.args.append(str(root))  # for tests that look at the origin
        yield proc


def origin_of(server: ServerProcess) -> Path:
    return Path(server.args[-1])


# ---------------------------------------------------------------------- auth


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_metrics_and_health_are_open(server: ServerProcess, path: str) -> None:
    assert call("GET", server.admin_url + path).status == 200
    bad = {"Authorization": "Bearer wrong"}
    assert call("GET", server.admin_url + path, headers=bad).status == 200


@pytest.mark.parametrize(("method", "target"), PROTECTED)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        f"Bearer {TOKEN}x",
        TOKEN,
        f"Basic {TOKEN}",
        "Bearer ",
        "Bearer \xff\xfe",  # sent as latin-1: not UTF-8
    ],
)
def test_admin_actions_need_the_token(
    server: ServerProcess, method: str, target: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = call(method, server.admin_url + target, headers=headers)
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert reply.json()["error"] == "unauthorized"
    assert TOKEN not in reply.body.decode()


def test_the_token_opens_the_admin_actions(server: ServerProcess) -> None:
    assert admin(server, "GET", "/admin/stats").status == 200
    # The auth scheme is case-insensitive (RFC 9110 section 11.1).
    lower = call(
        "GET", server.admin_url + "/admin/stats", headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert lower.status == 200


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/admin/evict", "POST"),
        ("GET", "/admin/sync", "POST"),
        ("GET", "/admin/drop?path=a.bin", "POST"),
        ("PUT", "/admin/pin?path=a.bin&range=0-1", "DELETE,POST"),
        ("POST", "/admin/stats", "GET"),
        ("DELETE", "/admin/files", "GET"),
        ("POST", "/metrics", "GET"),
        ("DELETE", "/healthz", "GET"),
        ("PUT", "/readyz", "GET"),
    ],
)
def test_wrong_method_is_405_with_a_json_body(
    server: ServerProcess, method: str, path: str, allowed: str
) -> None:
    reply = admin(server, method, path)
    assert reply.status == 405
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["error"] == "method_not_allowed" and body["message"]
    allow = {m.strip() for m in reply.headers["Allow"].split(",")} - {"HEAD"}
    assert allow == set(allowed.split(","))


@pytest.mark.parametrize("address", ["0.0.0.0", "[::]", "10.1.2.3"])
@pytest.mark.parametrize("via", ["flag", "env"])
def test_non_loopback_admin_listener_needs_a_token(tmp_path: Path, address: str, via: str) -> None:
    port = free_port()
    value = f"{address}:{port}"
    args = ["--origin", str(tmp_path / "origin"), "--listen", f"127.0.0.1:{free_port()}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    if via == "flag":
        args += ["--admin-listen", value]
    else:
        env["CACHESVC_ADMIN_LISTEN"] = value
    result = subprocess.run(
        [sys.executable, "-m", "cachesvc", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("cachesvc: error: --admin-listen: ")
    assert "--admin-token" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert not (tmp_path / "origin").exists()


# ------------------------------------------------------------------- actions


def test_stats(server: ServerProcess) -> None:
    assert call("GET", f"{server.url}/files/a.bin").status == 200
    assert call("GET", f"{server.url}/files/a.bin", headers={"Range": "bytes=0-99"}).status == 206
    body = admin(server, "GET", "/admin/stats").json()
    assert body["version"] and body["uptime_seconds"] >= 0
    assert body["origin"].startswith("file://")
    memory = body["memory"]
    assert set(memory["committed_bytes"]) == {"page_cache", "system"}
    assert set(memory["allocated_bytes"]) == {"page_cache", "system"}
    assert memory["allocated_bytes"]["page_cache"] >= SIZE
    for key in ("mapped_bytes", "evictable_bytes", "dirty_bytes", "file_size_bytes"):
        assert isinstance(memory[key], int) and memory[key] >= 0, key
    assert memory["limit_bytes"] == 64 << 20
    assert 0 < body["hit_ratio"] < 1
    assert body["counters"]["miss_bytes"] >= SIZE and body["counters"]["hit_bytes"] >= 100
    assert body["files"] >= 1
    config = body["config"]
    assert config["cache_size"] == 64 << 20 and config["write_mode"] == "writeback"
    assert config["dirty_expire"] == 3600
    assert TOKEN not in json.dumps(body)


def test_files_lists_cached_dirty_and_mapped_bytes(server: ServerProcess) -> None:
    assert file_stats(server, "files.bin") is None
    reply = call("GET", f"{server.url}/files/files.bin", headers={"Range": "bytes=0-65535"})
    assert reply.status == 206
    partial_put(server, "files.bin", 100, b"x" * 1000)
    assert admin(server, "POST", "/admin/pin?path=files.bin&range=0-8191").status == 200
    entry = file_stats(server, "files.bin")
    assert entry is not None
    assert entry["size"] == SIZE
    assert 64 * KiB <= entry["cached_bytes"] <= SIZE
    assert entry["dirty_bytes"] == 1000
    assert entry["mapped_bytes"] == 8192
    assert admin(server, "DELETE", "/admin/pin?path=files.bin&range=0-8191").status == 200
    assert call("POST", f"{server.url}/files/files.bin?fsync").status == 204
    entry = file_stats(server, "files.bin")
    assert entry is not None and entry["dirty_bytes"] == 0 and entry["mapped_bytes"] == 0


def test_sync_writes_back_everything(server: ServerProcess) -> None:
    assert call("GET", f"{server.url}/files/sync.bin").status == 200
    partial_put(server, "sync.bin", 5000, b"S" * 3000)
    assert call("GET", f"{server.url}/files/sub/b.bin").status == 200
    partial_put(server, "sub/b.bin", 0, b"B" * 10)
    on_disk = origin_of(server) / "sync.bin"
    assert on_disk.read_bytes()[5000:8000] == pattern(2, 5000, 3000)  # still only cached
    reply = admin(server, "POST", "/admin/sync")
    assert reply.status == 200
    assert reply.json() == {"synced": True, "failures": []}
    assert on_disk.read_bytes()[5000:8000] == b"S" * 3000
    assert (origin_of(server) / "sub/b.bin").read_bytes()[:10] == b"B" * 10
    assert admin(server, "GET", "/admin/stats").json()["memory"]["dirty_bytes"] == 0


def test_drop_writes_back_then_drops(server: ServerProcess) -> None:
    assert call("GET", f"{server.url}/files/drop.bin").status == 200
    partial_put(server, "drop.bin", 0, b"D" * 100)
    reply = admin(server, "POST", "/admin/drop?path=drop.bin")
    assert reply.status == 200
    body = reply.json()
    assert body["path"] == "drop.bin" and body["dropped_bytes"] >= SIZE
    assert (origin_of(server) / "drop.bin").read_bytes()[:100] == b"D" * 100
    assert file_stats(server, "drop.bin") is None
    # Not cached (or not there at all): nothing to drop.
    for path in ("drop.bin", "never-read.bin"):
        again = admin(server, "POST", f"/admin/drop?path={path}")
        assert again.status == 200 and again.json()["dropped_bytes"] == 0


def test_pin_and_unpin(server: ServerProcess) -> None:
    pinned = admin(server, "POST", "/admin/pin?path=pin.bin&range=0-65535")
    assert pinned.status == 200
    assert pinned.json() == {"path": "pin.bin", "range": [0, 65535], "pinned_bytes": 65536}
    assert admin(server, "GET", "/admin/stats").json()["memory"]["mapped_bytes"] >= 65536
    # A pinned range survives an eviction of everything.
    assert admin(server, "POST", "/admin/evict?wait=1").status == 200
    entry = file_stats(server, "pin.bin")
    assert entry is not None and entry["cached_bytes"] == 65536 and entry["mapped_bytes"] == 65536
    unpinned = admin(server, "DELETE", "/admin/pin?path=pin.bin&range=0-65535")
    assert unpinned.status == 200
    assert unpinned.json() == {"path": "pin.bin", "range": [0, 65535], "unpinned": True}
    for target in ("path=pin.bin&range=0-65535", "path=pin.bin&range=0-4095", "path=x&range=0-1"):
        missing = admin(server, "DELETE", f"/admin/pin?{target}")
        assert missing.status == 404
        assert missing.json()["error"] == "not_found"
    nofile = admin(server, "POST", "/admin/pin?path=no-such-file.bin&range=0-1")
    assert nofile.status == 404 and nofile.json()["error"] == "not_found"


def test_path_is_url_encoded_like_a_query_value(server: ServerProcess) -> None:
    # urlencode writes "/" as %2F and " " as "+".
    target = "/admin/pin?" + urllib.parse.urlencode({"path": "sub/b.bin", "range": "0-4095"})
    reply = admin(server, "POST", target)
    assert reply.status == 200 and reply.json()["path"] == "sub/b.bin"
    assert admin(server, "DELETE", target).status == 200
    missing = admin(server, "POST", "/admin/pin?path=no+such.bin&range=0-1")
    assert missing.status == 404 and "no such.bin" in missing.json()["message"]


def test_evict_without_wait_starts_evicting(server: ServerProcess) -> None:
    reply = admin(server, "POST", "/admin/evict")
    assert reply.status == 200 and reply.json()["evicting"] is True


@pytest.mark.parametrize(
    "query",
    [
        "",
        "path=",
        "path=sub/",
        "path=../a.bin",
        "path=sub/../a.bin",
        "path=./a.bin",
        "path=a%00.bin",
        "path=a%5Cb",
        "path=" + "x" * 4097,
        "path=%FF.bin",
        "path=a.bin&path=pin.bin",
    ],
)
@pytest.mark.parametrize("action", ["POST /admin/drop", "POST /admin/pin", "DELETE /admin/pin"])
def test_bad_path_is_400(server: ServerProcess, action: str, query: str) -> None:
    method, path = action.split()
    sep = "&" if query else ""
    reply = admin(server, method, f"{path}?{query}{sep}range=0-1")
    assert reply.status == 400
    assert reply.json()["error"] in ("bad_request", "bad_path")


@pytest.mark.parametrize(
    "rng",
    [
        None,
        "",
        "abc",
        "5-1",
        "-5",
        "1-",
        "+1-2",
        "1-+2",
        " 1-2",
        "1-2-3",
        "0x1-2",
        "\u0661-\u0662",  # Arabic-Indic digits
        "0-9" * 20,
    ],
)
@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_bad_range_is_400(server: ServerProcess, method: str, rng: str | None) -> None:
    query = "path=a.bin" if rng is None else f"path=a.bin&range={urllib.parse.quote(rng)}"
    reply = admin(server, method, f"/admin/pin?{query}")
    assert reply.status == 400
    assert reply.json()["error"] in ("bad_request", "bad_range")


# ---------------------------------------------------------- failing origin


def test_sync_failure_report_and_readiness(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    seed(root, ["f.bin"])
    args = ["--dirty-expire", "1h"]
    with running_cachesvc(str(root), args, log_dir=tmp_path / "logs") as server:
        assert call("GET", f"{server.url}/files/f.bin").status == 200
        partial_put(server, "f.bin", 4096, b"W" * 4096)
        # The file is replaced by a directory: the write-back has nowhere to go.
        (root / "f.bin").unlink()
        (root / "f.bin").mkdir()
        reply = call("POST", server.admin_url + "/admin/sync")
        assert reply.status == 502
        body = reply.json()
        assert body["synced"] is False
        [failure] = body["failures"]
        assert failure["path"] == "f.bin" and failure["ranges"] == [[4096, 8192]]
        assert failure["error"]
        stats = call("GET", server.admin_url + "/admin/stats").json()
        assert stats["memory"]["dirty_bytes"] == 4096
        assert stats["counters"]["writeback_errors"] >= 1
        [entry] = call("GET", server.admin_url + "/admin/files").json()["files"]
        assert entry["dirty_bytes"] == 4096 and entry["last_error"]

        # Put the file back: the next sync writes the kept bytes again.
        (root / "f.bin").rmdir()
        (root / "f.bin").write_bytes(pattern(0, 0, SIZE))
        retry = call("POST", server.admin_url + "/admin/sync")
        assert retry.status == 200 and retry.json() == {"synced": True, "failures": []}
        data = (root / "f.bin").read_bytes()
        assert data[4096:8192] == b"W" * 4096 and data[:4096] == pattern(0, 0, 4096)

        # Readiness follows the origin root.
        assert call("GET", server.admin_url + "/readyz").json() == {"status": "ready"}
        shutil.rmtree(root)
        deadline = time.monotonic() + 10
        while (ready := call("GET", server.admin_url + "/readyz")).status != 503:
            assert time.monotonic() < deadline, ready.body
            time.sleep(0.1)
        body = ready.json()
        assert body["status"] == "not ready" and body["problems"][0].startswith("origin:")
        assert call("GET", server.admin_url + "/healthz").status == 200
