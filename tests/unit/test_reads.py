"""Tests of cachesvc.api.reads: the read policy both front ends answer with
(plan_read), and its retry and copy-or-stream decisions (read)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from cachesvc.api.access import Transfer
from cachesvc.api.reads import (
    PRECONDITION_FAILED,
    READ_ATTEMPTS,
    SMALL_BODY,
    KeptChanging,
    ReadPlan,
    Snapshot,
    plan_read,
    read,
)
from cachesvc.api.streaming import BodySink
from cachesvc.core.inode import CachingInode
from cachesvc.core.ranges import Range
from cachesvc.wire import format_http_date

MTIME = 784111777.25  # Sun, 06 Nov 1994 08:49:37 GMT
LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"
VALIDATORS = f'Accept-Ranges: bytes\r\nETag: "v1"\r\nLast-Modified: {LAST_MODIFIED}\r\n'


def snapshot(size: int = 1000, token: str = "v1") -> Snapshot:
    return Snapshot(size, MTIME, token, epoch=1, version=1)


def plan(snap: Snapshot | None = None, **kwargs: Any) -> ReadPlan:
    return plan_read(snap or snapshot(), "text/plain", 4, **kwargs)


def test_whole_file() -> None:
    got = plan()
    assert got.status == 200
    assert got.fields == VALIDATORS + "Content-Type: text/plain\r\n"
    assert got.pieces == (Range(0, 1000),)
    assert got.length == 1000
    assert got.sends_body and not got.streamed
    assert list(got.headers()) == ["Accept-Ranges", "ETag", "Last-Modified", "Content-Type"]
    assert got.headers()["Last-Modified"] == LAST_MODIFIED == format_http_date(MTIME)


def test_the_fields_of_a_version_are_built_once() -> None:
    assert plan().fields is plan().fields
    assert plan(snapshot(token="v2")).fields != plan().fields


def test_empty_file_and_head_send_no_body() -> None:
    empty = plan(snapshot(0))
    assert (empty.status, empty.pieces, empty.length, empty.sends_body) == (200, (), 0, False)
    head = plan(method="HEAD", range_header="bytes=10-19")
    assert (head.status, head.length, head.head, head.sends_body) == (206, 10, True, False)
    assert head.pieces == (Range(10, 20),)  # what a GET would send: same headers


def test_single_range() -> None:
    got = plan(range_header="bytes=10-19")
    assert got.status == 206
    assert got.fields == (
        VALIDATORS + "Content-Type: text/plain\r\nContent-Range: bytes 10-19/1000\r\n"
    )
    assert (got.pieces, got.length) == ((Range(10, 20),), 10)


def test_several_ranges_are_multipart() -> None:
    got = plan(range_header="bytes=0-1,10-11")
    assert got.status == 206
    match = re.fullmatch(
        VALIDATORS + "Content-Type: multipart/byteranges; boundary=([0-9a-f]{32})\r\n", got.fields
    )
    assert match is not None
    boundary = match[1].encode()
    assert [type(piece) for piece in got.pieces] == [bytes, Range, bytes, Range, bytes]
    assert [p for p in got.pieces if isinstance(p, Range)] == [Range(0, 2), Range(10, 12)]
    first = got.pieces[0]
    assert isinstance(first, bytes) and first.startswith(b"--" + boundary + b"\r\n")
    assert b"Content-Range: bytes 10-11/1000\r\n" in cast(bytes, got.pieces[2])
    assert got.length == sum(len(p) if isinstance(p, bytes) else p.length for p in got.pieces)


def test_unsatisfiable_and_too_many_ranges() -> None:
    for header in ("bytes=1000-", "bytes=0-0,2-2,4-4,6-6,8-8"):
        got = plan(range_header=header)
        assert got.status == 416
        assert got.fields == VALIDATORS + "Content-Range: bytes */1000\r\n"
        assert (got.pieces, got.length, got.sends_body) == ((), 0, False)
        assert got.reason


def test_ignored_range_is_the_whole_file() -> None:
    assert plan(range_header="bytes=5-3") == plan()
    assert plan(range_header="items=0-1") == plan()


@pytest.mark.parametrize(
    ("if_range", "status"),
    [('"v1"', 206), ('"v2"', 200), ('W/"v1"', 200), (LAST_MODIFIED, 206), ("garbage", 200)],
)
def test_if_range(if_range: str, status: int) -> None:
    assert plan(range_header="bytes=0-9", if_range=if_range).status == status


def test_preconditions_come_before_ranges() -> None:
    not_modified = plan(range_header="bytes=1000-", conditions={"If-None-Match": '"v1"'})
    assert not_modified.status == 304
    assert not_modified.fields == VALIDATORS
    assert (not_modified.pieces, not_modified.length) == ((), 0)
    failed = plan(range_header="bytes=0-9", conditions={"If-Match": '"v2"'})
    assert (failed.status, failed.fields, failed.reason) == (412, "", PRECONDITION_FAILED)
    passed = plan(range_header="bytes=0-9", conditions={"If-Match": '"v1"'})
    assert passed == plan(range_header="bytes=0-9")


def test_small_bodies_are_copied_larger_ones_streamed() -> None:
    assert not plan(snapshot(SMALL_BODY)).streamed
    assert plan(snapshot(SMALL_BODY + 1)).streamed
    assert not plan(snapshot(SMALL_BODY + 1), range_header="bytes=0-9").streamed


# ---------------------------------------------------------------------------
# read: the retry loop and the copy


@dataclass
class FakeAttr:
    size: int
    mtime: float = MTIME
    etag: str = "v1"
    version: int = 1


@dataclass
class FakeInode:
    """Cached bytes that a write changes under the first ``changes`` copies."""

    data: bytes
    changes: int = 0
    path: str = "f"
    epoch: int = 1
    attr: FakeAttr = field(init=False)

    def __post_init__(self) -> None:
        self.attr = FakeAttr(len(self.data))

    async def read_cached(self, start: int, length: int) -> bytes:
        return self.data[start : start + length]

    def unchanged_since(self, epoch: int, version: int, rng: Range) -> bool:
        if self.changes:
            self.changes -= 1
            self.attr.version += 1
            return False
        return (epoch, version) == (self.epoch, self.attr.version)


@dataclass
class FakeFront:
    """A FrontEnd that records what it was asked to send."""

    sent: list[tuple[ReadPlan, bytes]] = field(default_factory=list)

    def complete(self, plan: ReadPlan, body: bytes | bytearray) -> str:
        self.sent.append((plan, bytes(body)))
        return "answer"

    async def begin_stream(self, plan: ReadPlan) -> tuple[str, BodySink | None]:
        raise AssertionError("small bodies are copied")


async def run_read(inode: FakeInode, front: FakeFront, **kwargs: Any) -> str:
    def plan_for(snap: Snapshot) -> ReadPlan:
        return plan_read(snap, "text/plain", 4, **kwargs)

    return await read(cast(CachingInode, inode), Transfer(), front, plan_for)


async def test_read_copies_a_small_body() -> None:
    front = FakeFront()
    assert await run_read(FakeInode(bytes(range(100))), front, range_header="bytes=10-12") == (
        "answer"
    )
    [(sent_plan, body)] = front.sent
    assert (sent_plan.status, body) == (206, bytes([10, 11, 12]))


async def test_read_plans_again_for_a_version_written_meanwhile() -> None:
    inode, front = FakeInode(bytes(100), changes=READ_ATTEMPTS - 1), FakeFront()
    await run_read(inode, front)
    [(sent_plan, body)] = front.sent
    assert (sent_plan.status, len(body)) == (200, 100)
    assert inode.attr.version == READ_ATTEMPTS  # planned for the last version


async def test_read_gives_up_on_a_file_that_keeps_changing() -> None:
    inode, front = FakeInode(bytes(100), changes=READ_ATTEMPTS), FakeFront()
    with pytest.raises(KeptChanging):
        await run_read(inode, front)
    assert front.sent == []


async def test_read_without_a_body_reads_nothing() -> None:
    inode, front = FakeInode(bytes(100), changes=READ_ATTEMPTS), FakeFront()
    await run_read(inode, front, method="HEAD")
    await run_read(inode, front, conditions={"If-None-Match": "*"})
    assert [(p.status, body) for p, body in front.sent] == [(200, b""), (304, b"")]
    assert inode.changes == READ_ATTEMPTS  # no copy was checked
