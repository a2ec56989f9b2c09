"""The embedded event store: eventsourcing's SQLite recorder with pragmas chosen by measurement.

Selected with PERSISTENCE_MODULE=adapters.storage.sqlite:TunedSQLiteFactory; SQLITE_SYNCHRONOUS
picks FULL (fsync every commit, the default: a 250 survives power loss) or NORMAL.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from eventsourcing.persistence import InterfaceError
from eventsourcing.sqlite import (
    SQLiteConnection,
    SQLiteConnectionPool,
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
            raw.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
            raw.execute("PRAGMA temp_store=MEMORY")
            raw.execute("PRAGMA mmap_size=268435456")
        except sqlite3.Error as exc:
            raise InterfaceError(exc) from exc
        return conn


class TunedSQLiteFactory(SQLiteFactory):
    SQLITE_SYNCHRONOUS = "SQLITE_SYNCHRONOUS"

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
