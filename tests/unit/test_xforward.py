"""XFORWARD's attribute syntax, and message creation events recorded before the client fields
existed (they read back with the fields empty)."""

from __future__ import annotations

import pytest
from eventsourcing.persistence import StoredEvent

from sourceauth.adapters.smtp.xforward import parse
from tests.support.service import Service


def test_xforward_attributes_are_xtext_decoded_and_unavailable_values_are_empty() -> None:
    assert parse("NAME=mx.client.test ADDR=IPV6:2001:db8::1 helo=a+2Bb PORT=[TEMPUNAVAIL]") == {
        "NAME": "mx.client.test",
        "ADDR": "2001:db8::1",
        "HELO": "a+b",
        "PORT": "",
    }


@pytest.mark.parametrize("arg", ["", "ADDR", "COLOUR=blue", "HELO=a+0Ab", "NAME=" + "x" * 300])
def test_malformed_xforward_attributes_are_refused(arg: str) -> None:
    with pytest.raises(ValueError):
        parse(arg)


def test_a_creation_event_recorded_before_the_client_fields_reads_them_as_empty(
    service: Service,
) -> None:
    app = service.app
    service.receive("alice@remote.test", "bob@example.test")
    notification = next(
        n for n in app.recorder.select_notifications(start=1, limit=10) if "Message" in n.topic
    )
    state = app.mapper.transcoder.decode(notification.state)
    assert state.pop("client_address") == "" and state.pop("client_helo") == ""
    old = StoredEvent(
        originator_id=notification.originator_id,
        originator_version=notification.originator_version,
        topic=notification.topic,
        state=app.mapper.transcoder.encode(state),
    )
    event = app.mapper.to_domain_event(old)
    assert event.client_address == "" and event.client_helo == ""  # type: ignore[attr-defined]
    assert event.sender == "alice@remote.test"  # type: ignore[attr-defined]
