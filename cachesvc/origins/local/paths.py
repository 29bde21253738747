"""Path operations under LocalOrigin's root, for its worker threads:
confined resolution, opening, stat, listing and removal of files, and the
temporary files behind atomic replacement.

Confinement. Nothing outside the root is ever opened. A path is resolved one
component at a time from a descriptor of the root: each directory with
``O_PATH | O_DIRECTORY | O_NOFOLLOW`` relative to its parent, the final name
with ``O_NOFOLLOW``. A symbolic link anywhere in a path is refused with
OriginPermissionDenied whatever it points to (inside or outside the root,
existing or not): its target is never looked at, so the answer cannot reveal
anything about it. Names ``''``, ``'.'``, ``'..'`` and names with a NUL are
refused the same way (``'/'`` only separates names). Only regular files are
served: the final name is checked with lstat before it is opened, so a device
is never opened; it is opened with ``O_NONBLOCK`` (a FIFO swapped in
meanwhile cannot block a worker) and checked again with fstat. Anything else
is OriginNotFound, as is a file where a directory is expected.

Temporary files. A replacement is written to ``.<name>.cachesvc-tmp-<hex>``
next to its target, fsynced, renamed over the target and the directory
fsynced; listings hide those names. Creating a file or a directory and
removing a file fsync the directory that changed.

Every function here blocks and raises OSError as the system calls do (the
symbolic-link refusal is ELOOP, anything but a regular file ENOENT);
LocalOrigin maps errno values to OriginErrors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import stat as statmod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cachesvc.origins.base import DirEntry, OriginPermissionDenied
from cachesvc.origins.local.fileio import copy_range, fsync_dir_at, pwritev_all

TEMP_MARKER = ".cachesvc-tmp-"
_TEMP_STEM_BYTES = 200  # Keeps temporary names under NAME_MAX (255 bytes).
_TEMP_NAME = re.compile(r"\..*" + re.escape(TEMP_MARKER) + r"[0-9a-f]{16}", re.DOTALL)

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def split_path(path: str) -> list[str]:
    """The names of an origin-relative path; OriginPermissionDenied if one is not a plain name."""
    names = path.split("/")
    for name in names:
        if name in ("", ".", "..") or "\0" in name:
            raise OriginPermissionDenied(f"{path!r}: not a valid origin path")
    return names


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary files (hidden from listings)."""
    return _TEMP_NAME.fullmatch(name) is not None


def _temp_name(name: str) -> str:
    stem = name.encode("utf-8", "surrogateescape")[:_TEMP_STEM_BYTES].decode("utf-8", "ignore")
    return f".{stem}{TEMP_MARKER}{secrets.token_hex(8)}"


def _symlink_refused() -> OSError:
    return OSError(errno.ELOOP, "symbolic links are not followed")


def require_regular(st: os.stat_result) -> None:
    """Raises the OSError we report for anything but a regular file."""
    if statmod.S_ISLNK(st.st_mode):
        raise _symlink_refused()
    if not statmod.S_ISREG(st.st_mode):
        raise OSError(errno.ENOENT, "not a regular file")


def _open_dir(root_fd: int, names: Sequence[str], *, create: bool = False) -> int:
    """An O_PATH descriptor of directory ``names`` (caller closes), resolved
    without following symbolic links; with ``create``, makes missing ones."""
    fd = os.dup(root_fd)
    try:
        for name in names:
            sub = _open_subdir(fd, name, create)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_subdir(dir_fd: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError:
        # O_DIRECTORY | O_NOFOLLOW fails alike for a link and a file.
        if statmod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise _symlink_refused() from None
        raise
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, dir_fd=dir_fd)
    except FileExistsError:
        pass  # made meanwhile
    else:
        fsync_dir_at(dir_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _open_in(parent: int, name: str, *, write: bool, create: bool) -> int:
    """Opens regular file ``name`` in ``parent``; with ``create`` (and
    ``write``), creates it if missing and fsyncs ``parent``."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        if not create:
            raise
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS
        try:
            fd = os.open(name, flags, 0o666, dir_fd=parent)
        except FileExistsError:
            pass  # created meanwhile: open it like any other
        else:
            try:
                fsync_dir_at(parent)
            except BaseException:
                os.close(fd)
                raise
            return fd
    else:
        require_regular(st)
    return os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _FILE_FLAGS, dir_fd=parent)


def open_file(
    root_fd: int, names: list[str], *, write: bool, create: bool
) -> tuple[int, os.stat_result]:
    """Opens regular file ``names`` (see _open_in) in blocking mode; returns the
    descriptor (caller closes) and its fstat."""
    parent = _open_dir(root_fd, names[:-1], create=create)
    try:
        fd = _open_in(parent, names[-1], write=write, create=create)
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        require_regular(st)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def stat_file(root_fd: int, names: list[str]) -> os.stat_result:
    """The lstat of regular file ``names``."""
    parent = _open_dir(root_fd, names[:-1])
    try:
        st = os.stat(names[-1], dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)
    require_regular(st)
    return st


def list_entries(root_fd: int, names: list[str]) -> list[DirEntry]:
    """The files and directories in directory ``names``, by name (see _listable_name)."""
    parent = _open_dir(root_fd, names)
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)
    entries = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                if not _listable_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                if statmod.S_ISDIR(st.st_mode) or statmod.S_ISREG(st.st_mode):
                    is_dir = statmod.S_ISDIR(st.st_mode)
                    entries.append(DirEntry(entry.name, is_dir, st.st_size, st.st_mtime_ns / 1e9))
    finally:
        os.close(fd)
    entries.sort(key=lambda e: e.name)
    return entries


def _listable_name(name: str) -> bool:
    """Not a temporary file, and addressable through the API (valid UTF-8)."""
    if is_temp_name(name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def remove_file(root_fd: int, names: list[str]) -> None:
    """Unlinks regular file ``names`` and fsyncs its directory."""
    parent = _open_dir(root_fd, names[:-1])
    try:
        require_regular(os.stat(names[-1], dir_fd=parent, follow_symlinks=False))
        os.unlink(names[-1], dir_fd=parent)
        fsync_dir_at(parent)
    finally:
        os.close(parent)


@dataclass(eq=False, slots=True)
class TempFile:
    """A temporary file being written for replace() or rewrite().

    Its jobs run one after another; each field is written by a job thread and
    read by the next job, except ``last``, which is loop thread only.
    """

    names: list[str]  # Immutable: the target's path.
    parent: int = -1  # O_PATH descriptor of the target's directory.
    fd: int = -1  # The temporary file.
    name: str = ""  # Its name in parent; '' once renamed over the target (or never created).
    old: int = -1  # rewrite(): the current target, -1 if none.
    old_size: int = 0
    last: asyncio.Future[Any] | None = None  # The last job submitted for this file.


def open_temp(temp: TempFile, root_fd: int, keep_old: bool) -> None:
    """Creates the temporary file next to the target (and missing directories);
    with ``keep_old``, also opens the current target for copy_old."""
    name = temp.names[-1]
    temp.parent = _open_dir(root_fd, temp.names[:-1], create=True)
    mode = None
    try:
        st = os.stat(name, dir_fd=temp.parent, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        require_regular(st)
        mode = statmod.S_IMODE(st.st_mode) & 0o777
        if keep_old:
            temp.old = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=temp.parent)
            old = os.fstat(temp.old)
            require_regular(old)
            os.set_blocking(temp.old, True)
            temp.old_size = old.st_size
    tmp_name = _temp_name(name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    temp.fd = os.open(tmp_name, flags, 0o666, dir_fd=temp.parent)
    temp.name = tmp_name
    if mode is not None:
        # Keep the old permission bits where the filesystem lets us.
        with contextlib.suppress(PermissionError):
            os.fchmod(temp.fd, mode)


def write_temp(temp: TempFile, offset: int, buffers: Sequence[memoryview | bytes]) -> int:
    """Writes ``buffers`` at ``offset`` of the temporary file; returns bytes written."""
    return pwritev_all(temp.fd, offset, buffers)


def copy_old(temp: TempFile, size: int) -> None:
    """Copies the old content below ``size`` into the temporary file and sets its size."""
    end = min(temp.old_size, size) if temp.old >= 0 else 0
    copy_range(temp.old, temp.fd, end)
    os.ftruncate(temp.fd, size)


def commit_temp(temp: TempFile) -> os.stat_result:
    """fsyncs the temporary file, renames it over the target and fsyncs the
    directory; returns the new file's stat."""
    os.fsync(temp.fd)
    st = os.fstat(temp.fd)
    os.rename(temp.name, temp.names[-1], src_dir_fd=temp.parent, dst_dir_fd=temp.parent)
    temp.name = ""
    fsync_dir_at(temp.parent)
    return st


def drop_temp(temp: TempFile) -> None:
    """Unlinks the temporary file unless renamed, and closes its descriptors."""
    if temp.name:
        with contextlib.suppress(OSError):
            os.unlink(temp.name, dir_fd=temp.parent)
    for fd in (temp.fd, temp.old, temp.parent):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
