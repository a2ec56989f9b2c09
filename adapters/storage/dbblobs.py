"""Message originals inside the SQLite file, beside their events (`[storage] blobs = "database"`).

Written by the event recorder in the same transaction as the events (one fsync for both):
`stage` only hands them over; this class reads, deletes and, for direct callers, stores them.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sourceauth.adapters.storage.blobs import blob_ref, check_key
from sourceauth.adapters.storage.sqlite import BLOB_TABLE, CREATE_BLOB_TABLE
from sourceauth.engine.api import Blob
from sourceauth.engine.ports import BlobCorrupt, BlobNotFound, BlobStoreUnavailable, StagedBlobs


class DatabaseBlobStore:
    """The BlobStore port over the `sa_blob_data` table of the SQLite event store."""

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
            raise BlobStoreUnavailable(f"cannot open blob table in {self.path}: {exc}") from exc

    def stage(self, items: Sequence[tuple[str, bytes]]) -> StagedBlobs:
        """The port's stage: nothing is written here; the event recorder stores the originals
        in the transaction of their events, so one fsync makes both durable."""
        return StagedBlobs(tuple(blob_ref(k, d) for k, d in items), with_events=tuple(items))

    def put(self, key: str, data: bytes) -> Blob:
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[Blob]:
        refs = [blob_ref(k, d) for k, d in items]
        with self._write(f"cannot store {len(items)} blob(s)") as conn:
            conn.executemany(
                f"INSERT INTO {BLOB_TABLE} (receipt_id, data) VALUES (?, ?) "
                "ON CONFLICT (receipt_id) DO NOTHING",
                list(items),
            )
        return refs

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite errors become BlobStoreUnavailable (the SMTP side: 4xx)."""
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
            raise BlobStoreUnavailable(f"{what}: {exc}") from exc

    def get(self, key: str, *, verify_sha256: str | None = None) -> bytes:
        row = self._select("data", key)
        if row is None:
            raise BlobNotFound(key)
        data = row[0]
        assert isinstance(data, bytes)
        if verify_sha256 is not None and hashlib.sha256(data).hexdigest() != verify_sha256.lower():
            raise BlobCorrupt(f"blob {key} does not match its recorded SHA-256")
        return data

    def exists(self, key: str) -> bool:
        return self._select("1", key) is not None

    def _select(self, column: str, key: str) -> tuple[object, ...] | None:
        """One row of the blob table (or None); storage errors become BlobStoreUnavailable."""
        check_key(key)
        try:
            with self._lock:
                row: tuple[object, ...] | None = self._conn.execute(
                    f"SELECT {column} FROM {BLOB_TABLE} WHERE receipt_id = ?", (key,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise BlobStoreUnavailable(f"cannot read blob {key}: {exc}") from exc
        return row

    def delete(self, key: str) -> bool:
        return self.delete_many([key]) > 0

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete several originals in one transaction; how many were there."""
        for key in keys:
            check_key(key)
        with self._write(f"cannot delete {len(keys)} blob(s)") as conn:
            sql = f"DELETE FROM {BLOB_TABLE} WHERE receipt_id = ?"
            return sum(conn.execute(sql, (key,)).rowcount for key in keys)

    def replace_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Rewrite originals (key, old bytes, new bytes) in one transaction, each only if it
        still holds the old bytes (a purge meanwhile stays a purge); how many were rewritten."""
        for key, _, _ in items:
            check_key(key)
        with self._write(f"cannot rewrite {len(items)} blob(s)") as conn:
            sql = f"UPDATE {BLOB_TABLE} SET data = ? WHERE receipt_id = ? AND data = ?"
            return sum(conn.execute(sql, (new, key, old)).rowcount for key, old, new in items)

    def keys(self) -> Iterator[str]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT receipt_id FROM {BLOB_TABLE} ORDER BY receipt_id"
            ).fetchall()
        return iter([str(r[0]) for r in rows])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
