"""Never challenge, never amplify (DESIGN.md §2): the exempt classes with their configured
action, the authentication gate, rate limits and resends, full mailboxes, and bad input."""

from __future__ import annotations

from typing import Any

import pytest

from sourceauth.engine.api import Blob, Decision, Incoming
from sourceauth.engine.errors import InvalidInput
from sourceauth.engine.policy import AuthGate, ExemptAction, Exemption, Limits
from sourceauth.engine.settings import DAY
from tests.support.service import Service
from tests.unit.conftest import ServiceFactory

STRANGER = "alice@remote.test"
BOB = "bob@example.test"

# One message of each class that must never be challenged: (envelope sender, headers).
NEVER_CHALLENGE: dict[Exemption, tuple[str, list[tuple[str, str]]]] = {
    Exemption.NULL_SENDER: ("", []),
    Exemption.MAILER_DAEMON: ("MAILER-DAEMON@remote.test", []),
    Exemption.AUTO_SUBMITTED: (STRANGER, [("Auto-Submitted", "auto-generated")]),
    Exemption.MAILING_LIST: (STRANGER, [("List-Id", "<news.remote.test>")]),
    Exemption.BULK: (STRANGER, [("Precedence", "bulk")]),
    Exemption.DSN: (
        STRANGER,
        [("Content-Type", 'multipart/report; report-type=delivery-status; boundary="x"')],
    ),
    Exemption.SPAM: (STRANGER, [("X-Spam-Flag", "YES")]),
    # the inbound adapter's flag: flufl.bounce read the body as a bounce in no report format
    Exemption.PLAIN_BOUNCE: (STRANGER, []),
}
PLAIN_BOUNCE_FLAG = "flufl.bounce: permanent failure for bob@remote.test"


@pytest.mark.parametrize("exemption", list(Exemption), ids=str)
@pytest.mark.parametrize("action", list(ExemptAction), ids=str)
def test_mail_that_must_never_be_challenged_gets_its_configured_action(
    make_service: ServiceFactory, exemption: Exemption, action: ExemptAction
) -> None:
    service = make_service(exemptions={exemption: action})
    mail_from, headers = NEVER_CHALLENGE[exemption]
    flag = PLAIN_BOUNCE_FLAG if exemption is Exemption.PLAIN_BOUNCE else ""
    receipt = service.receive(mail_from, BOB, headers=headers, bounce_like=flag)
    decision = receipt.decision_for(BOB)
    expected = {
        ExemptAction.HOLD: Decision.HOLD,
        ExemptAction.DELIVER: Decision.DELIVER,
        ExemptAction.DISCARD: Decision.DISCARD,
    }[action]
    assert decision.decision is expected
    assert exemption.value in decision.reason  # the decision is recorded with its reason
    assert receipt.challenges == ()
    service.dispatch()
    service.app.maintain()
    assert service.relay.sent == []
    taken = [(receipt.receipt_id, BOB)] if action is ExemptAction.DELIVER else []
    assert service.next_hop.taken == taken
    if action is ExemptAction.HOLD:
        assert [m.state for m in service.copies_of(receipt)] == ["held"]


@pytest.mark.parametrize(
    ("mail_from", "headers"),
    [
        ("postmaster@remote.test", []),
        (STRANGER, [("Auto-Submitted", "auto-replied")]),
        (STRANGER, [("List-Unsubscribe", "<mailto:leave@remote.test>")]),
        (STRANGER, [("Precedence", "junk")]),
        (STRANGER, [("Precedence", "list")]),
        (STRANGER, [("X-Spam-Status", "Yes, score=12.0")]),
    ],
)
def test_other_markers_of_automated_or_bulk_mail_are_never_challenged(
    service: Service, mail_from: str, headers: list[tuple[str, str]]
) -> None:
    receipt = service.receive(mail_from, BOB, headers=headers)
    assert receipt.decision_for(BOB).decision is Decision.HOLD  # the default action
    assert receipt.challenges == ()


def test_a_plain_text_bounce_flag_is_recorded_in_the_reason_and_draws_no_challenge(
    service: Service,
) -> None:
    receipt = service.receive(STRANGER, BOB, bounce_like=PLAIN_BOUNCE_FLAG)
    decision = receipt.decision_for(BOB)
    assert decision.decision is Decision.HOLD
    assert decision.reason == f"never_challenge:plain_bounce: {PLAIN_BOUNCE_FLAG}"
    assert receipt.challenges == ()


def test_the_plain_bounce_flag_never_holds_mail_from_an_authorized_sender(
    service: Service,
) -> None:
    service.app.authorize(STRANGER, actor="operator", reason="known")
    receipt = service.receive(STRANGER, BOB, bounce_like=PLAIN_BOUNCE_FLAG)
    assert receipt.decision_for(BOB).decision is Decision.DELIVER


def test_auto_submitted_no_is_a_person_and_gets_challenged(service: Service) -> None:
    receipt = service.receive(STRANGER, BOB, headers=[("Auto-Submitted", "no")])
    assert receipt.decision_for(BOB).decision is Decision.CHALLENGE


def test_held_exempt_mail_can_be_released_by_the_operator(
    service: Service,
) -> None:
    receipt = service.receive(STRANGER, BOB, headers=[("Precedence", "bulk")])
    (copy,) = service.copies_of(receipt)
    service.app.release(copy.id)
    service.dispatch()
    assert service.next_hop.taken == [(receipt.receipt_id, BOB)]


def test_authentication_gate_challenges_only_authenticated_sender_domains(
    make_service: ServiceFactory,
) -> None:
    service = make_service(
        auth_gate=AuthGate(enabled=True, trusted_authserv_ids=("mx.example.test",))
    )
    forged = service.receive(STRANGER, BOB)
    assert forged.decision_for(BOB).decision is Decision.HOLD
    assert forged.challenges == ()
    passed = service.receive(
        "carol@other.test",
        BOB,
        headers=[("Authentication-Results", "mx.example.test; spf=pass smtp.mailfrom=other.test")],
    )
    assert passed.decision_for(BOB).decision is Decision.CHALLENGE
    untrusted = service.receive(
        "dave@third.test",
        BOB,
        headers=[("Authentication-Results", "mx.evil.test; spf=pass smtp.mailfrom=third.test")],
    )
    assert untrusted.challenges == ()


def test_challenges_per_sender_domain_are_capped_per_hour(make_service: ServiceFactory) -> None:
    service = make_service(limits=Limits(challenges_per_domain_per_hour=2))
    firsts = [service.receive(f"s{i}@remote.test", BOB) for i in range(3)]
    assert [len(r.challenges) for r in firsts] == [1, 1, 0]
    capped = firsts[2].decision_for(BOB)
    assert capped.decision is Decision.HOLD and capped.reason
    assert len(service.receive("s@other.test", BOB).challenges) == 1  # another domain

    service.clock.advance(3600 + 120)
    assert len(service.receive("s9@remote.test", BOB).challenges) == 1
    service.dispatch()
    assert len(service.relay.sent) == 4


def test_challenges_are_capped_server_wide_per_hour(make_service: ServiceFactory) -> None:
    service = make_service(limits=Limits(challenges_per_hour=2))
    receipts = [service.receive(f"s@domain{i}.test", BOB) for i in range(4)]
    assert [len(r.challenges) for r in receipts] == [1, 1, 0, 0]
    service.dispatch()
    assert len(service.relay.sent) == 2


def test_a_held_sender_under_the_cap_is_not_challenged_by_its_next_message_either(
    make_service: ServiceFactory,
) -> None:
    service = make_service(limits=Limits(challenges_per_domain_per_hour=1))
    service.receive("first@remote.test", BOB)
    for _ in range(3):
        assert service.receive(STRANGER, BOB).challenges == ()
    service.dispatch()
    assert [c.to for c in service.relay.sent] == ["first@remote.test"]


def test_a_challenge_is_resent_a_bounded_number_of_times_with_the_same_token(
    make_service: ServiceFactory,
) -> None:
    service = make_service(resend_after=DAY, limits=Limits(max_resends=2))
    service.receive(STRANGER, BOB)
    service.dispatch()
    for _ in range(2):
        service.receive(STRANGER, BOB)  # within a day: no resend
        service.dispatch()
    assert len(service.relay.sent) == 1
    for _ in range(4):
        service.clock.advance(DAY)
        service.receive(STRANGER, BOB)
        service.dispatch()
    assert len(service.relay.sent) == 3  # the first and two resends
    assert len(service.relay.tokens_to(STRANGER)) == 1


def test_a_full_mailbox_refuses_more_held_mail_but_not_from_authorized_senders(
    make_service: ServiceFactory,
) -> None:
    service = make_service(held_per_recipient=2)
    service.app.authorize("friend@remote.test")
    for i in range(2):
        service.receive(f"s{i}@remote.test", BOB)
    service.dispatch()  # the workers keep the views current; the check reads them
    assert service.app.quarantine_full("s9@remote.test", BOB)
    assert not service.app.quarantine_full("friend@remote.test", BOB)
    assert not service.app.quarantine_full("s9@remote.test", "carol@example.test")
    service.app.refresh_full_mailboxes()
    assert service.app.mailbox_may_be_full(BOB)
    assert not service.app.mailbox_may_be_full("carol@example.test")


def _bare(service: Service, mail_from: str, recipients: tuple[str, ...]) -> Incoming:
    blob: Any = service.blobs.put("k", b"Subject: x\r\n\r\nbody\r\n")
    return Incoming(mail_from, recipients, Blob(blob.key, blob.size, blob.sha256))


@pytest.mark.parametrize(
    ("mail_from", "recipients"),
    [
        (STRANGER, ()),
        ("not an address", (BOB,)),
        (STRANGER, ("bad@@example.test",)),
        (STRANGER, ("",)),
        (STRANGER, tuple(f"u{i}@example.test" for i in range(101))),
    ],
    ids=["no_recipient", "bad_sender", "bad_recipient", "empty_recipient", "too_many"],
)
def test_bad_input_raises_invalid_input_and_records_nothing(
    service: Service, mail_from: str, recipients: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidInput):
        service.app.receive(_bare(service, mail_from, recipients))
    assert service.app.quarantine() == []
    assert service.app.whitelist() == []


def test_one_bad_message_in_a_batch_records_none_of_the_batch(service: Service) -> None:
    good = service.mail(STRANGER, BOB)
    with pytest.raises(InvalidInput):
        service.app.receive_many([good, _bare(service, STRANGER, ())])
    assert service.app.quarantine() == []
