"""Checks that challenge caps hold across engines sharing one store (issue 8, item 3): used by
the SQLite test (two engines on one file) and the PostgreSQL one (two nodes on one schema)."""

from __future__ import annotations

from collections import Counter

from sourceauth.engine.application import SourceAuth
from sourceauth.engine.service.caps import MAILBOX_PENDING, RATE_LIMITED
from tests.conftest import event_name, events_since, incoming
from tests.integration.test_engine import run_together

BOB = "bob@example.test"
CHALLENGE_EVENTS = ("Sender.FirstChallenged", "Sender.Challenged")


def challenges(app: SourceAuth) -> Counter[str]:
    """Challenge events in the shared log, per sender address."""
    found: Counter[str] = Counter()
    for event in events_since(app, 0):
        if event_name(event) in CHALLENGE_EVENTS:
            found[getattr(event, "address", "") or str(event.originator_id)] += 1
    return found


def flood_one_domain_through_both(a: SourceAuth, b: SourceAuth, cap: int) -> None:
    """Both engines (cap `cap` per domain) race 3 x cap senders of one domain: the store's
    count stops the total at the cap, and every copy over it is held, waiting."""
    senders = [f"flood{i}@flood.test" for i in range(3 * cap)]

    def feed(app: SourceAuth, mine: list[str]) -> None:
        for s in mine:
            app.receive(incoming(app, s, BOB, subject="flood"))

    run_together(lambda: feed(a, senders[0::2]), lambda: feed(b, senders[1::2]))  # type: ignore[func-returns-value]
    total = sum(challenges(a).values())
    assert total == cap, f"{total} challenges recorded with a cap of {cap} per domain"
    held = b.quarantine()
    assert len(held) == len(senders)
    states = Counter(m.state for m in held)
    assert states == Counter({"challenged": cap, "held": len(senders) - cap}), states
    assert all(m.reason.startswith(RATE_LIMITED) for m in held if m.state == "held")


def total_cap_across_domains(a: SourceAuth, b: SourceAuth, cap: int) -> None:
    """The server-wide cap, shared: senders of many domains race both engines."""
    senders = [f"s{i}@d{i}.test" for i in range(4 * cap)]
    run_together(
        lambda: [a.receive(incoming(a, s, BOB)) for s in senders[0::2]],  # type: ignore[arg-type,return-value]
        lambda: [b.receive(incoming(b, s, BOB)) for s in senders[1::2]],  # type: ignore[arg-type,return-value]
    )
    total = sum(challenges(a).values())
    assert total == cap, f"{total} challenges recorded with a cap of {cap} per hour"


def one_pending_challenge_per_mailbox(a: SourceAuth, b: SourceAuth) -> None:
    """A challenge pending to joe@ (sent by engine a) holds joe+other@ at engine b, which has
    not seen it; raced, two extensions of one mailbox get one challenge between them."""
    a.receive(incoming(a, "joe+one@remote.test", BOB))
    b.receive(incoming(b, "joe+two@remote.test", BOB))
    assert challenges(a) == Counter({"joe+one@remote.test": 1})
    [held] = b.quarantine(sender="joe+two@remote.test")
    assert held.state == "held" and held.reason == MAILBOX_PENDING, held

    run_together(
        lambda: a.receive(incoming(a, "ann+x@race.test", BOB)),
        lambda: b.receive(incoming(b, "ann+y@race.test", BOB)),
    )
    raced = {s: n for s, n in challenges(a).items() if s.startswith("ann+")}
    assert sum(raced.values()) == 1, raced
