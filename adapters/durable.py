"""Durable file writes for every adapter: a file is fsync'd before it becomes visible under its
final name, and the directory that names it is fsync'd after, so a crash leaves it absent or whole.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

StrPath = str | os.PathLike[str]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Hard links are how a write stays "never overwrite"; some file systems lack them.
_LINK_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}

_FSYNC_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="durable-fsync")


def fsync_dir(path: StrPath) -> None:
    """Make the entries of a directory (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: StrPath, directory: bool) -> None:
    if directory:
        fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_all(paths: Sequence[StrPath], *, directory: bool = False) -> None:
    """fsync several files (or directories) at once: the file system commits them together,
    so a batch costs about one journal commit instead of one per file."""
    if len(paths) == 1:
        _fsync_path(paths[0], directory)
        return
    for future in [_FSYNC_POOL.submit(_fsync_path, p, directory) for p in paths]:
        future.result()


def unlink_quietly(path: StrPath) -> None:
    """Remove a file if it is there; cleanup after a failure must not hide the failure."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_new_file(path: StrPath, data: bytes, *, mode: int = 0o600, fsync: bool = True) -> None:
    """Create `path` (it must not exist), write all of `data` and fsync it (unless fsync=False,
    for callers that fsync a batch with `fsync_all`). On failure the file is removed again."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def write_once(
    path: StrPath, data: bytes, *, temp: StrPath | None = None, mode: int = 0o600
) -> bool:
    """Write `data` to `path` durably unless `path` already exists; True if this call wrote it.

    The bytes go to `temp` (default: a hidden name beside `path`), are fsync'd, then linked to
    `path`, which never replaces a file a racing writer put there first; the directory is then
    fsync'd. Where the file system has no hard links the temp file is renamed instead.
    """
    final = Path(path)
    scratch = Path(temp) if temp is not None else final.with_name(_temp_name(final.name))
    write_new_file(scratch, data, mode=mode)
    try:
        try:
            os.link(scratch, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _LINK_UNSUPPORTED:
                raise
            os.rename(scratch, final)
    finally:
        unlink_quietly(scratch)
    fsync_dir(final.parent)
    return True


def replace_file(path: StrPath, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` durably, replacing what is there: a reader sees the old file or
    the new one, whole (written beside it, fsync'd, renamed over it, directory fsync'd)."""
    final = Path(path)
    scratch = scratch_path(final)
    write_new_file(scratch, data, mode=mode)
    try:
        os.replace(scratch, final)
    except BaseException:
        unlink_quietly(scratch)
        raise
    fsync_dir(final.parent)


def scratch_path(final: StrPath) -> Path:
    """A hidden, unique name beside `final` for a file written before it takes that name."""
    path = Path(final)
    return path.with_name(_temp_name(path.name))


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
