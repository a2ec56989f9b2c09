"""adapters/durable.py on a real temporary directory: whole files or none, never an overwrite."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from sourceauth.adapters.durable import fsync_all, fsync_dir, write_new_file, write_once


def test_write_once_writes_a_private_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    assert write_once(target, b"first") is True
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["secret"]


def test_write_once_never_replaces_what_is_there(tmp_path: Path) -> None:
    target = tmp_path / "mail"
    write_once(target, b"first")
    assert write_once(target, b"second", temp=tmp_path / "scratch") is False
    assert target.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["mail"]


def test_write_once_renames_where_hard_links_are_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "mail"
    assert write_once(target, b"data") is True
    assert target.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["mail"]


def test_write_once_fsyncs_the_file_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_once(tmp_path / "x", b"data")
    assert synced == ["file", "dir"]


def test_write_new_file_refuses_an_existing_path_and_cleans_up_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = tmp_path / "taken"
    existing.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_new_file(existing, b"other")
    assert existing.read_bytes() == b"keep"

    def disk_full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError) as failed:
        write_new_file(tmp_path / "partial", b"data")
    assert failed.value.errno == errno.ENOSPC
    assert not (tmp_path / "partial").exists()


def test_fsync_all_and_fsync_dir_accept_files_and_directories(tmp_path: Path) -> None:
    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    fsync_all(files)
    fsync_all([tmp_path, tmp_path / ".."], directory=True)
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
