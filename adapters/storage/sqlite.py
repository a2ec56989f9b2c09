"""The embedded event store: eventsourcing's SQLite recorder with pragmas chosen by measurement.

Selected with PERSISTENCE_MODULE=adapters.storage.sqlite:TunedSQLiteFactory; SQLITE_SYNCHRONOUS
picks FULL (fsync every commit, the default: a 250 survives power loss) or NORMAL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import InterfaceError, StoredEvent
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteCursor,
    SQLiteFactory,
)
from eventsourcing.utils import Environment

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
DEFAULT_LOCK_TIMEOUT = 30


class TunedSQLiteConnectionPool(SQLiteConnectionPool):
    """Every connection gets the same pragmas (synchronous is per connection in SQLite)."""

    def __init__(self, *, synchronous: str, **kwargs: Any) -> None:
        self.synchronous = synchronous
        super().__init__(**kwargs)

    def _create_connection(self) -> SQLiteConnection:
        conn = super()._create_connection()
        raw: sqlite3.Connection = conn._sqlite_conn
        try:
            raw.execute(f"PRAGMA synchronous={self.synchronous}")
            # 16 MiB page cache per connection and no mmap: measured (benchmarks/memory.py),
            # a 256 MiB mmap put every page a lookup touched into resident memory (+275 MB
            # at 1 M senders); this keeps RSS within a few MB of an empty store.
            raw.execute("PRAGMA cache_size=-16384")
            raw.execute("PRAGMA temp_store=MEMORY")
            raw.execute("PRAGMA mmap_size=0")
        except sqlite3.Error as exc:
            raise InterfaceError(exc) from exc
        return conn


BLOB_TABLE = "sa_blob_data"
CREATE_BLOB_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {BLOB_TABLE} (receipt_id TEXT PRIMARY KEY, data BLOB NOT NULL)"
)


class BlobRecordingSQLiteRecorder(SQLiteApplicationRecorder):
    """The application recorder, plus message originals written in the same transaction as
    their events (`save(..., blobs=[(key, bytes), ...])`): one fsync makes both durable."""

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            CREATE_BLOB_TABLE,
        ]

    def _insert_events(
        self,
        c: SQLiteCursor,
        stored_events: Sequence[StoredEvent],
        *,
        blobs: Sequence[tuple[str, bytes]] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        if blobs:
            c.executemany(
                f"INSERT INTO {BLOB_TABLE} (receipt_id, data) VALUES (?, ?) "
                "ON CONFLICT (receipt_id) DO NOTHING",
                blobs,
            )
        return super()._insert_events(c, stored_events, **kwargs)


class TunedSQLiteFactory(SQLiteFactory):
    SQLITE_SYNCHRONOUS = "SQLITE_SYNCHRONOUS"
    application_recorder_class = BlobRecordingSQLiteRecorder

    def __init__(self, env: Environment | Any) -> None:
        if not (env.get(self.SQLITE_LOCK_TIMEOUT) or "").strip():
            env[self.SQLITE_LOCK_TIMEOUT] = str(DEFAULT_LOCK_TIMEOUT)
        super().__init__(env)
        synchronous = (self.env.get(self.SQLITE_SYNCHRONOUS) or "FULL").upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise OSError(
                f"SQLITE_SYNCHRONOUS must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}"
            )
        old = self.datastore.pool
        self.datastore.pool = TunedSQLiteConnectionPool(
            synchronous=synchronous,
            db_name=old.db_name,
            lock_timeout=old.lock_timeout,
        )
        old.close()
