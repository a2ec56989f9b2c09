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

from sourceauth.adapters.storage.capcount import CapCounter, create_statements
from sourceauth.adapters.storage.chain import (
    CHAIN_TABLE,
    GENESIS,
    check_extends,
    keyed,
    last_digest,
    links,
)
from sourceauth.engine.ports import CapClaim

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


CREATE_CHAIN_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {CHAIN_TABLE} (position INTEGER PRIMARY KEY, links BLOB NOT NULL)"
)
BACKLOG_PAGE = 5000


class BlobRecordingSQLiteRecorder(SQLiteApplicationRecorder):
    """The application recorder, plus message originals written in the same transaction as
    their events (`save(..., blobs=[(key, bytes), ...])`): one fsync makes both durable.
    With a chain key attached, every event's link of the audit chain is written there too."""

    chain_key: bytes | None = None
    _mac: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # None: the caps are counted per process only (the engine benchmark's baseline).
        self.cap_counter: CapCounter | None = CapCounter()

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            CREATE_BLOB_TABLE,
            CREATE_CHAIN_TABLE,
            *create_statements("", "REAL"),
        ]

    def _insert_events(
        self,
        c: SQLiteCursor,
        stored_events: Sequence[StoredEvent],
        *,
        blobs: Sequence[tuple[str, bytes]] = (),
        caps: CapClaim | None = None,
        **kwargs: Any,
    ) -> Sequence[int] | None:
        if blobs:
            c.executemany(
                f"INSERT INTO {BLOB_TABLE} (receipt_id, data) VALUES (?, ?) "
                "ON CONFLICT (receipt_id) DO NOTHING",
                blobs,
            )
        positions = super()._insert_events(c, stored_events, **kwargs)
        if caps is not None and self.cap_counter is not None:
            # After a write: this transaction holds the write lock and reads the last commit.
            self.cap_counter.count(c, caps)
        if self.chain_key is not None and positions:
            # After the insert: this transaction holds SQLite's write lock, so the head it
            # reads is the last one committed and no other writer can chain in between.
            self._chain(c, stored_events, positions)
        return positions

    def _chain(
        self, c: SQLiteCursor, events: Sequence[StoredEvent], positions: Sequence[int]
    ) -> None:
        c.execute(f"SELECT position, links FROM {CHAIN_TABLE} ORDER BY position DESC LIMIT 1")
        row = c.fetchone()
        check_extends(row[0] if row else 0, positions)
        packed, _ = links(self._mac, last_digest(row[1]) if row else GENESIS, events, positions)
        c.execute(
            f"INSERT INTO {CHAIN_TABLE} (position, links) VALUES (?, ?)", (positions[-1], packed)
        )

    def attach_chain(self, key: bytes) -> None:
        """Chain every event written from now on; first chain any written before the chain
        existed (a store from an older version), oldest first."""
        self.chain_key, self._mac = key, keyed(key)
        while True:
            with self.datastore.transaction(commit=True) as c:
                c.execute(f"DELETE FROM {CHAIN_TABLE} WHERE position < 0")  # take the write lock
                c.execute(f"SELECT MAX(position) FROM {CHAIN_TABLE}")
                head = c.fetchone()[0] or 0
                c.execute(
                    f"SELECT rowid, originator_id, originator_version, topic, state "
                    f"FROM {self.events_table_name} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (head, BACKLOG_PAGE),
                )
                rows = c.fetchall()
                if not rows:
                    return
                events = [
                    StoredEvent(
                        originator_id=self.convert_originator_id(r[1]),
                        originator_version=r[2],
                        topic=r[3],
                        state=r[4],
                    )
                    for r in rows
                ]
                self._chain(c, events, [r[0] for r in rows])

    def chain_page(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Rows of the chain (last position, packed links) after `after`, oldest first."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                f"SELECT position, links FROM {CHAIN_TABLE} WHERE position > ? "
                "ORDER BY position LIMIT ?",
                (after, limit),
            )
            return [(r[0], bytes(r[1])) for r in c.fetchall()]

    def chain_head(self) -> tuple[int, bytes] | None:
        """The last chained position and its digest."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"SELECT position, links FROM {CHAIN_TABLE} ORDER BY position DESC LIMIT 1")
            row = c.fetchone()
        return (row[0], last_digest(row[1])) if row else None

    def ids_between(self, low: str, high: str, limit: int) -> list[str]:
        """Aggregate ids (32 hex digits) from `low` to `high`: a prefix's candidates."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                f"SELECT originator_id FROM {self.events_table_name} "
                "WHERE originator_id BETWEEN ? AND ? AND originator_version = 1 "
                "ORDER BY originator_id LIMIT ?",
                (low, high, limit),
            )
            return [str(r[0]) for r in c.fetchall()]


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
