"""`maintain --dry-run` (issue 10): the maintenance pass itself with recording switched off.
It records nothing, deletes no original, sends nothing, and says what the real pass then does."""

from __future__ import annotations

from sourceauth.engine.api import MaintenancePlan, SendOutcome
from sourceauth.engine.recipient_policy import PolicyOverride
from sourceauth.engine.settings import DAY
from tests.support.service import Service
from tests.unit.conftest import ServiceFactory

HOUR = 3600.0
STRANGER = "stranger@remote.test"
GONE = "gone@far.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"


def _log_head(service: Service) -> int:
    return service.app.recorder.max_notification_id() or 0


def _ids(plan: MaintenancePlan, action: str) -> set[str]:
    return {item.id for item in getattr(plan, action)}


def _a_day_of_work(service: Service) -> dict[str, str]:
    """A challenge about to lapse (two held copies), a failed challenge (its copy expired, to
    be purged), and a copy held without a challenge past its hold lifetime."""
    ids: dict[str, str] = {}
    first = service.receive(STRANGER, BOB, subject="lapses")
    ids["lapsing"] = first.decisions[0].message_id.hex  # type: ignore[union-attr]
    service.app.dispatch_challenges()
    service.relay.script(SendOutcome.PERMANENT)
    failed = service.receive(GONE, BOB, subject="fails")
    ids["failed"] = failed.decisions[0].message_id.hex  # type: ignore[union-attr]
    service.app.dispatch_challenges()
    bulk = service.receive("news@list.test", CAROL, headers=[("Precedence", "bulk")])
    ids["bulk"] = bulk.decisions[0].message_id.hex  # type: ignore[union-attr]
    service.clock.advance(7 * DAY + 120)
    return ids


def test_dry_run_records_nothing_and_names_what_the_pass_then_does(
    make_service: ServiceFactory,
) -> None:
    service = make_service()
    ids = _a_day_of_work(service)
    head = _log_head(service)
    quarantine = service.app.quarantine()
    blobs = dict(service.blobs.data)
    sent = len(service.relay.sent)

    plan = service.app.maintain_dry_run()
    again = service.app.maintain_dry_run()

    assert _log_head(service) == head  # no event
    assert service.app.quarantine() == quarantine  # no view row
    assert service.blobs.data == blobs  # no original deleted
    assert len(service.relay.sent) == sent and service.next_hop.jobs == []  # nothing sent
    assert plan.as_dict() == again.as_dict()  # and nothing changed for the next one

    assert [(i.address, i.reason) for i in plan.lapse] == [(STRANGER, "challenge_lifetime_passed")]
    expire = {i.id: i.reason for i in plan.expire}
    assert expire == {ids["lapsing"]: "challenge_expired", ids["bulk"]: "hold_lifetime_passed"}
    # The failed copy, and the copies this very pass expires, are purged in the same pass.
    assert _ids(plan, "purge") == {ids["failed"], ids["lapsing"], ids["bulk"]}
    assert all(item.recipients for item in plan.purge)

    report = service.app.maintain()
    assert report.challenges_expired == len(plan.lapse)
    assert report.messages_expired == 1  # bulk; the lapsing copy expired with its challenge
    assert report.purged == len(plan.purge)
    for mid in _ids(plan, "purge"):
        assert service.app.held_message(mid).state == "purged"
    assert _log_head(service) > head


def test_dry_run_lists_the_sends_and_deliveries_due(make_service: ServiceFactory) -> None:
    service = make_service()
    service.relay.script(SendOutcome.TEMPORARY)
    service.receive(STRANGER, BOB)
    service.app.dispatch_challenges()  # deferred: due again after the retry interval
    service.receive(STRANGER, "someone@elsewhere.test")  # unprotected: queued at once
    service.clock.advance(3600)
    plan = service.app.maintain_dry_run()
    assert [(i.address, i.reason) for i in plan.send_challenges] == [(STRANGER, "retry 2")]
    assert [(i.address, i.recipients, i.reason) for i in plan.retry_deliveries] == [
        (STRANGER, ("someone@elsewhere.test",), "first attempt")
    ]
    assert len(service.relay.sent) == 1 and service.next_hop.jobs == []


def test_dry_run_follows_each_copys_policy(make_service: ServiceFactory) -> None:
    service = make_service(
        protected=("a.test", "b.test"),
        domains={
            "a.test": PolicyOverride(failed_action="purge", hold_lifetime=HOUR),
            "b.test": PolicyOverride(failed_action="keep", hold_lifetime=7 * DAY),
        },
    )
    service.relay.script(SendOutcome.PERMANENT)
    receipt = service.receive(GONE, ["alice@a.test", "bob@b.test"])
    service.app.dispatch_challenges()
    plan = service.app.maintain_dry_run()
    (alice,) = [m for m in service.copies_of(receipt) if m.recipients == ("alice@a.test",)]
    assert [(i.id, i.recipients) for i in plan.purge] == [(alice.id, ("alice@a.test",))]
    assert plan.purge[0].reason.startswith("challenge_failed (failed_action purge")
