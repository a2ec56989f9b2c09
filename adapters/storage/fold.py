"""Rebuilding the views fast: fold the whole log into rows in memory, then bulk-insert them.

The same row operations as the incremental SQL path (views.py), applied to dicts; the
rebuild-equals-live checks (`audit verify`, the tests) hold the two to the same result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any
from uuid import UUID, SafeUUID

from eventsourcing.persistence import ApplicationRecorder, Mapper, Notification
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import resolve_topic

from sourceauth.engine import projections as p

Row = dict[str, Any]


def _split(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split("\n") if x)


class MemoryTables:
    """Every view table as {primary key: row}; rows carry every column (None when unset)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[Any, Row]] = {name: {} for name in p.TABLES}
        self._columns = {name: [c for c, _ in cols] for name, cols in p.TABLES.items()}
        self._latest_challenge: dict[str, tuple[float, str]] = {}

    def current_challenge(self, sender_id: str) -> str | None:
        found = self._latest_challenge.get(sender_id)
        return found[1] if found else None

    def _new(self, table: str, key: Any) -> Row:
        row: Row = dict.fromkeys(self._columns[table])
        row[self._columns[table][0]] = key
        self.tables[table][key] = row
        return row

    def _upsert(self, table: str, key: Any, values: Row) -> None:
        row = self.tables[table].get(key)
        if row is None:
            row = self._new(table, key)
        row.update(values)
        if table == p.CHALLENGES and "created" in values:
            latest = self._latest_challenge.get(row["sender_id"])
            if latest is None or values["created"] >= latest[0]:
                self._latest_challenge[row["sender_id"]] = (values["created"], key)

    def _held_delta(self, recipients: tuple[str, ...], delta: int) -> None:
        counts = self.tables[p.HELD_COUNTS]
        for rcpt in recipients:
            row = counts.get(rcpt)
            if row is None:
                counts[rcpt] = {"recipient": rcpt, "held": delta}
            else:
                row["held"] += delta

    def apply(self, op: p.Op) -> None:
        kind = type(op)
        if kind is p.Upsert:
            self._upsert(op.table, op.key, op.values)  # type: ignore[union-attr]
        elif kind is p.Update:
            row = self.tables[op.table].get(op.key)  # type: ignore[union-attr]
            if row is not None:
                row.update(op.values)  # type: ignore[union-attr]
        elif kind is p.Add:
            row = self.tables[op.table].get(op.key)  # type: ignore[union-attr]
            if row is not None:
                for col, delta in op.deltas.items():  # type: ignore[union-attr]
                    row[col] += delta
        elif kind is p.Delete:
            self.tables[op.table].pop(op.key, None)  # type: ignore[union-attr]
        elif isinstance(op, p.BlobRef):
            row = self.tables[p.BLOBS].get(op.receipt_id)
            if row is None:
                self.tables[p.BLOBS][op.receipt_id] = {
                    "receipt_id": op.receipt_id,
                    "live": op.live,
                    "copies": 1,
                    "collected": 0,
                }
            else:
                row["live"] += op.live
                row["copies"] += 1
        elif isinstance(op, p.QueueFromQuarantine):
            held = self.tables[p.QUARANTINE].get(op.message_id)
            if held is not None and op.message_id not in self.tables[p.DELIVERY]:
                self.tables[p.DELIVERY][op.message_id] = {
                    "message_id": op.message_id,
                    "receipt_id": held["receipt_id"],
                    "sender": held["sender"],
                    "recipients": held["recipients"],
                    "attempts": 0,
                    "next_attempt": 0,
                    "queued_at": op.queued_at,
                }
        elif isinstance(op, p.DropRecipients):
            row = self.tables[p.DELIVERY].get(op.message_id)
            if row is not None:
                left = [r for r in _split(row["recipients"]) if r not in op.recipients]
                row["recipients"] = "\n".join(left)
        elif isinstance(op, p.CopyDone):
            receipt = self._receipt_of(op.message_id)
            if receipt is not None and receipt in self.tables[p.BLOBS]:
                self.tables[p.BLOBS][receipt]["live"] -= 1
        elif isinstance(op, p.FailedCopy):
            row = self.tables[p.QUARANTINE].get(op.message_id)
            queued = self.tables[p.DELIVERY].get(op.message_id)
            if row is None and queued is not None:
                row = self._new(p.QUARANTINE, op.message_id)
                row.update(
                    receipt_id=queued["receipt_id"],
                    sender=queued["sender"],
                    sender_id="",
                    recipients=queued["recipients"],
                    subject="",
                    size=0,
                    received=queued["queued_at"],
                    expires=0,
                )
            if row is not None:
                row.update(state=p.FAILED_COPY, reason=op.reason, updated=op.at)
        elif isinstance(op, p.SupersedeIfPending):
            row = self.tables[p.CHALLENGES].get(op.challenge_id)
            if row is not None and row["outcome"] in p.PENDING_OUTCOMES:
                row["outcome"] = p.SUPERSEDED
        elif isinstance(op, p.ChallengeFromSender):
            sender = self.tables[p.WHITELIST].get(op.sender_id)
            address, scope = (sender["address"], sender["scope"]) if sender else ("", "")
            values = {
                "sender_id": op.sender_id,
                "address": address,
                "domain": address.rsplit("@", 1)[-1],
                "scope": scope,
                **op.values,
            }
            self._upsert(p.CHALLENGES, op.challenge_id, values)
        elif isinstance(op, p.HeldDelta):
            self._held_delta(op.recipients, op.delta)
        elif isinstance(op, p.LeaveHeld):
            row = self.tables[p.QUARANTINE].get(op.message_id)
            if row is not None and row["state"] in p.HELD_STATES:
                self._held_delta(_split(row["recipients"]), -1)
        else:  # pragma: no cover - the projector emits only the kinds above
            raise TypeError(f"unknown view operation {op!r}")

    def _receipt_of(self, message_id: str) -> str | None:
        for table in (p.QUARANTINE, p.DELIVERY):
            row = self.tables[table].get(message_id)
            if row is not None:
                return str(row["receipt_id"])
        return None

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        cols = self._columns[table]
        return [tuple(row[c] for c in cols) for row in self.tables[table].values()]


def log_pages(recorder: ApplicationRecorder, page: int) -> Iterator[Sequence[Notification]]:
    """The whole event log in pages of notifications, oldest first."""
    position = 0
    while True:
        notifications = recorder.select_notifications(
            start=position, limit=page, inclusive_of_start=False
        )
        if not notifications:
            return
        yield notifications
        if len(notifications) < page:
            return
        position = notifications[-1].id


def _uuid(text: str) -> UUID:
    """A UUID from its stored 32-digit hex form without UUID()'s re-parsing (a rebuild
    makes one per event)."""
    uid = object.__new__(UUID)
    object.__setattr__(uid, "int", int(text, 16))
    object.__setattr__(uid, "is_safe", SafeUUID.unknown)
    return uid


def decoded_pages(
    recorder: ApplicationRecorder, mapper: Mapper[UUID], page: int
) -> Iterator[tuple[int, list[Any]]]:
    """The whole log as domain events, oldest first, a page at a time, each with the position
    of its last event. A SQLite log by the shortest path: one query of plain rows, ids made
    into UUIDs without re-parsing, the transcoder called directly, each topic's class
    resolved once. Anything else (PostgreSQL, a cipher or compressor, an event class with
    upcasts) goes through eventsourcing's own select_notifications + to_domain_event."""
    lean = (
        isinstance(recorder, SQLiteApplicationRecorder)
        and getattr(mapper, "cipher", None) is None
        and getattr(mapper, "compressor", None) is None
    )
    if not lean:
        for notifications in log_pages(recorder, page):
            yield notifications[-1].id, [mapper.to_domain_event(n) for n in notifications]
        return
    assert isinstance(recorder, SQLiteApplicationRecorder)
    decode = mapper.transcoder.decode
    classes: dict[str, type | None] = {}  # None: the class upcasts, use the mapper
    statement = (
        f"SELECT rowid, originator_id, originator_version, topic, state "
        f"FROM {recorder.events_table_name} WHERE rowid > ? ORDER BY rowid LIMIT ?"
    )
    position = 0
    while True:
        with recorder.datastore.transaction(commit=False) as c:
            c.execute(statement, (position, page))
            rows = c.fetchall()
        if not rows:
            return
        events: list[Any] = []
        for row in rows:
            topic = row[3]
            if topic not in classes:
                cls = resolve_topic(topic)
                classes[topic] = cls if getattr(cls, "class_version", 1) == 1 else None
            cls = classes[topic]
            oid = row[1]
            uid = _uuid(oid) if len(oid) == 32 else UUID(oid)
            if cls is None:
                events.append(
                    mapper.to_domain_event(
                        Notification(
                            id=row[0],
                            originator_id=uid,
                            originator_version=row[2],
                            topic=topic,
                            state=row[4],
                        )
                    )
                )
                continue
            state = decode(row[4])
            state["originator_id"] = uid
            state["originator_version"] = row[2]
            state.pop("class_version", None)
            event: Any = object.__new__(cls)
            object.__setattr__(event, "__dict__", state)
            events.append(event)
        position = rows[-1][0]
        yield position, events
        if len(rows) < page:
            return
