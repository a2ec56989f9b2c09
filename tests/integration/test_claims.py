"""Outbound work claimed on the SQLite file (DESIGN.md §8): two engines on one file, as two
processes of one node would be, each lease written in a write transaction."""

from __future__ import annotations

from collections import Counter

from sourceauth.engine.policy import Limits
from tests.conftest import EngineFactory, incoming, reply_to_challenge
from tests.integration.test_engine import run_together
from tests.support.fakes import FakeChallenges, FakeDeliveries
from tests.support.shared_caps import (
    flood_one_domain_through_both,
    one_pending_challenge_per_mailbox,
    total_cap_across_domains,
)

BOB = "bob@example.test"


def test_two_engines_on_one_file_send_each_challenge_and_delivery_once(
    make_engine: EngineFactory,
) -> None:
    relays, hops = [FakeChallenges(), FakeChallenges()], [FakeDeliveries(), FakeDeliveries()]
    a, b = (make_engine(challenges=r, deliveries=h) for r, h in zip(relays, hops, strict=True))
    senders = [f"racer{i}@remote{i % 3}.test" for i in range(40)]
    for s in senders:
        a.receive(incoming(a, s, BOB))

    run_together(a.dispatch_challenges, b.dispatch_challenges, a.dispatch_challenges)
    sent = Counter(c.challenge_id for r in relays for c in r.sent)
    assert len(sent) == len(senders) and set(sent.values()) == {1}, sent.most_common(3)

    for i, s in enumerate(senders):
        via = (a, b)[i % 2]
        token = next(c.token for r in relays for c in r.to(s))
        via.receive(reply_to_challenge(via, s, token=token))
    run_together(a.dispatch_deliveries, b.dispatch_deliveries, b.dispatch_deliveries)
    handed = Counter(j.message_id for h in hops for j in h.jobs)
    assert len(handed) == len(senders) and set(handed.values()) == {1}, handed.most_common(3)
    assert {m.state for m in b.quarantine(state="delivered")} == {"delivered"}
    assert len(b.quarantine(state="delivered")) == len(senders)
    assert not a.views.claimed_work()  # type: ignore[attr-defined]


def test_two_engines_on_one_file_share_the_domain_cap(make_engine: EngineFactory) -> None:
    limits = Limits(challenges_per_domain_per_hour=5)
    a, b = make_engine(limits=limits), make_engine(limits=limits)
    flood_one_domain_through_both(a, b, cap=5)


def test_two_engines_on_one_file_share_the_hourly_cap(make_engine: EngineFactory) -> None:
    limits = Limits(challenges_per_hour=6)
    a, b = make_engine(limits=limits), make_engine(limits=limits)
    total_cap_across_domains(a, b, cap=6)


def test_two_engines_on_one_file_keep_one_pending_challenge_per_mailbox(
    make_engine: EngineFactory,
) -> None:
    a, b = make_engine(), make_engine()
    one_pending_challenge_per_mailbox(a, b)
