"""Maintenance (DESIGN.md §1): expire, purge, release, collect originals, retry sends; one pass
does everything due, a second pass does nothing."""

from __future__ import annotations

from sourceauth.engine.api import MaintenanceReport, SendOutcome
from sourceauth.engine.settings import DAY
from tests.support.service import Service

BOB = "bob@example.test"
OUTSIDER = "dave@elsewhere.test"


def _busy(service: Service) -> None:
    """Senders in every situation maintenance deals with."""
    service.app.authorize("friend@remote.test")
    service.receive("friend@remote.test", BOB)  # a delivery due
    service.receive("pending@remote.test", BOB)  # a challenge due
    service.receive("failed@remote.test", [BOB, OUTSIDER])
    service.receive("lapsing@remote.test", BOB)
    service.receive("confirming@remote.test", BOB)
    service.app.dispatch_challenges()
    service.dsn(service.relay.to("failed@remote.test")[0])
    service.reply(service.relay.to("confirming@remote.test")[0])
    service.clock.advance(7 * DAY + 120)  # every pending challenge lapses
    service.receive("pending@other.test", BOB)  # a fresh one does not


def _snapshot(service: Service) -> tuple[object, ...]:
    return (
        service.app.whitelist(),
        service.app.quarantine(),
        sorted(service.blobs.data),
        len(service.relay.sent),
        len(service.next_hop.jobs),
    )


def test_maintenance_on_an_empty_store_does_nothing(service: Service) -> None:
    assert service.app.maintain() == MaintenanceReport()


def test_maintenance_is_idempotent_a_second_pass_does_nothing(service: Service) -> None:
    _busy(service)
    first = service.app.maintain()
    assert first.challenges_expired == 2  # pending@remote.test and lapsing@
    assert first.purged == 3  # their held mail, and failed@'s
    assert first.delivered == 3  # friend@'s, confirming@'s released one, failed@'s outsider copy
    after_first = _snapshot(service)
    history = len(service.app.history("pending@remote.test"))

    second = service.app.maintain()
    assert second == MaintenanceReport()
    assert _snapshot(service) == after_first
    assert len(service.app.history("pending@remote.test")) == history


def test_maintenance_sends_what_is_due_unless_told_not_to_dispatch(service: Service) -> None:
    service.receive("alice@remote.test", BOB)
    assert service.app.maintain(dispatch=False).challenges_sent == 0
    assert service.relay.sent == []
    assert service.app.maintain().challenges_sent == 1
    assert len(service.relay.sent) == 1


def test_maintenance_retries_deferred_challenges_when_due(service: Service) -> None:
    service.relay.script(SendOutcome.TEMPORARY)
    service.receive("alice@remote.test", BOB)
    assert service.app.maintain().challenges_deferred == 1
    assert service.app.maintain().challenges_sent == 0
    service.clock.advance(60)
    assert service.app.maintain().challenges_sent == 1


def test_an_original_another_copy_still_needs_is_kept_until_that_copy_is_delivered(
    service: Service,
) -> None:
    receipt = service.receive("alice@remote.test", [BOB, OUTSIDER])
    service.app.dispatch_challenges()
    service.dsn(service.relay.sent[0])
    report = service.app.maintain(dispatch=False)
    assert report.purged == 1
    assert service.blobs.exists(receipt.receipt_id)  # the outsider's copy is still due

    service.app.dispatch_deliveries()
    assert service.next_hop.taken == [(receipt.receipt_id, OUTSIDER)]
    assert service.app.maintain().blobs_collected == 1
    assert not service.blobs.exists(receipt.receipt_id)


def test_delivered_originals_are_collected_in_the_same_pass(service: Service) -> None:
    service.app.authorize("friend@remote.test")
    receipt = service.receive("friend@remote.test", BOB)
    report = service.app.maintain()
    assert report.delivered == 1 and report.blobs_collected == 1
    assert not service.blobs.exists(receipt.receipt_id)
