"""When a challenge cannot be delivered, goes unanswered, or the next hop says no: DSNs and
relay replies, lifetimes on a moved clock, retries with backoff (DESIGN.md §1)."""

from __future__ import annotations

from sourceauth.engine.api import DeliveryJob, DeliveryResult, SendOutcome
from sourceauth.engine.settings import DAY
from tests.support.service import Service
from tests.unit.conftest import ServiceFactory

STRANGER = "alice@remote.test"
BOB = "bob@example.test"


def _held_and_challenged(service: Service, count: int = 1) -> list[str]:
    receipts = [service.receive(STRANGER, BOB, subject=f"m{i}").receipt_id for i in range(count)]
    service.app.dispatch_challenges()
    return receipts


def test_dsn_for_the_challenge_expires_the_sender_and_its_held_mail(service: Service) -> None:
    receipts = _held_and_challenged(service, 2)
    result = service.dsn(service.relay.sent[0], "550 5.1.1 no such user")
    assert [d.decision.value for d in result.decisions] == ["bounce"]
    assert service.state_of(STRANGER) == "expired"
    assert service.held_states(STRANGER) == ["expired", "expired"]
    assert all(service.blobs.exists(r) for r in receipts)  # deleted at maintenance, not now

    report = service.app.maintain()
    assert report.purged == 2
    assert service.held_states(STRANGER) == ["purged", "purged"]
    assert not any(service.blobs.exists(r) for r in receipts)
    assert service.next_hop.jobs == []  # nothing reached anybody, no bounce either
    assert len(service.relay.sent) == 1


def test_challenge_failed_through_the_api_needs_a_valid_token(service: Service) -> None:
    _held_and_challenged(service)
    token = service.relay.sent[0].token
    forged = service.app.challenge_failed("a" * len(token), "550 5.1.1 gone")
    assert not forged.recorded
    assert service.state_of(STRANGER) == "challenged"
    failed = service.app.challenge_failed(token, "550 5.1.1 gone")
    assert failed.recorded and failed.sender == STRANGER and failed.expired == 1
    assert not service.app.challenge_failed(token, "550 5.1.1 gone").recorded  # once only


def test_the_dsn_itself_is_never_delivered(service: Service) -> None:
    _held_and_challenged(service)
    dsn = service.dsn(service.relay.sent[0])
    service.dispatch()
    service.app.maintain()
    assert all(receipt != dsn.receipt_id for receipt, _ in service.next_hop.taken)


def test_relay_refusing_the_challenge_with_5xx_expires_the_sender(service: Service) -> None:
    service.relay.script(SendOutcome.PERMANENT)
    _held_and_challenged(service)
    assert service.state_of(STRANGER) == "expired"
    assert service.held_states(STRANGER) == ["expired"]
    assert service.app.maintain().purged == 1
    assert service.held_states(STRANGER) == ["purged"]


def test_failed_action_keep_holds_the_mail_until_its_own_lifetime_ends(
    make_service: ServiceFactory,
) -> None:
    service = make_service(failed_action="keep", hold_lifetime=3 * DAY)
    (receipt,) = _held_and_challenged(service)
    failed = service.dsn(service.relay.sent[0])
    assert failed.decisions[0].decision.value == "bounce"
    assert service.state_of(STRANGER) == "expired"
    assert service.app.maintain().purged == 0
    assert service.held_states(STRANGER) == ["challenged"]  # still held, still releasable
    assert service.blobs.exists(receipt)

    service.clock.advance(7 * DAY + 120)  # past the hold, past the challenge's lifetime
    service.app.maintain()
    assert service.held_states(STRANGER) == ["purged"]
    assert not service.blobs.exists(receipt)


def test_mail_kept_after_a_failed_challenge_can_still_be_released_by_the_operator(
    make_service: ServiceFactory,
) -> None:
    service = make_service(failed_action="keep")
    (receipt,) = _held_and_challenged(service)
    service.dsn(service.relay.sent[0])
    service.app.authorize(STRANGER)
    service.dispatch()
    assert service.next_hop.taken == [(receipt, BOB)]


def test_relay_4xx_is_retried_with_backoff_and_the_same_token(service: Service) -> None:
    service.relay.script(SendOutcome.TEMPORARY, SendOutcome.TEMPORARY)
    _held_and_challenged(service)  # attempt 1: deferred for 60 s
    assert service.state_of(STRANGER) == "challenged"
    service.app.dispatch_challenges()
    assert len(service.relay.sent) == 1  # not due yet

    service.clock.advance(60)
    service.app.dispatch_challenges()  # attempt 2: deferred for 120 s
    assert len(service.relay.sent) == 2
    service.clock.advance(60)
    service.app.dispatch_challenges()
    assert len(service.relay.sent) == 2  # the backoff doubled

    service.clock.advance(60)
    service.app.dispatch_challenges()  # attempt 3: sent
    assert len(service.relay.sent) == 3
    service.clock.advance(3600)
    service.app.dispatch_challenges()
    assert len(service.relay.sent) == 3  # sent once is sent
    assert len({c.token for c in service.relay.sent}) == 1
    assert service.state_of(STRANGER) == "challenged"


def test_a_relay_failing_temporarily_for_too_long_counts_as_a_failed_challenge(
    make_service: ServiceFactory,
) -> None:
    service = make_service(challenge_give_up_after=600.0, challenge_retry_max=120.0)
    service.relay.outcome = SendOutcome.TEMPORARY
    _held_and_challenged(service)
    for _ in range(10):
        service.clock.advance(120)
        service.app.dispatch_challenges()
    assert service.state_of(STRANGER) == "expired"
    assert service.held_states(STRANGER) == ["expired"]


def test_an_unanswered_challenge_lapses_after_its_lifetime(service: Service) -> None:
    receipts = _held_and_challenged(service, 2)
    service.clock.advance(6 * DAY)
    assert service.app.maintain().challenges_expired == 0
    assert service.state_of(STRANGER) == "challenged"

    service.clock.advance(DAY + 120)
    report = service.app.maintain()
    assert report.challenges_expired == 1
    assert service.state_of(STRANGER) == "expired"
    assert service.held_states(STRANGER) == ["purged", "purged"]
    assert not any(service.blobs.exists(r) for r in receipts)


def test_a_reply_after_the_lifetime_is_refused(service: Service) -> None:
    _held_and_challenged(service)
    challenge = service.relay.sent[0]
    service.clock.advance(7 * DAY + 120)
    result = service.app.confirm(challenge.token, [STRANGER])
    assert not result.confirmed
    service.dispatch()
    assert service.next_hop.jobs == []


def test_an_expired_sender_is_challenged_again_with_a_new_token(service: Service) -> None:
    _held_and_challenged(service)
    first = service.relay.sent[0]
    service.dsn(first)
    assert service.state_of(STRANGER) == "expired"
    assert service.app.maintain().purged == 1

    again = service.receive(STRANGER, BOB, subject="trying again")
    assert len(again.challenges) == 1
    second = service.challenge_to(STRANGER)
    assert second.token != first.token
    assert service.state_of(STRANGER) == "challenged"
    assert not service.app.confirm(first.token, [STRANGER]).confirmed  # the old one is dead
    assert service.app.confirm(second.token, [STRANGER]).released == 1


def test_a_late_dsn_after_confirmation_changes_nothing(service: Service) -> None:
    _held_and_challenged(service)
    challenge = service.relay.sent[0]
    service.reply(challenge)
    service.dsn(challenge)
    assert service.state_of(STRANGER) == "authorized"
    service.dispatch()
    assert len(service.next_hop.taken) == 1


def test_next_hop_4xx_is_retried_with_backoff_until_accepted(service: Service) -> None:
    answers = iter(["temporary", "temporary", "accepted"])

    def next_hop(job: DeliveryJob) -> DeliveryResult:
        if next(answers) == "temporary":
            return DeliveryResult(temporary=job.recipients, diagnostic="451 later")
        return DeliveryResult(delivered=job.recipients, diagnostic="250 ok")

    service.next_hop.answer = next_hop
    service.app.authorize(STRANGER)
    receipt = service.receive(STRANGER, BOB)
    service.dispatch()  # deferred 60 s
    service.dispatch()
    assert len(service.next_hop.jobs) == 1
    service.clock.advance(60)
    service.dispatch()  # deferred 120 s
    service.clock.advance(60)
    service.dispatch()
    assert len(service.next_hop.jobs) == 2
    service.clock.advance(60)
    service.dispatch()
    assert service.next_hop.taken == [(receipt.receipt_id, BOB)]
    assert len({j.message_id for j in service.next_hop.jobs}) == 1  # one id on every attempt
    service.clock.advance(DAY)
    service.dispatch()
    assert len(service.next_hop.jobs) == 3  # delivered once is delivered


def test_next_hop_5xx_fails_the_copy_without_retrying(service: Service) -> None:
    service.next_hop.answer = lambda job: DeliveryResult(
        rejected=job.recipients, diagnostic="550 no such mailbox"
    )
    service.app.authorize(STRANGER)
    receipt = service.receive(STRANGER, BOB)
    service.dispatch()
    service.clock.advance(DAY)
    service.dispatch()
    assert [j.receipt_id for j in service.next_hop.jobs] == [receipt.receipt_id]
    assert service.next_hop.taken == []
