"""`sourceauth backup FILE` and `sourceauth restore FILE` for the embedded SQLite store.

A backup is one SQLite file: a consistent copy of the store taken with SQLite's online backup
API (`serve` keeps running), plus what is needed to read it: the keyring (every sender id and
token derives from it), the originals when they live in files, and what took it. It is as
secret as the keyring: written 0600. On PostgreSQL, use pg_dump and keep the keyring
(docs/operations.md).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sourceauth.adapters.config import Config
from sourceauth.adapters.durable import (
    fsync_all,
    fsync_dir,
    replace_file,
    scratch_path,
    unlink_quietly,
)
from sourceauth.adapters.status import version
from sourceauth.adapters.storage.blobs import FileBlobStore
from sourceauth.adapters.storage.figures import reader, require_store
from sourceauth.adapters.storage.wiring import Storage
from sourceauth.engine.logs import get_logger

log = get_logger(__name__)

FORMAT = 1
META = "sa_backup"  # key -> value: what the backup is and what reads it
FILES = "sa_backup_blobs"  # originals kept as files by the store, copied in


class BackupError(Exception):
    """A backup or restore that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class BackupSummary:
    path: Path
    events: int
    size: int
    blobs_copied: int
    blobs_missing: int

    def line(self) -> str:
        extra = f", {self.blobs_copied} original files" if self.blobs_copied else ""
        missing = (
            f", {self.blobs_missing} originals already collected" if self.blobs_missing else ""
        )
        return f"{self.path}: {self.events} events, {self.size} bytes{extra}{missing}"


@dataclass(frozen=True)
class RestoreSummary:
    store: Path
    events: int
    originals: int
    taken_at: float
    backup_version: str


def _sqlite_only(storage: Storage, verb: str) -> Path:
    if storage.kind != "sqlite" or storage.sqlite_path is None:
        raise BackupError(
            f"{verb} works on the SQLite store; on PostgreSQL use pg_dump / pg_restore and keep "
            "the secret file with the dump (docs/operations.md)"
        )
    return Path(storage.sqlite_path)


def _keyring_text(cfg: Config, environ: Mapping[str, str]) -> str:
    if cfg.challenge.secret_env in environ:
        return environ[cfg.challenge.secret_env]
    assert cfg.challenge.secret_file is not None
    try:
        return cfg.challenge.secret_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise BackupError(
            f"cannot read the secret file {cfg.challenge.secret_file} ({exc.strerror}); "
            "a backup without it cannot be read"
        ) from None


def _events(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%events'"
    ).fetchone()
    if row is None:
        return 0
    return int(conn.execute(f'SELECT COUNT(*) FROM "{row[0]}"').fetchone()[0])


def backup(
    cfg: Config, storage: Storage, target: Path, environ: Mapping[str, str]
) -> BackupSummary:
    """Write a consistent copy of the live store, with its keyring, to `target` (a new file)."""
    _sqlite_only(storage, "backup")
    require_store(storage)
    if target.exists():
        raise BackupError(f"{target} exists; name a new file")
    if not target.parent.is_dir():
        raise BackupError(f"no directory {target.parent}")
    keyring = _keyring_text(cfg, environ)
    scratch = scratch_path(target)
    try:
        os.close(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        source = reader(storage)()
        dest = sqlite3.connect(scratch, isolation_level=None)
        try:
            # One step: the whole database under one read transaction, so the copy is one
            # committed state; in WAL mode writers go on meanwhile.
            source.backup(dest)
            dest.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal
            copied, missing = _copy_files(storage, dest)
            dest.execute(f"CREATE TABLE {META} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            meta = {
                "format": str(FORMAT),
                "version": version(),
                "taken_at": str(time.time()),
                "source": str(storage.sqlite_path),
                "blobs": storage.blob_location,
                "keyring": keyring,
            }
            dest.executemany(f"INSERT INTO {META} VALUES (?, ?)", list(meta.items()))
            events = _events(dest)
        finally:
            source.close()
            dest.close()
        fsync_all([scratch])
        os.link(scratch, target)  # never replaces a file that appeared meanwhile
    except FileExistsError:
        raise BackupError(f"{target} exists; name a new file") from None
    except (OSError, sqlite3.Error) as exc:
        raise BackupError(f"cannot write {target}: {exc}") from exc
    finally:
        unlink_quietly(scratch)
    fsync_dir(target.parent)
    summary = BackupSummary(target, events, target.stat().st_size, copied, missing)
    log.info("backup_written", path=str(target), events=events, size=summary.size)
    return summary


def _copy_files(storage: Storage, dest: sqlite3.Connection) -> tuple[int, int]:
    """Originals kept as files go into the backup, after the database copy: every original
    its events name was durable before they committed. One collected meanwhile is counted."""
    if storage.blob_location != "files":
        return 0, 0
    dest.execute(f"CREATE TABLE {FILES} (receipt_id TEXT PRIMARY KEY, data BLOB NOT NULL)")
    store = FileBlobStore(storage.blob_dir)
    copied = missing = 0
    dest.execute("BEGIN")
    for key in store.keys():
        try:
            data = store.get(key)
        except (KeyError, OSError):
            missing += 1
            continue
        dest.execute(f"INSERT INTO {FILES} VALUES (?, ?)", (key, data))
        copied += 1
    dest.execute("COMMIT")
    return copied, missing


def _refuse_if_in_use(store: Path) -> None:
    """BackupError when another process has the store open (a running `serve`): in WAL mode
    an exclusive lock is granted only to a connection that is alone on the file."""
    conn = sqlite3.connect(store, isolation_level=None, timeout=1.0)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError:
        raise BackupError(
            f"the store at {store} is in use (is `sourceauth serve` running?): stop it first"
        ) from None
    finally:
        conn.close()


def _read_meta(source: Path) -> dict[str, str]:
    if not source.is_file():
        raise BackupError(f"no backup file {source}")
    try:
        conn = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute(f"SELECT key, value FROM {META}").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        raise BackupError(f"{source} is not a sourceauth backup") from None
    meta = {str(k): str(v) for k, v in rows}
    if meta.get("format") != str(FORMAT):
        raise BackupError(
            f"{source}: backup format {meta.get('format')!r}, this version reads {FORMAT}"
        )
    return meta


def restore(
    cfg: Config, storage: Storage, source: Path, *, force: bool, environ: Mapping[str, str]
) -> RestoreSummary:
    """Put a backup in place of the configured store and secret file.

    An existing store, or a different secret file, is replaced only with `force`; what is
    replaced is kept beside it as NAME.before-restore-TIMESTAMP. Stop `serve` first."""
    target = _sqlite_only(storage, "restore")
    meta = _read_meta(source)
    if meta["blobs"] != storage.blob_location:
        raise BackupError(
            f"the backup keeps originals in {meta['blobs']!r} but [storage] blobs is "
            f"{storage.blob_location!r}: set blobs = {meta['blobs']!r} to restore it"
        )
    secret = cfg.challenge.secret_file
    assert secret is not None
    keyring = meta["keyring"]
    secret_differs = secret.exists() and secret.read_text(encoding="utf-8") != keyring
    if cfg.challenge.secret_env in environ and environ[cfg.challenge.secret_env] != keyring:
        raise BackupError(
            f"{cfg.challenge.secret_env} holds another keyring than the backup: "
            "set it to the backup's keyring, or unset it"
        )
    if not force:
        if target.exists():
            raise BackupError(
                f"a store exists at {target}: restore --force replaces it "
                "(stop `sourceauth serve` first; the old one is kept beside it)"
            )
        if secret_differs:
            raise BackupError(
                f"another secret file is at {secret}: restore --force replaces it "
                "(the old one is kept beside it)"
            )
    if target.exists():
        _refuse_if_in_use(target)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = scratch_path(target)
    try:
        os.close(os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        src = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True)
        dest = sqlite3.connect(scratch, isolation_level=None)
        try:
            src.backup(dest)
            originals = dest.execute(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (FILES,)
            ).fetchone()[0]
            files = (
                dest.execute(f"SELECT receipt_id, data FROM {FILES}").fetchall()
                if originals
                else []
            )
            dest.execute(f"DROP TABLE IF EXISTS {FILES}")
            dest.execute(f"DROP TABLE {META}")
            if files:
                dest.execute("VACUUM")  # give back the pages the originals took
            dest.execute("PRAGMA journal_mode=WAL")
            events = _events(dest)
        finally:
            src.close()
            dest.close()
        fsync_all([scratch])
        kept, existed = f"{target.name}.before-restore-{stamp}", target.exists()
        for suffix in ("", "-wal", "-shm"):  # the old store moves aside whole, WAL and all
            old = target.with_name(target.name + suffix)
            if existed and old.exists():
                os.replace(old, target.with_name(kept + suffix))
            else:
                unlink_quietly(old)
        os.replace(scratch, target)
        fsync_dir(target.parent)
    except (OSError, sqlite3.Error) as exc:
        raise BackupError(f"cannot restore into {target}: {exc}") from exc
    finally:
        unlink_quietly(scratch)
    if files:
        FileBlobStore(storage.blob_dir).put_many([(str(k), bytes(v)) for k, v in files])
    if secret_differs:
        os.replace(secret, secret.with_name(f"{secret.name}.before-restore-{stamp}"))
    if cfg.challenge.secret_env not in environ and not secret.exists():
        secret.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_file(secret, keyring.encode("utf-8"), mode=0o600)
    summary = RestoreSummary(target, events, len(files), float(meta["taken_at"]), meta["version"])
    log.info("backup_restored", path=str(source), store=str(target), events=events)
    return summary
