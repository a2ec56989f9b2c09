"""The engine's behaviour on a real SQLite file and a real blob directory.

Each test is one rule of DESIGN.md §1-§6, driven through SourceAuth's library API; only the
challenge relay and the next hop are fakes (tests/conftest.py).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from sourceauth.adapters.storage.audit import verify
from sourceauth.engine import tokens
from sourceauth.engine.api import (
    BounceInfo,
    Decision,
    DeliveryJob,
    DeliveryResult,
    Receipt,
    SendOutcome,
)
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.errors import IllegalTransition, NotFound
from sourceauth.engine.message import Message
from sourceauth.engine.policy import AuthGate, ExemptAction, Exemption, Limits
from sourceauth.engine.sender import Sender
from sourceauth.engine.settings import DAY
from tests.conftest import (
    FakeChallenges,
    FakeClock,
    FakeDeliveries,
    challenge_id_of,
    event_name,
    events_since,
    incoming,
    log_position,
    reply_to_challenge,
    settle,
    token_of,
)

pytestmark = pytest.mark.timeout(60)

ALICE = "alice@remote.test"
MALLORY = "mallory@remote.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"
DAVE = "dave@other.test"  # not protected
UNKNOWN_USER = "550 5.1.1 <alice@remote.test>: Recipient address rejected: User unknown"


@pytest.fixture
def app(make_engine: Any, relay: FakeChallenges, next_hop: FakeDeliveries) -> SourceAuth:
    return make_engine(challenges=relay, deliveries=next_hop)


def decisions(receipt: Receipt) -> dict[str, Decision]:
    return {d.recipient: d.decision for d in receipt.decisions}


def names(events: list[Any]) -> list[str]:
    return [event_name(e) for e in events]


def sender_state(app: SourceAuth, address: str, scope: str = "global") -> str:
    return app.sender(address, scope).state


def held_states(app: SourceAuth, sender: str = ALICE) -> list[str]:
    """States of the copies held from `sender` (its replies to challenges left out)."""
    return [
        m.state
        for m in app.quarantine(sender=sender)
        if not any(r.startswith("confirm+") for r in m.recipients)
    ]


def send(app: SourceAuth, sender: str = ALICE, to: Any = BOB, **kw: Any) -> Receipt:
    return app.receive(incoming(app, sender, to, **kw))


# ------------------------------------------------------------------------------ §1 the flow


def test_first_message_from_unknown_sender_is_held_and_one_challenge_leaves(
    app: SourceAuth, relay: FakeChallenges
) -> None:
    before = log_position(app)
    receipt = send(app, subject="Lunch?")
    assert decisions(receipt) == {BOB: Decision.CHALLENGE}
    assert receipt.decisions[0].reason == "challenge_queued"
    assert len(receipt.challenges) == 1
    assert names(events_since(app, before)) == ["Sender.FirstChallenged", "Message.Challenged"]
    assert sender_state(app, ALICE) == "challenged"
    assert held_states(app) == ["challenged"]

    assert app.dispatch_challenges() == (1, 0, 0)
    [challenge] = relay.sent
    assert challenge.to == ALICE and challenge.recipient == BOB
    assert challenge.subject == "Lunch?"
    assert challenge.token == token_of(app, ALICE)
    assert app.dispatch_challenges() == (0, 0, 0), "a sent challenge is not sent again"


def test_second_message_from_pending_sender_sends_no_second_challenge(
    app: SourceAuth, relay: FakeChallenges
) -> None:
    send(app)
    app.dispatch_challenges()
    before = log_position(app)
    second = send(app, to=CAROL)
    assert decisions(second) == {CAROL: Decision.CHALLENGE}
    assert second.decisions[0].reason == "challenge_pending"
    assert second.challenges == ()
    assert names(events_since(app, before)) == ["Message.Challenged"]
    app.maintain()
    assert len(relay.sent) == 1
    assert held_states(app) == ["challenged", "challenged"]


def test_confirmation_releases_every_held_message(
    app: SourceAuth, next_hop: FakeDeliveries
) -> None:
    for to in (BOB, CAROL, BOB):
        send(app, to=to)
    before = log_position(app)
    reply = app.receive(reply_to_challenge(app, ALICE))
    [decision] = reply.decisions
    assert decision.decision == Decision.CONFIRM
    assert decision.reason == "confirm_accepted: sender confirmed"
    new = events_since(app, before)
    assert Counter(names(new)) == Counter(
        {"Sender.Confirmed": 1, "Message.Released": 3, "Message.Discarded": 1}
    )
    assert sender_state(app, ALICE) == "authorized"
    assert app.sender(ALICE).via == "reply"

    assert app.dispatch_deliveries() == (3, 0, 0)
    assert next_hop.per_recipient() == Counter({BOB: 2, CAROL: 1})
    assert held_states(app) == ["delivered", "delivered", "delivered"]
    # The reply itself is recorded and dropped, never delivered to the confirm mailbox.
    assert all(not r.startswith("confirm") for r in next_hop.per_recipient())

    later = send(app)
    assert decisions(later) == {BOB: Decision.DELIVER}
    assert later.decisions[0].reason == "sender_authorized"


def test_confirm_api_accepts_the_envelope_sender_or_from_address(app: SourceAuth) -> None:
    send(app)
    result = app.confirm(token_of(app, ALICE), ["someone@else.test", f"<{ALICE.upper()}>"])
    assert result.confirmed and result.sender == ALICE and result.released == 1
    again = app.confirm(token_of(app, ALICE), [ALICE])
    assert not again.confirmed, "a token confirms once"


def test_reply_from_other_sender_releases_nothing(app: SourceAuth) -> None:
    send(app)
    before = log_position(app)
    reply = app.receive(reply_to_challenge(app, MALLORY, token=token_of(app, ALICE)))
    assert reply.decisions[0].decision == Decision.CONFIRM
    assert reply.decisions[0].reason.startswith("confirm_refused: reply is not from the challenged")
    assert names(events_since(app, before)) == ["Message.Discarded"]  # the reply
    assert app.confirm(token_of(app, ALICE), [MALLORY]).confirmed is False
    assert sender_state(app, ALICE) == "challenged"
    assert held_states(app) == ["challenged"]


def test_forged_altered_expired_and_other_sender_tokens_release_nothing(
    app: SourceAuth, clock: FakeClock
) -> None:
    send(app)
    send(app, MALLORY)
    genuine = token_of(app, ALICE)
    claims = tokens.parse(genuine)
    forged = tokens.mint(
        tokens.generate_keyring(),
        challenge_id=claims.challenge_id,
        sender=ALICE,
        scope="global",
        expires_at=claims.expires_at,
    )
    altered = genuine[:-1] + ("a" if genuine[-1] != "a" else "b")
    bound_to_mallory = tokens.mint(
        app.keyring,
        challenge_id=claims.challenge_id,
        sender=MALLORY,
        scope="global",
        expires_at=claims.expires_at,
    )
    before = log_position(app)
    attempts = [
        (forged, [ALICE], "token refused"),
        (altered, [ALICE], "token refused"),
        ("not-a-token", [ALICE], "malformed token"),
        (token_of(app, MALLORY), [ALICE], "reply is not from the challenged sender"),
        (bound_to_mallory, [MALLORY], "reply is not from the challenged sender"),
        (genuine, [MALLORY], "reply is not from the challenged sender"),
    ]
    for token, claimants, why in attempts:
        result = app.confirm(token, claimants)
        assert not result.confirmed and why in result.reason, (token, result)

    clock.advance(7 * DAY + 60)
    late = app.confirm(genuine, [ALICE])
    assert not late.confirmed and "expired" in late.reason
    assert events_since(app, before) == []
    assert sender_state(app, ALICE) == "challenged"
    assert held_states(app) == ["challenged"]


def test_challenge_failure_expires_held_mail_and_maintain_purges_it_and_deletes_the_blob(
    app: SourceAuth,
) -> None:
    first = incoming(app, ALICE, BOB)
    second = incoming(app, ALICE, CAROL)
    app.receive_many([first, second])
    store: Any = app.blobs
    assert store.exists(first.blob.key) and store.exists(second.blob.key)

    result = app.challenge_failed(token_of(app, ALICE), UNKNOWN_USER)
    assert result.recorded and result.expired == 2
    assert sender_state(app, ALICE) == "expired"
    assert held_states(app) == ["expired", "expired"]
    assert store.exists(first.blob.key), "deleted at the next maintenance run, not before"

    before = log_position(app)
    report = app.maintain()
    assert report.purged == 2
    purged = events_since(app, before)
    assert names(purged) == ["Message.Purged", "Message.Purged"]
    assert all(e.blob_deleted and "original deleted" in e.reason for e in purged)
    assert held_states(app) == ["purged", "purged"]
    assert not store.exists(first.blob.key) and not store.exists(second.blob.key)
    assert app.challenge_failed(token_of(app, ALICE), UNKNOWN_USER).recorded is False


def test_dsn_for_the_challenge_fails_it_and_reaches_nobody(
    app: SourceAuth, next_hop: FakeDeliveries
) -> None:
    send(app)
    bounce_to = f"bounces+{token_of(app, ALICE)}@example.test"
    dsn = incoming(
        app,
        "<>",
        bounce_to,
        subject="Undelivered Mail Returned to Sender",
        headers=[("Content-Type", 'multipart/report; report-type=delivery-status; boundary="b"')],
        bounce=BounceInfo(failed=True, diagnostic="5.1.1 user unknown"),
    )
    receipt = app.receive(dsn)
    assert receipt.decisions[0].decision == Decision.BOUNCE
    assert receipt.decisions[0].reason == "bounce_recorded: challenge failed"
    assert sender_state(app, ALICE) == "expired"
    failed = [e for e in events_since(app, 0) if isinstance(e, Sender.ChallengeFailed)]
    assert [(e.actor, e.diagnostic) for e in failed] == [("dsn", "5.1.1 user unknown")]
    app.maintain()
    assert next_hop.jobs == [], "a report about a challenge is never delivered to anyone"


def test_relay_4xx_is_retried_with_backoff_and_5xx_fails_the_challenge(
    make_engine: Any, clock: FakeClock
) -> None:
    relay = FakeChallenges(SendOutcome.TEMPORARY, "451 4.3.0 try later")
    app = make_engine(challenges=relay)
    send(app)
    assert app.dispatch_challenges() == (0, 1, 0)
    assert app.dispatch_challenges() == (0, 0, 0), "not before the backoff"
    clock.advance(61)
    assert app.dispatch_challenges() == (0, 1, 0)
    relay.outcome, relay.diagnostic = SendOutcome.PERMANENT, "550 5.1.1 no such user"
    clock.advance(3600)
    assert app.dispatch_challenges() == (0, 0, 1)
    assert len({c.token for c in relay.sent}) == 1, "a retried challenge carries the same token"
    assert sender_state(app, ALICE) == "expired"
    assert held_states(app) == ["expired"]
    failed = [e for e in events_since(app, 0) if isinstance(e, Sender.ChallengeFailed)]
    assert [e.actor for e in failed] == ["relay"]


def test_failed_action_keep_holds_until_lifetime(make_engine: Any, clock: FakeClock) -> None:
    app = make_engine(failed_action="keep")
    send(app)
    result = app.challenge_failed(token_of(app, ALICE), UNKNOWN_USER)
    assert result.recorded and result.expired == 0
    assert sender_state(app, ALICE) == "expired"
    assert app.maintain().purged == 0
    assert held_states(app) == ["challenged"]

    clock.advance(7 * DAY - 60)
    assert app.maintain().purged == 0
    assert held_states(app) == ["challenged"]
    clock.advance(120)
    report = app.maintain()
    assert (report.messages_expired, report.purged) == (1, 1)
    assert held_states(app) == ["purged"]
    [held] = app.quarantine(sender=ALICE)
    assert held.reason.startswith("hold_lifetime_passed")


def test_mixed_recipients_unprotected_copy_delivered_now_protected_after_confirmation_no_duplicates(
    app: SourceAuth, next_hop: FakeDeliveries
) -> None:
    receipt = send(app, to=[BOB, DAVE, CAROL])
    assert decisions(receipt) == {
        BOB: Decision.CHALLENGE,
        DAVE: Decision.DELIVER,
        CAROL: Decision.CHALLENGE,
    }
    assert app.dispatch_deliveries() == (1, 0, 0)
    assert next_hop.per_recipient() == Counter({DAVE: 1})

    app.receive(reply_to_challenge(app, ALICE))
    for _ in range(3):
        app.dispatch_deliveries()
        app.maintain()
    assert next_hop.per_recipient() == Counter({BOB: 1, DAVE: 1, CAROL: 1})
    assert {job.receipt_id for job in next_hop.jobs} == {receipt.receipt_id}
    assert len({job.message_id for job in next_hop.jobs}) == 2, "one copy delivered now, one held"


def test_delivery_4xx_is_retried_and_partial_success_delivers_each_recipient_once(
    make_engine: Any, clock: FakeClock
) -> None:
    calls: list[DeliveryJob] = []

    def flaky(job: DeliveryJob) -> DeliveryResult:
        calls.append(job)
        if len(calls) == 1:  # the first attempt takes one recipient, defers the other
            return DeliveryResult(delivered=job.recipients[:1], temporary=job.recipients[1:])
        return DeliveryResult(delivered=job.recipients)

    hop = FakeDeliveries(flaky)
    app = make_engine(deliveries=hop)
    send(app, to=[DAVE, "erin@other.test"])
    assert app.dispatch_deliveries() == (0, 1, 0)
    clock.advance(61)
    assert app.dispatch_deliveries() == (1, 0, 0)
    assert hop.per_recipient() == Counter({DAVE: 1, "erin@other.test": 1})
    assert [job.recipients for job in hop.jobs] == [(DAVE, "erin@other.test"), ("erin@other.test",)]
    assert app.dispatch_deliveries() == (0, 0, 0)


def test_purge_keeps_an_original_another_copy_still_needs_and_collects_it_once_delivered(
    make_engine: Any, clock: FakeClock
) -> None:
    hop = FakeDeliveries(lambda job: DeliveryResult(temporary=job.recipients))  # next hop down
    app = make_engine(deliveries=hop)
    message = incoming(app, ALICE, [BOB, DAVE])
    app.receive(message)
    app.challenge_failed(token_of(app, ALICE), UNKNOWN_USER)
    app.maintain()
    purged = [e for e in events_since(app, 0) if event_name(e) == "Message.Purged"]
    assert [(e.blob_deleted, e.reason) for e in purged] == [
        (False, "challenge_failed; original kept for another copy")
    ]
    store: Any = app.blobs
    assert store.exists(message.blob.key), "Dave's copy still needs it"

    hop.answer = None
    clock.advance(3600)
    app.maintain()
    app.maintain()
    assert hop.per_recipient() == Counter({DAVE: 1})
    assert not store.exists(message.blob.key), "collected once no copy needs it"


def test_addresses_compare_case_insensitively(app: SourceAuth) -> None:
    send(app, ALICE)
    assert send(app, "Alice@Remote.TEST").decisions[0].reason == "challenge_pending"
    result = app.confirm(token_of(app, ALICE), ["ALICE@remote.test"])
    assert result.confirmed and result.released == 2


# ------------------------------------------------------------------------------ §2 never challenge


NEVER_CHALLENGED = [
    ("<>", [], "null_sender"),
    ("MAILER-DAEMON@remote.test", [], "mailer_daemon"),
    ("postmaster@remote.test", [], "mailer_daemon"),
    ("alice@remote.test", [("Auto-Submitted", "auto-replied")], "auto_submitted"),
    ("news@remote.test", [("List-Id", "<news.remote.test>")], "mailing_list"),
    ("news@remote.test", [("List-Unsubscribe", "<mailto:u@remote.test>")], "mailing_list"),
    ("promo@remote.test", [("Precedence", "bulk")], "bulk"),
    ("promo@remote.test", [("Precedence", "junk")], "bulk"),
    (
        "mta@remote.test",
        [("Content-Type", "multipart/report; report-type=delivery-status; boundary=x")],
        "dsn",
    ),
    ("spam@remote.test", [("X-Spam-Flag", "YES")], "spam"),
]


def test_null_sender_auto_submitted_list_bulk_and_dsn_are_never_challenged(
    app: SourceAuth, relay: FakeChallenges
) -> None:
    for mail_from, headers, exemption in NEVER_CHALLENGED:
        receipt = send(app, mail_from, [BOB], headers=headers)
        [decision] = receipt.decisions
        assert decision.decision == Decision.HOLD, (mail_from, headers)
        assert decision.reason.startswith(f"never_challenge:{exemption}:"), decision.reason
        assert receipt.challenges == ()
    app.maintain()
    assert relay.sent == []
    assert app.whitelist() == []
    assert not [e for e in events_since(app, 0) if event_name(e).startswith("Sender.")]
    assert [m.state for m in app.quarantine()] == ["held"] * len(NEVER_CHALLENGED)


def test_exemption_action_deliver_delivers_with_the_reason_recorded(
    make_engine: Any, next_hop: FakeDeliveries
) -> None:
    app = make_engine(deliveries=next_hop, exemptions={Exemption.BULK: ExemptAction.DELIVER})
    receipt = send(app, "promo@remote.test", BOB, headers=[("Precedence", "bulk")])
    assert decisions(receipt) == {BOB: Decision.DELIVER}
    [received] = events_since(app, 0)
    assert isinstance(received, Message.Accepted)
    assert received.reason.startswith("never_challenge:bulk")
    assert app.dispatch_deliveries() == (1, 0, 0)
    assert app.whitelist() == []


def test_exemption_action_discard_discards_with_the_reason_recorded(
    make_engine: Any, next_hop: FakeDeliveries
) -> None:
    app = make_engine(
        deliveries=next_hop, exemptions={Exemption.MAILING_LIST: ExemptAction.DISCARD}
    )
    receipt = send(app, "news@remote.test", [BOB, DAVE], headers=[("List-Id", "<n.remote.test>")])
    assert decisions(receipt) == {BOB: Decision.DISCARD, DAVE: Decision.DELIVER}
    discarded = [e for e in events_since(app, 0) if isinstance(e, Message.Discarded)]
    assert [e.reason.split(":")[:2] for e in discarded] == [["never_challenge", "mailing_list"]]
    app.maintain()
    assert next_hop.per_recipient() == Counter({DAVE: 1})


@pytest.mark.parametrize(
    ("envelope", "headers"),
    [
        (ALICE, [("Auto-Submitted", "auto-replied")]),
        (ALICE, [("X-Autoreply", "yes")]),
        (ALICE, [("Precedence", "bulk")]),
        (ALICE, [("Content-Type", "multipart/report; report-type=delivery-status")]),
        ("<>", []),
        ("MAILER-DAEMON@remote.test", []),
    ],
    ids=["auto-submitted", "x-autoreply", "bulk", "dsn", "null-sender", "mailer-daemon"],
)
def test_automated_reply_to_confirm_address_never_confirms(
    app: SourceAuth, envelope: str, headers: list[tuple[str, str]]
) -> None:
    send(app)
    reply = reply_to_challenge(app, ALICE, headers=headers)
    automated = incoming(app, envelope, reply.recipients, headers=headers, subject="Out of office")
    before = log_position(app)
    [decision] = app.receive(automated).decisions
    assert decision.decision == Decision.CONFIRM
    assert decision.reason.startswith("confirm_refused: automated reply never confirms")
    assert names(events_since(app, before)) == ["Message.Discarded"]
    assert sender_state(app, ALICE) == "challenged"
    assert held_states(app) == ["challenged"]


def test_blocked_sender_mail_is_discarded(app: SourceAuth, relay: FakeChallenges) -> None:
    send(app)
    app.block(ALICE, reason="abuse report")
    assert held_states(app) == ["discarded"], "held mail of a blocked sender is discarded"
    receipt = send(app, to=[BOB, DAVE])
    assert decisions(receipt) == {BOB: Decision.DISCARD, DAVE: Decision.DELIVER}
    assert receipt.decision_for(BOB).reason == "sender_blocked"
    app.maintain()
    assert len(relay.sent) == 0, "the challenge queued before the block is never sent"
    assert sender_state(app, ALICE) == "blocked"


def test_rate_limit_holds_without_challenge_and_records_reason(
    make_engine: Any, clock: FakeClock
) -> None:
    app = make_engine(limits=Limits(challenges_per_domain_per_hour=2, challenges_per_hour=3))
    for who in ("a1@remote.test", "a2@remote.test"):
        assert decisions(send(app, who)) == {BOB: Decision.CHALLENGE}
    before = log_position(app)
    limited = send(app, "a3@remote.test")
    assert decisions(limited) == {BOB: Decision.HOLD}
    assert limited.decisions[0].reason == (
        "rate_limited: challenges_per_domain_per_hour limit 2 reached for remote.test"
    )
    assert names(events_since(app, before)) == ["Message.Held"], "no challenge, no sender"
    assert decisions(send(app, "b1@elsewhere.test")) == {BOB: Decision.CHALLENGE}
    server_wide = send(app, "b2@elsewhere.test")
    assert server_wide.decisions[0].reason == "rate_limited: challenges_per_hour limit 3 reached"

    clock.advance(3660)
    assert decisions(send(app, "a3@remote.test")) == {BOB: Decision.CHALLENGE}
    result = app.confirm(token_of(app, "a3@remote.test"), ["a3@remote.test"])
    assert result.released == 2, "the mail held by the rate limit is released with the rest"


def test_auth_gate_challenges_only_authenticated_sender_domains(make_engine: Any) -> None:
    gate = AuthGate(enabled=True, trusted_authserv_ids=("mx.example.test",))
    app = make_engine(auth_gate=gate)
    passed = ("Authentication-Results", "mx.example.test; spf=pass smtp.mailfrom=alice@remote.test")
    forged = ("Authentication-Results", "evil.test; spf=pass smtp.mailfrom=eve@remote.test")
    assert send(app, ALICE, headers=[passed]).decisions[0].reason == "challenge_queued"
    held = send(app, "eve@remote.test", headers=[forged])
    assert decisions(held) == {BOB: Decision.HOLD}
    assert held.decisions[0].reason.startswith(
        "auth_gate: no Authentication-Results from a trusted"
    )
    assert {s.address for s in app.whitelist()} == {ALICE}, "no challenge, no sender recorded"


def test_resend_is_bounded_and_uses_the_same_token(
    app: SourceAuth, relay: FakeChallenges, clock: FakeClock
) -> None:
    send(app)
    app.dispatch_challenges()
    reasons = []
    for _ in range(4):
        clock.advance(DAY)
        reasons.append(send(app).decisions[0].reason)
        app.dispatch_challenges()
    assert reasons == [
        "challenge_resent",
        "challenge_resent",
        "challenge_pending",
        "challenge_pending",
    ]
    assert len(relay.sent) == 3, "the first send and max_resends=2 more"
    assert len({c.token for c in relay.sent}) == 1
    assert len({c.challenge_id for c in relay.sent}) == 1
    assert app.confirm(relay.sent[0].token, [ALICE]).released == 5


def test_scope_recipient_keeps_one_whitelist_per_mailbox(make_engine: Any) -> None:
    app = make_engine(scope="recipient")
    receipt = send(app, to=[BOB, CAROL])
    # One message never causes more than one challenge (issue 7); its confirmation
    # authorizes the sender for every mailbox whose copy waited on it.
    assert len(receipt.challenges) == 1, "one challenge per message"
    assert decisions(receipt) == {BOB: Decision.CHALLENGE, CAROL: Decision.HOLD}
    rows = {(s.scope, s.state) for s in app.whitelist() if s.address == ALICE}
    assert rows == {(BOB, "challenged")}
    assert app.confirm(token_of(app, ALICE, BOB), [ALICE]).released == 2
    rows = {(s.scope, s.state) for s in app.whitelist() if s.address == ALICE}
    assert rows == {(BOB, "authorized"), (CAROL, "authorized")}
    later = send(app, to=["bob+lists@example.test", CAROL, "dave@example.test"])
    assert decisions(later) == {
        "bob+lists@example.test": Decision.DELIVER,
        CAROL: Decision.DELIVER,
        "dave@example.test": Decision.CHALLENGE,
    }
    with pytest.raises(tokens.TokenForged):
        tokens.verify(
            app.keyring, token_of(app, ALICE, BOB), sender=ALICE, scope=CAROL, now=int(app.clock())
        )


def test_challenge_lapses_after_lifetime(app: SourceAuth, clock: FakeClock) -> None:
    send(app)
    first = challenge_id_of(app, ALICE)
    clock.advance(7 * DAY - 120)
    assert app.maintain().challenges_expired == 0
    clock.advance(240)
    before = log_position(app)
    report = app.maintain()
    assert (report.challenges_expired, report.purged) == (1, 1)
    lapsed = events_since(app, before)
    assert "Sender.ChallengeExpired" in names(lapsed)
    assert sender_state(app, ALICE) == "expired"
    assert held_states(app) == ["purged"]

    again = send(app)
    assert again.decisions[0].reason == "challenge_queued"
    assert challenge_id_of(app, ALICE) != first, "a new challenge, with a new token"


def test_maintain_is_idempotent(app: SourceAuth, clock: FakeClock) -> None:
    send(app)
    send(app, MALLORY, [BOB, DAVE])
    send(app, "<>")
    app.challenge_failed(token_of(app, MALLORY), UNKNOWN_USER)
    clock.advance(8 * DAY)
    first = app.maintain()
    assert first.purged == 3 and first.challenges_expired == 1 and first.delivered == 1
    position, views = log_position(app), app.views.dump()  # type: ignore[attr-defined]
    for _ in range(2):
        again = app.maintain()
        recorded = {k: v for k, v in again.as_dict().items() if k != "blobs_collected"}
        assert all(v == 0 for v in recorded.values()), again
        assert log_position(app) == position, "a second pass records nothing"
        assert app.views.dump() == views  # type: ignore[attr-defined]


def run_together(*jobs: Callable[[], Receipt]) -> list[Receipt]:
    """Run each job in its own thread, released at the same instant; re-raise any error."""
    start = threading.Barrier(len(jobs))
    results: list[Receipt] = []
    errors: list[BaseException] = []

    def run(job: Callable[[], Receipt]) -> None:
        start.wait()
        try:
            results.append(job())
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def test_concurrent_engines_on_one_file_produce_one_challenge(
    make_engine: Any, tmp_path: Any
) -> None:
    """Two filter processes on one SQLite file race on a stranger's first message, several
    times over: the loser of each race retries on the winner's state and only holds."""
    path = tmp_path / "shared.db"
    left, right = make_engine(path=path), make_engine(path=path)
    strangers = [f"stranger{i}@remote.test" for i in range(5)]
    for stranger in strangers:
        one, other = incoming(left, stranger, BOB), incoming(right, stranger, CAROL)
        receipts = run_together(partial(left.receive, one), partial(right.receive, other))
        assert [r.decisions[0].decision for r in receipts] == [Decision.CHALLENGE] * 2
        assert sum(len(r.challenges) for r in receipts) == 1, stranger

    recorded = Counter(names(events_since(left, 0)))
    assert recorded == Counter(
        {"Sender.FirstChallenged": len(strangers), "Message.Challenged": 2 * len(strangers)}
    )
    for engine in (left, right):
        for stranger in strangers:
            assert held_states(engine, stranger) == ["challenged", "challenged"]
            assert sender_state(engine, stranger) == "challenged"


# ------------------------------------------------------------------------------ §5-§6 the log


def drive_workload(app: SourceAuth, clock: FakeClock) -> None:
    """A little of everything: challenge, confirm, failure, lapse, exemptions, operator verbs."""
    send(app, to=[BOB, DAVE])
    send(app, to=CAROL)
    app.dispatch_challenges()
    app.receive(reply_to_challenge(app, ALICE))
    send(app, MALLORY)
    app.challenge_failed(token_of(app, MALLORY), UNKNOWN_USER)
    send(app, "slow@remote.test")
    send(app, "<>", BOB)
    send(app, "news@remote.test", BOB, headers=[("List-Id", "<n.remote.test>")])
    send(app, "spam@remote.test", BOB)
    app.block("spam@remote.test")
    app.authorize("friend@remote.test")
    send(app, "friend@remote.test", BOB)
    held = [m for m in app.quarantine(state="held")]
    app.release(held[0].id)
    app.maintain()
    clock.advance(8 * DAY)
    send(app, "late@remote.test")
    app.maintain()
    app.forget(ALICE)


def test_every_decision_has_a_reason_in_the_log(app: SourceAuth, clock: FakeClock) -> None:
    drive_workload(app, clock)
    for event in events_since(app, 0):
        if hasattr(event, "reason"):
            assert event.reason, f"{event_name(event)} has no reason"
            assert event.actor, f"{event_name(event)} has no actor"
    history = app.history(ALICE)
    by_event = {(h.event, h.fields.get("reason")) for h in history}
    assert ("Sender.FirstChallenged", "first_message_from_unknown_sender") in by_event
    assert ("Message.Challenged", "challenge_queued") in by_event
    assert ("Message.Challenged", "challenge_pending") in by_event
    assert ("Sender.Confirmed", "valid_reply") in by_event
    assert ("Message.Released", f"sender_confirmed:{ALICE}") in by_event
    assert ("Sender.Forgotten", "manual") in by_event
    assert [h.timestamp for h in history] == sorted(h.timestamp for h in history)
    spammer = {h.event: h.fields for h in app.history("spam@remote.test")}
    assert spammer["Sender.Blocked"]["actor"] == "operator"
    assert spammer["Message.DiscardedWhileHeld"]["reason"] == "sender_blocked"


def test_rebuild_equals_live_for_every_view(app: SourceAuth, clock: FakeClock) -> None:
    drive_workload(app, clock)
    settle(app)
    views: Any = app.views
    live = views.dump()
    assert all(live[table] for table in ("sa_whitelist", "sa_quarantine", "sa_challenges"))
    assert views.rebuild() == log_position(app)
    assert views.dump() == live


def test_audit_verify_passes_a_sound_log(app: SourceAuth, clock: FakeClock) -> None:
    drive_workload(app, clock)
    fault, summary = verify(app)
    assert fault is None
    assert "every transition legal" in summary


def test_audit_verify_finds_an_illegal_transition(app: SourceAuth) -> None:
    app.authorize(ALICE)
    sender: Any = app.repository.get(app.sender_id(ALICE))
    assert sender.state == "authorized"
    forged = Sender.Confirmed(
        originator_id=sender.id,
        originator_version=sender.version + 1,
        timestamp=Sender.Confirmed.create_timestamp(),
        actor=ALICE,
        reason="forged",
    )
    app.recorder.insert_events([app.mapper.to_stored_event(forged)])
    fault, _ = verify(app)
    assert fault is not None
    assert fault.position == log_position(app)
    assert fault.aggregate_id == sender.id.hex and fault.version == sender.version + 1
    assert "Sender.Confirmed" in fault.problem
    assert "'confirm' is not allowed from 'authorized'" in fault.problem


def test_views_survive_restart(make_engine: Any, clock: FakeClock, tmp_path: Any) -> None:
    app = make_engine()
    drive_workload(app, clock)
    send(app, "pending@remote.test")
    settle(app)
    views: Any = app.views
    whitelist, quarantine, dump = app.whitelist(), app.quarantine(), views.dump()
    token = token_of(app, "pending@remote.test")
    app.close()

    reopened = make_engine()
    again: Any = reopened.views
    assert again.position() == log_position(reopened)
    assert reopened.whitelist() == whitelist
    assert reopened.quarantine() == quarantine
    assert again.dump() == dump
    result = reopened.confirm(token, ["pending@remote.test"])
    assert result.confirmed and result.released == 1


def test_rate_limit_counts_survive_restart(make_engine: Any) -> None:
    limits = Limits(challenges_per_domain_per_hour=1)
    app = make_engine(limits=limits)
    send(app, "a1@remote.test")
    app.close()
    reopened = make_engine(limits=limits)
    assert send(reopened, "a2@remote.test").decisions[0].reason.startswith("rate_limited:")


def test_key_rotation_keeps_pending_tokens_valid(
    make_engine: Any, keyring: tokens.Keyring, relay: FakeChallenges
) -> None:
    app = make_engine(challenges=relay)
    send(app)
    app.dispatch_challenges()
    app.close()
    rotated = tokens.Keyring(
        token_keys={**keyring.token_keys, 2: b"k" * 32}, active_kid=2, id_key=keyring.id_key
    )
    reopened = make_engine(keyring=rotated, challenges=relay)
    assert token_of(reopened, ALICE) == relay.sent[0].token, "a resend carries the same token"
    send(reopened, MALLORY)
    assert tokens.parse(token_of(reopened, MALLORY)).kid == 2, "new challenges use the new key"
    assert reopened.confirm(relay.sent[0].token, [ALICE]).confirmed


# ------------------------------------------------------------------------------ operator verbs


def test_operator_release_and_discard_follow_the_message_spec(
    app: SourceAuth, next_hop: FakeDeliveries
) -> None:
    first = send(app).decisions[0].message_id
    second = send(app, to=CAROL).decisions[0].message_id
    assert app.release(str(first), reason="looked fine").state == "authorized"
    assert app.discard(str(second)).state == "discarded"
    app.maintain()
    assert next_hop.per_recipient() == Counter({BOB: 1})
    with pytest.raises(IllegalTransition):
        app.release(str(second))
    with pytest.raises(IllegalTransition):
        app.discard(str(first))
    assert sender_state(app, ALICE) == "challenged", "releasing mail does not whitelist"


def test_authorize_releases_held_mail_and_forget_makes_a_stranger_again(
    app: SourceAuth, relay: FakeChallenges
) -> None:
    send(app)
    app.dispatch_challenges()
    view = app.authorize(ALICE, actor="admin", reason="known customer")
    assert view.state == "authorized" and view.via == "admin"
    assert held_states(app) == ["authorized"]
    assert [c.outcome for c in app.views.challenges()] == ["superseded"]  # type: ignore[attr-defined]
    assert app.forget(ALICE).state == "unknown"
    assert send(app).decisions[0].reason == "challenge_queued"
    with pytest.raises(NotFound):
        app.forget("never-seen@remote.test")


def test_unprotected_recipients_alone_record_no_sender(app: SourceAuth) -> None:
    receipt = send(app, to=[DAVE])
    assert decisions(receipt) == {DAVE: Decision.DELIVER}
    assert receipt.decisions[0].reason == "recipient_unprotected"
    assert names(events_since(app, 0)) == ["Message.Accepted"]
    assert app.whitelist() == []


def test_group_commit_of_two_messages_from_one_stranger_makes_one_challenge(
    app: SourceAuth,
) -> None:
    receipts = app.receive_many([incoming(app, ALICE, BOB), incoming(app, ALICE, CAROL)])
    assert [r.decisions[0].reason for r in receipts] == ["challenge_queued", "challenge_pending"]
    recorded = Counter(names(events_since(app, 0)))
    assert recorded == Counter({"Sender.FirstChallenged": 1, "Message.Challenged": 2})


def test_token_for_a_challenge_just_recorded_is_available(app: SourceAuth) -> None:
    receipt = send(app)
    token = app.token_for(receipt.challenges[0])
    assert app.confirm(token, [ALICE]).confirmed


def test_message_held_in_the_same_group_commit_as_the_confirming_reply_is_released(
    app: SourceAuth, next_hop: FakeDeliveries
) -> None:
    send(app)
    token = token_of(app, ALICE)
    held, reply = app.receive_many(
        [incoming(app, ALICE, CAROL), reply_to_challenge(app, ALICE, token=token)]
    )
    assert held.decisions[0].decision == Decision.CHALLENGE
    assert reply.decisions[0].reason == "confirm_accepted: sender confirmed"
    assert held_states(app) == ["authorized", "authorized"]
    app.dispatch_deliveries()
    assert next_hop.per_recipient() == Counter({BOB: 1, CAROL: 1})


# ------------------------------------------------------------------------------ regressions (bugs found and fixed)


def test_maintain_collects_the_original_of_a_copy_it_delivered_in_the_same_pass(
    app: SourceAuth,
) -> None:
    message = incoming(app, ALICE, DAVE)
    app.receive(message)
    store: Any = app.blobs
    first = app.maintain()
    assert first.delivered == 1
    assert not store.exists(message.blob.key)
    assert app.maintain().blobs_collected == 0


def test_a_recipient_named_twice_gets_exactly_one_delivery(
    app: SourceAuth, next_hop: FakeDeliveries
) -> None:
    send(app, to=[BOB, "Bob@Example.TEST", DAVE, DAVE])
    app.authorize(ALICE)
    app.maintain()
    assert next_hop.per_recipient() == Counter({BOB: 1, DAVE: 1})


@pytest.mark.parametrize(
    "confirm_first",
    [True, False],
    ids=["confirm-address-first", "protected-mailbox-first"],
)
def test_reply_to_the_challenge_that_also_names_a_protected_mailbox_confirms_and_delivers(
    app: SourceAuth, next_hop: FakeDeliveries, confirm_first: bool
) -> None:
    """A "reply all" to a challenge: the confirm address and the protected mailbox in one."""
    send(app)
    confirm = f"confirm+{token_of(app, ALICE)}@example.test"
    recipients = [confirm, BOB] if confirm_first else [BOB, confirm]
    receipt = app.receive(incoming(app, ALICE, recipients, subject="Re: please confirm"))
    assert receipt.decision_for(confirm).reason == "confirm_accepted: sender confirmed"
    assert sender_state(app, ALICE) == "authorized"
    app.maintain()
    assert next_hop.per_recipient() == Counter({BOB: 2}), "the original and the reply"


class _Recorder:
    """Stands in for a module's structlog logger: records (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return record

    def resolved(self, level: int) -> _Recorder:
        """As LibraryLogger.resolved: what a loop logging many lines calls (this recorder)."""
        return self

    def enabled(self, level: int) -> bool:
        return True

    def info_many(self, event: str, rows: list[dict[str, Any]]) -> None:
        """As LibraryLogger.info_many: one info line per row."""
        self.lines.extend(("info", event, dict(row)) for row in rows)

    def events(self) -> list[str]:
        return [event for _, event, _ in self.lines]


def test_a_unit_retried_after_a_conflict_logs_each_decision_once(
    app: SourceAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventsourcing.persistence import IntegrityError

    from sourceauth.engine.service import context, receive

    logged = _Recorder()
    monkeypatch.setattr(context, "log", logged)
    monkeypatch.setattr(receive, "log", logged)
    real_save, attempts = app.save_unit, []

    def conflicting_once(*objs: Any, **kwargs: Any) -> Any:
        attempts.append(len(objs))
        if len(attempts) == 1:
            raise IntegrityError("another writer got there first")
        return real_save(*objs, **kwargs)

    monkeypatch.setattr(app, "save_unit", conflicting_once)
    receipt = send(app, to=[BOB, DAVE])
    assert len(attempts) == 2, "the unit was redone once"
    assert decisions(receipt) == {BOB: Decision.CHALLENGE, DAVE: Decision.DELIVER}
    assert logged.events() == ["concurrency_conflict", "message_decided", "message_decided"]
    assert {f["recipient"] for _, e, f in logged.lines if e == "message_decided"} == {BOB, DAVE}
    assert len(events_since(app, 0)) == 3  # the sender and two copies, recorded once


def test_log_event_names_are_literal_past_tense_facts(
    app: SourceAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourceauth.engine.service import context, receive

    logged = _Recorder()
    monkeypatch.setattr(context, "log", logged)
    monkeypatch.setattr(receive, "log", logged)
    held = send(app, "spam@remote.test").decisions[0].message_id
    app.release(str(held))
    app.block("spam@remote.test")
    app.authorize("friend@remote.test")
    app.forget("friend@remote.test")
    other = send(app, "x@remote.test").decisions[0].message_id
    app.discard(str(other))
    verbs = [e for e in logged.events() if e != "message_decided"]
    assert verbs == [
        "message_released",
        "sender_blocked",
        "sender_authorized",
        "sender_forgotten",
        "message_discarded",
    ]
