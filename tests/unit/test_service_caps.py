"""Caps that a flood of forged senders cannot turn against real ones (issue 7): mail held over
a cap is challenged later when budget frees, and a unit redone after a conflict counts once."""

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import IntegrityError

from sourceauth.engine.api import Decision
from sourceauth.engine.policy import Limits
from tests.unit.conftest import ServiceFactory

BOB = "bob@example.test"
HOUR = 3600.0


def test_sender_held_over_the_domain_cap_is_challenged_once_budget_frees(
    make_service: ServiceFactory,
) -> None:
    service = make_service(limits=Limits(challenges_per_domain_per_hour=2))
    for index in range(5):
        service.receive(f"forged{index}@remote.test", BOB)
        service.clock.advance(1)
    real = service.receive("real@remote.test", BOB).decision_for(BOB)
    assert real.decision is Decision.HOLD and real.reason.startswith("rate_limited: ")
    service.dispatch()
    assert len(service.relay.sent) == 2
    service.app.maintain()  # no budget yet: nothing more leaves
    assert len(service.relay.sent) == 2
    service.clock.advance(HOUR + 120)
    report = service.app.maintain()
    assert report.challenged_later == 2  # oldest first, within the cap
    assert sorted(c.to for c in service.relay.sent[2:]) == [
        "forged2@remote.test",
        "forged3@remote.test",
    ]
    for _ in range(2):
        service.clock.advance(HOUR + 120)
        service.app.maintain()
    assert sorted(c.to for c in service.relay.sent[4:]) == [
        "forged4@remote.test",
        "real@remote.test",
    ]
    assert len(service.relay.sent) == 6


def test_challenges_later_per_pass_bounds_one_pass(make_service: ServiceFactory) -> None:
    limits = Limits(challenges_per_domain_per_hour=1, challenged_later_per_pass=1)
    service = make_service(limits=limits)
    for index in range(4):
        service.receive(f"user{index}@d{index}.remote.test", BOB)
    service.clock.advance(HOUR + 120)
    assert service.app.maintain().challenged_later == 1


def test_a_unit_redone_after_a_conflict_counts_its_challenge_once(
    make_service: ServiceFactory,
) -> None:
    service = make_service(limits=Limits(challenges_per_domain_per_hour=2))
    app: Any = service.app
    save = app.save_unit
    conflicts = [IntegrityError("another writer got there first")]

    def conflicting_save(*objs: Any, **kwargs: Any) -> Any:
        if conflicts:
            raise conflicts.pop()
        return save(*objs, **kwargs)

    app.save_unit = conflicting_save
    first = service.receive("a@remote.test", BOB).decision_for(BOB)
    assert first.reason == "challenge_queued" and not conflicts
    second = service.receive("b@remote.test", BOB).decision_for(BOB)
    assert second.reason == "challenge_queued"  # counted once: the cap of 2 is not reached
    third = service.receive("c@remote.test", BOB).decision_for(BOB)
    assert third.reason.startswith("rate_limited: ")


def test_a_failed_challenge_expires_the_copies_that_waited_on_it_in_other_mailboxes(
    make_service: ServiceFactory,
) -> None:
    service = make_service(scope="recipient")
    mailboxes = ["bob@example.test", "carol@example.test", "dave@example.test"]
    receipt = service.receive("ghost@remote.test", mailboxes)
    assert len(receipt.challenges) == 1
    challenge = service.challenge_to("ghost@remote.test")
    service.dsn(challenge)
    service.app.maintain()
    service.clock.advance(2 * HOUR)
    service.app.maintain()
    assert len(service.relay.sent) == 1  # never a second challenge to an address that failed
    assert service.held_states("ghost@remote.test") == ["purged"] * 3
