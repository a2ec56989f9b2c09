"""The failure figures `sourceauth status` shows: counted from the log since a moment, found by a
binary search over log positions (events older than the window are never counted)."""

from __future__ import annotations

from sourceauth.adapters.storage.figures import failures_since, first_position_since
from sourceauth.engine.api import DeliveryResult, SendOutcome
from tests.support.service import Service

BOB = "bob@example.test"


def _failed_challenge(service: Service, sender: str) -> None:
    service.relay.script(SendOutcome.PERMANENT)
    service.receive(sender, BOB)
    service.app.dispatch_challenges()
    assert service.state_of(sender) == "expired"


def test_failures_in_the_last_hour_count_only_events_of_the_last_hour(service: Service) -> None:
    app = service.app
    start = service.clock()
    _failed_challenge(service, "old@remote.test")
    service.clock.advance(2 * 3600)
    middle = app.recorder.max_notification_id()
    _failed_challenge(service, "new@remote.test")
    now = service.clock()

    assert failures_since(app.recorder, app.mapper, now - 3600) == {
        "challenges": 1,
        "deliveries": 0,
    }
    assert failures_since(app.recorder, app.mapper, start)["challenges"] == 2
    assert failures_since(app.recorder, app.mapper, now + 1)["challenges"] == 0
    assert first_position_since(app.recorder, app.mapper, now - 3600) == (middle or 0) + 1
    assert first_position_since(app.recorder, app.mapper, start) == 1
    assert first_position_since(app.recorder, app.mapper, now + 1) is None


def test_a_next_hop_refusing_a_copy_counts_as_a_failed_delivery(service: Service) -> None:
    service.next_hop.answer = lambda job: DeliveryResult(
        rejected=job.recipients, diagnostic="550 5.1.1 unknown", next_hop="fake"
    )
    service.receive("carol@remote.test", "x@other.test")
    service.app.dispatch_deliveries()
    counts = failures_since(service.app.recorder, service.app.mapper, service.clock() - 3600)
    assert counts == {"challenges": 0, "deliveries": 1}
