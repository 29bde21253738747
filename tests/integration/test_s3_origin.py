"""S3Origin against moto's real S3 HTTP server.

Each test gets its own bucket. Results are checked with a separate aiobotocore
client; the origin's requests are counted with botocore ``before-call`` hooks
registered on the session it is given. Content is a function of offset.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from cachesvc.origins.base import (
    DirEntry,
    OriginConflict,
    OriginError,
    OriginNotFound,
    OriginPermissionDenied,
    OriginUnavailable,
    OriginUnsupported,
)
from cachesvc.origins.s3 import S3Origin
from tests.integration import moto_fixture
from tests.support.servers import free_port

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

# The shared fixtures: one moto server for this module, fake credentials for every test.
moto_endpoint = moto_fixture.moto_endpoint
aws_credentials = moto_fixture.aws_credentials
pytestmark = pytest.mark.usefixtures("aws_credentials")

MiB = 1 << 20
_PERIOD = 251  # prime, so a misplaced range shows up as wrong bytes


def content(offset: int, length: int, seed: int = 0) -> bytes:
    """The bytes ``[offset, offset+length)`` of the test file numbered ``seed``."""
    block = bytes((i * 7 + seed * 13 + 1) % 256 for i in range(_PERIOD))
    start = offset % _PERIOD
    return (block * ((start + length) // _PERIOD + 1))[start : start + length]


@pytest.fixture
async def s3(moto_endpoint: str) -> AsyncIterator[S3Client]:
    """A plain client, independent of the origin under test."""
    config = AioConfig(s3={"addressing_style": "path"})
    async with get_session().create_client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1", config=config
    ) as client:
        yield client


@pytest.fixture
async def bucket(s3: S3Client) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    await s3.create_bucket(Bucket=name)
    return name


class CountingOrigin:
    """An S3Origin plus the number of requests it made, by operation name."""

    def __init__(self, origin: S3Origin, calls: Counter[str]) -> None:
        self.origin = origin
        self.calls = calls


OriginFactory = Callable[..., CountingOrigin]


@pytest.fixture
async def make_origin(moto_endpoint: str, bucket: str) -> AsyncIterator[OriginFactory]:
    """``make_origin(prefix="", **settings)``: origins on the test bucket, closed at the end."""
    made: list[S3Origin] = []

    def make(prefix: str = "", *, bucket_name: str = bucket, **settings: Any) -> CountingOrigin:
        calls: Counter[str] = Counter()

        def count(model: Any, **_: Any) -> None:
            calls[model.name] += 1

        session = get_session()
        session.register("before-call.s3", count)
        origin = S3Origin(
            bucket_name,
            prefix,
            endpoint_url=moto_endpoint,
            region="us-east-1",
            session=session,
            **settings,
        )
        made.append(origin)
        return CountingOrigin(origin, calls)

    yield make
    for origin in made:
        await origin.close()


async def get_bytes(s3: S3Client, bucket: str, key: str) -> bytes:
    resp = await s3.get_object(Bucket=bucket, Key=key)
    async with resp["Body"] as body:
        return await body.read()


async def assert_no_uploads(s3: S3Client, bucket: str) -> None:
    resp = await s3.list_multipart_uploads(Bucket=bucket)
    assert resp.get("Uploads", []) == []


def reader(data: bytes, calls: list[tuple[int, int]] | None = None) -> Any:
    """A ``read_changed`` serving ``data`` (the whole new file), recording its calls."""

    async def read_changed(offset: int, length: int) -> bytes:
        if calls is not None:
            calls.append((offset, length))
        return data[offset : offset + length]

    return read_changed


def expected_rewrite(old: bytes, size: int, changed: list[tuple[int, int]], new: bytes) -> bytes:
    out = bytearray(old[:size].ljust(size, b"\0"))
    for start, end in changed:
        out[start:end] = new[start:end]
    return bytes(out)


# -- reading --------------------------------------------------------------------


async def test_stat_and_ranged_reads(s3: S3Client, bucket: str, make_origin: OriginFactory) -> None:
    data = content(0, 100_000)
    await s3.put_object(Bucket=bucket, Key="pre/dir/a.bin", Body=data)
    head = await s3.head_object(Bucket=bucket, Key="pre/dir/a.bin")
    origin = make_origin("pre").origin

    st = await origin.stat("dir/a.bin")
    assert st.size == len(data)
    assert st.etag == head["ETag"].strip('"')
    assert st.mtime == head["LastModified"].timestamp()
    assert st.is_file

    bufs = [bytearray(30_000), bytearray(70_000)]
    assert await origin.read_into("dir/a.bin", 0, [memoryview(b) for b in bufs], st.etag) == 100_000
    assert bytes(bufs[0] + bufs[1]) == data

    mid = bytearray(1234)
    assert await origin.read_into("dir/a.bin", 4321, [memoryview(mid)]) == 1234
    assert bytes(mid) == content(4321, 1234)

    tail = bytearray(5000)  # runs past the end: short read
    assert await origin.read_into("dir/a.bin", 98_000, [memoryview(tail)]) == 2000
    assert bytes(tail[:2000]) == data[98_000:]
    assert await origin.read_into("dir/a.bin", 100_000, [memoryview(bytearray(10))]) == 0
    assert await origin.read_into("dir/a.bin", 0, []) == 0

    with pytest.raises(OriginConflict):
        await origin.read_into("dir/a.bin", 0, [memoryview(bytearray(10))], "0123456789abcdef")
    with pytest.raises(OriginNotFound):
        await origin.stat("dir/missing")
    with pytest.raises(OriginNotFound):
        await origin.stat("dir")  # a "directory" is not a file
    with pytest.raises(OriginNotFound):
        await origin.read_into("missing", 0, [memoryview(bytearray(10))])
    for bad in ("../x", "dir//a.bin", "/dir/a.bin", "dir/./a.bin"):
        with pytest.raises(OriginPermissionDenied):
            await origin.stat(bad)


async def test_list_dir_with_nested_prefixes(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    for key in ("p/a", "p/d/", "p/d/b", "p/d/c", "p/d/e/f", "p/d/e/g/h", "p/z", "other/x"):
        await s3.put_object(Bucket=bucket, Key=key, Body=b"x" * len(key))
    origin = make_origin("p", list_page_size=1).origin  # every page holds one entry

    root = await origin.list_dir("")
    assert [(e.name, e.is_dir) for e in root] == [("a", False), ("d", True), ("z", False)]
    assert root[0].size == 3 and root[0].mtime > 0
    assert [(e.name, e.is_dir, e.size) for e in await origin.list_dir("d")] == [
        ("b", False, 5),
        ("c", False, 5),
        ("e", True, 0),
    ]
    h_mtime = (await origin.stat("d/e/g/h")).mtime
    assert await origin.list_dir("d/e/g") == [DirEntry("h", False, 9, h_mtime)]
    with pytest.raises(OriginNotFound):
        await origin.list_dir("nope")
    with pytest.raises(OriginNotFound):
        await origin.list_dir("a")  # a file, not a directory

    unprefixed = make_origin("").origin
    assert [e.name for e in await unprefixed.list_dir("")] == ["other", "p"]


async def test_empty_bucket_root_lists_empty(make_origin: OriginFactory) -> None:
    origin = make_origin("prefix/").origin
    assert await origin.list_dir("") == []


# -- whole-object writes -----------------------------------------------------------


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_replace_small_uses_put(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    counted = make_origin("pre")
    data = content(0, 100_000, seed=3)
    st = await counted.origin.replace("new/file", chunked(data, 7000))
    assert await get_bytes(s3, bucket, "pre/new/file") == data
    assert st.size == len(data)
    assert st.etag == (await s3.head_object(Bucket=bucket, Key="pre/new/file"))["ETag"].strip('"')
    assert counted.calls["PutObject"] == 1
    assert counted.calls["CreateMultipartUpload"] == 0


async def test_replace_large_uses_multipart(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    counted = make_origin(part_size=5 * MiB)
    data = content(0, 12 * MiB + 17, seed=4)
    st = await counted.origin.replace("big", chunked(data, 3 * MiB))
    assert st.size == len(data)
    assert await get_bytes(s3, bucket, "big") == data
    assert counted.calls["CreateMultipartUpload"] == 1
    assert counted.calls["UploadPart"] == 3
    assert counted.calls["CompleteMultipartUpload"] == 1
    await assert_no_uploads(s3, bucket)


class Boom(Exception):
    pass


async def test_replace_interrupted_keeps_old_object(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    await s3.put_object(Bucket=bucket, Key="f", Body=b"old content")
    counted = make_origin(part_size=5 * MiB)

    async def failing() -> AsyncIterator[bytes]:
        yield content(0, 6 * MiB)
        yield content(6 * MiB, 6 * MiB)
        raise Boom

    with pytest.raises(Boom):
        await counted.origin.replace("f", failing())
    assert counted.calls["CreateMultipartUpload"] == 1
    assert counted.calls["AbortMultipartUpload"] == 1
    assert await get_bytes(s3, bucket, "f") == b"old content"
    await assert_no_uploads(s3, bucket)


async def test_replace_cancelled_aborts_upload(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    await s3.put_object(Bucket=bucket, Key="f", Body=b"old content")
    counted = make_origin(part_size=5 * MiB)
    stalled = asyncio.Event()

    async def stalling() -> AsyncIterator[bytes]:
        yield content(0, 11 * MiB)
        stalled.set()
        await asyncio.Event().wait()  # never set: the upload hangs here until cancelled
        yield b""

    task = asyncio.create_task(counted.origin.replace("f", stalling()))
    await asyncio.wait_for(stalled.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counted.calls["AbortMultipartUpload"] == 1
    assert await get_bytes(s3, bucket, "f") == b"old content"
    await assert_no_uploads(s3, bucket)


# -- rewrite -----------------------------------------------------------------------


async def test_rewrite_small_grow_and_shrink(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    old = content(0, 1000)
    await s3.put_object(Bucket=bucket, Key="d/f", Body=old)
    counted = make_origin("")
    new = content(0, 3000, seed=9)

    grow = [(10, 20), (990, 1010), (2500, 2600)]
    st = await counted.origin.rewrite("d/f", 3000, grow, reader(new))
    expected = expected_rewrite(old, 3000, grow, new)
    assert expected[1010:2500] == bytes(1490)  # zeros past the old size
    assert await get_bytes(s3, bucket, "d/f") == expected
    assert st.size == 3000
    assert counted.calls["PutObject"] == 1

    shrink = [(400, 600)]  # partly past the new size: only [400, 500) counts
    calls: list[tuple[int, int]] = []
    await counted.origin.rewrite("d/f", 500, shrink, reader(new, calls))
    assert calls == [(400, 100)]
    assert await get_bytes(s3, bucket, "d/f") == expected[:400] + new[400:500]

    await counted.origin.rewrite("d/new", 10, [], reader(b""))  # missing: zeros
    assert await get_bytes(s3, bucket, "d/new") == bytes(10)


async def test_rewrite_large_copies_untouched_parts(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    size = 40 * MiB
    old = content(0, size)
    await s3.put_object(Bucket=bucket, Key="big", Body=old)
    counted = make_origin()  # 8 MiB parts: 5 of them
    new = content(0, size, seed=5)
    changed = [(100, 200), (16 * MiB - 10, 16 * MiB + 10)]  # parts 1, 2 and 3

    st = await counted.origin.rewrite("big", size, changed, reader(new))
    assert counted.calls["UploadPart"] == 3
    assert counted.calls["UploadPartCopy"] == 2
    assert counted.calls["PutObject"] == 0
    assert st.size == size
    assert await get_bytes(s3, bucket, "big") == expected_rewrite(old, size, changed, new)
    await assert_no_uploads(s3, bucket)


async def test_rewrite_multipart_grow_then_shrink(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    old = content(0, 12 * MiB)
    await s3.put_object(Bucket=bucket, Key="f", Body=old)
    counted = make_origin(part_size=5 * MiB, small_object_limit=5 * MiB)
    new = content(0, 17 * MiB, seed=6)

    changed = [(14 * MiB, 14 * MiB + 5)]
    await counted.origin.rewrite("f", 17 * MiB, changed, reader(new))
    grown = expected_rewrite(old, 17 * MiB, changed, new)
    assert grown[12 * MiB : 14 * MiB] == bytes(2 * MiB)
    assert await get_bytes(s3, bucket, "f") == grown
    # [0, 5) and [5, 10) copied; [10, 15) has old, zero and new bytes; [15, 17) zeros.
    assert (counted.calls["UploadPartCopy"], counted.calls["UploadPart"]) == (2, 2)

    counted.calls.clear()
    st = await counted.origin.rewrite("f", 7 * MiB, [], reader(b""))
    assert st.size == 7 * MiB
    assert await get_bytes(s3, bucket, "f") == grown[: 7 * MiB]
    assert (counted.calls["UploadPartCopy"], counted.calls["UploadPart"]) == (2, 0)
    await assert_no_uploads(s3, bucket)


async def test_rewrite_failing_read_aborts_upload(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    old = content(0, 12 * MiB)
    await s3.put_object(Bucket=bucket, Key="f", Body=old)
    counted = make_origin(part_size=5 * MiB, small_object_limit=5 * MiB)
    served: list[tuple[int, int]] = []
    changed = [(0, 10), (11 * MiB, 11 * MiB + 1)]  # parts 1 and 3

    async def read_changed(offset: int, length: int) -> bytes:
        served.append((offset, length))
        if len(served) == 2:
            raise Boom
        return bytes(length)

    with pytest.raises(Boom):
        await counted.origin.rewrite("f", 12 * MiB, changed, read_changed)
    assert served == [(0, 10), (11 * MiB, 1)]
    assert counted.calls["AbortMultipartUpload"] == 1
    assert await get_bytes(s3, bucket, "f") == old
    await assert_no_uploads(s3, bucket)


async def test_rewrite_conflicts_with_concurrent_writer(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    await s3.put_object(Bucket=bucket, Key="f", Body=content(0, 12 * MiB))
    counted = make_origin(part_size=5 * MiB, small_object_limit=5 * MiB)
    theirs = content(0, 12 * MiB, seed=8)
    changed = [(0, 10), (11 * MiB, 11 * MiB + 1)]  # parts 1 and 3

    async def read_changed(offset: int, length: int) -> bytes:
        # Someone replaces the object while we assemble part 1: the old bytes
        # of part 3 must not be read from their version.
        await s3.put_object(Bucket=bucket, Key="f", Body=theirs)
        return bytes(length)

    with pytest.raises(OriginConflict):
        await counted.origin.rewrite("f", 12 * MiB, changed, read_changed)
    assert counted.calls["AbortMultipartUpload"] == 1
    assert await get_bytes(s3, bucket, "f") == theirs
    await assert_no_uploads(s3, bucket)


async def test_writes_to_removed_bucket_fail(
    s3: S3Client, bucket: str, make_origin: OriginFactory
) -> None:
    await s3.put_object(Bucket=bucket, Key="f", Body=b"old")
    counted = make_origin(part_size=5 * MiB, small_object_limit=5 * MiB)
    await counted.origin.check()
    await s3.delete_object(Bucket=bucket, Key="f")
    await s3.delete_bucket(Bucket=bucket)

    with pytest.raises(OriginUnavailable, match="does not exist"):
        await counted.origin.rewrite("f", 100, [(0, 100)], reader(bytes(100)))
    with pytest.raises(OriginUnavailable, match="does not exist"):
        await counted.origin.rewrite("f", 6 * MiB, [], reader(b""))
    with pytest.raises(OriginError):
        await counted.origin.replace("f", chunked(content(0, 11 * MiB), MiB))
    with pytest.raises(OriginUnavailable, match="does not exist"):
        await counted.origin.check()
    with pytest.raises(OriginUnavailable, match="does not exist"):
        await counted.origin.list_dir("")
    assert counted.calls["UploadPart"] == counted.calls["UploadPartCopy"] == 0


async def test_failing_part_upload_raises(
    s3: S3Client, bucket: str, make_origin: OriginFactory, caplog: pytest.LogCaptureFixture
) -> None:
    counted = make_origin(part_size=5 * MiB)

    async def chunks() -> AsyncIterator[bytes]:
        yield content(0, 6 * MiB)  # part 1 goes up in the background
        # The bucket (holding only our upload) goes away under the upload.
        await s3.delete_bucket(Bucket=bucket)
        yield content(6 * MiB, 6 * MiB)

    with pytest.raises(OriginUnavailable, match="does not exist"):
        await counted.origin.replace("f", chunks())
    assert counted.calls["AbortMultipartUpload"] == 1
    assert counted.calls["CompleteMultipartUpload"] == 0
    assert "could not abort multipart upload" in caplog.text  # nothing left to abort


# -- small operations ----------------------------------------------------------------


async def test_create_and_remove(s3: S3Client, bucket: str, make_origin: OriginFactory) -> None:
    origin = make_origin("pre").origin
    st = await origin.create("a/new")
    assert st.size == 0
    assert await get_bytes(s3, bucket, "pre/a/new") == b""

    await s3.put_object(Bucket=bucket, Key="pre/a/full", Body=b"keep me")
    assert (await origin.create("a/full")).size == 7
    assert await get_bytes(s3, bucket, "pre/a/full") == b"keep me"

    await origin.remove("a/full")
    with pytest.raises(OriginNotFound):
        await origin.stat("a/full")
    with pytest.raises(OriginNotFound):
        await origin.remove("a/full")
    assert [e.name for e in await origin.list_dir("a")] == ["new"]


async def test_check_and_settings(moto_endpoint: str, make_origin: OriginFactory) -> None:
    origin = make_origin("x").origin
    await origin.check()
    assert origin.capabilities.writable
    assert not origin.capabilities.partial_writes
    assert not origin.capabilities.durable_sync
    await origin.sync("anything")
    unsupported: list[Awaitable[object]] = [
        origin.write_from("f", 0, [memoryview(b"x")]),
        origin.set_size("f", 10),
        origin.allocate("f", 0, 10),
    ]
    for call in unsupported:
        with pytest.raises(OriginUnsupported):
            await call

    with pytest.raises(OriginUnavailable, match="does not exist"):
        await make_origin(bucket_name="no-such-bucket").origin.check()

    closed_port = free_port()
    down = S3Origin("b", endpoint_url=f"http://127.0.0.1:{closed_port}", region="us-east-1")
    try:
        with pytest.raises(OriginUnavailable):
            await down.check()
    finally:
        await down.close()
    await origin.close()
    with pytest.raises(OriginUnavailable):
        await origin.check()


def test_from_url_and_description() -> None:
    origin = S3Origin.from_url("s3://bkt/some/prefix/", endpoint_url="http://u:p@minio:9000")
    assert (origin.bucket, origin.prefix) == ("bkt", "some/prefix")
    assert origin.description == "s3://bkt/some/prefix at http://minio:9000"
    assert S3Origin.from_url("s3://bkt").prefix == ""
    for bad in ("s3:///prefix", "http://bkt/x", "s3://bkt/x?versionId=1"):
        with pytest.raises(ValueError):
            S3Origin.from_url(bad)
    with pytest.raises(ValueError):
        S3Origin("bkt", part_size=MiB)
    with pytest.raises(ValueError):
        S3Origin("bkt", endpoint_url="minio:9000")
