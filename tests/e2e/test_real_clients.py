"""Real clients against a real ``cachesvc serve``: curl, fsspec and DuckDB.

One server (with a write token) serves a temporary origin directory for the
whole module. File content is a function of (seed, offset), so any range a
client asks for can be checked; writes are checked through the server and,
after an fsync, in the origin file itself.
"""

from __future__ import annotations

import importlib.metadata
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import fsspec  # type: ignore[import-untyped]
import pytest

from tests.support.content import pattern
from tests.support.servers import ServerProcess, running_cachesvc

CURL = shutil.which("curl") or "/usr/bin/curl"
TOKEN = "e2e-write-token"
AUTH = f"Authorization: Bearer {TOKEN}"
TIMEOUT = 30.0
MiB = 1 << 20
BIG_SIZE = 8 * MiB + 333
BIG_SEED = 21
INTERRUPTED_AT = 3 * MiB + 12345

needs_curl = pytest.mark.skipif(not Path(CURL).is_file(), reason="curl is not installed")


@dataclass(frozen=True)
class Served:
    root: Path
    server: ServerProcess
    big: bytes

    def url(self, name: str) -> str:
        return f"{self.server.url}/files/{name}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("real-clients")
    root = base / "root"
    root.mkdir()
    big = pattern(BIG_SEED, 0, BIG_SIZE)
    (root / "big.bin").write_bytes(big)
    with running_cachesvc(
        str(root), ["--cache-size", "128MiB", "--write-token", TOKEN], log_dir=base / "logs"
    ) as server:
        yield Served(root, server, big)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Runs curl quietly (errors shown) and returns the finished process."""
    return subprocess.run(
        [CURL, "--silent", "--show-error", *args],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


def fsync(served: Served, name: str) -> None:
    done = curl("-X", "POST", "-H", AUTH, "-w", "%{http_code}", served.url(name) + "?fsync")
    assert done.stdout == b"204", done.stderr


# ---------------------------------------------------------------------------
# curl


@needs_curl
@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("0-0", 0, 1),
        ("0-99", 0, 100),
        ("4096-1052671", 4096, 4096 + MiB),  # streamed, across 1 MiB mapping chunks
        ("8388000-", 8388000, BIG_SIZE),
        ("-1000", BIG_SIZE - 1000, BIG_SIZE),
        (f"0-{BIG_SIZE + 10}", 0, BIG_SIZE),  # clamped
    ],
)
def test_curl_range(served: Served, tmp_path: Path, spec: str, start: int, end: int) -> None:
    out = tmp_path / "part"
    done = curl("-r", spec, "-o", str(out), "-w", "%{http_code}", served.url("big.bin"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"206"
    assert out.read_bytes() == served.big[start:end]


@needs_curl
def test_curl_resumes_an_interrupted_download(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "download"
    # A download cut off by its reader: curl fails writing once the pipe is closed.
    proc = subprocess.Popen(
        [CURL, "--silent", served.url("big.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    with proc.stdout:
        prefix = proc.stdout.read(INTERRUPTED_AT)
    assert proc.wait(TIMEOUT) != 0
    assert prefix == served.big[:INTERRUPTED_AT]
    out.write_bytes(prefix)
    # -C - asks for "bytes=<size of out>-" and appends the rest.
    resumed = curl("-C", "-", "-o", str(out), "-w", "%{http_code}", served.url("big.bin"))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == b"206"
    assert out.read_bytes() == served.big


@needs_curl
def test_curl_resume_of_a_complete_file_is_416_and_keeps_it(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "download"
    out.write_bytes(served.big)
    done = curl("-C", "-", "-o", str(out), "-w", "%{http_code}", served.url("big.bin"))
    # curl takes the 416 for "already complete" and succeeds.
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"416"
    assert out.read_bytes() == served.big


@needs_curl
def test_curl_upload_of_a_range(served: Served, tmp_path: Path) -> None:
    """``curl -T file -r a-b`` sends ``PUT`` with ``Content-Range: bytes a-b/<upload size>``."""
    name = "upload.bin"
    original = pattern(31, 0, 300_000)
    (served.root / name).write_bytes(original)
    # Read it once so the range lands partly on cached pages.
    warm = curl("-o", "/dev/null", "-w", "%{http_code}", served.url(name))
    assert warm.stdout == b"200"
    piece = pattern(32, 0, 100_000)
    upload = tmp_path / "piece"
    upload.write_bytes(piece)
    done = curl(
        "-T", str(upload), "-r", "150000-249999", "-H", AUTH,
        "-w", "%{http_code}", "--trace-ascii", str(tmp_path / "trace"),
        served.url(name),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"204"
    trace = (tmp_path / "trace").read_text(errors="replace")
    assert "PUT /files/upload.bin" in trace
    assert "Content-Range: bytes 150000-249999/100000" in trace
    expected = original[:150_000] + piece + original[250_000:]
    got = curl("-o", str(tmp_path / "after"), served.url(name))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "after").read_bytes() == expected
    # A range past the end grows the file.
    tail = tmp_path / "tail"
    tail.write_bytes(b"tail!")
    grown = curl(
        "-T", str(tail), "-r", "300000-300004", "-H", AUTH, "-w", "%{http_code}", served.url(name)
    )
    assert grown.stdout == b"204", grown.stderr
    expected += b"tail!"
    fsync(served, name)
    assert (served.root / name).read_bytes() == expected
    # Without the token nothing is written.
    refused = curl("-T", str(tail), "-r", "0-4", "-w", "%{http_code}", served.url(name))
    assert refused.stdout.endswith(b"401")
    assert (served.root / name).read_bytes() == expected


@needs_curl
def test_curl_full_upload_then_ranges(served: Served, tmp_path: Path) -> None:
    data = pattern(33, 0, 2 * MiB + 5)
    upload = tmp_path / "whole"
    upload.write_bytes(data)
    done = curl("-T", str(upload), "-H", AUTH, "-w", "%{http_code}", served.url("dir/new.bin"))
    assert done.stdout == b"201", done.stderr
    assert (served.root / "dir" / "new.bin").read_bytes() == data
    out = tmp_path / "back"
    back = curl("-r", "1000000-", "-o", str(out), served.url("dir/new.bin"))
    assert back.returncode == 0, back.stderr
    assert out.read_bytes() == data[1_000_000:]


# ---------------------------------------------------------------------------
# fsspec


@pytest.mark.parametrize(("cache_type", "block_size"), [("bytes", 65536), ("none", 4096)])
def test_fsspec_random_reads(served: Served, cache_type: str, block_size: int) -> None:
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    url = served.url("big.bin")
    assert fs.info(url)["size"] == BIG_SIZE
    rng = random.Random(f"{cache_type}:{block_size}")
    with fs.open(url, "rb", block_size=block_size, cache_type=cache_type) as f:
        for _ in range(150):
            offset = rng.randrange(BIG_SIZE)
            length = rng.choice([1, 17, 4096, 70_000, 300_000])
            f.seek(offset)
            assert f.read(length) == served.big[offset : offset + length]
        f.seek(BIG_SIZE - 10)
        assert f.read() == served.big[-10:]
        assert f.read(1) == b""
    assert fs.cat_file(url, start=123, end=456) == served.big[123:456]


# ---------------------------------------------------------------------------
# DuckDB


def httpfs_extension() -> Path | None:
    """The httpfs extension shipped by the ``duckdb-ext-httpfs`` wheel, for offline loading."""
    try:
        dist = importlib.metadata.distribution("duckdb-ext-httpfs")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "httpfs.duckdb_extension":
            return Path(str(dist.locate_file(file)))
    return None


def test_duckdb_reads_parquet_over_http(served: Served) -> None:
    extension = httpfs_extension()
    if extension is None:
        pytest.skip("the duckdb-ext-httpfs wheel has no httpfs extension for this platform")
    local = served.root / "table.parquet"
    query = "SELECT sum(j), count(*), min(s), max(s), sum(length(s)) FROM read_parquet('{}')"
    con = duckdb.connect()
    try:
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute(f"LOAD '{extension}'")
        con.execute(
            "COPY (SELECT i, i * 3 - 7 AS j, 'row-' || i AS s FROM range(300000) t(i))"
            f" TO '{local}' (FORMAT parquet, ROW_GROUP_SIZE 30000)"
        )
        expected = con.execute(query.format(local)).fetchall()
        assert expected[0][1] == 300_000
        url = served.url("table.parquet")
        cold = con.execute(query.format(url)).fetchall()
        hot = con.execute(query.format(url)).fetchall()
    finally:
        con.close()
    assert cold == expected
    assert hot == expected
    # DuckDB read the file in ranges, not whole.
    assert "GET /files/table.parquet 206" in served.server.log()
