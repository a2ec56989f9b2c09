"""The operator's verbs (authorize, block, forget, release, discard) and the queries an
operator and an auditor read (whitelist, quarantine, sender, history)."""

from __future__ import annotations

import uuid

import pytest

from sourceauth.engine.api import Decision
from sourceauth.engine.errors import IllegalTransition, InvalidInput, NotFound
from tests.support.service import Service

STRANGER = "alice@remote.test"
BOB = "bob@example.test"


def _held(service: Service, count: int = 1) -> list[str]:
    """`count` messages held from STRANGER, its challenge sent; their message ids."""
    ids = []
    for i in range(count):
        receipt = service.receive(STRANGER, BOB, subject=f"m{i}")
        ids.append(str(receipt.decision_for(BOB).message_id))
    service.app.dispatch_challenges()
    return ids


def test_authorizing_an_unknown_sender_lets_its_mail_through(service: Service) -> None:
    view = service.app.authorize(STRANGER, reason="known correspondent")
    assert view.state == "authorized"
    assert service.receive(STRANGER, BOB).decision_for(BOB).decision is Decision.DELIVER
    row = {s.address: s for s in service.app.whitelist()}[STRANGER]
    assert row.state == "authorized" and row.reason == "known correspondent"
    assert service.relay.sent == []


def test_authorizing_a_pending_sender_releases_its_held_mail(service: Service) -> None:
    _held(service, 2)
    service.app.authorize(STRANGER)
    service.dispatch()
    assert service.held_states(STRANGER) == ["delivered", "delivered"]
    # the challenge still out there no longer confirms anything
    assert not service.app.confirm(service.relay.sent[0].token, [STRANGER]).confirmed


def test_blocking_a_sender_discards_its_held_mail_and_everything_after(service: Service) -> None:
    _held(service, 2)
    service.app.block(STRANGER, reason="spammer")
    assert service.state_of(STRANGER) == "blocked"
    assert service.held_states(STRANGER) == ["discarded", "discarded"]
    later = service.receive(STRANGER, BOB)
    assert later.decision_for(BOB).decision is Decision.DISCARD
    service.dispatch()
    service.app.maintain()
    assert service.next_hop.jobs == []
    assert len(service.relay.sent) == 1
    assert service.blobs.data == {}  # every original removed at maintenance


def test_forgetting_a_sender_makes_its_next_message_challenged_again(service: Service) -> None:
    service.app.authorize(STRANGER)
    service.app.forget(STRANGER)
    assert service.state_of(STRANGER) == "unknown"
    receipt = service.receive(STRANGER, BOB)
    assert receipt.decision_for(BOB).decision is Decision.CHALLENGE
    assert len(receipt.challenges) == 1


def test_forgetting_a_sender_never_seen_is_not_found(service: Service) -> None:
    with pytest.raises(NotFound):
        service.app.forget("nobody@remote.test")


def test_releasing_one_held_message_delivers_it_and_leaves_the_sender_pending(
    service: Service,
) -> None:
    first, second = _held(service, 2)
    released = service.app.release(first, reason="looks fine")
    assert released.id == uuid.UUID(first).hex
    service.dispatch()
    assert service.held_states(STRANGER) == ["challenged", "delivered"]
    assert service.state_of(STRANGER) == "challenged"
    assert len(service.next_hop.taken) == 1


def test_discarding_one_held_message_drops_it_for_good(service: Service) -> None:
    (mid,) = _held(service)
    receipt_id = service.app.held_message(mid).receipt_id
    assert service.app.discard(mid).state == "discarded"
    with pytest.raises(IllegalTransition):
        service.app.release(mid)
    service.app.confirm(service.relay.sent[0].token, [STRANGER])
    service.dispatch()
    service.app.maintain()
    assert service.next_hop.jobs == []
    assert not service.blobs.exists(receipt_id)


def test_message_verbs_refuse_unknown_and_malformed_ids(service: Service) -> None:
    with pytest.raises(NotFound):
        service.app.release(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        service.app.held_message(uuid.uuid4().hex)
    with pytest.raises(InvalidInput):
        service.app.discard("not-a-message-id")


@pytest.mark.parametrize("verb", ["authorize", "block", "forget"])
def test_sender_verbs_refuse_a_malformed_address(service: Service, verb: str) -> None:
    with pytest.raises(InvalidInput):
        getattr(service.app, verb)("not an address")


def test_quarantine_filters_by_state_and_sender(service: Service) -> None:
    _held(service, 2)
    service.receive("zed@other.test", BOB)
    assert {m.sender for m in service.app.quarantine(state="challenged")} == {
        STRANGER,
        "zed@other.test",
    }
    assert len(service.app.quarantine(sender=STRANGER)) == 2
    assert service.app.quarantine(state="delivered") == []
    assert len(service.app.quarantine(limit=1)) == 1


def test_whitelist_filters_by_state(service: Service) -> None:
    service.app.authorize("friend@remote.test")
    _held(service)
    assert [s.address for s in service.app.whitelist(state="authorized")] == ["friend@remote.test"]
    assert [s.address for s in service.app.whitelist(state="challenged")] == [STRANGER]


def test_history_of_an_address_tells_its_story_in_order(service: Service) -> None:
    (mid,) = _held(service)
    service.reply(service.relay.sent[0])
    service.dispatch()
    history = service.app.history(STRANGER)
    assert {e.aggregate for e in history} == {"sender", "message"}
    assert [e.timestamp for e in history] == sorted(e.timestamp for e in history)
    of_message = service.app.history(mid)
    assert of_message and {e.aggregate_id for e in of_message} == {uuid.UUID(mid).hex}
    assert [e.version for e in of_message] == list(range(1, len(of_message) + 1))


def test_history_refuses_what_is_neither_an_address_nor_an_id(service: Service) -> None:
    with pytest.raises(InvalidInput):
        service.app.history("neither")
