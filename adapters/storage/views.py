"""The four views (whitelist, quarantine, pending challenges, delivery queue) as SQL tables
beside the events, advanced by a pull loop whose tracking position commits with the rows.

Works on the SQLite file and on PostgreSQL; `rebuild()` drops the views and replays the log.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, Mapper

from sourceauth.adapters.storage.capcount import CAP_COUNTS, CAP_MAILBOXES, create_statements
from sourceauth.adapters.storage.fold import (  # log_pages: audit.py and tests read it here
    MemoryTables,
    decoded_pages,
    log_pages,  # noqa: F401
)
from sourceauth.adapters.storage.viewcrypt import ViewSealer
from sourceauth.engine import projections as p
from sourceauth.engine.api import ChallengeRow, DeliveryRow, HeldMessage, SenderView
from sourceauth.engine.collector import collector_paused
from sourceauth.engine.logs import get_logger
from sourceauth.engine.policy import TOTAL
from sourceauth.engine.rules import RuleView
from sourceauth.engine.service.caps import CHALLENGEABLE, CHALLENGED, DEFERRED_PREFIXES, HELD

log = get_logger(__name__)

TRACKING = "sa_tracking"
BLOB_GC = "sa_blob_gc"
CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL (a hung network: an error, not a hang)
KEYRING = "sa_keyring"  # fingerprints of the keyring every node on this store must share
LEASES = "sa_leases"  # outbound work claimed by one worker of one node until `until`
TRACKING_NAME = "views"
SEALED = "views:sealed"  # a tracking row: the views of this encrypted store are sealed
DDL_LOCK = "sourceauth-ddl:"  # + the schema: the advisory lock creating tables takes
PAGE = 2000
REBUILD_PAGE = 10000


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Dialect:
    """What differs between SQLite and PostgreSQL for these tables."""

    name = "sqlite"
    types = {"text": "TEXT", "real": "REAL", "int": "INTEGER"}

    def sql(self, statement: str) -> str:
        return statement

    def begin(self) -> str:
        return "BEGIN IMMEDIATE"

    def lock_tracking(self) -> str:
        return f"SELECT position FROM {TRACKING} WHERE name = ?"

    def lock_ddl(self) -> str | None:
        """A statement that serializes creating tables across processes (None: BEGIN
        IMMEDIATE already does)."""
        return None


class PostgresDialect(Dialect):
    name = "postgresql"
    types = {"text": "TEXT", "real": "DOUBLE PRECISION", "int": "BIGINT"}

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def begin(self) -> str:
        return "BEGIN"

    def lock_tracking(self) -> str:
        return f"SELECT position FROM {TRACKING} WHERE name = ? FOR UPDATE"

    def lock_ddl(self) -> str | None:
        # Nodes (and each node's two processes) starting at once would otherwise collide in
        # the catalog ("tuple concurrently updated"); the recorder takes the same lock.
        return f"SELECT pg_advisory_xact_lock(hashtext('{DDL_LOCK}' || current_schema()))"


def _pk(table: str) -> str:
    return p.TABLES[table][0][0]


def _split(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split("\n") if x)


class SqlViews:
    """ViewStore over one DB-API connection (sqlite3 or psycopg), guarded by a lock."""

    def __init__(
        self,
        connect: Callable[[], Any],
        dialect: Dialect,
        recorder: ApplicationRecorder,
        mapper: Mapper[UUID],
        sealer: ViewSealer | None = None,
    ) -> None:
        self._connect = connect
        # With an encryption key: mail text sealed at rest (viewcrypt.py); None costs nothing.
        self.sealer = sealer
        self.dialect = dialect
        self.recorder = recorder
        self.mapper = mapper
        self._lock = threading.RLock()
        self._conn = connect()
        self.projector = p.Projector(self._current_challenge)
        self._cur: Any = None
        self._statements: dict[tuple[str, str, tuple[str, ...]], str] = {}
        self.create_tables()
        if sealer is not None:
            self._adopt_sealing(sealer)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Any]:
        with self._lock:
            if getattr(self._conn, "closed", False):  # PostgreSQL dropped it (a restart, an
                self._conn = self._connect()  # outage): a new one, or the reason it fails
            cur = self._conn.cursor()
            if self.dialect.name == "sqlite":
                cur.execute(self.dialect.begin() if write else "BEGIN")
            try:
                self._cur = cur
                yield cur
            except BaseException:
                self._conn.rollback() if self.dialect.name != "sqlite" else cur.execute("ROLLBACK")
                raise
            else:
                if self.dialect.name == "sqlite":
                    cur.execute("COMMIT")
                else:
                    self._conn.commit()
            finally:
                self._cur = None

    def _x(self, cur: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self.dialect.sql(statement), tuple(params))
        return cur

    def _sql(self, kind: str, table: str, cols: tuple[str, ...]) -> str:
        """The statement for one row-operation shape, built once (the hot path of catch-up)."""
        key = (kind, table, cols)
        found = self._statements.get(key)
        if found is not None:
            return found
        pk = _pk(table)
        if kind == "upsert":
            sets = ", ".join(f"{c} = excluded.{c}" for c in cols)
            marks = ", ".join("?" * (len(cols) + 1))
            sql = (
                f"INSERT INTO {table} ({pk}, {', '.join(cols)}) VALUES ({marks}) "
                f"ON CONFLICT ({pk}) DO UPDATE SET {sets}"
            )
        elif kind == "update":
            sql = f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in cols)} WHERE {pk} = ?"
        elif kind == "add":
            sql = f"UPDATE {table} SET {', '.join(f'{c} = {c} + ?' for c in cols)} WHERE {pk} = ?"
        else:
            sql = f"DELETE FROM {table} WHERE {pk} = ?"
        found = self._statements[key] = self.dialect.sql(sql)
        return found

    def _rows(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._tx(write=False) as cur:
            return list(self._x(cur, statement, params).fetchall())

    def create_tables(self, *, indexes: bool = True) -> None:
        with self._tx(write=True) as cur:
            if (lock := self.dialect.lock_ddl()) is not None:
                self._x(cur, lock)
            for table, columns in p.TABLES.items():
                cols = ", ".join(f"{c} {self.dialect.types[k]}" for c, k in columns)
                self._x(
                    cur,
                    f"CREATE TABLE IF NOT EXISTS {table} ({cols}, PRIMARY KEY ({columns[0][0]}))",
                )
            if indexes:
                self._create_indexes(cur)
            self._x(
                cur,
                f"CREATE TABLE IF NOT EXISTS {TRACKING} (name TEXT PRIMARY KEY, position BIGINT NOT NULL)",
            )
            # The row exists before the first catch-up, so lock_tracking() always locks it:
            # two nodes catching up a fresh database at once then queue, not collide.
            self._x(
                cur,
                f"INSERT INTO {TRACKING} (name, position) VALUES (?, 0) ON CONFLICT (name) DO NOTHING",
                (TRACKING_NAME,),
            )
            self._x(
                cur,
                f"CREATE TABLE IF NOT EXISTS {BLOB_GC} (receipt_id TEXT PRIMARY KEY, collected_at {self.dialect.types['real']})",
            )
            self._x(
                cur,
                f"CREATE TABLE IF NOT EXISTS {LEASES} (work TEXT PRIMARY KEY, holder TEXT NOT NULL, "
                f"until {self.dialect.types['real']} NOT NULL)",
            )

    def _adopt_sealing(self, sealer: ViewSealer) -> None:
        """An encrypted store whose views were written before they were sealed (encryption
        at rest came first for the events): rebuild them sealed, and seal the cap counts in
        place, once (a tracking row records it). The pages the plaintext rows freed are
        overwritten only as the file is reused: VACUUM removes them at once."""
        with self._tx(write=True) as cur:
            self._x(cur, self.dialect.lock_tracking(), (TRACKING_NAME,))
            if self._x(cur, f"SELECT 1 FROM {TRACKING} WHERE name = ?", (SEALED,)).fetchone():
                return
            self._x(cur, f"INSERT INTO {TRACKING} (name, position) VALUES (?, 1)", (SEALED,))
            row = self._x(cur, f"SELECT position FROM {TRACKING} WHERE name = ?", (TRACKING_NAME,))
            stale = int(row.fetchone()[0]) > 0
            for statement in create_statements("", self.dialect.types["real"]):
                self._x(cur, statement)
            counts = self._x(cur, f"SELECT domain, minute, n FROM {CAP_COUNTS}").fetchall()
            held = self._x(
                cur, f"SELECT mailbox, sender_id, challenge_id, expires FROM {CAP_MAILBOXES}"
            ).fetchall()
            if counts or held:
                self._x(cur, f"DELETE FROM {CAP_COUNTS}")
                self._x(cur, f"DELETE FROM {CAP_MAILBOXES}")
                sealed_counts: dict[tuple[str, int], int] = {}
                for domain, minute, n in counts:
                    name = domain if domain == TOTAL else sealer.domain(domain)
                    sealed_counts[(name, minute)] = sealed_counts.get((name, minute), 0) + n
                cur.executemany(
                    self.dialect.sql(
                        f"INSERT INTO {CAP_COUNTS} (domain, minute, n) VALUES (?, ?, ?)"
                    ),
                    [(d, m, n) for (d, m), n in sealed_counts.items()],
                )
                cur.executemany(
                    self.dialect.sql(
                        f"INSERT INTO {CAP_MAILBOXES} (mailbox, sender_id, challenge_id, expires) VALUES (?, ?, ?, ?)"
                    ),
                    [(sealer.address(m), *rest) for m, *rest in held],
                )
        if stale:
            log.warning("views_sealing_rebuild")
            self.rebuild()

    def _create_indexes(self, cur: Any) -> None:
        for name, table, cols in p.INDEXES:
            self._x(cur, f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({', '.join(cols)})")

    def drop_tables(self) -> None:
        with self._tx(write=True) as cur:
            for table in p.TABLES:
                self._x(cur, f"DROP TABLE IF EXISTS {table}")
            self._x(cur, f"DELETE FROM {TRACKING} WHERE name = ?", (TRACKING_NAME,))
        self.projector = p.Projector(self._current_challenge)

    def rebuild(self, progress: Callable[[int], None] | None = None) -> int:
        """Drop every view and replay the whole log into it; returns the events applied.

        The log is folded into rows in memory first (no lock held, the old views keep
        serving), then one transaction swaps in the new tables with their tracking position,
        and an incremental catch-up applies whatever was recorded meanwhile."""
        memory = MemoryTables()
        projector = p.Projector(memory.current_challenge)
        position = 0
        applied = 0
        apply = memory.apply
        ops = projector.ops
        # The cyclic collector paused while the fold and the bulk insert run: they make no
        # cycles, but their hundreds of thousands of rows and events made the collector walk
        # the growing heap again and again (measured: a quarter of a rebuild's CPU time).
        with collector_paused():
            for last, events in decoded_pages(self.recorder, self.mapper, REBUILD_PAGE):
                for event in events:
                    for op in ops(event):
                        apply(op)
                applied += len(events)
                position = last
                if progress is not None:
                    progress(applied)
            with self._tx(write=True) as cur:
                self._x(cur, self.dialect.lock_tracking(), (TRACKING_NAME,))
                for table, columns in p.TABLES.items():
                    self._x(cur, f"DROP TABLE IF EXISTS {table}")
                    cols = ", ".join(f"{c} {self.dialect.types[k]}" for c, k in columns)
                    self._x(cur, f"CREATE TABLE {table} ({cols}, PRIMARY KEY ({columns[0][0]}))")
                    rows = memory.rows(table)
                    if rows and self.sealer is not None:
                        names_of = tuple(c for c, _ in columns)
                        rows = [self.sealer.seal_row(table, names_of, r) for r in rows]
                    if rows:
                        marks = ", ".join("?" * len(columns))
                        names = ", ".join(c for c, _ in columns)
                        cur.executemany(
                            self.dialect.sql(f"INSERT INTO {table} ({names}) VALUES ({marks})"),
                            rows,
                        )
                self._create_indexes(cur)  # built once, after the rows: faster than row by row
                self._x(
                    cur,
                    f"INSERT INTO {TRACKING} (name, position) VALUES (?, ?) "
                    f"ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                    (TRACKING_NAME, position),
                )
        self.projector = p.Projector(self._current_challenge)
        return applied + self.catch_up()

    def position(self) -> int:
        rows = self._rows(f"SELECT position FROM {TRACKING} WHERE name = ?", (TRACKING_NAME,))
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------ the pull loop

    def catch_up(
        self, observer: Callable[[UUID, int], None] | None = None, stop: int | None = None
    ) -> int:
        """Apply every event recorded after the tracking position (up to position `stop`
        inclusive, when given), committing rows and position together, one page per
        transaction."""
        applied = 0
        while True:
            with self._tx(write=True) as cur:
                # Another process or node may have advanced the views since: nothing the
                # projector remembered from an earlier transaction can be trusted now.
                self.projector = p.Projector(self._current_challenge)
                row = self._x(cur, self.dialect.lock_tracking(), (TRACKING_NAME,)).fetchone()
                position = int(row[0]) if row else 0
                notifications = self.recorder.select_notifications(
                    start=position, limit=PAGE, stop=stop, inclusive_of_start=False
                )
                if not notifications:
                    return applied
                for n in notifications:
                    event = self.mapper.to_domain_event(n)
                    if observer is not None:
                        observer(event.originator_id, event.originator_version)
                    for op in self.projector.ops(event):
                        self._apply(cur, op)
                last = notifications[-1].id
                if row is None:
                    self._x(
                        cur,
                        f"INSERT INTO {TRACKING} (name, position) VALUES (?, ?)",
                        (TRACKING_NAME, last),
                    )
                else:
                    self._x(
                        cur,
                        f"UPDATE {TRACKING} SET position = ? WHERE name = ?",
                        (last, TRACKING_NAME),
                    )
                applied += len(notifications)
            if len(notifications) < PAGE:
                return applied

    def _current_challenge(self, sender_id: str) -> str | None:
        cur = self._cur
        assert cur is not None
        row = self._x(
            cur,
            f"SELECT challenge_id FROM {p.CHALLENGES} WHERE sender_id = ? ORDER BY created DESC LIMIT 1",
            (sender_id,),
        ).fetchone()
        return str(row[0]) if row else None

    def _apply(self, cur: Any, op: p.Op) -> None:
        kind = type(op)
        if self.sealer is not None:
            op = self._sealed_op(op)
        if kind is p.Upsert:
            sql = self._sql("upsert", op.table, tuple(op.values))  # type: ignore[union-attr]
            cur.execute(sql, (op.key, *op.values.values()))  # type: ignore[union-attr]
        elif kind is p.Update:
            sql = self._sql("update", op.table, tuple(op.values))  # type: ignore[union-attr]
            cur.execute(sql, (*op.values.values(), op.key))  # type: ignore[union-attr]
        elif kind is p.Add:
            sql = self._sql("add", op.table, tuple(op.deltas))  # type: ignore[union-attr]
            cur.execute(sql, (*op.deltas.values(), op.key))  # type: ignore[union-attr]
        elif kind is p.Delete:
            cur.execute(self._sql("delete", op.table, ()), (op.key,))  # type: ignore[union-attr]
        elif isinstance(op, p.BlobRef):
            self._x(
                cur,
                f"INSERT INTO {p.BLOBS} (receipt_id, live, copies, collected) VALUES (?, ?, 1, 0) "
                f"ON CONFLICT (receipt_id) DO UPDATE SET live = {p.BLOBS}.live + excluded.live, "
                f"copies = {p.BLOBS}.copies + 1",
                (op.receipt_id, op.live),
            )
        elif isinstance(op, p.QueueFromQuarantine):
            self._x(
                cur,
                f"INSERT INTO {p.DELIVERY} (message_id, receipt_id, sender, recipients, attempts, next_attempt, queued_at) "
                f"SELECT message_id, receipt_id, sender, recipients, 0, 0, ? FROM {p.QUARANTINE} WHERE message_id = ? "
                f"ON CONFLICT (message_id) DO NOTHING",
                (op.queued_at, op.message_id),
            )
        elif isinstance(op, p.DropRecipients):
            row = self._x(
                cur, f"SELECT recipients FROM {p.DELIVERY} WHERE message_id = ?", (op.message_id,)
            ).fetchone()
            if row is not None:
                left = [r for r in _split(row[0]) if r not in op.recipients]
                self._x(
                    cur,
                    f"UPDATE {p.DELIVERY} SET recipients = ? WHERE message_id = ?",
                    ("\n".join(left), op.message_id),
                )
        elif isinstance(op, p.CopyDone):
            receipt = self._receipt_of(cur, op.message_id)
            if receipt is not None:
                self._x(
                    cur, f"UPDATE {p.BLOBS} SET live = live - 1 WHERE receipt_id = ?", (receipt,)
                )
        elif isinstance(op, p.FailedCopy):
            self._x(
                cur,
                f"INSERT INTO {p.QUARANTINE} (message_id, receipt_id, sender, sender_id, recipients, subject, size, "
                f"received, expires, state, reason, updated) SELECT message_id, receipt_id, sender, '', recipients, '', 0, "
                f"queued_at, 0, ?, ?, ? FROM {p.DELIVERY} WHERE message_id = ? "
                f"ON CONFLICT (message_id) DO UPDATE SET state = excluded.state, reason = excluded.reason, updated = excluded.updated",
                (p.FAILED_COPY, op.reason, op.at, op.message_id),
            )
            self._x(
                cur,
                f"UPDATE {p.QUARANTINE} SET state = ?, reason = ?, updated = ? WHERE message_id = ?",
                (p.FAILED_COPY, op.reason, op.at, op.message_id),
            )
        elif isinstance(op, p.SupersedeIfPending):
            self._x(
                cur,
                f"UPDATE {p.CHALLENGES} SET outcome = ? WHERE challenge_id = ? "
                f"AND outcome IN {p.sql_in(p.PENDING_OUTCOMES)}",
                (p.SUPERSEDED, op.challenge_id),
            )
        elif isinstance(op, p.HeldDelta):
            self._held_delta(cur, op.recipients, op.delta)
        elif isinstance(op, p.LeaveHeld):
            row = self._x(
                cur,
                f"SELECT state, recipients FROM {p.QUARANTINE} WHERE message_id = ?",
                (op.message_id,),
            ).fetchone()
            if row is not None and row[0] in p.HELD_STATES:
                self._held_delta(cur, _split(row[1]), -1)
        elif isinstance(op, p.ChallengeFromSender):
            row = self._x(
                cur,
                f"SELECT address, scope, sender_id FROM {p.WHITELIST} WHERE sender_id = ?",
                (op.sender_id,),
            ).fetchone()
            if row is not None and self.sealer is not None:
                row = self.sealer.open_row(p.WHITELIST, ("address", "scope", "sender_id"), row)
            address, scope = (row[0], row[1]) if row else ("", "")
            values = {
                "sender_id": op.sender_id,
                "address": address,
                "domain": address.rsplit("@", 1)[-1],
                "scope": scope,
                **op.values,
            }
            self._apply(cur, p.Upsert(p.CHALLENGES, op.challenge_id, values))
        else:  # pragma: no cover - the projector emits only the kinds above
            raise TypeError(f"unknown view operation {op!r}")

    def _sealed_op(self, op: p.Op) -> p.Op:
        """The operation with its mail text sealed (only row values and recipient lists: the
        kinds that read other rows meet them sealed already)."""
        sealer = self.sealer
        assert sealer is not None
        if isinstance(op, (p.Upsert, p.Update)):
            values = sealer.values(op.table, op.key, op.values)
            if values is not op.values:
                return type(op)(op.table, op.key, values)
        elif isinstance(op, p.HeldDelta):
            return type(op)(tuple(map(sealer.address, op.recipients)), op.delta)
        elif isinstance(op, p.DropRecipients):
            return type(op)(op.message_id, tuple(map(sealer.address, op.recipients)))
        elif isinstance(op, p.FailedCopy):
            reason = sealer.value(p.QUARANTINE, "reason", op.message_id, op.reason)
            return type(op)(op.message_id, op.at, reason)
        return op

    def _open(self, table: str, columns: tuple[str, ...], rows: list[Any]) -> list[Any]:
        """Rows read from a view, their sealed columns opened (as read without a key)."""
        if self.sealer is None:
            return rows
        return [self.sealer.open_row(table, columns, r) for r in rows]

    def _seal_address(self, address: str) -> str:
        return address if self.sealer is None else self.sealer.address(address)

    def _held_delta(self, cur: Any, recipients: Sequence[str], delta: int) -> None:
        for rcpt in recipients:
            self._x(
                cur,
                f"INSERT INTO {p.HELD_COUNTS} (recipient, held) VALUES (?, ?) "
                f"ON CONFLICT (recipient) DO UPDATE SET held = {p.HELD_COUNTS}.held + excluded.held",
                (rcpt, delta),
            )

    def recipients_holding(self, at_least: int) -> set[str]:
        rows = self._rows(f"SELECT recipient FROM {p.HELD_COUNTS} WHERE held >= ?", (at_least,))
        return {str(r[0]) for r in self._open(p.HELD_COUNTS, ("recipient",), rows)}

    def held_count(self, recipient: str) -> int:
        rows = self._rows(
            f"SELECT held FROM {p.HELD_COUNTS} WHERE recipient = ?",
            (self._seal_address(recipient),),
        )
        return int(rows[0][0]) if rows else 0

    def _receipt_of(self, cur: Any, message_id: str) -> str | None:
        for table in (p.QUARANTINE, p.DELIVERY):
            row = self._x(
                cur, f"SELECT receipt_id FROM {table} WHERE message_id = ?", (message_id,)
            ).fetchone()
            if row is not None:
                return str(row[0])
        return None

    # ------------------------------------------------------------------ queries for the engine

    _CH_COLS = (
        "challenge_id, sender_id, address, scope, kid, created, expires, sent_at, attempts, "
        "next_attempt, outcome, subject, in_reply_to, recipient"
    )

    _CH_NAMES = tuple(c.strip() for c in _CH_COLS.split(","))

    def _challenges(self, where: str, params: Sequence[Any]) -> list[ChallengeRow]:
        rows = self._rows(f"SELECT {self._CH_COLS} FROM {p.CHALLENGES} WHERE {where}", params)
        rows = self._open(p.CHALLENGES, self._CH_NAMES, rows)
        return [
            ChallengeRow(
                challenge_id=r[0],
                sender_id=r[1],
                address=r[2],
                scope=r[3],
                kid=int(r[4]),
                created=float(r[5]),
                expires=float(r[6]),
                sent_at=float(r[7]),
                attempts=int(r[8]),
                next_attempt=float(r[9]),
                outcome=r[10],
                subject=r[11] or "",
                in_reply_to=r[12] or "",
                recipient=r[13] or "",
            )
            for r in rows
        ]

    def challenge(self, challenge_id: str) -> ChallengeRow | None:
        found = self._challenges("challenge_id = ?", (challenge_id,))
        return found[0] if found else None

    def known_senders(self, sender_ids: Sequence[str]) -> set[str]:
        """Which of these senders the whitelist view has a row for (one query per 500 ids)."""
        return set(self.sender_states(sender_ids))

    def sender_states(self, sender_ids: Sequence[str]) -> dict[str, str]:
        """The state of each of these senders the whitelist view has a row for."""
        found: dict[str, str] = {}
        ids = list(sender_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._rows(
                f"SELECT sender_id, state FROM {p.WHITELIST} WHERE sender_id IN ({marks})", chunk
            )
            found.update((str(r[0]), str(r[1])) for r in rows)
        return found

    def challenges_due(self, now: float, limit: int) -> list[ChallengeRow]:
        return self._challenges(
            f"outcome IN {p.sql_in(p.DUE_OUTCOMES)} AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
            (now, limit),
        )

    def challenges_lapsed(self, now: float, limit: int) -> list[ChallengeRow]:
        return self._challenges(
            f"outcome IN {p.sql_in(p.PENDING_OUTCOMES)} AND expires <= ? ORDER BY expires LIMIT ?",
            (now, limit),
        )

    def challenges(self, *, limit: int | None = None) -> list[ChallengeRow]:
        return self._challenges(
            "1 = 1 ORDER BY created LIMIT ?",
            (limit if limit is not None else -1 if self.dialect.name == "sqlite" else 2**62,),
        )

    def recent_challenges(self, since: float) -> list[tuple[str, float]]:
        rows = self._rows(
            f"SELECT domain, created, challenge_id FROM {p.CHALLENGES} WHERE created >= ?",
            (since,),
        )
        rows = self._open(p.CHALLENGES, ("domain", "created", "challenge_id"), rows)
        return [(str(r[0]), float(r[1])) for r in rows]

    def held_of_sender(self, sender_id: str) -> list[str]:
        rows = self._rows(
            f"SELECT message_id FROM {p.QUARANTINE} WHERE sender_id = ? AND state IN {p.sql_in(p.RELEASABLE_COPY)} "
            f"ORDER BY received",
            (sender_id,),
        )
        return [str(r[0]) for r in rows]

    def held_lapsed(self, now: float, limit: int) -> list[str]:
        rows = self._rows(
            f"SELECT message_id FROM {p.QUARANTINE} WHERE state IN {p.sql_in(p.HELD_STATES)} AND expires > 0 "
            f"AND expires <= ? ORDER BY expires LIMIT ?",
            (now, limit),
        )
        return [str(r[0]) for r in rows]

    def held_of_authorized_senders(self, limit: int) -> list[str]:
        rows = self._rows(
            f"SELECT q.message_id FROM {p.QUARANTINE} q JOIN {p.WHITELIST} w ON q.sender_id = w.sender_id "
            f"WHERE q.state IN {p.sql_in(p.HELD_STATES)} AND w.state = ? LIMIT ?",
            (p.AUTHORIZED_SENDER, limit),
        )
        return [str(r[0]) for r in rows]

    def held_evictable(self, recipient: str, limit: int) -> list[str]:
        sealed = self._seal_address(recipient)  # base64 when sealed: no LIKE wildcard in it
        # recipients is newline-joined; LIKE may over-match (_ and %), the check below won't.
        rows = self._rows(
            f"SELECT q.message_id, q.recipients FROM {p.QUARANTINE} q LEFT JOIN {p.WHITELIST} w "
            f"ON q.sender_id = w.sender_id WHERE q.state IN {p.sql_in(p.HELD_STATES)} "
            f"AND (? || q.recipients || ?) LIKE ? "
            f"AND (w.state IS NULL OR w.state <> ?) "
            f"ORDER BY CASE WHEN w.state = ? THEN 1 ELSE 0 END, q.received, q.message_id LIMIT ?",
            ("\n", "\n", f"%\n{sealed}\n%", p.AUTHORIZED_SENDER, CHALLENGED, limit),
        )
        return [str(r[0]) for r in rows if sealed in _split(r[1])]

    def held_awaiting_challenge(self, now: float, limit: int) -> list[str]:
        reasons = " OR ".join("q.reason LIKE ?" for _ in DEFERRED_PREFIXES)
        rows = self._rows(
            f"SELECT q.message_id FROM {p.QUARANTINE} q LEFT JOIN {p.WHITELIST} w "
            f"ON q.sender_id = w.sender_id WHERE q.state = ? AND q.sender_id <> '' "
            f"AND q.expires > ? AND ({reasons}) "
            f"AND (w.state IS NULL OR w.state IN {p.sql_in(CHALLENGEABLE)}) "
            f"ORDER BY q.received, q.message_id LIMIT ?",
            (HELD, now, *(f"{prefix}%" for prefix in DEFERRED_PREFIXES), limit),
        )
        return [str(r[0]) for r in rows]

    def expired_messages(self, limit: int) -> list[str]:
        rows = self._rows(
            f"SELECT message_id FROM {p.QUARANTINE} WHERE state = ? LIMIT ?",
            (p.EXPIRED_COPY, limit),
        )
        return [str(r[0]) for r in rows]

    _D_NAMES = (
        "message_id",
        "receipt_id",
        "sender",
        "recipients",
        "attempts",
        "next_attempt",
        "queued_at",
    )

    def deliveries_due(self, now: float, limit: int) -> list[DeliveryRow]:
        rows = self._rows(
            f"SELECT message_id, receipt_id, sender, recipients, attempts, next_attempt, queued_at FROM {p.DELIVERY} "
            f"WHERE next_attempt <= ? ORDER BY next_attempt, queued_at LIMIT ?",
            (now, limit),
        )
        rows = self._open(p.DELIVERY, self._D_NAMES, rows)
        return [
            DeliveryRow(
                str(r[0]), str(r[1]), str(r[2]), _split(r[3]), int(r[4]), float(r[5]), float(r[6])
            )
            for r in rows
        ]

    def delivery_queue(self) -> list[DeliveryRow]:
        return self.deliveries_due(float("inf"), 2**31)

    def blobs_unreferenced(self, limit: int) -> list[str]:
        rows = self._rows(
            f"SELECT b.receipt_id FROM {p.BLOBS} b LEFT JOIN {BLOB_GC} g ON b.receipt_id = g.receipt_id "
            f"WHERE b.live <= 0 AND g.receipt_id IS NULL LIMIT ?",
            (limit,),
        )
        return [str(r[0]) for r in rows]

    def mark_blobs_collected(self, receipt_ids: Sequence[str]) -> None:
        import time

        now = time.time()
        with self._tx(write=True) as cur:
            cur.executemany(
                self.dialect.sql(
                    f"INSERT INTO {BLOB_GC} (receipt_id, collected_at) VALUES (?, ?) "
                    f"ON CONFLICT (receipt_id) DO NOTHING"
                ),
                [(r, now) for r in receipt_ids],
            )

    def claim_work(
        self,
        work: Sequence[str],
        holder: str,
        now: float,
        until: float,
        taken_over: set[str] | None = None,
    ) -> set[str]:
        """Lease each unleased (or lapsed) piece of outbound work to `holder` until `until`;
        returns what this call leased. One atomic statement: of workers racing for one key,
        on any node, exactly one gets it (PostgreSQL's ON CONFLICT DO UPDATE locks the row;
        SQLite runs it in a write transaction). Into `taken_over` go the keys that had a
        lease row already (a lapsed lease: its holder may have sent the work and died before
        recording the outcome)."""
        keys = sorted(set(work))  # one lock order for every worker: no deadlock between nodes
        claimed: set[str] = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ", ".join(["(?, ?, ?)"] * len(chunk))
            params: list[Any] = [v for key in chunk for v in (key, holder, until)]
            with self._tx(write=True) as cur:
                if taken_over is not None:
                    held = self._x(
                        cur,
                        f"SELECT work FROM {LEASES} WHERE work IN ({', '.join('?' * len(chunk))})",
                        tuple(chunk),
                    ).fetchall()
                    taken_over.update(str(r[0]) for r in held)
                rows = self._x(
                    cur,
                    f"INSERT INTO {LEASES} (work, holder, until) VALUES {marks} "
                    f"ON CONFLICT (work) DO UPDATE SET holder = excluded.holder, until = excluded.until "
                    f"WHERE {LEASES}.until <= ? RETURNING work",
                    (*params, now),
                ).fetchall()
            claimed.update(str(r[0]) for r in rows)
        return claimed

    def release_work(self, work: Sequence[str], holder: str) -> None:
        """End `holder`'s leases on this work (its outcome is recorded, or it was not sent)."""
        keys = sorted(set(work))
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            with self._tx(write=True) as cur:
                self._x(
                    cur,
                    f"DELETE FROM {LEASES} WHERE holder = ? AND work IN ({marks})",
                    (holder, *chunk),
                )

    def record_keyring(self, fingerprints: dict[str, str]) -> dict[str, str]:
        """Record each keyring fingerprint this store has none for yet (the first start, or a
        new key id); returns every fingerprint the store holds, to compare with ours."""
        with self._tx(write=True) as cur:
            self._x(
                cur,
                f"CREATE TABLE IF NOT EXISTS {KEYRING} (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL)",
            )
            for name, mark in sorted(fingerprints.items()):
                self._x(
                    cur,
                    f"INSERT INTO {KEYRING} (name, fingerprint) VALUES (?, ?) "
                    f"ON CONFLICT (name) DO NOTHING",
                    (name, mark),
                )
            rows = self._x(cur, f"SELECT name, fingerprint FROM {KEYRING}").fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def claimed_work(self) -> list[tuple[str, str, float]]:
        """Every lease (work, holder, until): what an operator looks at after a crash."""
        rows = self._rows(f"SELECT work, holder, until FROM {LEASES} ORDER BY work")
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def live_copies(self, receipt_id: str) -> int:
        rows = self._rows(f"SELECT live FROM {p.BLOBS} WHERE receipt_id = ?", (receipt_id,))
        return int(rows[0][0]) if rows else 0

    _W_NAMES = ("sender_id", "address", "scope", "state", "since", "via", "reason")

    def senders(
        self, *, state: str | None = None, address: str | None = None, limit: int | None = None
    ) -> list[SenderView]:
        where, params = ["1 = 1"], list[Any]()
        if state:
            where.append("state = ?")
            params.append(state)
        if address:
            where.append("address = ?")
            params.append(self._seal_address(address))
        sql = f"SELECT sender_id, address, scope, state, since, via, reason FROM {p.WHITELIST} WHERE {' AND '.join(where)}"
        if self.sealer is None:
            sql += " ORDER BY address, scope"
            if limit is not None:
                sql += " LIMIT ?"
                params.append(limit)
            rows = self._rows(sql, params)
        else:
            # Sealed addresses do not sort as the plaintext: every matching row is read,
            # opened and sorted here (O(senders) per call; docs/security.md).
            rows = self._open(p.WHITELIST, self._W_NAMES, self._rows(sql, params))
            rows.sort(key=lambda r: (str(r[1]), str(r[2])))
            rows = rows if limit is None else rows[: max(limit, 0)]
        return [
            SenderView(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                float(r[4]),
                str(r[5] or ""),
                str(r[6] or ""),
            )
            for r in rows
        ]

    _Q_COLS = "message_id, receipt_id, sender, sender_id, recipients, subject, size, received, expires, state, reason"
    _Q_NAMES = tuple(c.strip() for c in _Q_COLS.split(","))

    @staticmethod
    def _held(r: Any) -> HeldMessage:
        return HeldMessage(
            id=str(r[0]),
            receipt_id=str(r[1]),
            sender=str(r[2]),
            sender_id=str(r[3] or ""),
            recipients=_split(r[4]),
            subject=str(r[5] or ""),
            size=int(r[6]),
            received=float(r[7]),
            expires=float(r[8]),
            state=str(r[9]),
            reason=str(r[10] or ""),
        )

    def quarantine(
        self,
        *,
        state: str | None = None,
        sender: str | None = None,
        limit: int | None = None,
        states: Collection[str] | None = None,
        recipient: str | None = None,
        offset: int = 0,
    ) -> list[HeldMessage]:
        where, params = ["1 = 1"], list[Any]()
        if state:
            where.append("state = ?")
            params.append(state)
        if states is not None:
            where.append(f"state IN ({', '.join('?' for _ in states) or 'NULL'})")
            params.extend(sorted(states))
        if sender:
            where.append("sender = ?")
            params.append(self._seal_address(sender))
        if recipient:
            # recipients is one address per line: match a whole line (LIKE, its wildcards escaped)
            where.append("(? || recipients || ?) LIKE ? ESCAPE '!'")
            escaped = re.sub(r"([!%_])", r"!\1", self._seal_address(recipient))
            params.extend(["\n", "\n", f"%\n{escaped}\n%"])
        sql = f"SELECT {self._Q_COLS} FROM {p.QUARANTINE} WHERE {' AND '.join(where)} ORDER BY received, message_id"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params.extend([limit, offset])
        return [
            self._held(r) for r in self._open(p.QUARANTINE, self._Q_NAMES, self._rows(sql, params))
        ]

    _R_COLS = "rule_id, action, pattern, scope, kind, state, reason, actor, created, updated"
    _R_NAMES = tuple(c.strip() for c in _R_COLS.split(","))

    def rules(self) -> list[RuleView]:
        """Every rule, removed ones included, oldest first."""
        rows = self._rows(f"SELECT {self._R_COLS} FROM {p.RULES} ORDER BY created, rule_id")
        rows = self._open(p.RULES, self._R_NAMES, rows)
        return [
            RuleView(*(str(v or "") for v in r[:8]), created=float(r[8]), updated=float(r[9]))
            for r in rows
        ]

    def rules_version(self) -> int:
        """Grows with every rule event (each raises one row's version by one): whoever
        compiled the rules at an older value compiles them again."""
        rows = self._rows(f"SELECT COALESCE(SUM(version), 0) FROM {p.RULES}")
        return int(rows[0][0]) if rows else 0

    def held_message(self, message_id: str) -> HeldMessage | None:
        rows = self._rows(
            f"SELECT {self._Q_COLS} FROM {p.QUARANTINE} WHERE message_id = ?", (message_id,)
        )
        rows = self._open(p.QUARANTINE, self._Q_NAMES, rows)
        return self._held(rows[0]) if rows else None

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every view row, ordered by key: what an auditor compares after a rebuild."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table, columns in p.TABLES.items():
            cols = ", ".join(c for c, _ in columns)
            out[table] = [
                tuple(r) for r in self._rows(f"SELECT {cols} FROM {table} ORDER BY {columns[0][0]}")
            ]
        return out

    @contextmanager
    def snapshot(self) -> Iterator[ViewSnapshot]:
        """Every view as it stands at one moment, streamed: a connection of its own in one
        read-only transaction (SQLite: one WAL snapshot; PostgreSQL: REPEATABLE READ), rows read
        through the database's cursor a batch at a time, never a whole table in memory."""
        if self.dialect.name == "sqlite" and self._in_memory():
            with self._lock:  # a private in-memory database: only its own connection sees it
                self._conn.execute("BEGIN")
                try:
                    yield ViewSnapshot(self._conn, self.dialect)
                finally:
                    self._conn.execute("ROLLBACK")
            return
        conn = self._connect()
        try:
            if self.dialect.name == "sqlite":
                conn.execute("BEGIN")
            else:
                import psycopg

                conn.rollback()
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
            yield ViewSnapshot(conn, self.dialect)
        finally:
            try:
                conn.rollback()
            finally:
                conn.close()

    def _in_memory(self) -> bool:
        with self._lock:
            rows = self._conn.execute("PRAGMA database_list").fetchall()
        return not any(name == "main" and path for _, name, path in rows)

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except Exception:
                log.debug("views_close_failed")


class ViewSnapshot:
    """The views as of one read transaction (see SqlViews.snapshot)."""

    BATCH = 2000  # rows fetched from the database at a time

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect
        self._cursors = 0

    def position(self) -> int:
        """The log position the views stand at in this snapshot."""
        cur = self._conn.cursor()
        cur.execute(
            self._dialect.sql(f"SELECT position FROM {TRACKING} WHERE name = ?"), (TRACKING_NAME,)
        )
        row = cur.fetchone()
        cur.close()
        return int(row[0]) if row else 0

    def rows(self, table: str) -> Iterator[tuple[Any, ...]]:
        """Every row of one view, ordered by its key, streamed."""
        columns = p.TABLES[table]
        cols = ", ".join(c for c, _ in columns)
        key = columns[0][0]
        if self._dialect.name != "sqlite" and columns[0][1] == "text":
            # byte order, as SQLite's: a database collation (en_US…) would order the same keys
            # differently from the scratch rebuild they are compared with
            key += ' COLLATE "C"'
        statement = f"SELECT {cols} FROM {table} ORDER BY {key}"
        if self._dialect.name == "sqlite":
            cur = self._conn.cursor()  # sqlite3 steps the statement as rows are taken
        else:
            self._cursors += 1  # a server-side (named) cursor: PostgreSQL sends BATCH at a time
            cur = self._conn.cursor(name=f"sa_view_snapshot_{self._cursors}")
            cur.itersize = self.BATCH
        try:
            cur.execute(statement)
            while True:
                batch = cur.fetchmany(self.BATCH)
                if not batch:
                    return
                for row in batch:
                    yield tuple(row)
        finally:
            cur.close()


def sqlite_connector(path: str) -> Callable[[], sqlite3.Connection]:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    return connect


def postgres_connector(conninfo: str, schema: str | None = None) -> Callable[[], Any]:
    def connect() -> Any:
        import psycopg

        conn = psycopg.connect(conninfo, autocommit=False, connect_timeout=CONNECT_TIMEOUT)
        if schema:
            with conn.cursor() as cur:
                cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                cur.execute(f'SET search_path TO "{schema}"')
            conn.commit()
        return conn

    return connect
