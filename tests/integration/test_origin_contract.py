"""One read/write/fsync contract, run against every origin kind through a real FileCache.

The parametrized ``backend`` fixture builds a FileCache with a real
MemoryFile over one of:

* ``local``: a LocalOrigin on a temporary directory;
* ``http``: an HttpOrigin with writes, fronting a real lower-tier ``cachesvc
  serve`` process over a temporary directory (a cachesvc -> cachesvc tier);
* ``s3``: an S3Origin on a moto S3 server, one bucket per test.

Each backend also has an out-of-band view of the origin that bypasses the
cache under test (the file on disk, the lower tier's disk, a separate S3
client), so the tests check what really reached the origin.

To make write-back fail, ``http`` stops the lower tier (and restarts it on
the same port), ``s3`` deletes the bucket (and recreates it with the object as
it was, like an outage that ends). A local directory cannot be made unwritable
for root, so ``local`` alone is wrapped in TestOrigin, whose ``fail_writes``
makes every write call raise.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from cachesvc.core.cache import CacheOptions, FileCache
from cachesvc.core.inode import CachingInode
from cachesvc.core.memfile import MemoryFile
from cachesvc.origins.base import (
    Origin,
    OriginError,
    OriginNotFound,
    OriginUnavailable,
    OriginUnsupported,
)
from cachesvc.origins.http import HttpOrigin
from cachesvc.origins.local import LocalOrigin
from cachesvc.origins.s3 import S3Origin
from tests.integration import moto_fixture
from tests.integration.nginx_fixture import nginx  # noqa: F401  (fixture)
from tests.support.content import pattern
from tests.support.origins import TestOrigin
from tests.support.servers import ServerProcess, start_cachesvc

if TYPE_CHECKING:
    from collections.abc import Callable

    from types_aiobotocore_s3 import S3Client

moto_endpoint = moto_fixture.moto_endpoint
aws_credentials = moto_fixture.aws_credentials

KiB = 1 << 10
MiB = 1 << 20
SIZE = 700 * KiB + 123  # several fills, a partial last page


# -- the origins' out-of-band views ------------------------------------------------------


class Side(Protocol):
    """The origin as seen without the cache under test."""

    async def put(self, path: str, data: bytes) -> None: ...

    async def get(self, path: str) -> bytes | None:
        """The origin's bytes of ``path``; None if it does not exist."""
        ...

    async def fail_writes(self, path: str) -> None:
        """Makes writes to the origin fail (``path`` is the file under test)."""
        ...

    async def heal(self, path: str, original: bytes) -> None:
        """Ends the failure; ``original`` is the origin's content of ``path`` before it."""
        ...

    def cleanup(self) -> None:
        """Undoes a failure a broken test may have left (the origin must work for teardown)."""
        ...


class DirSide:
    """An origin directory, read and written directly."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def put(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    async def get(self, path: str) -> bytes | None:
        target = self.root / path
        return target.read_bytes() if target.exists() else None


class LocalSide(DirSide):
    def __init__(self, root: Path, origin: TestOrigin) -> None:
        super().__init__(root)
        self.origin = origin

    async def fail_writes(self, path: str) -> None:
        self.origin.fail_writes = OriginUnavailable("injected write failure")

    async def heal(self, path: str, original: bytes) -> None:
        self.origin.fail_writes = None

    def cleanup(self) -> None:
        self.origin.fail_writes = None


class LowerTier:
    """A ``cachesvc serve`` process over a directory that can be stopped and restarted
    on the same ports."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root = root
        self.log_dir = log_dir
        self.server: ServerProcess = start_cachesvc(str(root), log_dir=log_dir)

    @property
    def files_url(self) -> str:
        return f"{self.server.url}/files/"

    def stop(self) -> None:
        assert self.server.stop() == 0, self.server.log()

    def ensure_running(self) -> None:
        if self.server.proc.poll() is not None:
            self.server = start_cachesvc(
                str(self.root),
                log_dir=self.log_dir,
                port=self.server.port,
                admin_port=self.server.admin_port,
            )


class TierSide(DirSide):
    def __init__(self, tier: LowerTier) -> None:
        super().__init__(tier.root)
        self.tier = tier

    async def fail_writes(self, path: str) -> None:
        self.tier.stop()

    async def heal(self, path: str, original: bytes) -> None:
        self.tier.ensure_running()

    def cleanup(self) -> None:
        self.tier.ensure_running()


class S3Side:
    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    async def put(self, path: str, data: bytes) -> None:
        await self.client.put_object(Bucket=self.bucket, Key=path, Body=data)

    async def get(self, path: str) -> bytes | None:
        try:
            resp = await self.client.get_object(Bucket=self.bucket, Key=path)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise
        async with resp["Body"] as body:
            return await body.read()

    async def fail_writes(self, path: str) -> None:
        listed = await self.client.list_objects_v2(Bucket=self.bucket)
        for obj in listed.get("Contents", []):
            await self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
        await self.client.delete_bucket(Bucket=self.bucket)

    async def heal(self, path: str, original: bytes) -> None:
        await self.client.create_bucket(Bucket=self.bucket)
        await self.put(path, original)

    def cleanup(self) -> None:
        """Nothing: a bucket left deleted only makes the teardown's write-back fail."""


# -- fixtures -------------------------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    cache: FileCache
    origin: Origin
    side: Side
    base: str  # prefix of every path a test uses

    def path(self, name: str) -> str:
        return self.base + name


@pytest.fixture(scope="module")
def lower_tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LowerTier]:
    tier = LowerTier(tmp_path_factory.mktemp("lower"), tmp_path_factory.mktemp("lower-logs"))
    yield tier
    tier.server.stop()


@pytest.fixture(params=["local", "http", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind: str = request.param
    stack = contextlib.AsyncExitStack()
    base = ""
    side: Side
    origin: Origin
    if kind == "local":
        test_origin = TestOrigin(LocalOrigin.open(str(tmp_path)))
        origin, side = test_origin, LocalSide(tmp_path, test_origin)
    elif kind == "http":
        tier: LowerTier = request.getfixturevalue("lower_tier")
        tier.ensure_running()
        base = f"t{uuid.uuid4().hex[:12]}/"
        origin = HttpOrigin(tier.files_url, writes=True)
        side = TierSide(tier)
    else:
        endpoint: str = request.getfixturevalue("moto_endpoint")
        request.getfixturevalue("aws_credentials")
        client: S3Client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                config=AioConfig(s3={"addressing_style": "path"}),
            )
        )
        bucket = f"contract-{uuid.uuid4().hex[:12]}"
        await client.create_bucket(Bucket=bucket)
        origin = S3Origin(bucket, endpoint_url=endpoint, region="us-east-1")
        side = S3Side(client, bucket)
    memfile = await MemoryFile.create()
    cache = FileCache(
        origin,
        memfile,
        CacheOptions(
            cache_size=64 * MiB,
            max_dirty=32 * MiB,
            dirty_expire=3600.0,  # only the tests write back
            readahead=256 * KiB,
            revalidate=3600.0,
        ),
    )
    cache.start()
    try:
        yield Backend(kind, cache, origin, side, base)
    finally:
        side.cleanup()
        await cache.close()
        await memfile.close()
        await origin.close()
        await stack.aclose()


# -- helpers ------------------------------------------------------------------------------


async def read_all(inode: CachingInode) -> bytes:
    return await inode.read(0, inode.attr.size + 4096)


async def seeded(b: Backend, name: str, seed: int, size: int = SIZE) -> tuple[str, bytearray]:
    """Puts a file at the origin out of band; returns its path and its content (the model)."""
    path = b.path(name)
    data = pattern(seed, 0, size)
    await b.side.put(path, data)
    return path, bytearray(data)


def apply(model: bytearray, offset: int, data: bytes) -> None:
    if offset > len(model):
        model.extend(bytes(offset - len(model)))
    model[offset : offset + len(data)] = data


# -- reads --------------------------------------------------------------------------------


async def test_read_ranges_equal_content(backend: Backend) -> None:
    path, model = await seeded(backend, "dir/read.bin", 1)
    async with backend.cache.open(path) as inode:
        assert inode.attr.size == SIZE
        for offset, length in [
            (0, 1),
            (4095, 2),  # across a page boundary
            (100 * KiB + 7, 3 * KiB),
            (SIZE - 10, 10),
            (SIZE - 10, 100),  # short at the end of the file
            (SIZE, 10),  # at the end: empty
            (SIZE + 4096, 10),  # past the end: empty
            (300 * KiB, 0),
            (0, SIZE),
        ]:
            got = await inode.read(offset, length)
            assert got == bytes(model[offset : offset + length]), (offset, length)
        inode.check_invariants()
    assert backend.cache.counters.miss_bytes > 0
    assert backend.cache.counters.hit_bytes > 0


async def test_missing_file_is_not_found(backend: Backend) -> None:
    with pytest.raises(OriginNotFound):
        async with backend.cache.open(backend.path("missing.bin")):
            pass


# -- writes -------------------------------------------------------------------------------


async def test_writes_to_cached_and_uncached_ranges_reach_the_origin(backend: Backend) -> None:
    path, model = await seeded(backend, "w.bin", 2)
    writes = [
        (10, b"cached " * 50),  # on pages the first read cached
        (4090, b"straddles a page"),
        (500 * KiB + 3, pattern(20, 0, 9 * KiB)),  # on a gap
        (SIZE - 5, b"grows the file"),  # over the end
        (SIZE + 40 * KiB, b"past a hole"),  # the hole reads as zeros
    ]
    async with backend.cache.open(path) as inode:
        assert await inode.read(0, 4096) == bytes(model[:4096])
        for offset, data in writes:
            await backend.cache.write(inode, offset, data)
            apply(model, offset, data)
            inode.check_invariants()
        assert await read_all(inode) == bytes(model)
        await inode.fsync()
        assert not inode.has_dirty
        assert inode.attr.size == len(model)
    assert await backend.side.get(path) == bytes(model)


async def test_new_file_written_through_the_cache(backend: Backend) -> None:
    path = backend.path("new/file.bin")
    data = pattern(3, 0, 300 * KiB + 1)
    async with backend.cache.open(path, create=True) as inode:
        assert inode.attr.size == 0
        await backend.cache.write(inode, 0, data)
        assert await read_all(inode) == data
        await inode.fsync()
    assert await backend.side.get(path) == data


async def test_truncate_shrink_and_grow(backend: Backend) -> None:
    path, model = await seeded(backend, "t.bin", 4)
    async with backend.cache.open(path) as inode:
        assert await inode.read(0, 128 * KiB) == bytes(model[: 128 * KiB])
        await backend.cache.write(inode, 64 * KiB, b"dirty before the cut")
        apply(model, 64 * KiB, b"dirty before the cut")

        await inode.truncate(100 * KiB + 5)  # shrink into cached pages, mid-page
        del model[100 * KiB + 5 :]
        assert await read_all(inode) == bytes(model)
        await inode.fsync()
        assert await backend.side.get(path) == bytes(model)

        await inode.truncate(300 * KiB)  # grow: zeros, including the old tail's page
        model.extend(bytes(300 * KiB - len(model)))
        await backend.cache.write(inode, 200 * KiB, b"after growing")
        apply(model, 200 * KiB, b"after growing")
        assert await read_all(inode) == bytes(model)
        await inode.fsync()
        inode.check_invariants()
    assert await backend.side.get(path) == bytes(model)

    async with backend.cache.open(path) as inode:
        await inode.truncate(0)
        await inode.fsync()
    assert await backend.side.get(path) == b""


async def test_full_replace(backend: Backend) -> None:
    path, model = await seeded(backend, "r.bin", 5)
    async with backend.cache.open(path) as inode:
        assert await inode.read(0, 64 * KiB) == bytes(model[: 64 * KiB])
        old_etag = inode.attr.etag
    new = pattern(6, 0, 200 * KiB + 9)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(new), 64 * KiB):
            yield new[start : start + 64 * KiB]

    inode, created = await backend.cache.replace(path, chunks())
    assert not created
    # A full replace is at the origin when it returns; no fsync needed.
    assert await backend.side.get(path) == new
    async with backend.cache.open(path) as inode:
        assert inode.attr.etag != old_etag
        assert await read_all(inode) == new

    fresh = backend.path("replaced-new.bin")

    async def one_chunk() -> AsyncIterator[bytes]:
        yield b"brand new"

    _, created = await backend.cache.replace(fresh, one_chunk())
    assert created
    assert await backend.side.get(fresh) == b"brand new"


async def test_remove(backend: Backend) -> None:
    path, _ = await seeded(backend, "gone.bin", 7)
    async with backend.cache.open(path) as inode:
        await inode.read(0, 4096)
        await backend.cache.write(inode, 0, b"dirty data that is thrown away")
    await backend.cache.remove(path)
    assert await backend.side.get(path) is None
    assert backend.cache.lookup(path) is None
    assert backend.cache.counters.dirty_bytes == 0
    with pytest.raises(OriginNotFound):
        async with backend.cache.open(path):
            pass
    with pytest.raises(OriginNotFound):
        await backend.cache.remove(path)


async def test_failing_write_back_keeps_data_dirty(backend: Backend) -> None:
    path, model = await seeded(backend, "fail.bin", 8, 64 * KiB + 100)
    original = bytes(model)
    async with backend.cache.open(path) as inode:
        assert await read_all(inode) == bytes(model)  # all cached: no origin reads needed below
        await backend.cache.write(inode, 1000, b"must survive the outage")
        apply(model, 1000, b"must survive the outage")

        await backend.side.fail_writes(path)
        for _attempt in range(2):  # and a retry fails the same way, not "succeeds"
            with pytest.raises(OriginError):
                await inode.fsync()
            assert inode.has_dirty
            assert inode.last_error is not None
            assert await read_all(inode) == bytes(model)
        assert backend.cache.counters.writeback_errors >= 2
        inode.check_invariants()

        await backend.side.heal(path, original)
        await inode.fsync()
        assert not inode.has_dirty
        assert inode.last_error is None
    assert await backend.side.get(path) == bytes(model)


# -- a read-only HTTP origin ------------------------------------------------------------


async def test_read_only_http_origin(tmp_path: Path, nginx: Callable[..., int]) -> None:  # noqa: F811
    root = tmp_path / "root"
    root.mkdir()
    data = pattern(9, 0, SIZE)
    (root / "ro.bin").write_bytes(data)
    origin = HttpOrigin(f"http://127.0.0.1:{nginx(root)}/")
    memfile = await MemoryFile.create()
    cache = FileCache(origin, memfile, CacheOptions(dirty_expire=3600.0, revalidate=3600.0))
    try:
        async with cache.open("ro.bin") as inode:
            assert await read_all(inode) == data
            assert await inode.read(5000, 7) == data[5000:5007]
            # The core refuses changes the origin could never take, rather
            # than keeping them dirty forever.
            with pytest.raises(OriginUnsupported):
                await cache.write(inode, 10, b"nope")
            with pytest.raises(OriginUnsupported):
                await inode.truncate(10)
            assert not inode.has_dirty
            assert await inode.read(0, 20) == data[:20]
        for write in (
            origin.write_from("ro.bin", 0, [memoryview(b"x")]),
            origin.set_size("ro.bin", 10),
            origin.remove("ro.bin"),
            origin.create("other.bin"),
        ):
            with pytest.raises(OriginUnsupported):
                await write

        async def chunks() -> AsyncIterator[bytes]:
            yield b"new"

        with pytest.raises(OriginUnsupported):
            await cache.replace("ro.bin", chunks())
        with pytest.raises(OriginUnsupported):
            await cache.remove("ro.bin")
        assert (root / "ro.bin").read_bytes() == data
    finally:
        await cache.close()
        await memfile.close()
        await origin.close()
