"""The PostgreSQL event store: eventsourcing's recorder, plus the audit chain written in the
events' own transaction (under the table lock that already orders their commits).

Selected with PERSISTENCE_MODULE=sourceauth.adapters.storage.postgres:ChainedPostgresFactory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresFactory
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from sourceauth.adapters.storage.chain import (
    CHAIN_TABLE,
    GENESIS,
    check_extends,
    keyed,
    last_digest,
    links,
)

BACKLOG_PAGE = 5000


class ChainedPostgresRecorder(PostgresApplicationRecorder):
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


class ChainedPostgresFactory(PostgresFactory):
    application_recorder_class = ChainedPostgresRecorder
