"""Properties of the whole service under any interleaving of mail, replies, reports, operator
verbs, worker passes and time: no copy lost or duplicated, one challenge per round, and
maintenance that leaves nothing for a second pass."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sourceauth.engine.api import Decision, MaintenanceReport, Receipt
from tests.support.service import Service, open_service

SENDERS = ("alice@remote.test", "bert@remote.test", "cleo@other.test")
PROTECTED = ("bob@example.test", "carol@example.test")
OUTSIDERS = ("dave@elsewhere.test",)
TERMINAL = {"purged", "discarded", "expired"}  # a copy that is never delivered, with a reason


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 6), recipients=st.sets(st.sampled_from(PROTECTED), min_size=1))
def test_several_messages_from_one_pending_sender_one_challenge_all_released_by_one_reply(
    count: int, recipients: set[str]
) -> None:
    service = open_service()
    try:
        receipts = [service.receive(SENDERS[0], sorted(recipients)) for _ in range(count)]
        service.dispatch()
        assert len(service.relay.sent) == 1
        assert sum(len(r.challenges) for r in receipts) == 1
        assert service.reply(service.relay.sent[0]).decisions[0].decision is Decision.CONFIRM
        service.dispatch()
        expected = Counter((r.receipt_id, rcpt) for r in receipts for rcpt in recipients)
        assert Counter(service.next_hop.taken) == expected
    finally:
        service.app.close()


class MailFlow(RuleBasedStateMachine):
    """Random traffic through one service; the next hop must see each copy at most once and,
    once every sender is settled, exactly once unless it ended in a recorded terminal state."""

    def __init__(self) -> None:
        super().__init__()
        self.service: Service = open_service()
        self.receipts: list[tuple[Receipt, tuple[str, ...]]] = []

    @rule(
        sender=st.sampled_from(SENDERS),
        recipients=st.lists(
            st.sampled_from(PROTECTED + OUTSIDERS), min_size=1, max_size=3, unique=True
        ),
    )
    def mail(self, sender: str, recipients: list[str]) -> None:
        receipt = self.service.receive(sender, recipients)
        self.receipts.append((receipt, tuple(recipients)))
        assert {d.recipient for d in receipt.decisions} == set(recipients)

    @rule(sender=st.sampled_from(SENDERS))
    def reply(self, sender: str) -> None:
        sent = self.service.relay.to(sender)
        if sent:
            self.service.reply(sent[-1])

    @rule(sender=st.sampled_from(SENDERS))
    def bounce(self, sender: str) -> None:
        sent = self.service.relay.to(sender)
        if sent:
            self.service.dsn(sent[-1])

    @rule(sender=st.sampled_from(SENDERS), verb=st.sampled_from(["authorize", "block"]))
    def operator(self, sender: str, verb: str) -> None:
        getattr(self.service.app, verb)(sender)

    @rule()
    def workers(self) -> None:
        self.service.dispatch()

    @rule()
    def maintain(self) -> None:
        self.service.app.maintain()

    @rule(hours=st.integers(1, 24 * 8))
    def time_passes(self, hours: int) -> None:
        self.service.clock.advance(hours * 3600.0)

    @invariant()
    def no_copy_is_delivered_twice(self) -> None:
        twice = [k for k, n in Counter(self.service.next_hop.taken).items() if n > 1]
        assert not twice, twice

    @invariant()
    def only_queued_challenges_leave_and_each_round_has_one_token(self) -> None:
        queued = {c for r, _ in self.receipts for c in r.challenges}
        sent = self.service.relay.sent
        assert {c.challenge_id for c in sent} <= queued
        tokens = {c.challenge_id: c.token for c in sent}
        assert all(tokens[c.challenge_id] == c.token for c in sent)  # a resend: same token

    def teardown(self) -> None:
        try:
            self._settle_and_check()
        finally:
            self.service.app.close()

    def _settle_and_check(self) -> None:
        app = self.service.app
        for sender in SENDERS:
            if app.sender(sender).state != "blocked":
                app.authorize(sender)
        app.maintain()
        assert app.maintain() == MaintenanceReport()  # the first pass left nothing to do
        taken = Counter(self.service.next_hop.taken)
        held = {(m.receipt_id, r): m.state for m in app.quarantine() for r in m.recipients}
        for receipt, recipients in self.receipts:
            for rcpt in recipients:
                key = (receipt.receipt_id, rcpt)
                state = held.get(key, "not held")
                assert taken[key] == 1 or state in TERMINAL, (key, taken[key], state)
                assert not (taken[key] and state in TERMINAL), (key, state)


MailFlow.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
test_mail_flow_loses_and_duplicates_nothing = MailFlow.TestCase
