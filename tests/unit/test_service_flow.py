"""The flow of DESIGN.md §1 through the library API: deliver, hold and challenge, confirm and
release, for one sender and several, one recipient and several."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from sourceauth.engine.api import Decision
from tests.support.service import Service
from tests.unit.conftest import ServiceFactory

STRANGER = "alice@remote.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"
OUTSIDER = "dave@elsewhere.test"  # not protected


def test_mail_to_an_unprotected_recipient_is_delivered_at_once(service: Service) -> None:
    receipt = service.receive(STRANGER, OUTSIDER)
    assert receipt.decision_for(OUTSIDER).decision is Decision.DELIVER
    assert receipt.challenges == ()
    service.dispatch()
    assert service.next_hop.taken == [(receipt.receipt_id, OUTSIDER)]
    assert service.relay.sent == []
    assert service.state_of(STRANGER) == "unknown"


def test_first_message_from_an_unknown_sender_is_held_and_one_challenge_sent(
    service: Service,
) -> None:
    receipt = service.receive(
        STRANGER, BOB, subject="Quarterly numbers", body="SECRET-BODY-MARKER\r\n"
    )
    assert receipt.decision_for(BOB).decision is Decision.CHALLENGE
    assert len(receipt.challenges) == 1
    assert service.state_of(STRANGER) == "challenged"
    assert service.held_states(STRANGER) == ["challenged"]

    service.dispatch()
    (challenge,) = service.relay.sent
    assert challenge.to == STRANGER
    assert challenge.recipient == BOB
    assert challenge.subject == "Quarterly numbers"
    assert challenge.in_reply_to.startswith("<") and challenge.in_reply_to.endswith(">")
    assert "SECRET-BODY-MARKER" not in repr(challenge)
    assert service.next_hop.jobs == []


def test_second_message_from_pending_sender_sends_no_second_challenge(service: Service) -> None:
    first = service.receive(STRANGER, BOB, subject="one")
    service.dispatch()
    second = service.receive(STRANGER, BOB, subject="two")
    service.dispatch()
    assert second.decision_for(BOB).decision is Decision.CHALLENGE  # held, its challenge is out
    assert second.challenges == ()
    assert len(first.challenges) == 1
    assert len(service.relay.sent) == 1
    assert service.held_states(STRANGER) == ["challenged", "challenged"]


def test_one_valid_reply_releases_every_message_held_from_the_sender(service: Service) -> None:
    receipts = [service.receive(STRANGER, BOB, subject=s) for s in ("one", "two", "three")]
    challenge = service.challenge_to(STRANGER)

    reply = service.reply(challenge)
    assert reply.decisions[0].decision is Decision.CONFIRM
    assert service.state_of(STRANGER) == "authorized"
    service.dispatch()
    assert sorted(service.next_hop.taken) == sorted((r.receipt_id, BOB) for r in receipts)
    assert service.held_states(STRANGER) == ["delivered"] * 3
    assert len(service.relay.sent) == 1  # one challenge for all three


def test_the_reply_itself_reaches_no_mailbox(service: Service) -> None:
    service.receive(STRANGER, BOB)
    reply = service.reply(service.challenge_to(STRANGER))
    service.dispatch()
    assert service.next_hop.taken  # the held message went out ...
    assert all(receipt != reply.receipt_id for receipt, _ in service.next_hop.taken)  # not this


def test_mail_from_an_authorized_sender_is_delivered_without_a_challenge(
    service: Service,
) -> None:
    service.receive(STRANGER, BOB)
    service.reply(service.challenge_to(STRANGER))
    later = service.receive(STRANGER, BOB, subject="later")
    assert later.decision_for(BOB).decision is Decision.DELIVER
    service.dispatch()
    assert (later.receipt_id, BOB) in service.next_hop.taken
    assert len(service.relay.sent) == 1


def test_confirm_through_the_api_needs_the_challenged_address_among_the_claimants(
    service: Service,
) -> None:
    service.receive(STRANGER, BOB)
    challenge = service.challenge_to(STRANGER)
    refused = service.app.confirm(challenge.token, ["mallory@evil.test"])
    assert not refused.confirmed and refused.released == 0
    accepted = service.app.confirm(challenge.token, ["mallory@evil.test", STRANGER])
    assert accepted.confirmed and accepted.released == 1
    assert accepted.sender == STRANGER


def test_a_second_valid_reply_releases_nothing_more(service: Service) -> None:
    service.receive(STRANGER, BOB)
    challenge = service.challenge_to(STRANGER)
    assert service.app.confirm(challenge.token, [STRANGER]).confirmed
    again = service.app.confirm(challenge.token, [STRANGER])
    assert not again.confirmed and again.released == 0
    service.dispatch()
    assert service.next_hop.per_recipient() == Counter({BOB: 1})


def test_reply_from_another_address_is_refused_and_releases_nothing(service: Service) -> None:
    service.receive(STRANGER, BOB)
    challenge = service.challenge_to(STRANGER)
    refused = service.reply(challenge, sender="mallory@evil.test")
    assert refused.decisions[0].decision is Decision.CONFIRM  # processed as a reply ...
    service.dispatch()
    assert service.state_of(STRANGER) == "challenged"  # ... and refused
    assert service.held_states(STRANGER) == ["challenged"]
    assert service.next_hop.jobs == []


def test_reply_with_a_forged_token_is_refused(service: Service) -> None:
    service.receive(STRANGER, BOB)
    challenge = service.challenge_to(STRANGER)
    forged = challenge.token[:-1] + ("b" if challenge.token[-1] != "b" else "c")
    service.reply(challenge, token=forged)
    service.reply(challenge, token="a" * len(challenge.token))
    service.dispatch()
    assert service.state_of(STRANGER) == "challenged"
    assert service.next_hop.jobs == []


def test_automated_reply_to_the_confirm_address_never_confirms(service: Service) -> None:
    service.receive(STRANGER, BOB)
    challenge = service.challenge_to(STRANGER)
    service.reply(challenge, headers=[("Auto-Submitted", "auto-replied")])
    service.reply(challenge, headers=[("Precedence", "bulk")])
    service.dispatch()
    assert service.state_of(STRANGER) == "challenged"
    assert service.next_hop.jobs == []


def test_a_reply_all_confirms_first_then_delivers_to_the_other_recipient(
    service: Service,
) -> None:
    held = service.receive(STRANGER, BOB)
    challenge = service.challenge_to(STRANGER)
    confirm = f"confirm+{challenge.token}@example.test"
    reply_all = service.receive(STRANGER, [BOB, confirm], subject="Re: yes it's me")
    assert reply_all.decision_for(confirm).decision is Decision.CONFIRM
    assert reply_all.decision_for(BOB).decision is Decision.DELIVER
    service.dispatch()
    assert sorted(service.next_hop.taken) == sorted(
        [(held.receipt_id, BOB), (reply_all.receipt_id, BOB)]
    )


def test_mixed_recipients_unprotected_now_protected_after_confirmation(
    service: Service,
) -> None:
    receipt = service.receive(STRANGER, [BOB, OUTSIDER, CAROL])
    assert receipt.decision_for(OUTSIDER).decision is Decision.DELIVER
    assert receipt.decision_for(BOB).decision is Decision.CHALLENGE
    assert receipt.decision_for(CAROL).decision is Decision.CHALLENGE
    service.dispatch()
    assert service.next_hop.taken == [(receipt.receipt_id, OUTSIDER)]
    assert len(service.relay.sent) == 1  # one sender, one challenge, whatever the recipients

    service.reply(service.relay.sent[0])
    service.dispatch()
    service.app.maintain()
    assert sorted(service.next_hop.taken) == sorted(
        (receipt.receipt_id, r) for r in (BOB, OUTSIDER, CAROL)
    )


def test_a_recipient_named_twice_gets_one_copy(service: Service) -> None:
    receipt = service.receive(STRANGER, [OUTSIDER, OUTSIDER.upper()])
    assert len({d.message_id for d in receipt.decisions}) == 1
    service.dispatch()
    assert service.next_hop.per_recipient() == Counter({OUTSIDER: 1})


def test_recipient_scope_keeps_one_whitelist_per_mailbox(make_service: ServiceFactory) -> None:
    service = make_service(scope="recipient")
    service.receive(STRANGER, BOB)
    service.reply(service.challenge_to(STRANGER))
    to_carol = service.receive(STRANGER, CAROL)
    assert to_carol.decision_for(CAROL).decision is Decision.CHALLENGE
    to_bob = service.receive(STRANGER, BOB)
    assert to_bob.decision_for(BOB).decision is Decision.DELIVER
    assert {(s.scope, s.state) for s in service.app.whitelist()} == {
        (BOB, "authorized"),
        (CAROL, "challenged"),
    }


def test_milter_mode_copy_kept_by_the_mta_is_recorded_delivered_and_never_sent(
    service: Service,
) -> None:
    """Milter mode: the MTA keeps and delivers the copy decided DELIVER itself; the held copy
    of the same message waits for its sender as on the SMTP path."""
    incoming = replace(service.mail(STRANGER, [OUTSIDER, BOB]), kept_by_mta=True)
    receipt = service.app.receive(incoming)
    assert receipt.decision_for(OUTSIDER).decision is Decision.DELIVER
    assert receipt.decision_for(BOB).decision is Decision.CHALLENGE
    service.dispatch()
    assert service.next_hop.taken == []  # the MTA has it, not the next hop
    kept = receipt.decision_for(OUTSIDER).message_id
    assert kept is not None
    steps = [type(e).__name__ for e in service.app.events.get(kept)]
    assert steps == ["Accepted", "Delivered"]
    assert service.held_states(STRANGER) == ["challenged"]

    service.reply(service.challenge_to(STRANGER))
    service.dispatch()
    assert service.next_hop.taken == [(receipt.receipt_id, BOB)]  # released through the next hop
