"""Tests of LocalOrigin: data paths, atomic replacement, confinement, errors."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cachesvc.origins.base import (
    DirEntry,
    OriginConflict,
    OriginError,
    OriginNoSpace,
    OriginNotFound,
    OriginPermissionDenied,
    OriginTimeout,
    OriginUnavailable,
    OriginUnsupported,
)
from cachesvc.origins.local.fileio import IOV_MAX
from cachesvc.origins.local.origin import LocalOrigin, etag_of, origin_error
from cachesvc.origins.local.paths import TEMP_MARKER, is_temp_name

pytestmark = pytest.mark.timeout(30)


def pattern(start: int, end: int, seed: int = 0) -> bytes:
    """Content as a function of offset: any range can be checked on its own."""
    return bytes(((i * 131) ^ (i >> 9) ^ seed) & 0xFF for i in range(start, end))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if TEMP_MARKER in name]


async def gen(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def calls(origin: LocalOrigin, path: str, *ops: str) -> list[Callable[[], Awaitable[object]]]:
    """Zero-argument calls of the named origin operations on ``path``."""
    every: dict[str, Callable[[], Awaitable[object]]] = {
        "stat": lambda: origin.stat(path),
        "read": lambda: origin.read_into(path, 0, [memoryview(bytearray(4))]),
        "write": lambda: origin.write_from(path, 0, [memoryview(b"pwned")]),
        "set_size": lambda: origin.set_size(path, 0),
        "sync": lambda: origin.sync(path),
        "create": lambda: origin.create(path),
        "replace": lambda: origin.replace(path, gen(b"pwned")),
        "remove": lambda: origin.remove(path),
    }
    return [every[op] for op in ops]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(b"top secret")
    return path


@pytest.fixture
async def origin(root: Path) -> AsyncIterator[LocalOrigin]:
    o = LocalOrigin(str(root), max_workers=4)
    yield o
    await o.close()


# ------------------------------------------------------------------ reads


async def test_read_into_fills_several_views_and_stops_at_eof(
    origin: LocalOrigin, root: Path
) -> None:
    (root / "f").write_bytes(pattern(0, 10_000))
    first = bytearray(b"\xee" * 4096)
    third = bytearray(b"\xee" * 4096)
    with mmap.mmap(-1, 8192) as mem:
        view = memoryview(mem)
        second = view[:4096]
        try:
            n = await origin.read_into("f", 100, [memoryview(first), second, memoryview(third)])
            assert n == 9_900
            assert bytes(first) == pattern(100, 4196)
            assert bytes(second) == pattern(4196, 8292)
            assert bytes(third[: 9_900 - 8192]) == pattern(8292, 10_000)
            assert bytes(third[9_900 - 8192 :]) == b"\xee" * (4096 - 1708)
        finally:
            # Releasing our views lets the mmap close: the origin keeps no export.
            second.release()
            view.release()


async def test_failed_read_keeps_no_export_of_caller_memory(
    origin: LocalOrigin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "f").write_bytes(b"data")

    def failing(fd: int, bufs: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing)
    mem = mmap.mmap(-1, 4096)
    view = memoryview(mem)
    parts = [view[:100], view[200:300]]
    with pytest.raises(OriginUnavailable) as info:
        await origin.read_into("f", 0, parts)
    # Once the caller releases its views, the error (alive, with its
    # traceback) holds no export of the mapping.
    assert info.value.__cause__ is not None
    for part in [*parts, view]:
        part.release()
    mem.close()


async def test_read_into_past_eof_returns_zero(origin: LocalOrigin, root: Path) -> None:
    (root / "f").write_bytes(b"abc")
    buf = bytearray(10)
    assert await origin.read_into("f", 3, [memoryview(buf)]) == 0
    assert await origin.read_into("f", 50, [memoryview(buf)]) == 0
    assert await origin.read_into("f", 1, [memoryview(buf), memoryview(bytearray())]) == 2
    assert buf[:2] == b"bc"


async def test_read_into_more_buffers_than_iov_max(origin: LocalOrigin, root: Path) -> None:
    count = IOV_MAX * 2 + 17
    (root / "f").write_bytes(pattern(0, count * 8))
    bufs = [bytearray(8) for _ in range(count)]
    assert await origin.read_into("f", 0, [memoryview(b) for b in bufs]) == count * 8
    assert b"".join(bufs) == pattern(0, count * 8)


async def test_short_reads_and_writes_are_continued(
    origin: LocalOrigin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"read": 0, "write": 0}

    def short_preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls["read"] += 1
        return real_preadv(fd, [bufs[0][:7]], offset)

    def short_pwritev(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls["write"] += 1
        return real_pwritev(fd, [bufs[0][:5]], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    await origin.create("f")
    data = pattern(0, 300)
    assert await origin.write_from("f", 0, [memoryview(data[:100]), memoryview(data[100:])]) == 300
    assert calls["write"] == 60
    assert (root / "f").read_bytes() == data
    bufs = [bytearray(50), bytearray(300)]
    assert await origin.read_into("f", 10, [memoryview(b) for b in bufs]) == 290
    assert bytes(bufs[0]) + bytes(bufs[1][:240]) == data[10:]
    assert calls["read"] >= 290 // 7


async def test_read_into_checks_etag(origin: LocalOrigin, root: Path) -> None:
    (root / "f").write_bytes(b"0123456789")
    st = await origin.stat("f")
    buf = bytearray(4)
    assert await origin.read_into("f", 2, [memoryview(buf)], etag=st.etag) == 4
    assert buf == b"2345"
    (root / "f").write_bytes(b"changed content")
    with pytest.raises(OriginConflict):
        await origin.read_into("f", 2, [memoryview(buf)], etag=st.etag)


async def test_stat_of_file_directory_and_missing(origin: LocalOrigin, root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"hello")
    st = await origin.stat("d/f")
    host = os.stat(root / "d" / "f")
    assert (st.size, st.is_file) == (5, True)
    assert st.etag == f"{host.st_ino:x}-{host.st_mtime_ns:x}-{host.st_size:x}" == etag_of(host)
    assert st.mtime == pytest.approx(host.st_mtime)
    for path in ("d", "missing", "d/missing", "missing/f", "d/f/x"):
        with pytest.raises(OriginNotFound):
            await origin.stat(path)
    await origin.write_from("d/f", 5, [memoryview(b"!")])
    assert (await origin.stat("d/f")).etag != st.etag


# ----------------------------------------------------------------- writes


async def test_write_set_size_allocate_sync(origin: LocalOrigin, root: Path) -> None:
    await origin.create("f")
    assert await origin.write_from("f", 3, [memoryview(b"abc"), memoryview(b"de")]) == 5
    assert (root / "f").read_bytes() == b"\0\0\0abcde"
    await origin.set_size("f", 5)
    assert (root / "f").read_bytes() == b"\0\0\0ab"
    await origin.set_size("f", 7)
    assert (root / "f").read_bytes() == b"\0\0\0ab\0\0"
    await origin.allocate("f", 4, 100)
    assert os.stat(root / "f").st_size == 104
    await origin.allocate("f", 0, 10)
    await origin.allocate("f", 0, 0)
    assert os.stat(root / "f").st_size == 104
    await origin.sync("f")
    assert (root / "f").read_bytes()[:7] == b"\0\0\0ab\0\0"
    with pytest.raises(OriginNotFound):
        await origin.write_from("missing", 0, [memoryview(b"x")])
    with pytest.raises(OriginNotFound):
        await origin.sync("missing")


async def test_write_from_more_buffers_than_iov_max(origin: LocalOrigin, root: Path) -> None:
    data = pattern(0, 3000 * 4)
    await origin.create("f")
    views = [memoryview(data)[i : i + 4] for i in range(0, len(data), 4)]
    assert await origin.write_from("f", 0, views) == len(data)
    assert (root / "f").read_bytes() == data


async def test_allocate_grows_the_file_where_fallocate_is_unsupported(
    origin: LocalOrigin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    (root / "f").write_bytes(b"abc")
    await origin.allocate("f", 10, 20)
    assert (root / "f").read_bytes() == b"abc" + bytes(27)
    await origin.allocate("f", 0, 5)
    assert os.stat(root / "f").st_size == 30


async def test_create_makes_parents_and_accepts_existing(origin: LocalOrigin, root: Path) -> None:
    st = await origin.create("a/b/c.txt")
    assert (root / "a" / "b" / "c.txt").read_bytes() == b""
    assert st.size == 0
    (root / "a" / "b" / "c.txt").write_bytes(b"keep")
    again = await origin.create("a/b/c.txt")
    assert again.size == 4
    assert (root / "a" / "b" / "c.txt").read_bytes() == b"keep"
    with pytest.raises(OriginNotFound):
        await origin.create("a/b")
    with pytest.raises(OriginNotFound):
        await origin.create("a/b/c.txt/d")


async def test_remove(origin: LocalOrigin, root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"x")
    await origin.read_into("d/f", 0, [memoryview(bytearray(1))])
    await origin.remove("d/f")
    assert not (root / "d" / "f").exists()
    assert origin.stats()["open_files"] == 0
    with pytest.raises(OriginNotFound):
        await origin.remove("d/f")
    with pytest.raises(OriginNotFound):
        await origin.remove("d")
    assert (root / "d").is_dir()


# ------------------------------------------------------- replace / rewrite


async def test_replace_creates_with_parents(origin: LocalOrigin, root: Path) -> None:
    data = pattern(0, 3 << 20)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    st = await origin.replace("x/y/z", gen(b"", *chunks))
    assert (root / "x" / "y" / "z").read_bytes() == data
    assert st == await origin.stat("x/y/z")
    assert temp_files(root / "x" / "y") == []


async def test_replace_swaps_content_and_keeps_mode(origin: LocalOrigin, root: Path) -> None:
    (root / "f").write_bytes(b"old content")
    os.chmod(root / "f", 0o640)
    buf = bytearray(3)
    await origin.read_into("f", 0, [memoryview(buf)])  # caches a descriptor of the old file
    await origin.write_from("f", 0, [memoryview(b"OLD")])
    old = await origin.stat("f")
    st = await origin.replace("f", gen(b"new ", b"content!"))
    assert st.etag != old.etag
    assert (root / "f").read_bytes() == b"new content!"
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o640
    assert await origin.read_into("f", 0, [memoryview(buf)]) == 3
    assert buf == b"new"


async def test_failed_replace_leaves_old_content_and_no_temp_file(
    origin: LocalOrigin, root: Path
) -> None:
    (root / "f").write_bytes(b"old")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (2 << 20)  # more than one write batch reaches the temporary file
        yield b"y" * 1000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await origin.replace("f", broken())
    assert (root / "f").read_bytes() == b"old"
    assert temp_files(root) == []


async def test_cancelled_replace_cleans_up(origin: LocalOrigin, root: Path) -> None:
    (root / "f").write_bytes(b"old")
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"x" * (2 << 20)
        started.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(origin.replace("f", stalled()))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (root / "f").read_bytes() == b"old"
    assert temp_files(root) == []


async def test_replace_interrupted_by_close_cleans_up(root: Path) -> None:
    (root / "f").write_bytes(b"old")
    before = open_fds()
    origin = LocalOrigin(str(root))
    started, resume = asyncio.Event(), asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * (2 << 20)
        started.set()
        await resume.wait()
        yield b"late"

    task = asyncio.create_task(origin.replace("f", slow()))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(origin.close(), 10)
    resume.set()
    with pytest.raises(OriginUnavailable, match="closed"):
        await asyncio.wait_for(task, 10)
    assert (root / "f").read_bytes() == b"old"
    assert temp_files(root) == []
    assert open_fds() == before


async def test_rewrite_keeps_unchanged_bytes_and_zero_fills(
    origin: LocalOrigin, root: Path
) -> None:
    old = pattern(0, 10_000)
    (root / "f").write_bytes(old)
    new = pattern(0, 12_000, seed=0x5A)
    asked: list[tuple[int, int]] = []

    async def read_changed(offset: int, length: int) -> bytes:
        asked.append((offset, length))
        return new[offset : offset + length]

    changed = [(100, 200), (9_000, 11_000)]
    st = await origin.rewrite("f", 12_000, changed, read_changed)
    got = (root / "f").read_bytes()
    assert asked == [(100, 100), (9_000, 2_000)]
    assert got[:100] == old[:100]
    assert got[100:200] == new[100:200]
    assert got[200:9_000] == old[200:9_000]
    assert got[9_000:11_000] == new[9_000:11_000]
    assert got[11_000:] == bytes(1_000)
    assert st == await origin.stat("f")
    assert temp_files(root) == []

    await origin.rewrite("f", 50, [], read_changed)
    assert (root / "f").read_bytes() == old[:50]


async def test_rewrite_without_copy_file_range_and_of_missing_file(
    origin: LocalOrigin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_copy(*args: Any) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", no_copy)
    old = pattern(0, 5_000)
    (root / "f").write_bytes(old)

    async def read_changed(offset: int, length: int) -> memoryview:
        return memoryview(b"N" * length)

    await origin.rewrite("f", 6_000, [(10, 20)], read_changed)
    assert (root / "f").read_bytes() == old[:10] + b"N" * 10 + old[20:] + bytes(1_000)
    await origin.rewrite("new/g", 8, [(2, 4)], read_changed)
    assert (root / "new" / "g").read_bytes() == b"\0\0NN\0\0\0\0"


async def test_failed_rewrite_leaves_old_content(origin: LocalOrigin, root: Path) -> None:
    (root / "f").write_bytes(b"old content")

    async def failing(offset: int, length: int) -> bytes:
        raise RuntimeError("cache lost it")

    with pytest.raises(RuntimeError, match="cache lost it"):
        await origin.rewrite("f", 11, [(0, 3)], failing)

    async def short(offset: int, length: int) -> bytes:
        return b"x"

    with pytest.raises(RuntimeError, match="returned 1 bytes"):
        await origin.rewrite("f", 11, [(0, 3)], short)
    with pytest.raises(ValueError):
        await origin.rewrite("f", 11, [(5, 8), (2, 3)], short)
    with pytest.raises(ValueError):
        await origin.rewrite("f", 11, [(5, 12)], short)
    assert (root / "f").read_bytes() == b"old content"
    assert temp_files(root) == []


# -------------------------------------------------------------- listings


async def test_list_dir(origin: LocalOrigin, root: Path, outside: Path) -> None:
    (root / "b.txt").write_bytes(b"12345")
    (root / "a").mkdir()
    (root / "a" / "inner").write_bytes(b"")
    (root / "link").symlink_to(outside / "secret")
    os.mkfifo(root / "pipe")
    (root / ".c.cachesvc-tmp-0123456789abcdef").write_bytes(b"partial")
    (root / ".hidden").write_bytes(b"h")
    entries = await origin.list_dir("")
    assert [(e.name, e.is_dir) for e in entries] == [
        (".hidden", False),
        ("a", True),
        ("b.txt", False),
    ]
    b = entries[2]
    assert b.size == 5
    assert b.mtime == os.stat(root / "b.txt").st_mtime_ns / 1e9
    inner_mtime = os.stat(root / "a" / "inner").st_mtime_ns / 1e9
    assert await origin.list_dir("a") == [DirEntry("inner", False, 0, inner_mtime)]
    for path in ("missing", "b.txt", "pipe"):
        with pytest.raises(OriginNotFound):
            await origin.list_dir(path)
    with pytest.raises(OriginPermissionDenied):
        await origin.list_dir("link")


def test_temp_names() -> None:
    assert is_temp_name(".f.cachesvc-tmp-0123456789abcdef")
    assert is_temp_name(".a.b.cachesvc-tmp-00000000000000ff")
    assert not is_temp_name("f.cachesvc-tmp-0123456789abcdef")
    assert not is_temp_name(".f.cachesvc-tmp-0123")
    assert not is_temp_name(".f.cachesvc-tmp-0123456789abcdef.txt")


# ----------------------------------------------------------- confinement


@pytest.mark.parametrize(
    "path", ["", ".", "..", "../x", "a/../b", "/abs", "a//b", "a/", "./a", "a/.", "a\0b"]
)
async def test_invalid_names_are_refused(origin: LocalOrigin, path: str) -> None:
    with pytest.raises(OriginPermissionDenied):
        await origin.stat(path)
    with pytest.raises(OriginPermissionDenied):
        await origin.create(path)
    with pytest.raises(OriginPermissionDenied):
        await origin.read_into(path, 0, [memoryview(bytearray(1))])
    if path:
        with pytest.raises(OriginPermissionDenied):
            await origin.list_dir(path)


async def test_symlink_to_outside_file_is_refused(
    origin: LocalOrigin, root: Path, outside: Path
) -> None:
    (root / "link").symlink_to(outside / "secret")
    (root / "dangling").symlink_to(outside / "nothing")
    (root / "inner").symlink_to("real")  # inside the root: refused too
    (root / "real").write_bytes(b"r")
    (root / "null").symlink_to("/dev/null")
    messages = set()
    for name in ("link", "dangling", "inner", "null"):
        ops = ("stat", "read", "write", "set_size", "sync", "create", "replace", "remove")
        for call in calls(origin, name, *ops):
            with pytest.raises(OriginPermissionDenied) as info:
                await call()
            messages.add(str(info.value).removeprefix(name))
    # The same answer whether or not the target exists, naming no host path.
    assert messages == {": symbolic links are not followed"}
    assert (outside / "secret").read_bytes() == b"top secret"
    assert not (outside / "nothing").exists()
    assert (root / "link").is_symlink() and (root / "dangling").is_symlink()


async def test_symlinked_directory_component_is_refused(
    origin: LocalOrigin, root: Path, outside: Path
) -> None:
    (root / "d").symlink_to(outside)
    (root / "real").mkdir()
    (root / "real" / "sub").symlink_to(outside)
    for path in ("d/secret", "real/sub/secret", "d/new/file", "d/missing"):
        for call in calls(origin, path, "stat", "read", "write", "create", "replace", "remove"):
            with pytest.raises(OriginPermissionDenied, match="symbolic links are not followed"):
                await call()
    with pytest.raises(OriginPermissionDenied):
        await origin.list_dir("d")
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"top secret"


async def test_directory_swapped_for_symlink_after_caching(
    origin: LocalOrigin, root: Path, outside: Path
) -> None:
    (root / "d").mkdir()
    (root / "d" / "secret").write_bytes(b"public data")
    buf = bytearray(6)
    assert await origin.read_into("d/secret", 0, [memoryview(buf)]) == 6
    assert origin.stats()["open_files"] == 1
    os.rename(root / "d", root / "d2")
    (root / "d").symlink_to(outside)
    with pytest.raises(OriginPermissionDenied):
        await origin.read_into("d/secret", 0, [memoryview(buf)])
    with pytest.raises(OriginPermissionDenied):
        await origin.write_from("d/secret", 0, [memoryview(b"pwned")])
    with pytest.raises(OriginPermissionDenied):
        await origin.sync("d/secret")
    assert buf == b"public"
    assert (outside / "secret").read_bytes() == b"top secret"
    assert (root / "d2" / "secret").read_bytes() == b"public data"


async def test_fifo_is_refused_without_blocking(origin: LocalOrigin, root: Path) -> None:
    os.mkfifo(root / "pipe")
    for call in calls(origin, "pipe", "stat", "read", "write", "create", "replace", "remove"):
        with pytest.raises(OriginNotFound, match="not a regular file"):
            await asyncio.wait_for(call(), 10)
    assert stat.S_ISFIFO(os.stat(root / "pipe", follow_symlinks=False).st_mode)


async def test_fifo_swapped_in_after_the_check_does_not_block(
    origin: LocalOrigin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "f").write_bytes(b"data")
    real_stat = os.stat

    def racing_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)
        if path == "f" and kwargs.get("dir_fd") is not None:
            os.unlink(root / "f")
            os.mkfifo(root / "f")
        return st

    monkeypatch.setattr(os, "stat", racing_stat)
    with pytest.raises(OriginNotFound, match="not a regular file"):
        await asyncio.wait_for(origin.read_into("f", 0, [memoryview(bytearray(4))]), 10)


async def test_device_is_refused_without_being_opened(
    origin: LocalOrigin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("cannot create device nodes here")
    real_open = os.open
    opened: list[Any] = []

    def recording_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    for call in calls(origin, "null", "stat", "read", "write", "create", "remove"):
        with pytest.raises(OriginNotFound):
            await call()
    assert "null" not in opened


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ENOENT, OriginNotFound),
        (errno.ENOTDIR, OriginNotFound),
        (errno.EISDIR, OriginNotFound),
        (errno.EACCES, OriginPermissionDenied),
        (errno.EPERM, OriginPermissionDenied),
        (errno.ELOOP, OriginPermissionDenied),
        (errno.ENOSPC, OriginNoSpace),
        (errno.EDQUOT, OriginNoSpace),
        (errno.EFBIG, OriginNoSpace),
        (errno.ETIMEDOUT, OriginTimeout),
        (errno.EIO, OriginUnavailable),
        (errno.ESTALE, OriginUnavailable),
    ],
)
def test_errno_mapping(code: int, cls: type[OriginError]) -> None:
    err = origin_error(OSError(code, os.strerror(code), "/host/secret/path"), "a/b")
    assert type(err) is cls
    assert str(err) == f"a/b: {os.strerror(code)}"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ENOSPC, OriginNoSpace),
        (errno.EIO, OriginUnavailable),
        (errno.EACCES, OriginPermissionDenied),
    ],
)
async def test_write_errors_are_translated(
    origin: LocalOrigin,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    cls: type[OriginError],
) -> None:
    await origin.create("d/f")
    real_pwritev = os.pwritev

    def failing(fd: int, bufs: list[memoryview], offset: int) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwritev", failing)
    with pytest.raises(cls) as info:
        await origin.write_from("d/f", 0, [memoryview(b"data")])
    assert str(root) not in str(info.value)
    assert str(info.value).startswith("d/f: ")
    assert isinstance(info.value.__cause__, OSError)
    assert origin.stats()["open_files"] == 0  # a failed descriptor is not reused
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    assert await origin.write_from("d/f", 0, [memoryview(b"data")]) == 4


async def test_read_only_origin(root: Path) -> None:
    (root / "f").write_bytes(b"data")
    origin = LocalOrigin(str(root), read_only=True)
    try:
        assert not origin.capabilities.writable

        async def changed(offset: int, length: int) -> bytes:
            return bytes(length)

        for call in (
            lambda: origin.write_from("f", 0, [memoryview(b"x")]),
            lambda: origin.set_size("f", 0),
            lambda: origin.allocate("f", 0, 10),
            lambda: origin.create("g"),
            lambda: origin.remove("f"),
            lambda: origin.replace("f", gen(b"x")),
            lambda: origin.rewrite("f", 1, [], changed),
        ):
            with pytest.raises(OriginUnsupported):
                await call()
        buf = bytearray(4)
        assert await origin.read_into("f", 0, [memoryview(buf)]) == 4
        await origin.sync("f")
        assert buf == b"data"
        assert sorted(os.listdir(root)) == ["f"]
    finally:
        await origin.close()


# ----------------------------------------------------- descriptor table


async def test_descriptor_table_is_bounded(root: Path) -> None:
    origin = LocalOrigin(str(root), max_open_files=2)
    try:
        for name in ("a", "b", "c"):
            await origin.create(name)
            await origin.write_from(name, 0, [memoryview(name.encode())])
        assert origin.stats()["open_files"] == 2
        for name in ("a", "b", "c"):
            await origin.sync(name)
            assert (root / name).read_bytes() == name.encode()
    finally:
        await origin.close()


async def test_file_replaced_behind_our_back_is_reopened(origin: LocalOrigin, root: Path) -> None:
    (root / "f").write_bytes(b"first")
    buf = bytearray(5)
    await origin.read_into("f", 0, [memoryview(buf)])
    (root / "other").write_bytes(b"second")
    os.rename(root / "other", root / "f")
    await origin.read_into("f", 0, [memoryview(buf)])
    assert buf == b"secon"
    await origin.write_from("f", 0, [memoryview(b"S")])
    assert (root / "f").read_bytes() == b"Second"


async def test_close_error_of_evicted_descriptor_is_returned_by_sync(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = LocalOrigin(str(root), max_open_files=1)
    try:
        await origin.create("a")
        await origin.write_from("a", 0, [memoryview(b"a")])
        real_close = os.close
        target = str(root / "a")
        failing = {fd for fd in map(int, open_fds()) if fd_target(fd) == target}
        assert len(failing) == 1

        def failing_close(fd: int) -> None:
            real_close(fd)
            if fd in failing:
                failing.discard(fd)
                raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "close", failing_close)
        await origin.create("b")  # evicts "a", whose close fails
        for _ in range(500):
            if not failing and origin.stats()["jobs"] == 0:
                break
            await asyncio.sleep(0.01)
        assert not failing
        with pytest.raises(OriginUnavailable, match="a: Input/output error"):
            await origin.sync("a")
        await origin.sync("a")  # reported once
        await origin.sync("b")
    finally:
        await origin.close()


async def test_descriptor_in_use_is_not_closed_until_its_job_ends(
    origin: LocalOrigin, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "f").write_bytes(b"still readable")
    await origin.read_into("f", 0, [memoryview(bytearray(1))])
    entered, release = threading.Event(), threading.Event()
    real_preadv = os.preadv

    def slow_preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        entered.set()
        release.wait(10)
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    buf = bytearray(14)
    read = asyncio.create_task(origin.read_into("f", 0, [memoryview(buf)]))
    assert await asyncio.to_thread(entered.wait, 10)
    await origin.remove("f")  # retires the descriptor the read is using
    assert origin.stats()["open_files"] == 0
    release.set()
    assert await asyncio.wait_for(read, 10) == 14
    assert buf == b"still readable"


async def test_cancelled_calls_leak_no_descriptors(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "f").write_bytes(b"data")
    before = open_fds()
    origin = LocalOrigin(str(root))
    entered, release = threading.Event(), threading.Event()
    real_preadv = os.preadv

    def slow_preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        entered.set()
        release.wait(10)
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    read = asyncio.create_task(origin.read_into("f", 0, [memoryview(bytearray(4))]))
    assert await asyncio.to_thread(entered.wait, 10)
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    release.set()
    await origin.write_from("f", 0, [memoryview(b"D")])
    await asyncio.wait_for(origin.close(), 10)
    assert open_fds() == before
    with pytest.raises(OriginUnavailable):
        await origin.stat("f")
    await origin.close()  # idempotent


# --------------------------------------------------------------- lifecycle


async def test_open_creates_the_root(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "b"
    with pytest.raises(OriginNotFound):
        LocalOrigin(str(missing))
    with pytest.raises(OriginNotFound):
        LocalOrigin.open(str(missing), create=False)
    origin = LocalOrigin.open(str(missing))
    try:
        assert missing.is_dir()
        assert origin.description == f"file://{missing}"
        assert origin.capabilities.writable and origin.capabilities.partial_writes
        assert origin.capabilities.durable_sync
        await origin.check()
    finally:
        await origin.close()


async def test_check_reports_a_replaced_root(origin: LocalOrigin, root: Path) -> None:
    await origin.check()
    os.rename(root, root.with_name("moved"))
    os.mkdir(root)
    with pytest.raises(OriginUnavailable, match="replaced"):
        await origin.check()


async def test_concurrent_reads_share_one_descriptor(origin: LocalOrigin, root: Path) -> None:
    data = pattern(0, 1 << 20)
    (root / "f").write_bytes(data)

    async def read(offset: int) -> bytes:
        buf = bytearray(4096)
        n = await origin.read_into("f", offset, [memoryview(buf)])
        return bytes(buf[:n])

    offsets = list(range(0, 1 << 20, 37 * 4096))
    results = await asyncio.gather(*(read(o) for o in offsets))
    for offset, got in zip(offsets, results, strict=True):
        assert got == data[offset : offset + 4096]
    assert origin.stats()["open_files"] == 1
