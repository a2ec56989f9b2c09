"""Message originals in PostgreSQL, beside their events (`[storage] blobs = "database"`, the
default): nodes sharing the database need no shared file system.

The recorder writes the originals a `save(..., blobs=[(key, bytes), ...])` carries in the
same transaction as the events; `PostgresBlobStore` is the BlobStore port over that table.
Selected with PERSISTENCE_MODULE=sourceauth.adapters.storage.postgres:BlobPostgresFactory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore, PostgresFactory
from psycopg import Connection, Cursor
from psycopg.sql import SQL, Identifier

from sourceauth.adapters.storage.blobs import blob_ref, check_key
from sourceauth.adapters.storage.sqlite import BLOB_TABLE
from sourceauth.engine.api import Blob
from sourceauth.engine.ports import BlobCorrupt, BlobNotFound, BlobStoreUnavailable, StagedBlobs


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

    def _insert_events(
        self,
        curs: Cursor[Any],
        stored_events: Sequence[Any],
        *,
        blobs: Sequence[tuple[str, bytes]] = (),
        **kwargs: Any,
    ) -> None:
        if blobs:
            curs.executemany(self._insert_blob, list(blobs))
        super()._insert_events(curs, stored_events, **kwargs)


class BlobPostgresFactory(PostgresFactory):
    application_recorder_class = BlobRecordingPostgresRecorder


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
