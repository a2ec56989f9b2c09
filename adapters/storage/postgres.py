"""The PostgreSQL event store: eventsourcing's recorder, plus two things written in the
events' own transaction (under the table lock that already orders their commits): message
originals (`[storage] blobs = "database"`, the default: nodes need no shared file system) and
the audit chain. `PostgresBlobStore` is the BlobStore port over the originals' table.

Selected with PERSISTENCE_MODULE=sourceauth.adapters.storage.postgres:ChainedPostgresFactory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    InterfaceError,
    OperationalError,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore, PostgresFactory
from psycopg import Connection, Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from sourceauth.adapters.storage.blobs import blob_ref, check_key
from sourceauth.adapters.storage.capcount import CapCounter, create_statements
from sourceauth.adapters.storage.chain import (
    CHAIN_TABLE,
    GENESIS,
    check_extends,
    keyed,
    last_digest,
    links,
)
from sourceauth.adapters.storage.sqlite import BLOB_TABLE
from sourceauth.adapters.storage.views import DDL_LOCK
from sourceauth.engine.api import Blob
from sourceauth.engine.ports import (
    BlobCorrupt,
    BlobNotFound,
    BlobStoreUnavailable,
    CapClaim,
    StagedBlobs,
)

BACKLOG_PAGE = 5000


class BlobRecordingPostgresRecorder(PostgresApplicationRecorder):
    """The application recorder, plus message originals written in the transaction of their
    events: a 250 then means both are committed, on whichever node reads them later."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{table} "
                "(receipt_id text PRIMARY KEY, data bytea NOT NULL)"
            ).format(schema=Identifier(datastore.schema), table=Identifier(BLOB_TABLE))
        )
        self._insert_blob = SQL(
            "INSERT INTO {schema}.{table} (receipt_id, data) VALUES (%s, %s) "
            "ON CONFLICT (receipt_id) DO NOTHING"
        ).format(schema=Identifier(datastore.schema), table=Identifier(BLOB_TABLE))
        prefix = Identifier(datastore.schema).as_string(None) + "."
        self.sql_create_statements.extend(SQL(s) for s in create_statements(prefix, "float8"))  # type: ignore[arg-type]
        self.cap_counter: CapCounter | None = CapCounter(prefix, "%s")

    def _create_table(self, curs: Cursor[DictRow]) -> None:
        # Serialized with every other process creating this schema's tables (the views take
        # the same lock): concurrent CREATE OR REPLACE FUNCTION fails otherwise.
        curs.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", (DDL_LOCK + self.datastore.schema,)
        )
        super()._create_table(curs)

    def _insert_events(
        self,
        curs: Cursor[Any],
        stored_events: Sequence[Any],
        *,
        blobs: Sequence[tuple[str, bytes]] = (),
        caps: CapClaim | None = None,
        **kwargs: Any,
    ) -> None:
        if caps is not None and self.cap_counter is not None:
            # The lock eventsourcing takes next, taken first: the counts read are the last
            # committed, and no other node counts before this transaction ends.
            self._lock_table(curs)
            self.cap_counter.count(curs, caps)
        if blobs:
            curs.executemany(self._insert_blob, list(blobs))
        super()._insert_events(curs, stored_events, **kwargs)


class ChainedPostgresRecorder(BlobRecordingPostgresRecorder):
    """With a chain key attached, every event's link of the audit chain is written in the
    transaction that inserts it (eventsourcing holds the events table's EXCLUSIVE lock there,
    so links follow commit order even with several nodes writing)."""

    chain_key: bytes | None = None
    _mac: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        schema = Identifier(self.datastore.schema)
        chain = SQL("{0}.{1}").format(schema, Identifier(CHAIN_TABLE))
        events = SQL("{0}.{1}").format(schema, Identifier(self.events_table_name))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {0} (position bigint PRIMARY KEY, links bytea NOT NULL)"
            ).format(chain)
        )
        self._head_sql = SQL(
            "SELECT position, links FROM {0} ORDER BY position DESC LIMIT 1"
        ).format(chain)
        self._insert_link_sql = SQL("INSERT INTO {0} (position, links) VALUES (%s, %s)").format(
            chain
        )
        self._page_sql = SQL(
            "SELECT position, links FROM {0} WHERE position > %s ORDER BY position LIMIT %s"
        ).format(chain)
        self._backlog_sql = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {0} "
            "WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
        ).format(events)
        self._ids_sql = SQL(
            "SELECT originator_id FROM {0} WHERE originator_id BETWEEN %s AND %s "
            "AND originator_version = 1 ORDER BY originator_id LIMIT %s"
        ).format(events)

    def _fetch_ids_after_insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        positions = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        if self.chain_key is not None and positions:
            self._chain(curs, stored_events, positions)
        return positions

    def _chain(
        self, curs: Cursor[DictRow], events: Sequence[StoredEvent], positions: Sequence[int]
    ) -> None:
        curs.execute(self._head_sql, prepare=True)
        row = curs.fetchone()
        check_extends(row["position"] if row else 0, positions)
        previous = last_digest(row["links"]) if row else GENESIS
        packed, _ = links(self._mac, previous, events, positions)
        curs.execute(self._insert_link_sql, (positions[-1], packed), prepare=True)

    def attach_chain(self, key: bytes) -> None:
        """Chain every event written from now on; first chain any written before the chain
        existed (a store from an older version), oldest first."""
        self.chain_key, self._mac = key, keyed(key)
        while True:
            with self.datastore.transaction(commit=True) as curs:
                self._lock_table(curs)
                curs.execute(self._head_sql)
                row = curs.fetchone()
                curs.execute(self._backlog_sql, (row["position"] if row else 0, BACKLOG_PAGE))
                rows = curs.fetchall()
                if not rows:
                    return
                events = [
                    StoredEvent(
                        originator_id=r["originator_id"],
                        originator_version=r["originator_version"],
                        topic=r["topic"],
                        state=bytes(r["state"]),
                    )
                    for r in rows
                ]
                self._chain(curs, events, [r["notification_id"] for r in rows])

    def chain_page(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Rows of the chain (last position, packed links) after `after`, oldest first."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._page_sql, (after, limit))
            return [(r["position"], bytes(r["links"])) for r in curs.fetchall()]

    def chain_head(self) -> tuple[int, bytes] | None:
        """The last chained position and its digest."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._head_sql)
            row = curs.fetchone()
        return (row["position"], last_digest(row["links"])) if row else None

    def ids_between(self, low: str, high: str, limit: int) -> list[str]:
        """Aggregate ids (32 hex digits) from `low` to `high`: a prefix's candidates."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._ids_sql, (UUID(low), UUID(high), limit))
            return [r["originator_id"].hex for r in curs.fetchall()]


class DatabaseGone(PersistenceError):
    """Stopping, and PostgreSQL does not answer: given up without eventsourcing's retries
    (10 per call, each waiting up to the pool's timeout). Nothing accepted is lost: a 250
    is only sent after its commit, so what this fails was answered 4xx or not at all."""


STOP_WAIT = 2.0  # seconds a stopping node waits for a pooled connection


class StoppablePostgresDatastore(PostgresDatastore):
    """eventsourcing's datastore, which gives up fast once the node is stopping: after
    `begin_stop()` a call waits at most STOP_WAIT for a connection, and the first failure to
    reach the database makes every later call fail at once (DatabaseGone is not one of the
    errors eventsourcing retries). While the node serves, outages are retried as before."""

    stopping: threading.Event
    gone: threading.Event

    def begin_stop(self) -> None:
        self.pool.timeout = min(self.pool.timeout, STOP_WAIT)
        self.stopping.set()

    @contextmanager
    def get_connection(self) -> Iterator[Connection[DictRow]]:
        if not self.stopping.is_set():
            with super().get_connection() as conn:
                yield conn
            return
        if self.gone.is_set():
            raise DatabaseGone("stopping: the database did not answer")
        try:
            with super().get_connection() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            if self._answers():
                raise  # a busy pool or one dropped connection: eventsourcing retries it
            self.gone.set()
            raise DatabaseGone(f"stopping: the database does not answer ({exc})") from exc

    def _answers(self) -> bool:
        """Whether a fresh connection opens within STOP_WAIT (libpq counts whole seconds)."""
        import psycopg

        kwargs = self.pool.kwargs() if callable(self.pool.kwargs) else self.pool.kwargs
        params = {k: v for k, v in (kwargs or {}).items() if k != "row_factory"}
        try:
            psycopg.connect(**params, connect_timeout=max(2, int(STOP_WAIT))).close()
        except psycopg.Error:
            return False
        return True

    def close(self) -> None:
        if self.gone.is_set():
            self.pool.close(timeout=STOP_WAIT)  # (its reconnecting threads: not 5 s more)
            return
        super().close()


def begin_stop(app: Any) -> None:
    """The node is stopping: from now on its PostgreSQL calls give up fast when the database
    is gone (a no-op on SQLite)."""
    datastore = getattr(getattr(app, "recorder", None), "datastore", None)
    if isinstance(datastore, StoppablePostgresDatastore):
        datastore.begin_stop()


def database_gone(app: Any) -> bool:
    """Whether this engine's PostgreSQL does not answer a fresh connection now (False on
    SQLite): a stop that outlasts its deadline may then abandon what is stuck on it."""
    datastore = getattr(getattr(app, "recorder", None), "datastore", None)
    if isinstance(datastore, StoppablePostgresDatastore):
        return datastore.gone.is_set() or not datastore._answers()
    return False


class ChainedPostgresFactory(PostgresFactory):
    application_recorder_class = ChainedPostgresRecorder

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # eventsourcing builds its own PostgresDatastore: the same object, made stoppable.
        self.datastore.__class__ = StoppablePostgresDatastore
        assert isinstance(self.datastore, StoppablePostgresDatastore)
        self.datastore.stopping = threading.Event()
        self.datastore.gone = threading.Event()


class PostgresBlobStore:
    """The BlobStore port over the `sa_blob_data` table of the PostgreSQL event store.

    One connection, reopened after trouble; every database error is BlobStoreUnavailable
    (SMTP answers 4xx, delivery retries)."""

    def __init__(self, conninfo: str, schema: str = "", *, connect_timeout: int = 5) -> None:
        self.conninfo = conninfo
        self.schema = schema or "public"
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn: Connection[Any] | None = None
        self._table = SQL("{schema}.{table}").format(
            schema=Identifier(self.schema), table=Identifier(BLOB_TABLE)
        )

    def stage(self, items: Sequence[tuple[str, bytes]]) -> StagedBlobs:
        """Nothing is written here: the event recorder stores the originals in the
        transaction of their events."""
        return StagedBlobs(tuple(blob_ref(k, d) for k, d in items), with_events=tuple(items))

    @contextmanager
    def _cursor(self, what: str) -> Iterator[Cursor[Any]]:
        import psycopg

        try:
            with self._lock:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.conninfo, autocommit=False, connect_timeout=self.connect_timeout
                    )
                conn = self._conn
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        yield cur
                except psycopg.OperationalError:
                    conn.close()  # a broken connection: the next call opens a new one
                    raise
        except psycopg.Error as exc:
            raise BlobStoreUnavailable(f"{what}: {' '.join(str(exc).split())}") from exc

    def put(self, key: str, data: bytes) -> Blob:
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[Blob]:
        refs = [blob_ref(k, d) for k, d in items]
        with self._cursor(f"cannot store {len(items)} blob(s)") as cur:
            cur.executemany(
                SQL(
                    "INSERT INTO {} (receipt_id, data) VALUES (%s, %s) "
                    "ON CONFLICT (receipt_id) DO NOTHING"
                ).format(self._table),
                list(items),
            )
        return refs

    def get(self, key: str, *, verify_sha256: str | None = None) -> bytes:
        check_key(key)
        with self._cursor(f"cannot read blob {key}") as cur:
            row = cur.execute(
                SQL("SELECT data FROM {} WHERE receipt_id = %s").format(self._table), (key,)
            ).fetchone()
        if row is None:
            raise BlobNotFound(key)
        data = bytes(row[0])
        if verify_sha256 is not None and hashlib.sha256(data).hexdigest() != verify_sha256.lower():
            raise BlobCorrupt(f"blob {key} does not match its recorded SHA-256")
        return data

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._cursor(f"cannot read blob {key}") as cur:
            row = cur.execute(
                SQL("SELECT 1 FROM {} WHERE receipt_id = %s").format(self._table), (key,)
            ).fetchone()
        return row is not None

    def delete(self, key: str) -> bool:
        return self.delete_many([key]) > 0

    def delete_many(self, keys: Sequence[str]) -> int:
        for key in keys:
            check_key(key)
        if not keys:
            return 0
        with self._cursor(f"cannot delete {len(keys)} blob(s)") as cur:
            cur.execute(
                SQL("DELETE FROM {} WHERE receipt_id = ANY(%s)").format(self._table), (list(keys),)
            )
            return int(cur.rowcount)

    def replace_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> int:
        """Rewrite originals (key, old bytes, new bytes) in one transaction, each only if it
        still holds the old bytes (a purge meanwhile stays a purge); how many were rewritten."""
        for key, _, _ in items:
            check_key(key)
        done = 0
        with self._cursor(f"cannot rewrite {len(items)} blob(s)") as cur:
            sql = SQL("UPDATE {} SET data = %s WHERE receipt_id = %s AND data = %s")
            for key, old, new in items:
                cur.execute(sql.format(self._table), (new, key, old))
                done += int(cur.rowcount)
        return done

    def keys(self) -> Iterator[str]:
        with self._cursor("cannot list blobs") as cur:
            rows = cur.execute(
                SQL("SELECT receipt_id FROM {} ORDER BY receipt_id").format(self._table)
            ).fetchall()
        return iter([str(r[0]) for r in rows])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
