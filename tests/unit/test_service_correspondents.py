"""Mail sent out on the correspondents path (SourceAuth.submit_outbound_many) and tokenless
replies threaded onto a challenge, on the in-memory service."""

from __future__ import annotations

import pytest

from sourceauth.engine.api import Decision, OutgoingChallenge, Receipt
from tests.conftest import CONFIRM
from tests.support.service import Service
from tests.unit.conftest import ServiceFactory

ALICE = "alice@example.test"
CAROL = "carol@remote.test"


def send_out(service: Service, mail_from: str, to: list[str], learn: bool = True) -> Receipt:
    return service.app.submit_outbound_many([service.mail(mail_from, to)], learn=learn)[0]


def test_every_recipient_of_mail_sent_out_is_queued_for_the_next_hop(service: Service) -> None:
    receipt = send_out(service, ALICE, [CAROL, "Dave@Remote.test"])
    assert [(d.recipient, d.decision) for d in receipt.decisions] == [
        (CAROL, Decision.DELIVER),
        ("dave@remote.test", Decision.DELIVER),
    ]
    service.dispatch()
    assert [sorted(job.recipients) for job in service.next_hop.jobs] == [
        [CAROL, "dave@remote.test"]
    ]


def test_a_blocked_recipient_stays_blocked(service: Service) -> None:
    service.app.block(CAROL, reason="spam")
    send_out(service, ALICE, [CAROL])
    assert service.state_of(CAROL) == "blocked"


def test_an_extension_of_the_sender_teaches_its_mailbox(make_service: ServiceFactory) -> None:
    service = make_service(scope="recipient")
    send_out(service, "alice+lists@example.test", [CAROL])
    assert service.app.sender(CAROL, ALICE).state == "authorized"


@pytest.mark.parametrize("rcpt", [ALICE, CONFIRM, "confirm+abc@example.test"])
def test_the_sender_itself_and_the_filters_addresses_are_never_learned(
    service: Service, rcpt: str
) -> None:
    send_out(service, ALICE, [rcpt])
    assert service.app.whitelist() == []


def test_mail_sent_out_by_the_null_sender_teaches_nothing(service: Service) -> None:
    send_out(service, "", [CAROL])
    assert service.app.whitelist() == []


# ------------------------------------------------------------- tokenless, threaded replies


def _thread_reply(service: Service, challenge: OutgoingChallenge, sender: str) -> str:
    msgid = f"<{challenge.thread_id}@mx.example.test>"
    receipt = service.receive(sender, CONFIRM, headers=[("In-Reply-To", msgid)])
    return receipt.decision_for(CONFIRM).reason


def test_challenge_carries_a_thread_id_for_its_sender_and_scope(service: Service) -> None:
    service.receive(CAROL, ALICE)
    challenge = service.challenge_to(CAROL)
    assert challenge.thread_id.startswith(f"challenge.{challenge.challenge_id}.")


def test_threaded_reply_in_a_per_mailbox_scope_confirms_that_scope(
    make_service: ServiceFactory,
) -> None:
    service = make_service(scope="recipient")
    service.receive(CAROL, ALICE)
    reason = _thread_reply(service, service.challenge_to(CAROL), CAROL)
    assert reason == "confirm_accepted: sender confirmed"
    assert service.app.sender(CAROL, ALICE).state == "authorized"


def test_threaded_reply_names_the_superseded_challenge_and_is_refused(service: Service) -> None:
    service.receive(CAROL, ALICE)
    first = service.challenge_to(CAROL)
    service.clock.advance(8 * 86400)
    service.app.maintain()  # the first challenge lapses
    service.receive(CAROL, ALICE, subject="again")
    second = service.challenge_to(CAROL)
    assert second.challenge_id != first.challenge_id
    reason = _thread_reply(service, first, CAROL)
    assert reason.startswith("confirm_refused: ")
    assert service.state_of(CAROL) == "challenged"
    assert _thread_reply(service, second, CAROL) == "confirm_accepted: sender confirmed"
