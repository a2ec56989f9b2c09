"""The auditor's tools on a real SQLite file and a real PostgreSQL schema: histories that read
as state machines, the state of anything at a moment, one paragraph per message, id prefixes,
and the hash chain that exposes a modified, deleted, reordered or inserted event.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sourceauth.adapters.storage.audit import resolve_id, seal, verify
from sourceauth.adapters.storage.chain import ChainBroken, Seal, pack, unpack
from sourceauth.engine import tokens
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.errors import InvalidInput, NotFound
from sourceauth.engine.sender import Sender
from tests.conftest import (
    FakeChallenges,
    FakeClock,
    FakeDeliveries,
    incoming,
    log_position,
    reply_to_challenge,
    settings_for,
)
from tests.integration.pg import PgSchema, pg_schema_fixture, postgres
from tests.integration.test_postgres import run_together

pytestmark = pytest.mark.timeout(120)

ALICE = "alice@remote.test"
BOB = "bob@example.test"
DAVE = "dave@other.test"  # not protected


@pytest.fixture
def app(make_engine: Any, relay: FakeChallenges, next_hop: FakeDeliveries) -> SourceAuth:
    return make_engine(challenges=relay, deliveries=next_hop)


def send(app: SourceAuth, sender: str = ALICE, to: Any = BOB, **kw: Any) -> Any:
    return app.receive(incoming(app, sender, to, **kw))


def confirmed_flow(app: SourceAuth, clock: FakeClock) -> str:
    """Alice writes to Bob, is challenged, replies; her message is released and delivered.
    Returns the held message's id."""
    receipt = send(app, subject="Lunch?")
    app.dispatch_challenges()
    clock.advance(60)
    app.receive(reply_to_challenge(app, ALICE))
    clock.advance(60)
    app.dispatch_deliveries()
    mid = receipt.decisions[0].message_id
    assert mid is not None
    return str(mid.hex)


# ------------------------------------------------------------------------------ history


def test_history_of_a_confirmed_sender_reads_as_its_state_machine(
    app: SourceAuth, clock: FakeClock
) -> None:
    mid = confirmed_flow(app, clock)
    history = app.history(ALICE)
    sender_steps = [(h.event, h.from_state, h.to_state) for h in history if h.aggregate == "sender"]
    assert sender_steps == [
        ("Sender.FirstChallenged", "unknown", "challenged"),
        ("Sender.ChallengeSent", "challenged", "challenged"),
        ("Sender.Confirmed", "challenged", "authorized"),
    ]
    message_steps = [(h.from_state, h.to_state) for h in history if h.aggregate_id == mid]
    assert message_steps == [
        ("unknown", "challenged"),
        ("challenged", "authorized"),
        ("authorized", "delivered"),
    ]
    for h in history:
        assert h.actor and h.reason, h
        assert len(h.aggregate_id) == 32 and int(h.aggregate_id, 16) >= 0
    sent = next(h for h in history if h.event == "Sender.ChallengeSent")
    assert (sent.actor, sent.reason) == ("relay", "relay_accepted_challenge")
    delivered = next(h for h in history if h.event == "Message.Delivered")
    assert (delivered.actor, delivered.reason) == ("next_hop", "next_hop_accepted")


def test_history_by_a_message_id_is_that_copy_alone(app: SourceAuth, clock: FakeClock) -> None:
    mid = confirmed_flow(app, clock)
    history = app.history(mid)
    assert {h.aggregate_id for h in history} == {mid}
    assert [h.to_state for h in history] == ["challenged", "authorized", "delivered"]


# ------------------------------------------------------------------------------ ids


def _sender_with_id(app: SourceAuth, sender_id: uuid.UUID, address: str) -> None:
    app.save(
        Sender.first_verdict(
            sender_id,
            trigger="authorize",
            address=address,
            scope="global",
            timestamp=datetime.now(tz=UTC),
            actor="operator",
            reason="test",
        )
    )


def test_a_unique_prefix_resolves_and_an_ambiguous_one_names_the_candidates(
    app: SourceAuth,
) -> None:
    first = uuid.UUID("abcd1000" + "0" * 24)
    second = uuid.UUID("abcd2000" + "0" * 24)
    _sender_with_id(app, first, "one@remote.test")
    _sender_with_id(app, second, "two@remote.test")
    assert resolve_id(app, "abcd1") == first.hex
    assert resolve_id(app, str(second)) == second.hex  # the dashed form too
    with pytest.raises(InvalidInput) as ambiguous:
        resolve_id(app, "abcd")
    assert first.hex in str(ambiguous.value) and second.hex in str(ambiguous.value)
    with pytest.raises(NotFound):
        resolve_id(app, "ffff0")
    with pytest.raises(InvalidInput):
        resolve_id(app, "abc")
    assert resolve_id(app, ALICE) == ALICE  # an address is no id


# ------------------------------------------------------------------------------ state at, explain


def test_state_at_replays_the_log_up_to_each_moment(app: SourceAuth, clock: FakeClock) -> None:
    before = datetime.fromtimestamp(clock() - 1, tz=UTC)
    send(app)
    held_at = datetime.fromtimestamp(clock() + 1, tz=UTC)
    clock.advance(3600)
    app.dispatch_challenges()
    app.receive(reply_to_challenge(app, ALICE))
    after = datetime.fromtimestamp(clock() + 1, tz=UTC)

    assert app.state_at(before).senders == []
    then = app.state_at(held_at)
    assert [(s["address"], s["state"]) for s in then.senders] == [(ALICE, "challenged")]
    assert [(m["sender"], m["state"], m["held"]) for m in then.messages] == [
        (ALICE, "challenged", True)
    ]
    now = app.state_at(after, ALICE)
    assert [s["state"] for s in now.senders] == ["authorized"]
    held = [m for m in now.messages if not m["recipients"][0].startswith("confirm+")]
    assert [m["state"] for m in held] == ["authorized"]
    assert now.at == after.isoformat()


def test_explain_tells_a_message_story_in_one_paragraph(app: SourceAuth, clock: FakeClock) -> None:
    mid = confirmed_flow(app, clock)
    text = app.explain(mid)
    assert "\n" not in text
    for part in (mid, f"<{ALICE}>", BOB, "'Lunch?'", "held while its sender was challenged"):
        assert part in text, (part, text)
    for part in ("Challenge ", "the relay", f"a valid reply from {ALICE}", "released"):
        assert part in text, (part, text)
    assert "delivered" in text and text.endswith("It is now delivered.")


# ------------------------------------------------------------------------------ the hash chain


class Tamper:
    """Raw SQL on the store, as someone with write access but no keyring would do."""

    def __init__(self, execute: Callable[[str, tuple[Any, ...]], list[Any]], pg: bool) -> None:
        self.execute = execute
        self.pg = pg
        self.table = "sourceauth_events" if pg else "stored_events"
        self.pos = "notification_id" if pg else "rowid"

    def modify(self, position: int, state: bytes) -> None:
        self.execute(f"UPDATE {self.table} SET state = %s WHERE {self.pos} = %s", (state, position))

    def delete(self, position: int, *, with_link: bool = False) -> None:
        self.execute(f"DELETE FROM {self.table} WHERE {self.pos} = %s", (position,))
        if with_link:  # rewrite the chain row that holds its link, without it
            last, packed = self.execute(
                "SELECT position, links FROM sa_audit_chain WHERE position >= %s "
                "ORDER BY position LIMIT 1",
                (position,),
            )[0]
            kept = [(p, d) for p, d in unpack(bytes(packed)) if p != position]
            self.execute("DELETE FROM sa_audit_chain WHERE position = %s", (last,))
            if kept:
                self.execute(
                    "INSERT INTO sa_audit_chain (position, links) VALUES (%s, %s)",
                    (kept[-1][0], pack(kept)),
                )

    def forge_link(self, position: int, digest: bytes) -> None:
        self.execute(
            "INSERT INTO sa_audit_chain (position, links) VALUES (%s, %s)",
            (position, pack([(position, digest)])),
        )

    def swap(self, first: int, second: int) -> None:
        for source, dest in ((first, -1), (second, first), (-1, second)):
            self.execute(
                f"UPDATE {self.table} SET {self.pos} = %s WHERE {self.pos} = %s", (dest, source)
            )

    def insert(self, stored: Any, *, forged_link: bool) -> int:
        oid = stored.originator_id if self.pg else stored.originator_id.hex
        self.execute(
            f"INSERT INTO {self.table} (originator_id, originator_version, topic, state) "
            "VALUES (%s, %s, %s, %s)",
            (oid, stored.originator_version, stored.topic, stored.state),
        )
        position = int(self.execute(f"SELECT MAX({self.pos}) FROM {self.table}", ())[0][0])
        if forged_link:
            self.forge_link(position, bytes(32))
        return position


def sqlite_tamper(path: Path) -> Tamper:
    def execute(sql: str, params: tuple[Any, ...]) -> list[Any]:
        with sqlite3.connect(path) as conn:
            return list(conn.execute(sql.replace("%s", "?"), params).fetchall())

    return Tamper(execute, pg=False)


def forged_authorization(app: SourceAuth, address: str) -> Any:
    """A stored event granting `address` authorization, as a forger would write it."""
    sender: Any = app.repository.get(app.sender_id(address))
    forged = Sender.Authorized(
        originator_id=sender.id,
        originator_version=sender.version + 1,
        timestamp=Sender.Authorized.create_timestamp(),
        actor="operator",
        reason="forged",
    )
    return app.mapper.to_stored_event(forged)


def reworded(app: SourceAuth, position: int) -> bytes:
    """The state of the event at `position` recorded a minute later: still a valid event."""
    notification = app.recorder.select_notifications(start=position, limit=1)[0]
    event = app.mapper.to_domain_event(notification)
    changed = type(event)(**{**vars(event), "timestamp": event.timestamp + timedelta(minutes=1)})
    return bytes(app.mapper.to_stored_event(changed).state)


def a_log(app: SourceAuth, clock: FakeClock) -> int:
    confirmed_flow(app, clock)
    send(app, "carol@remote.test")
    app.dispatch_challenges()
    return log_position(app)


def assert_fault_at(app: SourceAuth, position: int, words: str, rebuild: bool = False) -> None:
    if rebuild:
        app.views.rebuild()  # type: ignore[attr-defined]
    fault, _ = verify(app)
    assert fault is not None, f"no fault found, expected one at {position}"
    assert fault.position == position, fault
    assert words in fault.problem, fault


@pytest.fixture
def tampered(
    app: SourceAuth, clock: FakeClock, tmp_path: Path
) -> Iterator[tuple[SourceAuth, Tamper]]:
    a_log(app, clock)
    fault, summary = verify(app)
    assert fault is None and "hash chain intact" in summary, fault
    yield app, sqlite_tamper(tmp_path / "sourceauth.db")


def test_sqlite_modified_event_is_named(tampered: tuple[SourceAuth, Tamper]) -> None:
    app, tamper = tampered
    tamper.modify(3, reworded(app, 3))
    assert_fault_at(app, 3, "altered or moved", rebuild=True)


def test_sqlite_deleted_event_is_named_before_and_after_rebuild(
    tampered: tuple[SourceAuth, Tamper],
) -> None:
    app, tamper = tampered
    tamper.delete(4)
    assert_fault_at(app, 4, "deleted")
    assert_fault_at(app, 4, "deleted", rebuild=True)


def test_sqlite_deleted_event_with_its_link_is_named_at_the_next(
    tampered: tuple[SourceAuth, Tamper],
) -> None:
    app, tamper = tampered
    tamper.delete(4, with_link=True)
    assert_fault_at(app, 5, "removed with its link", rebuild=True)


def test_sqlite_reordered_events_are_named(tampered: tuple[SourceAuth, Tamper]) -> None:
    app, tamper = tampered
    tamper.swap(3, 5)
    assert_fault_at(app, 3, "altered or moved", rebuild=True)


def test_sqlite_inserted_event_is_named_with_or_without_a_forged_link(
    tampered: tuple[SourceAuth, Tamper],
) -> None:
    app, tamper = tampered
    position = tamper.insert(forged_authorization(app, "carol@remote.test"), forged_link=False)
    assert_fault_at(app, position, "inserted", rebuild=True)
    tamper.forge_link(position, b"x" * 32)
    assert_fault_at(app, position, "altered or moved")


def test_sqlite_removed_tail_passes_alone_but_not_against_a_seal(
    tampered: tuple[SourceAuth, Tamper],
) -> None:
    app, tamper = tampered
    sealed = seal(app)
    end = log_position(app)
    assert sealed.position == end and len(sealed.digest) == 64
    fault, _ = verify(app, sealed)
    assert fault is None, fault
    tamper.delete(end, with_link=True)
    app.views.rebuild()  # type: ignore[attr-defined]
    fault, _ = verify(app, sealed)
    assert fault is not None and fault.position == end and "removed from its end" in fault.problem
    assert verify(app, Seal(end - 1, "00" * 32))[0] is not None  # a wrong digest is a rewrite


def test_a_node_refuses_to_extend_a_chain_whose_tail_was_cut(
    tampered: tuple[SourceAuth, Tamper],
) -> None:
    app, tamper = tampered
    tamper.delete(log_position(app))  # the event only: SQLite reuses its position
    with pytest.raises(ChainBroken):
        app.authorize("eve@remote.test")


def write_together(nodes: list[SourceAuth], count: int) -> None:
    """Each node receives `count` messages from its own strangers, all nodes at once."""

    def work(n: int) -> Callable[[], None]:
        return lambda: [send(nodes[n], f"s{n}-{i}@remote.test", [BOB, DAVE]) for i in range(count)]

    run_together(*(work(n) for n in range(len(nodes))))


def test_sqlite_concurrent_writers_keep_one_sound_chain(make_engine: Any) -> None:
    nodes = [make_engine(), make_engine()]
    write_together(nodes, 25)
    fault, summary = verify(nodes[0])
    assert fault is None, fault
    assert f"intact to position {log_position(nodes[0])}" in summary


def test_a_store_written_before_the_chain_is_chained_on_open(
    make_engine: Any, tmp_path: Path
) -> None:
    app = make_engine()
    app.authorize("old@remote.test")
    send(app, "older@remote.test")
    app.close()
    sqlite_tamper(tmp_path / "sourceauth.db").execute("DELETE FROM sa_audit_chain", ())
    reopened = make_engine()
    fault, summary = verify(reopened)
    assert fault is None, fault
    assert seal(reopened).position == log_position(reopened)


# ------------------------------------------------------------------------------ PostgreSQL


@pytest.fixture
def pg() -> Iterator[PgSchema]:
    yield from pg_schema_fixture()


@pytest.fixture
def pg_node(
    pg: PgSchema, tmp_path: Path, clock: FakeClock, keyring: tokens.Keyring
) -> Iterator[Callable[[], SourceAuth]]:
    from sourceauth.adapters.storage.wiring import open_engine

    opened: list[SourceAuth] = []

    def build() -> SourceAuth:
        app = open_engine(
            settings=settings_for(),
            keyring=keyring,
            storage=pg.storage(tmp_path / "blobs"),
            clock=clock,
            challenges=FakeChallenges(),
            deliveries=FakeDeliveries(),
        )
        opened.append(app)
        return app

    yield build
    for app in opened:
        app.close()


def pg_tamper(pg: PgSchema) -> Tamper:
    def execute(sql: str, params: tuple[Any, ...]) -> list[Any]:
        with pg.connect() as conn:
            cursor = conn.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    return Tamper(execute, pg=True)


@postgres
@pytest.mark.parametrize("kind", ["modified", "deleted", "reordered", "inserted", "tail"])
def test_postgres_tampering_is_named(
    pg: PgSchema, pg_node: Callable[[], SourceAuth], clock: FakeClock, kind: str
) -> None:
    app = pg_node()
    end = a_log(app, clock)
    sealed = seal(app)
    fault, _ = verify(app, sealed)
    assert fault is None, fault
    tamper = pg_tamper(pg)
    if kind == "modified":
        tamper.modify(3, reworded(app, 3))
        expected, words = 3, "altered or moved"
    elif kind == "deleted":
        tamper.delete(4)
        expected, words = 4, "deleted"
    elif kind == "reordered":
        tamper.swap(3, 5)
        expected, words = 3, "altered or moved"
    elif kind == "inserted":
        expected = tamper.insert(forged_authorization(app, "carol@remote.test"), forged_link=False)
        words = "inserted"
    else:
        tamper.delete(end, with_link=True)
        expected, words = end, "removed from its end"
    app.views.rebuild()  # type: ignore[attr-defined]
    fault, _ = verify(app, sealed)
    assert fault is not None and fault.position == expected, fault
    assert words in fault.problem, fault


@postgres
def test_postgres_concurrent_nodes_keep_one_sound_chain(
    pg_node: Callable[[], SourceAuth],
) -> None:
    nodes = [pg_node(), pg_node()]
    write_together(nodes, 20)
    fault, summary = verify(nodes[1])
    assert fault is None, fault
    assert f"intact to position {log_position(nodes[1])}" in summary


def test_a_view_row_changed_removed_or_added_is_named_streamed_row_by_row(
    tampered: tuple[SourceAuth, Tamper],
) -> None:
    views_drift_named(*tampered)


@postgres
def test_postgres_view_row_changed_removed_or_added_is_named(
    pg: PgSchema, pg_node: Callable[[], SourceAuth], clock: FakeClock
) -> None:
    app = pg_node()
    a_log(app, clock)
    assert verify(app)[0] is None
    views_drift_named(app, pg_tamper(pg))


def views_drift_named(app: SourceAuth, tamper: Tamper) -> None:
    rows = tamper.execute("SELECT sender_id, state FROM sa_whitelist ORDER BY sender_id", ())
    assert len(rows) >= 2
    first, second = rows[0][0], rows[1][0]

    tamper.execute("UPDATE sa_whitelist SET state = 'blocked' WHERE sender_id = %s", (second,))
    fault, _ = verify(app)
    assert fault is not None and "view sa_whitelist" in fault.problem, fault
    assert "at row 1 (the rows differ)" in fault.problem, fault

    tamper.execute("DELETE FROM sa_whitelist WHERE sender_id = %s", (first,))
    fault, _ = verify(app)
    assert fault is not None and "at row 0" in fault.problem, fault

    app.views.rebuild()  # type: ignore[attr-defined]
    assert verify(app)[0] is None
    tamper.execute(
        "INSERT INTO sa_whitelist (sender_id, address, scope, state, since, via, reason, version)"
        " VALUES (%s, 'forged@remote.test', 'global', 'authorized', 0, 'operator', 'x', 1)",
        ("f" * 32,),
    )
    fault, _ = verify(app)
    assert fault is not None, "an extra live row went unseen"
    assert f"at row {len(rows)} (a row only in the live view)" in fault.problem, fault


@postgres
def test_postgres_views_in_a_language_collation_compare_in_byte_order(
    pg: PgSchema, pg_node: Callable[[], SourceAuth], clock: FakeClock
) -> None:
    """en-US orders 'a_x' before 'a.x', SQLite's scratch rebuild the other way round: the
    comparison must not take that for drift."""
    app = pg_node()
    for n, recipient in enumerate(["a.x@example.test", "a_x@example.test"]):
        send(app, f"stranger{n}@remote.test", recipient)
    app.catch_up()
    tamper = pg_tamper(pg)
    tamper.execute(
        'ALTER TABLE sa_held_counts ALTER COLUMN recipient TYPE TEXT COLLATE "en-US-x-icu"', ()
    )
    ordered = tamper.execute("SELECT recipient FROM sa_held_counts ORDER BY recipient", ())
    assert [r[0] for r in ordered] == ["a_x@example.test", "a.x@example.test"]
    fault, summary = verify(app)
    assert fault is None, fault
    assert "views equal a fresh rebuild" in summary
