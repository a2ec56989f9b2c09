"""Message originals inside the SQLite file, beside their events (`[storage] blobs = "database"`).

Written by the event recorder in the same transaction as the events (one fsync for both);
this class reads, deletes and, for direct callers, stores them.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sourceauth.adapters.storage.blobs import (
    BlobCorrupt,
    BlobNotFound,
    BlobRef,
    BlobStoreError,
    _check,
)
from sourceauth.adapters.storage.sqlite import BLOB_TABLE, CREATE_BLOB_TABLE


class DatabaseBlobStore:
    """The blob interface of FileBlobStore over the `sa_blob_data` table."""

    in_transaction_with_events = True  # the inbound committer hands blobs to the event save

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._conn.execute(CREATE_BLOB_TABLE)
        except sqlite3.Error as exc:
            raise BlobStoreError(f"cannot open blob table in {self.path}: {exc}") from exc

    @staticmethod
    def ref(key: str, data: bytes) -> BlobRef:
        _check(key)
        return BlobRef(key, len(data), hashlib.sha256(data).hexdigest())

    def put(self, key: str, data: bytes) -> BlobRef:
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[BlobRef]:
        refs = [self.ref(k, d) for k, d in items]
        with self._write(f"cannot store {len(items)} blob(s)") as conn:
            conn.executemany(
                f"INSERT INTO {BLOB_TABLE} (receipt_id, data) VALUES (?, ?) "
                "ON CONFLICT (receipt_id) DO NOTHING",
                list(items),
            )
        return refs

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite errors become BlobStoreError (the SMTP side: 4xx)."""
        try:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise BlobStoreError(f"{what}: {exc}") from exc

    def get(self, key: str, *, verify_sha256: str | None = None) -> bytes:
        _check(key)
        try:
            with self._lock:
                row = self._conn.execute(
                    f"SELECT data FROM {BLOB_TABLE} WHERE receipt_id = ?", (key,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise BlobStoreError(f"blob {key} unreadable: {exc}") from exc
        if row is None:
            raise BlobNotFound(key)
        data = bytes(row[0])
        if verify_sha256 is not None and hashlib.sha256(data).hexdigest() != verify_sha256:
            raise BlobCorrupt(f"blob {key} does not match its recorded SHA-256")
        return data

    def exists(self, key: str) -> bool:
        _check(key)
        with self._lock:
            row = self._conn.execute(
                f"SELECT 1 FROM {BLOB_TABLE} WHERE receipt_id = ?", (key,)
            ).fetchone()
        return row is not None

    def delete(self, key: str) -> bool:
        return self.delete_many([key]) > 0

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete several originals in one transaction; how many were there."""
        for key in keys:
            _check(key)
        with self._write(f"cannot delete {len(keys)} blob(s)") as conn:
            sql = f"DELETE FROM {BLOB_TABLE} WHERE receipt_id = ?"
            return sum(conn.execute(sql, (key,)).rowcount for key in keys)

    def keys(self) -> Iterator[str]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT receipt_id FROM {BLOB_TABLE} ORDER BY receipt_id"
            ).fetchall()
        return iter([str(r[0]) for r in rows])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
