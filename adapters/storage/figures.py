"""Operator figures read straight from the store: what the views say is held, pending and
queued; failures recorded in the log since a moment; the store's size. Read-only throughout.

`status` and the Prometheus endpoint read them on a connection of their own, never the engine's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, Mapper
from eventsourcing.utils import get_topic

from sourceauth.adapters.storage.views import TRACKING
from sourceauth.adapters.storage.wiring import Storage
from sourceauth.engine import projections as p
from sourceauth.engine.message import HELD_STATES, Message
from sourceauth.engine.sender import Sender

# The log events that are failures an operator alerts on.
FAILURE_TOPICS = {
    get_topic(Sender.ChallengeFailed): "challenges",
    get_topic(Message.DeliveryFailed): "deliveries",
}
PAGE = 2000


class StoreMissing(Exception):
    """There is no store where the configuration points (nothing was created)."""


@dataclass(frozen=True)
class QueueFigures:
    """What the views hold now."""

    held: int
    pending_challenges: int
    delivery_queue: int
    oldest_queued_at: float | None  # unix seconds of the oldest copy awaiting the next hop

    def oldest_age(self, now: float) -> float | None:
        return None if self.oldest_queued_at is None else max(0.0, now - self.oldest_queued_at)


def reader(storage: Storage) -> Callable[[], Any]:
    """A connection factory that never writes: SQLite opened read-only, or PostgreSQL."""
    if storage.kind == "sqlite":
        assert storage.sqlite_path is not None
        uri = f"{Path(storage.sqlite_path).absolute().as_uri()}?mode=ro"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30.0)

        return connect

    def connect_pg() -> Any:
        import psycopg

        conn = psycopg.connect(storage.conninfo(), autocommit=False)
        if storage.pg_schema:  # never CREATE SCHEMA here: a read creates nothing
            conn.execute(f'SET search_path TO "{storage.pg_schema}"')
            conn.commit()
        return conn

    return connect_pg


def require_store(storage: Storage) -> None:
    """StoreMissing unless the store exists (its views' tracking table); creates nothing."""
    if storage.kind == "sqlite":
        assert storage.sqlite_path is not None
        if not Path(storage.sqlite_path).is_file():
            raise StoreMissing(f"no store at {storage.sqlite_path}")
        where = str(storage.sqlite_path)
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    else:
        where = f"postgresql://{storage.pg_host}:{storage.pg_port}/{storage.pg_dbname}"
        query = "SELECT to_regclass(%s)"
    try:
        conn = reader(storage)()
    except Exception as exc:
        raise StoreMissing(f"cannot open the store at {where}: {exc}") from exc
    try:
        row = conn.execute(query, (TRACKING,)).fetchone()
    finally:
        conn.close()
    if not row or row[0] is None:
        raise StoreMissing(f"no sourceauth store at {where} (no {TRACKING} table)")


def _in(states: frozenset[str] | set[str]) -> str:
    return p.sql_in(states)


QUEUE_SQL = (
    f"SELECT (SELECT COUNT(*) FROM {p.QUARANTINE} WHERE state IN {_in(HELD_STATES)}), "
    f"(SELECT COUNT(*) FROM {p.CHALLENGES} WHERE outcome IN {_in(p.PENDING_OUTCOMES)}), "
    f"(SELECT COUNT(*) FROM {p.DELIVERY}), (SELECT MIN(queued_at) FROM {p.DELIVERY})"
)


def queue_figures(conn: Any) -> QueueFigures:
    """Held copies, pending challenges and the delivery queue, in one statement (one snapshot)."""
    cur = conn.cursor()
    try:
        cur.execute(QUEUE_SQL)
        held, pending, depth, oldest = cur.fetchone()
    finally:
        cur.close()
    if not isinstance(conn, sqlite3.Connection):
        conn.rollback()  # psycopg opened a transaction; end it so the next read sees new rows
    return QueueFigures(
        int(held), int(pending), int(depth), None if oldest is None else float(oldest)
    )


def store_size(storage: Storage, conn: Any) -> int:
    """Bytes the store takes: the SQLite file with its WAL (and the blob directory when
    originals are files), or the PostgreSQL tables of its schema with their indexes."""
    if storage.kind == "sqlite":
        assert storage.sqlite_path is not None
        path = Path(storage.sqlite_path)
        files = [path, path.with_name(path.name + "-wal")]
        size = sum(f.stat().st_size for f in files if f.exists())
    else:
        cur = conn.cursor()
        cur.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        )
        size = int(cur.fetchone()[0])
        cur.close()
        conn.rollback()
    if storage.blob_location == "files" and Path(storage.blob_dir).is_dir():
        size += sum(f.stat().st_size for f in Path(storage.blob_dir).rglob("*") if f.is_file())
    return size


def _at(mapper: Mapper[UUID], notification: Any) -> float:
    """When the event of this notification happened (unix seconds)."""
    return float(getattr(mapper.to_domain_event(notification), "timestamp").timestamp())  # noqa: B009


def _timestamp(recorder: ApplicationRecorder, mapper: Mapper[UUID], at: int) -> tuple[int, float]:
    found = recorder.select_notifications(start=at, limit=1)
    n = found[0]
    return n.id, _at(mapper, n)


def first_position_since(
    recorder: ApplicationRecorder, mapper: Mapper[UUID], since: float
) -> int | None:
    """The first log position whose event is at or after `since` (a binary search over the
    positions: log2(events) decodes, not a scan), or None if every event is older."""
    last = recorder.max_notification_id()
    if not last:
        return None
    if _timestamp(recorder, mapper, last)[1] < since:
        return None
    low, high = 1, last  # invariant: the first event read from `high` on is recent enough
    while low < high:
        middle = (low + high) // 2
        position, at = _timestamp(recorder, mapper, middle)
        if at >= since:
            high = middle
        else:
            low = position + 1
    return _timestamp(recorder, mapper, low)[0]


def _pages(recorder: ApplicationRecorder, start: int, topics: Sequence[str]) -> Iterator[Any]:
    position, inclusive = start, True
    while True:
        page = recorder.select_notifications(
            start=position, limit=PAGE, topics=topics, inclusive_of_start=inclusive
        )
        yield from page
        if len(page) < PAGE:
            return
        position, inclusive = page[-1].id, False


def failures_since(
    recorder: ApplicationRecorder, mapper: Mapper[UUID], since: float
) -> dict[str, int]:
    """Failed challenges and failed deliveries recorded at or after `since`."""
    counts = dict.fromkeys(FAILURE_TOPICS.values(), 0)
    start = first_position_since(recorder, mapper, since)
    if start is None:
        return counts
    for n in _pages(recorder, start, tuple(FAILURE_TOPICS)):
        if _at(mapper, n) >= since:
            counts[FAILURE_TOPICS[n.topic]] += 1
    return counts
