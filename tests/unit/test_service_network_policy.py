"""Policy per network (issue 10): overrides per protected domain and mailbox, resolved per
recipient copy; one server applying two policies to one message's recipients."""

from __future__ import annotations

from typing import Any

from sourceauth.engine.policy import AuthGate, ExemptAction, Exemption
from sourceauth.engine.recipient_policy import PolicyOverride
from sourceauth.engine.settings import DAY, EngineSettings
from tests.support.service import Service
from tests.unit.conftest import ServiceFactory

HOUR = 3600.0
STRANGER = "stranger@remote.test"
ALICE = "alice@a.test"
BOB = "bob@b.test"
CEO = "ceo@a.test"

TWO_NETWORKS: dict[str, Any] = {
    "protected": ("a.test", "b.test", "example.test"),
    "failed_action": "purge",
    "domains": {
        "a.test": PolicyOverride(failed_action="purge", hold_lifetime=HOUR),
        "b.test": PolicyOverride(failed_action="keep", hold_lifetime=7 * DAY),
    },
}


def _two_networks(make_service: ServiceFactory, **more: Any) -> Service:
    return make_service(**{**TWO_NETWORKS, **more})


def test_mailbox_override_then_domain_then_global() -> None:
    settings = EngineSettings(
        protected=("a.test",),
        hold_lifetime=2 * DAY,
        domains={"a.test": PolicyOverride(failed_action="keep", hold_lifetime=HOUR)},
        mailboxes={CEO: PolicyOverride(challenge_lifetime=HOUR, scope="recipient")},
    )
    policies = settings.policies
    ceo = policies.for_recipient("ceo+tag@a.test")  # an extension names the same mailbox
    assert ceo.source == "mailbox:ceo@a.test"
    assert (ceo.scope, ceo.challenge_lifetime) == ("recipient", HOUR)  # its own keys
    assert (ceo.failed_action, ceo.hold_lifetime) == ("keep", HOUR)  # from its domain
    alice = policies.for_recipient(ALICE)
    assert (alice.source, alice.scope, alice.challenge_lifetime) == (
        "domain:a.test",
        "global",
        7 * DAY,  # from [policy]
    )
    other = policies.for_recipient("x@elsewhere.test")
    assert other is policies.default and other.hold_lifetime == 2 * DAY


def test_without_overrides_every_recipient_has_the_one_global_policy() -> None:
    policies = EngineSettings(protected=("a.test",)).policies
    assert not policies.overrides
    assert policies.for_recipient(ALICE) is policies.for_recipient(BOB) is policies.default


def test_one_message_two_policies_purge_one_copy_and_keep_the_other(
    make_service: ServiceFactory,
) -> None:
    service = _two_networks(make_service)
    receipt = service.receive(STRANGER, [ALICE, BOB], subject="for both")
    copies = {m.recipients: m for m in service.copies_of(receipt)}
    assert set(copies) == {(ALICE,), (BOB,)}  # one copy per policy, one original
    alice, bob = copies[(ALICE,)], copies[(BOB,)]
    assert [d.decision.value for d in receipt.decisions] == ["challenge", "challenge"]
    challenge = service.challenge_to(STRANGER)
    assert len(service.relay.sent) == 1  # one challenge for the message, both copies wait on it
    # Each deadline is at least its own hold_lifetime and the challenge's lifetime (7 d).
    assert bob.expires >= service.clock() + 7 * DAY - 60
    assert alice.expires >= service.clock() + 7 * DAY - 60

    service.dsn(challenge, "550 5.1.1 no such user")
    alice_now = service.app.held_message(alice.id)
    assert alice_now.state == "expired"
    assert alice_now.reason == "challenge_failed (failed_action purge, policy domain:a.test)"
    assert service.app.held_message(bob.id).state == "challenged"

    report = service.app.maintain()
    assert report.purged == 1
    assert service.app.held_message(alice.id).state == "purged"
    assert "original kept for another copy" in service.app.held_message(alice.id).reason
    assert service.app.held_message(bob.id).state == "challenged"  # kept, still releasable
    assert service.blobs.exists(receipt.receipt_id)

    # Which policy applied is in the log: replay tells it.
    assert "Policy domain:a.test applied" in service.app.explain(alice.id)
    assert "failed_action keep" in service.app.explain(bob.id)
    assert "Policy domain:b.test applied" in service.app.explain(bob.id)

    service.clock.advance(7 * DAY + 120)
    service.app.maintain()
    assert service.app.held_message(bob.id).state == "purged"
    assert not service.blobs.exists(receipt.receipt_id)


def test_a_kept_copy_is_still_released_by_the_operator(make_service: ServiceFactory) -> None:
    service = _two_networks(make_service)
    receipt = service.receive(STRANGER, [ALICE, BOB])
    service.dsn(service.challenge_to(STRANGER))
    (bob,) = [m for m in service.copies_of(receipt) if m.recipients == (BOB,)]
    service.app.release(bob.id, actor="operator", reason="asked for it")
    service.dispatch()
    assert [r for r, _ in service.next_hop.taken] == [receipt.receipt_id]


def test_challenge_lifetime_comes_from_the_recipient_it_is_sent_for(
    make_service: ServiceFactory,
) -> None:
    service = make_service(
        protected=("a.test",),
        domains={"a.test": PolicyOverride(challenge_lifetime=2 * HOUR, hold_lifetime=HOUR)},
    )
    service.receive(STRANGER, ALICE)
    service.app.dispatch_challenges()
    service.clock.advance(2 * HOUR + 120)  # the global challenge_lifetime is 7 d
    assert service.app.maintain().challenges_expired == 1
    assert service.state_of(STRANGER) == "expired"


def test_exemptions_follow_each_recipients_policy(make_service: ServiceFactory) -> None:
    service = make_service(
        protected=("a.test", "b.test"),
        mailboxes={CEO: PolicyOverride(exemptions={Exemption.BULK: ExemptAction.DELIVER})},
    )
    receipt = service.receive(STRANGER, [CEO, BOB], headers=[("Precedence", "bulk")])
    decisions = {d.recipient: d.decision.value for d in receipt.decisions}
    assert decisions == {CEO: "deliver", BOB: "hold"}
    assert service.relay.sent == []


def test_auth_gate_applies_to_the_recipients_that_ask_for_it(make_service: ServiceFactory) -> None:
    gate = {"enabled": True, "trusted_authserv_ids": ("mx.a.test",)}
    service = make_service(
        protected=("a.test", "b.test"), domains={"a.test": PolicyOverride(auth_gate=gate)}
    )
    receipt = service.receive(STRANGER, [ALICE, BOB])
    by_rcpt = {d.recipient: d for d in receipt.decisions}
    assert by_rcpt[ALICE].decision.value == "hold"
    assert by_rcpt[ALICE].reason.startswith("auth_gate: ")
    assert by_rcpt[BOB].decision.value == "challenge"
    assert service.app.settings.policies.for_recipient(ALICE).auth_gate == AuthGate(
        enabled=True, trusted_authserv_ids=("mx.a.test",)
    )


def test_scope_per_mailbox_gives_that_mailbox_its_own_whitelist(
    make_service: ServiceFactory,
) -> None:
    service = make_service(
        protected=("a.test",), mailboxes={CEO: PolicyOverride(scope="recipient")}
    )
    service.receive(STRANGER, [ALICE])
    service.reply(service.challenge_to(STRANGER))
    assert service.state_of(STRANGER) == "authorized"  # the global whitelist
    # The ceo's mailbox has its own: the same sender is a stranger there.
    receipt = service.receive(STRANGER, [CEO, ALICE])
    decisions = {d.recipient: d.decision.value for d in receipt.decisions}
    assert decisions == {CEO: "challenge", ALICE: "deliver"}
    assert service.app.sender(STRANGER, scope=CEO).state == "challenged"


def test_answers_to_the_filter_are_not_split_by_policy(make_service: ServiceFactory) -> None:
    service = _two_networks(make_service)
    service.receive(STRANGER, ALICE)
    replied = service.reply(service.challenge_to(STRANGER))
    assert [d.decision.value for d in replied.decisions] == ["confirm"]
    assert service.held_states(STRANGER) == ["authorized"]  # released
