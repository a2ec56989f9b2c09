"""The engine on a real PostgreSQL (DESIGN.md §4, §5, §6, §8): one fresh schema per test.

Events, views and tracking live in the schema; blobs in a directory shared by the "nodes"
(two SourceAuth instances on one database). Only the challenge relay and the next hop are
fakes, except in the SMTP tests, where they are real sinks on loopback.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import build_engine
from sourceauth.adapters.storage.audit import verify
from sourceauth.adapters.storage.wiring import open_engine
from sourceauth.engine import tokens
from sourceauth.engine.api import BounceInfo, Decision, MaintenanceReport, Receipt
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.policy import Limits
from sourceauth.engine.service.context import WORK_LEASE
from tests.conftest import (
    FakeChallenges,
    FakeClock,
    FakeDeliveries,
    event_name,
    events_since,
    incoming,
    reply_to_challenge,
    settings_for,
)
from tests.integration.pg import PgSchema, fresh_schema, pg_schema_fixture, postgres
from tests.integration.smtp_harness import (
    RunningFilter,
    message,
    parsed,
    token_of,
    write_config,
)
from tests.support.shared_caps import (
    flood_one_domain_through_both,
    one_pending_challenge_per_mailbox,
    total_cap_across_domains,
)
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_outbound_idle, wait_until

pytestmark = [postgres, pytest.mark.timeout(120)]

ALICE = "alice@remote.test"
MALLORY = "mallory@remote.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"
DSN = BounceInfo(failed=True, diagnostic="5.1.1 smtp; 550 5.1.1 user unknown")

Node = Callable[..., SourceAuth]


@pytest.fixture
def pg() -> Iterator[PgSchema]:
    yield from pg_schema_fixture()


@pytest.fixture
def node(pg: PgSchema, tmp_path: Path, clock: FakeClock, keyring: tokens.Keyring) -> Iterator[Node]:
    """node(challenges=…, deliveries=…, **settings): one more SourceAuth on the test's schema.

    Every node shares the schema, the blob directory, the clock and the keyring, as filter
    nodes behind one PostgreSQL do; all are closed before the schema is dropped."""
    opened: list[SourceAuth] = []

    def build(*, challenges: Any = None, deliveries: Any = None, **overrides: Any) -> SourceAuth:
        app = open_engine(
            settings=settings_for(**overrides),
            keyring=keyring,
            storage=pg.storage(tmp_path / "blobs"),
            clock=clock,
            challenges=challenges,
            deliveries=deliveries,
        )
        opened.append(app)
        return app

    yield build
    for app in opened:
        try:
            app.close()
        except Exception:
            pass


def all_events(app: SourceAuth) -> list[Any]:
    return events_since(app, 0)


def names(events: list[Any]) -> Counter[str]:
    return Counter(event_name(e) for e in events)


def per_aggregate(events: list[Any], name: str) -> Counter[Any]:
    """How many `name` events each aggregate has."""
    return Counter(e.originator_id for e in events if event_name(e) == name)


def bounce_to(token: str) -> str:
    return f"bounces+{token}@example.test"


def run_together(*work: Callable[[], Any], timeout: float = 60.0) -> list[Any]:
    """Run each callable in its own thread, all released at once; re-raise the first error."""
    gate = threading.Barrier(len(work))
    results: list[Any] = [None] * len(work)
    errors: list[BaseException] = []

    def run(i: int, fn: Callable[[], Any]) -> None:
        try:
            gate.wait(timeout=10)
            results[i] = fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


# ------------------------------------------------------------------------------ wiring


def test_engine_creates_its_schema_and_keeps_every_table_in_it(
    tmp_path: Path, keyring: tokens.Keyring, clock: FakeClock
) -> None:
    with fresh_schema("sa_new", create=False) as pg:
        app = open_engine(
            settings=settings_for(),
            keyring=keyring,
            storage=pg.storage(tmp_path / "blobs"),
            clock=clock,
        )
        try:
            app.receive(incoming(app, ALICE, BOB))
            tables = {
                r[0]
                for r in pg.query(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                    (pg.schema,),
                )
            }
            assert {"sourceauth_events", "sa_tracking", "sa_quarantine", "sa_whitelist"} <= tables
            assert pg.query("SELECT count(*) FROM sourceauth_events")[0][0] == 2
        finally:
            app.close()


# ------------------------------------------------------------------------------ §1 the flow


def test_core_flow_hold_challenge_once_confirm_releases_all_dsn_expires_maintain_purges(
    node: Node, clock: FakeClock
) -> None:
    relay, next_hop = FakeChallenges(), FakeDeliveries()
    app = node(challenges=relay, deliveries=next_hop)

    receipts = [app.receive(incoming(app, ALICE, BOB, subject=f"m{i}")) for i in range(3)]
    assert [r.decisions[0].decision for r in receipts] == [Decision.CHALLENGE] * 3
    assert [r.decisions[0].reason for r in receipts] == [
        "challenge_queued",
        "challenge_pending",
        "challenge_pending",
    ]
    assert app.dispatch_challenges() == (1, 0, 0)
    assert app.dispatch_challenges() == (0, 0, 0)
    assert [c.to for c in relay.sent] == [ALICE]
    assert [m.state for m in app.quarantine(sender=ALICE)] == ["challenged"] * 3

    confirm = app.receive(reply_to_challenge(app, ALICE, token=relay.sent[0].token))
    assert confirm.decisions[0].decision == Decision.CONFIRM
    assert confirm.decisions[0].reason.startswith("confirm_accepted")
    assert app.sender(ALICE).state == "authorized"
    assert app.dispatch_deliveries() == (3, 0, 0)
    assert sorted(j.recipients for j in next_hop.jobs) == [(BOB,)] * 3
    held = [m for m in app.quarantine(sender=ALICE) if m.subject.startswith("m")]
    assert [m.state for m in held] == ["delivered"] * 3
    # an authorized sender's next message goes straight through
    direct = app.receive(incoming(app, ALICE, BOB, subject="after"))
    assert direct.decisions[0].decision == Decision.DELIVER
    assert app.dispatch_deliveries() == (1, 0, 0)

    # a DSN for Mallory's challenge expires Mallory and every message held for it
    for i in range(2):
        app.receive(incoming(app, MALLORY, [BOB, CAROL], subject=f"x{i}"))
    app.dispatch_challenges()
    token = relay.to(MALLORY)[0].token
    dsn = app.receive(incoming(app, "", bounce_to(token), bounce=DSN, subject="failure"))
    assert dsn.decisions[0].decision == Decision.BOUNCE
    assert dsn.decisions[0].reason.startswith("bounce_recorded")
    assert app.sender(MALLORY).state == "expired"
    expired = [m for m in app.quarantine(sender=MALLORY)]
    assert [m.state for m in expired] == ["expired", "expired"]
    originals = [m.receipt_id for m in expired]
    assert all(app.blobs.exists(r) for r in originals)  # type: ignore[union-attr]

    report = app.maintain()
    assert report.purged == 2 and report.conflicts == 0
    assert [m.state for m in app.quarantine(sender=MALLORY)] == ["purged", "purged"]
    assert not any(app.blobs.exists(r) for r in originals)  # type: ignore[union-attr]
    assert app.maintain().purged == 0
    assert len(relay.sent) == 2 and len(next_hop.jobs) == 4
    fault, summary = verify(app)
    assert fault is None, fault
    assert "views equal a fresh rebuild" in summary


def test_rebuilt_views_equal_live_views_row_for_row_and_audit_verify_is_sound(
    node: Node, clock: FakeClock
) -> None:
    relay, next_hop = FakeChallenges(), FakeDeliveries()
    app = node(challenges=relay, deliveries=next_hop)
    senders = [f"s{i}@remote{i % 3}.test" for i in range(12)]
    for i, s in enumerate(senders):
        app.receive(incoming(app, s, [BOB, CAROL, "dave@other.test"][: 1 + i % 3]))
    app.dispatch_challenges()
    for s in senders[:4]:
        app.receive(reply_to_challenge(app, s))
    for s in senders[4:6]:
        app.receive(incoming(app, "", bounce_to(relay.to(s)[0].token), bounce=DSN))
    app.authorize("friend@remote.test", actor="operator", reason="known")
    app.block(senders[6], actor="operator", reason="spam")
    app.receive(incoming(app, ALICE, BOB, headers=[("Precedence", "bulk")]))
    app.dispatch_deliveries()
    clock.advance(8 * 86400)
    app.maintain()
    app.receive(incoming(app, senders[7], BOB, subject="again"))  # expired -> challenged again

    with app.exclusive():
        app.catch_up()
        live = app.views.dump()  # type: ignore[attr-defined]
        applied = app.views.rebuild()  # type: ignore[attr-defined]
        rebuilt = app.views.dump()  # type: ignore[attr-defined]
    assert applied == len(all_events(app))
    assert sum(len(rows) for rows in live.values()) > 40
    for table in live:
        assert rebuilt[table] == live[table], table
    fault, summary = verify(app)
    assert fault is None, fault
    # a second engine opened on the same schema sees the same views
    other = node()
    assert other.views.dump() == rebuilt  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ §8 two nodes


def test_two_nodes_racing_the_first_message_from_one_sender_record_one_challenge(
    node: Node,
) -> None:
    relay_a, relay_b = FakeChallenges(), FakeChallenges()
    a, b = node(challenges=relay_a), node(challenges=relay_b)
    # Force the race: each node decides on the same (empty) state before either writes.
    gate = threading.Barrier(2)
    conflicts: Counter[str] = Counter()
    for app, name in ((a, "a"), (b, "b")):
        original = app.save_unit
        first = [True]

        def save(
            *aggregates: Any,
            _save: Any = original,
            _name: str = name,
            _first: list[bool] = first,
            **kwargs: Any,
        ) -> Any:
            if _first[0]:
                _first[0] = False
                gate.wait(timeout=10)
            try:
                return _save(*aggregates, **kwargs)
            except IntegrityError:
                conflicts[_name] += 1
                raise

        app.save_unit = save  # type: ignore[method-assign]

    ra, rb = run_together(
        lambda: a.receive(incoming(a, ALICE, BOB, subject="via a")),
        lambda: b.receive(incoming(b, ALICE, BOB, subject="via b")),
    )
    assert sum(conflicts.values()) == 1, conflicts
    assert {ra.decisions[0].decision, rb.decisions[0].decision} == {Decision.CHALLENGE}
    assert sorted([ra.decisions[0].reason, rb.decisions[0].reason]) == [
        "challenge_pending",
        "challenge_queued",
    ]
    events = all_events(a)
    assert names(events)["Sender.FirstChallenged"] == 1
    assert names(events)["Sender.Challenged"] == 0
    assert names(events)["Message.Challenged"] == 2
    for app in (a, b):
        assert sorted(m.state for m in app.quarantine(sender=ALICE)) == ["challenged"] * 2
    # the challenge leaves once, whichever node dispatches first
    assert a.dispatch_challenges()[0] + b.dispatch_challenges()[0] == 1
    assert len(relay_a.sent) + len(relay_b.sent) == 1


def test_two_nodes_racing_many_senders_never_record_a_second_challenge(node: Node) -> None:
    a, b = node(), node()
    senders = [f"racer{i}@remote{i % 4}.test" for i in range(25)]

    def flood(app: SourceAuth, tag: str) -> list[Receipt]:
        return [app.receive(incoming(app, s, BOB, subject=tag)) for s in senders]

    for _ in range(2):
        run_together(lambda: flood(a, "a"), lambda: flood(b, "b"))
    events = all_events(a)
    assert set(per_aggregate(events, "Sender.FirstChallenged").values()) == {1}
    assert len(per_aggregate(events, "Sender.FirstChallenged")) == len(senders)
    assert names(events)["Sender.Challenged"] == 0
    held = b.quarantine()
    assert len(held) == 4 * len(senders)
    assert {m.state for m in held} == {"challenged"}
    assert len({r.challenge_id for r in a.views.challenges()}) == len(senders)  # type: ignore[attr-defined]


def test_two_nodes_catching_up_a_fresh_database_at_once_queue_instead_of_colliding(
    node: Node,
) -> None:
    """Found here: the tracking row used to be inserted by the first catch-up, so two nodes
    doing their first catch-up at once both inserted it and one failed (a 451 over SMTP)."""
    a, b = node(), node()
    a.receive(incoming(a, ALICE, BOB))
    b.receive(incoming(b, MALLORY, BOB))  # 4 events, applied by neither view yet
    gate = threading.Barrier(2)
    for app in (a, b):
        select = app.recorder.select_notifications

        def held_select(*args: Any, _select: Any = select, **kwargs: Any) -> Any:
            found = _select(*args, **kwargs)
            try:
                gate.wait(timeout=1.5)  # both inside catch-up together, if the lock lets them
            except threading.BrokenBarrierError:
                pass
            return found

        app.views.recorder = type(  # type: ignore[attr-defined]
            "Held", (), {"select_notifications": staticmethod(held_select)}
        )()
    applied = run_together(a.views.catch_up, b.views.catch_up)
    assert sum(applied) == 4
    assert sorted(m.sender for m in a.quarantine()) == [ALICE, MALLORY]


def test_maintain_on_two_nodes_at_once_is_idempotent(node: Node, clock: FakeClock) -> None:
    relay, hop_a, hop_b = FakeChallenges(), FakeDeliveries(), FakeDeliveries()
    a = node(challenges=relay, deliveries=hop_a)
    b = node(challenges=FakeChallenges(), deliveries=hop_b)
    confirmed = [f"ok{i}@remote.test" for i in range(3)]
    failed = [f"bad{i}@remote.test" for i in range(3)]
    lapsing = [f"gone{i}@remote.test" for i in range(3)]
    for s in confirmed + failed + lapsing:
        for i in range(2):
            a.receive(incoming(a, s, [BOB, CAROL][: 1 + i], subject=f"{s}-{i}"))
    a.dispatch_challenges()
    clock.advance(3600)
    for s in confirmed:
        a.receive(reply_to_challenge(a, s))  # released, left for maintain to deliver
    for s in failed:
        a.receive(incoming(a, "", bounce_to(relay.to(s)[0].token), bounce=DSN))
    clock.advance(8 * 86400)  # the remaining challenges lapse
    before = len(all_events(a))

    reports: list[MaintenanceReport] = run_together(a.maintain, b.maintain)
    again: list[MaintenanceReport] = run_together(a.maintain, b.maintain)

    events = all_events(a)
    new = events[before:]
    for name in ("Message.Expired", "Message.Purged", "Message.Delivered", "Message.Released"):
        twice = {k: v for k, v in per_aggregate(events, name).items() if v > 1}
        assert not twice, f"{name} recorded more than once for {twice}"
    assert set(per_aggregate(events, "Sender.ChallengeExpired").values()) <= {1}
    assert names(new)["Sender.ChallengeExpired"] == len(lapsing)
    assert names(new)["Message.Purged"] == 2 * (len(failed) + len(lapsing))
    assert names(new)["Message.Delivered"] == 2 * len(confirmed)
    total = {k: sum(r.as_dict()[k] for r in reports) for k in reports[0].as_dict()}
    assert total["challenges_expired"] == len(lapsing)
    assert total["purged"] == 2 * (len(failed) + len(lapsing))
    assert total["delivered"] == 2 * len(confirmed)
    # the second round only collects the originals the first round's deliveries freed
    skip = {"conflicts", "blobs_collected"}
    assert all(v == 0 for r in again for k, v in r.as_dict().items() if k not in skip)
    collected = sum(r.blobs_collected for r in reports + again)
    assert collected == 2 * len(confirmed) + len(confirmed) + len(failed)  # each exactly once
    assert names(all_events(a)) == names(events)  # the second round recorded nothing
    # each copy leased to one node: handed to a next hop exactly once
    handed = Counter(j.message_id for j in hop_a.jobs + hop_b.jobs)
    assert len(handed) == 2 * len(confirmed) and set(handed.values()) == {1}
    states = Counter(m.state for m in b.quarantine())
    assert states == {
        "delivered": 2 * len(confirmed),
        "purged": 2 * (len(failed) + len(lapsing)),
        "discarded": len(confirmed) + len(failed),  # the replies and the DSNs themselves
    }
    fault, _ = verify(b)
    assert fault is None, fault


# ------------------------------------------------------------------------------ over SMTP


def pg_config(tmp: Path, pg: PgSchema, relay: Sink, next_hop: Sink, *, data_dir: Path) -> Any:
    tmp.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp, relay=relay.url, next_hop=next_hop.url)
    text = path.read_text(encoding="utf-8").replace(
        f'data_dir = "{tmp / "var"}"', f'data_dir = "{data_dir}"'
    )
    path.write_text(text + f'\n[storage]\nurl = "{pg.url}"\n', encoding="utf-8")
    return load_config(path)


def test_smtp_flow_on_postgresql(tmp_path: Path, pg: PgSchema) -> None:
    stranger, protected = "alice@remote.test", "bob@example.test"
    with Sink() as relay, Sink() as next_hop:
        cfg = pg_config(tmp_path, pg, relay, next_hop, data_dir=tmp_path / "var")
        assert cfg.storage.kind == "postgresql" and cfg.storage.pg_schema == pg.schema
        flt = RunningFilter(cfg)
        try:
            for subject in ("one", "two"):
                code, text = flt.sendmail_reply(
                    stranger, [protected], message(stranger, protected, subject=subject)
                )
                assert code == 250 and b"queued as" in text
            token = token_of(relay.wait_for(1)[0])
            reply = message(stranger, f"confirm+{token}@example.test", subject="Re: confirm")
            flt.send(stranger, [f"confirm+{token}@example.test"], reply)
            delivered = next_hop.wait_for(2, timeout=20)
            assert sorted(parsed(m)["Subject"] for m in delivered) == ["one", "two"]
            assert all(parsed(m)["X-SourceAuth-Id"] for m in delivered)
            wait_outbound_idle(flt.app)
            assert len(relay.messages) == 1 and len(next_hop.messages) == 2
        finally:
            flt.stop()
    # everything is in the schema (the originals too), nothing in a SQLite file or a blob file
    assert not list((tmp_path / "var").glob("*.db"))
    assert not list((tmp_path / "var").glob("blobs/**/*[0-9a-f]"))
    assert pg.query("SELECT count(*) FROM sa_blob_data")[0][0] == 3  # two held, one reply
    assert pg.query("SELECT count(*) FROM sourceauth_events")[0][0] >= 10
    app = build_engine(cfg, transports=False)  # views catch up on the next query
    try:
        assert Counter(m.state for m in app.quarantine()) == {"delivered": 2, "discarded": 1}
        assert [(s.address, s.state) for s in app.whitelist()] == [(stranger, "authorized")]
    finally:
        app.close()
    assert pg.query("SELECT state FROM sa_whitelist") == [("authorized",)]


def test_two_smtp_nodes_on_one_database_send_one_challenge_and_release_across_nodes(
    tmp_path: Path, pg: PgSchema
) -> None:
    """Two filters (each behind its own MTA, each with its own data directory) share only the
    database: the originals live in it, so a confirmation at one node releases mail the other
    accepted, and each copy is delivered once."""
    stranger, protected = "carol@remote.test", "bob@example.test"
    a_var, b_var = tmp_path / "a" / "var", tmp_path / "b" / "var"
    with Sink() as relay, Sink() as next_hop:
        nodes = [RunningFilter(pg_config(tmp_path / "a", pg, relay, next_hop, data_dir=a_var))]
        # The operator copies the first node's keyring to every other node.
        b_var.mkdir(parents=True, mode=0o700)
        shutil.copy2(a_var / "secret", b_var / "secret")
        nodes.append(RunningFilter(pg_config(tmp_path / "b", pg, relay, next_hop, data_dir=b_var)))
        try:
            codes = run_together(
                *(
                    (
                        lambda flt=flt, i=i: flt.sendmail_reply(
                            stranger, [protected], message(stranger, protected, subject=f"n{i}")
                        )
                    )
                    for i, flt in enumerate(nodes)
                )
            )
            assert [c for c, _ in codes] == [250, 250]
            first = relay.wait_for(1, timeout=15)
            wait_outbound_idle(*(n.app for n in nodes))  # every challenge either node queued
            tokens_sent = {token_of(m) for m in relay.messages}
            assert len(tokens_sent) == 1, tokens_sent
            token = token_of(first[0])
            # the reply reaches the other node: it releases mail held by both
            nodes[1].send(
                stranger,
                [f"confirm+{token}@example.test"],
                message(stranger, f"confirm+{token}@example.test", subject="Re: confirm"),
            )
            wait_until(
                lambda: len({parsed(m)["X-SourceAuth-Id"] for m in next_hop.messages}) == 2,
                message="both held copies at the next hop",
            )
            wait_outbound_idle(*(n.app for n in nodes))
            ids = Counter(parsed(m)["X-SourceAuth-Id"] for m in next_hop.messages)
            assert sorted(parsed(m)["Subject"] for m in next_hop.messages) == ["n0", "n1"]
            assert len(ids) == 2 and set(ids.values()) == {1}, ids
            assert len(relay.messages) == 1
            print(
                f"two nodes: challenges sent {len(relay.messages)} (distinct tokens 1), "
                f"deliveries {sum(ids.values())} for 2 copies"
            )
        finally:
            for flt in nodes:
                flt.stop()
    assert pg.query("SELECT count(*) FROM sa_challenges")[0][0] == 1


# ------------------------------------------------------------------------------ §8 claimed work


def test_two_nodes_dispatching_at_once_send_each_challenge_and_each_delivery_exactly_once(
    node: Node,
) -> None:
    """Outbound work is leased in the database: four dispatchers (two per node) racing over
    the same due rows hand each challenge to a relay once and each copy to a next hop once."""
    relays, hops = [FakeChallenges(), FakeChallenges()], [FakeDeliveries(), FakeDeliveries()]
    a, b = (node(challenges=r, deliveries=h) for r, h in zip(relays, hops, strict=True))
    senders = [f"racer{i}@remote{i % 5}.test" for i in range(48)]
    run_together(
        lambda: [a.receive(incoming(a, s, BOB, subject="via a")) for s in senders],
        lambda: [b.receive(incoming(b, s, BOB, subject="via b")) for s in senders],
    )

    run_together(
        a.dispatch_challenges, b.dispatch_challenges, a.dispatch_challenges, b.dispatch_challenges
    )
    wait_outbound_idle(a, b)
    sent = Counter(c.challenge_id for r in relays for c in r.sent)
    assert len(sent) == len(senders) and set(sent.values()) == {1}, sent.most_common(3)
    assert all(relays), "both nodes took a share of the work"  # the race really happened

    for i, s in enumerate(senders):
        via = (a, b)[i % 2]
        token = next(c.token for r in relays for c in r.to(s))
        via.receive(reply_to_challenge(via, s, token=token))
    run_together(
        a.dispatch_deliveries, b.dispatch_deliveries, a.dispatch_deliveries, b.dispatch_deliveries
    )
    wait_outbound_idle(a, b)
    handed = Counter(j.message_id for h in hops for j in h.jobs)
    assert len(handed) == 2 * len(senders) and set(handed.values()) == {1}, handed.most_common(3)
    events = all_events(a)
    assert set(per_aggregate(events, "Message.Delivered").values()) == {1}
    assert set(per_aggregate(events, "Sender.ChallengeSent").values()) == {1}
    assert not a.views.claimed_work()  # type: ignore[attr-defined]  # every lease ended


class Stuck:
    """Never answers until released: its worker holds its leases like a node that died in
    the middle of a send."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.release.wait(60)


class StuckRelay(FakeChallenges, Stuck):
    def __init__(self) -> None:
        FakeChallenges.__init__(self)
        Stuck.__init__(self)

    def send(self, challenge: Any) -> Any:
        self.hold()
        return super().send(challenge)


class StuckHop(FakeDeliveries, Stuck):
    def __init__(self) -> None:
        FakeDeliveries.__init__(self)
        Stuck.__init__(self)

    def deliver(self, job: Any) -> Any:
        self.hold()
        return super().deliver(job)


def test_a_dead_workers_leases_lapse_and_another_node_sends_with_the_same_token_and_id(
    node: Node, clock: FakeClock
) -> None:
    stuck_relay, stuck_hop = StuckRelay(), StuckHop()
    relay, hop = FakeChallenges(), FakeDeliveries()
    dead = node(challenges=stuck_relay, deliveries=stuck_hop)
    alive = node(challenges=relay, deliveries=hop)
    dead.receive(incoming(dead, ALICE, BOB, subject="held"))
    stuck = threading.Thread(target=dead.dispatch_challenges, daemon=True)
    delivering = threading.Thread(target=dead.dispatch_deliveries, daemon=True)
    stuck.start()
    try:
        assert stuck_relay.entered.wait(30)
        assert alive.dispatch_challenges() == (0, 0, 0)  # leased to the dead worker
        clock.advance(WORK_LEASE + 1)
        assert alive.dispatch_challenges() == (1, 0, 0)  # taken over once the lease lapsed
        token = relay.sent[0].token
        assert token == alive.token_for(relay.sent[0].challenge_id)

        alive.receive(reply_to_challenge(alive, ALICE, token=token))
        delivering.start()
        assert stuck_hop.entered.wait(30)
        assert alive.dispatch_deliveries() == (0, 0, 0)
        clock.advance(WORK_LEASE + 1)
        assert alive.dispatch_deliveries() == (1, 0, 0)
        assert [j.recipients for j in hop.jobs] == [(BOB,)]
    finally:
        stuck_relay.release.set()
        stuck_hop.release.set()
        stuck.join(30)
        if delivering.ident is not None:
            delivering.join(30)
    # the dead worker's late answers: at least once, with the same token and the same id
    assert stuck_relay.sent[0].token == token
    assert stuck_hop.jobs[0].message_id == hop.jobs[0].message_id
    assert alive.quarantine(sender=ALICE)[0].state == "delivered"


def test_two_nodes_share_the_domain_cap_counted_in_the_database(node: Node) -> None:
    limits = Limits(challenges_per_domain_per_hour=5)
    flood_one_domain_through_both(node(limits=limits), node(limits=limits), cap=5)


def test_two_nodes_share_the_hourly_cap_counted_in_the_database(node: Node) -> None:
    limits = Limits(challenges_per_hour=6)
    total_cap_across_domains(node(limits=limits), node(limits=limits), cap=6)


def test_two_nodes_keep_one_pending_challenge_per_mailbox(node: Node) -> None:
    one_pending_challenge_per_mailbox(node(), node())
