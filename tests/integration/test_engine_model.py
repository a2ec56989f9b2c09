"""The engine raced against a reference model of DESIGN.md by hypothesis.

The model is plain dicts (sender -> state, message -> state) updated by the rules of
DESIGN.md §1-§2, written out by hand; after every step the engine's views, aggregates and
log must agree with it. It runs twice: one whitelist for the server ("global") and one
whitelist per protected mailbox ("recipient"), where a sender is keyed by (address, mailbox).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sourceauth.adapters.storage.audit import verify
from sourceauth.engine import tokens
from sourceauth.engine.api import Decision, DeliveryJob, DeliveryResult, Receipt, SendOutcome
from sourceauth.engine.audit import check_events
from sourceauth.engine.errors import IllegalTransition, NotFound
from sourceauth.engine.settings import DAY
from tests.conftest import (
    FakeChallenges,
    FakeClock,
    FakeDeliveries,
    build_engine,
    challenge_id_of,
    incoming,
    reply_to_challenge,
    settle,
    token_of,
)

pytestmark = pytest.mark.timeout(180)

NULL = "<>"
SENDERS = ("a@x.test", "b@x.test", "c@y.test", NULL)
PEOPLE = tuple(s for s in SENDERS if s != NULL)
PROTECTED = ("bob@example.test", "carol@example.test")
UNPROTECTED = ("dave@other.test",)
LIFETIME = 7 * DAY  # challenge_lifetime and hold_lifetime, the defaults
MAX_RESENDS = 2  # Limits().max_resends

HELD = frozenset({"held", "challenged"})
RELEASABLE = frozenset({"held", "challenged", "expired", "failed"})
DISCARDABLE = frozenset({"held", "challenged", "expired"})

Key = tuple[str, str]  # (sender address, whitelist scope)


@dataclass
class SenderModel:
    state: str = "unknown"
    exists: bool = False  # has an aggregate (challenged, or named by an operator)
    challenged: bool = False  # has ever had a challenge, so a token to reply with
    expires: float = 0.0  # of its current challenge
    outcome: str = ""  # of its current challenge: queued, sent, failed, …
    sent_at: float = 0.0
    resends: int = 0


@dataclass
class MessageModel:
    state: str
    sender: Key | None  # whose confirmation releases it; None if nobody's
    quarantined: bool  # listed by quarantine() (every copy but those delivered at once)
    expires: float = 0.0
    deferred: bool = False  # held over a cap: its sender is challenged later (issue 7)


def _refuse_all(job: DeliveryJob) -> DeliveryResult:
    return DeliveryResult(rejected=job.recipients, diagnostic="550 5.1.1 mailbox unavailable")


class EngineAgainstModel(RuleBasedStateMachine):
    scope = "global"

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="sourceauth-model-"))
        self.clock = FakeClock()
        self.relay = FakeChallenges()
        self.hop = FakeDeliveries()
        self.app = build_engine(
            self.directory,
            clock=self.clock,
            keyring=tokens.generate_keyring(),
            challenges=self.relay,
            deliveries=self.hop,
            scope=self.scope,
        )
        self.scopes = ("global",) if self.scope == "global" else PROTECTED
        self.senders: dict[Key, SenderModel] = {
            (a, s): SenderModel() for a in PEOPLE for s in self.scopes
        }
        self.messages: dict[str, MessageModel] = {}
        # (moment, sender states, held copies' states) as the model had them before the clock
        # moved on: `audit state --at` must replay the log to exactly these.
        self.snapshots: list[tuple[float, dict[Key, str], dict[str, str]]] = []

    def teardown(self) -> None:
        try:
            for moment, senders, messages in self.snapshots[-3:]:  # each replays the whole log
                found = self.app.state_at(datetime.fromtimestamp(moment, tz=UTC))
                replayed = {(r["address"], r["scope"]): r["state"] for r in found.senders}
                assert replayed == senders, (moment, replayed, senders)
                held = {r["id"]: r["state"] for r in found.messages}
                assert held == messages, (moment, held, messages)
            # The auditor's full check: every transition legal and every view equal to a
            # rebuild from the log. It rebuilds into a scratch file (~50 ms), so it runs once
            # per run; the legality of the log is checked after every step below.
            fault, _ = verify(self.app)
            assert fault is None, str(fault)
        finally:
            self.app.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ the model's rules

    def scope_of(self, recipient: str) -> str:
        return "global" if self.scope == "global" else recipient

    def challenged_ever(self) -> list[Key]:
        return [k for k, s in self.senders.items() if s.challenged]

    def _linked(self, key: Key, states: frozenset[str]) -> Iterator[MessageModel]:
        return (m for m in self.messages.values() if m.sender == key and m.state in states)

    def _move_linked(self, key: Key, states: frozenset[str], to: str) -> None:
        for m in list(self._linked(key, states)):
            m.state = to

    def _pending_elsewhere(self, key: Key) -> bool:
        """Another scope of the same address has a challenge out: one per mailbox."""
        return any(
            k[0] == key[0] and k != key and s.state == "challenged" for k, s in self.senders.items()
        )

    def _waiting_elsewhere(self, key: Key) -> Iterator[MessageModel]:
        """Copies from the same address held over a cap for other mailboxes: a message to
        several mailboxes drew one challenge, whose outcome is theirs too."""
        return (
            m
            for m in self.messages.values()
            if m.deferred
            and m.state == "held"
            and m.sender is not None
            and m.sender[0] == key[0]
            and m.sender != key
        )

    def _fail(self, key: Key, outcome: str) -> None:
        """A challenge failed or lapsed: its mail expires, and what waited on it elsewhere."""
        model = self.senders[key]
        model.state, model.outcome = "expired", outcome
        self._move_linked(key, HELD, "expired")
        for m in list(self._waiting_elsewhere(key)):
            m.state = "expired"

    def _new_challenge(self, model: SenderModel, now: float) -> None:
        model.state, model.exists, model.challenged = "challenged", True, True
        model.expires = float(int(now + LIFETIME) // 60 * 60)
        model.outcome, model.resends = "queued", 0

    def _supersede(self, model: SenderModel) -> None:
        if model.outcome in ("queued", "sent"):
            model.outcome = "superseded"

    def _record(self, receipt: Receipt, expected: dict[str, tuple[Decision, MessageModel]]) -> None:
        got = {d.recipient: d.decision for d in receipt.decisions}
        assert got == {r: decision for r, (decision, _) in expected.items()}, receipt
        for d in receipt.decisions:
            assert d.message_id is not None and d.reason
            self.messages.setdefault(d.message_id.hex, expected[d.recipient][1])

    # ------------------------------------------------------------------ rules

    @rule(
        sender=st.sampled_from(SENDERS),
        recipients=st.lists(
            st.sampled_from(PROTECTED + UNPROTECTED), min_size=1, max_size=3, unique=True
        ),
        bulk=st.sampled_from([False, False, False, True]),
    )
    def receive(self, sender: str, recipients: list[str], bulk: bool) -> None:
        now = self.clock()
        deliver = MessageModel("authorized", None, quarantined=False)
        hold = MessageModel("held", None, quarantined=True, expires=now + LIFETIME)
        discard = MessageModel("discarded", None, quarantined=True)
        held: dict[Key, list[str]] = {}  # recipients per sender aggregate, in envelope order
        exempt: dict[Key, MessageModel] = {}  # never-challenge copies, linked to their sender
        expected: dict[str, tuple[Decision, MessageModel]] = {}
        for rcpt in recipients:
            key = (sender, self.scope_of(rcpt))
            state = self.senders[key].state if key in self.senders else "unknown"
            if rcpt in UNPROTECTED or state == "authorized":
                expected[rcpt] = (Decision.DELIVER, deliver)
            elif state == "blocked":
                expected[rcpt] = (Decision.DISCARD, discard)
            elif sender == NULL:
                expected[rcpt] = (Decision.HOLD, hold)  # never challenged, nobody's
            elif bulk:
                copy = exempt.setdefault(
                    key, MessageModel("held", key, quarantined=True, expires=now + LIFETIME)
                )
                expected[rcpt] = (Decision.HOLD, copy)  # never challenged
            else:
                held.setdefault(key, []).append(rcpt)
        may_challenge = True  # one message never causes more than one challenge
        for key, rcpts in held.items():
            model = self.senders[key]
            copy = MessageModel("challenged", key, quarantined=True, expires=now + LIFETIME)
            decision = Decision.CHALLENGE
            if model.state == "challenged":  # one pending challenge per sender
                if (
                    may_challenge
                    and model.outcome == "sent"
                    and now - model.sent_at >= DAY
                    and model.resends < MAX_RESENDS
                ):
                    model.outcome, model.resends = "queued", model.resends + 1  # same token
                    may_challenge = False
            elif may_challenge and not self._pending_elsewhere(key):
                self._new_challenge(model, now)
                may_challenge = False
            else:  # held over a cap, linked: challenged later
                copy = MessageModel(
                    "held", key, quarantined=True, expires=now + LIFETIME, deferred=True
                )
                decision = Decision.HOLD
            for rcpt in rcpts:
                expected[rcpt] = (decision, copy)
        headers = [("Precedence", "bulk")] if bulk else []
        receipt = self.app.receive(incoming(self.app, sender, recipients, headers=headers))
        self._record(receipt, expected)

    @precondition(lambda self: bool(self.challenged_ever()))
    @rule(data=st.data(), from_the_challenged_sender=st.booleans())
    def reply(self, data: st.DataObject, from_the_challenged_sender: bool) -> None:
        key = data.draw(st.sampled_from(self.challenged_ever()))
        target, scope = key
        replier = target
        if not from_the_challenged_sender:
            replier = data.draw(st.sampled_from([a for a in PEOPLE if a != target]))
        model = self.senders[key]
        confirms = (
            replier == target and model.state == "challenged" and self.clock() < model.expires
        )
        token = token_of(self.app, target, scope)
        receipt = self.app.receive(reply_to_challenge(self.app, replier, token=token))
        [decision] = receipt.decisions
        assert decision.decision == Decision.CONFIRM
        expected = "confirm_accepted" if confirms else "confirm_refused"
        assert decision.reason.startswith(expected), decision.reason
        assert decision.message_id is not None
        self.messages[decision.message_id.hex] = MessageModel("discarded", None, quarantined=True)
        if confirms:
            model.state, model.outcome = "authorized", "confirmed"
            self._move_linked(key, HELD | {"expired"}, "authorized")
            for other in {m.sender for m in self._waiting_elsewhere(key) if m.sender}:
                waiting = self.senders[other]
                if waiting.state in ("unknown", "expired", "challenged"):
                    waiting.state, waiting.exists = "authorized", True
                    self._supersede(waiting)
                    self._move_linked(other, HELD | {"expired"}, "authorized")

    @precondition(lambda self: bool(self.challenged_ever()))
    @rule(data=st.data())
    def challenge_failed(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.challenged_ever()))
        model = self.senders[key]
        token = token_of(self.app, *key)
        result = self.app.challenge_failed(token, "550 5.1.1 user unknown")
        assert result.recorded == (model.state == "challenged"), result
        if result.recorded:
            self._fail(key, "failed")

    @rule(seconds=st.sampled_from([60.0, 3600.0, DAY, 8 * DAY]))
    def advance_clock(self, seconds: float) -> None:
        self.snapshots.append(
            (
                self.clock(),
                {k: m.state for k, m in self.senders.items() if m.exists},
                {mid: m.state for mid, m in self.messages.items() if m.quarantined},
            )
        )
        self.clock.advance(seconds)

    @rule()
    def maintain(self) -> None:
        now = self.clock()
        for key, model in self.senders.items():  # challenges past their lifetime lapse
            if model.state == "challenged" and model.expires <= now:
                self._fail(key, "expired")
        for m in self.messages.values():  # held mail past its hold lifetime expires
            if m.state in HELD and 0 < m.expires <= now:
                m.state = "expired"
        for m in self.messages.values():  # expired originals are deleted
            if m.state == "expired":
                m.state = "purged"
        # Senders of mail held over a cap are challenged now, one per address (the engine
        # takes the oldest copy first; copies of one second have no order, so the test reads
        # which scope it chose and checks there was exactly one choice to make).
        candidates: dict[str, set[Key]] = {}
        for m in self.messages.values():
            if m.deferred and m.state == "held" and m.sender is not None:
                if self.senders[m.sender].state in ("unknown", "expired"):
                    candidates.setdefault(m.sender[0], set()).add(m.sender)
        known = {c.challenge_id for c in self.relay.sent}
        sent_before = len(self.relay.sent)
        queued = {k for k, model in self.senders.items() if model.state == "challenged"}
        self.app.maintain()
        fresh = [c for c in self.relay.sent[sent_before:] if c.challenge_id not in known]
        chosen = {(c.to, c.scope) for c in fresh} - queued
        for address, keys in candidates.items():
            picked = chosen & keys
            if any(self._pending_elsewhere(k) for k in keys):
                assert not picked, (address, picked)
                continue
            assert len(picked) == 1, (address, keys, chosen)
            self._new_challenge(self.senders[picked.pop()], now)
        assert chosen <= {k for keys in candidates.values() for k in keys}, chosen
        for key, model in self.senders.items():  # queued challenges leave
            if model.state == "challenged" and model.outcome == "queued":
                if self.relay.outcome == SendOutcome.SENT:
                    model.outcome, model.sent_at = "sent", now
                else:  # a 5xx from the relay: the challenge failed, its mail expires
                    self._fail(key, "failed")
        for m in self.messages.values():  # the next hop takes (or refuses) every queued copy
            if m.state == "authorized":
                m.state = "delivered" if self.hop.answer is None else "failed"
                m.quarantined = m.quarantined or m.state == "failed"

    @rule(outcome=st.sampled_from([SendOutcome.SENT, SendOutcome.SENT, SendOutcome.PERMANENT]))
    def relay_answers(self, outcome: SendOutcome) -> None:
        self.relay.outcome = outcome

    @rule(refuses=st.sampled_from([False, False, True]))
    def next_hop_answers(self, refuses: bool) -> None:
        self.hop.answer = _refuse_all if refuses else None

    @rule(data=st.data(), address=st.sampled_from(PEOPLE))
    def authorize(self, data: st.DataObject, address: str) -> None:
        key = (address, data.draw(st.sampled_from(self.scopes)))
        self.app.authorize(address, scope=key[1])
        model = self.senders[key]
        model.state, model.exists = "authorized", True
        self._supersede(model)
        self._move_linked(key, HELD | {"expired"}, "authorized")

    @rule(data=st.data(), address=st.sampled_from(PEOPLE))
    def block(self, data: st.DataObject, address: str) -> None:
        key = (address, data.draw(st.sampled_from(self.scopes)))
        self.app.block(address, scope=key[1])
        model = self.senders[key]
        model.state, model.exists = "blocked", True
        self._supersede(model)
        self._move_linked(key, HELD, "discarded")

    @rule(data=st.data(), address=st.sampled_from(PEOPLE))
    def forget(self, data: st.DataObject, address: str) -> None:
        key = (address, data.draw(st.sampled_from(self.scopes)))
        model = self.senders[key]
        if not model.exists:
            with pytest.raises(NotFound):
                self.app.forget(address, scope=key[1])
            return
        self.app.forget(address, scope=key[1])
        model.state = "unknown"
        self._supersede(model)

    @precondition(lambda self: bool(self.messages))
    @rule(data=st.data(), verb=st.sampled_from(["release", "discard"]))
    def operator_decides_on_a_message(self, data: st.DataObject, verb: str) -> None:
        mid = data.draw(st.sampled_from(list(self.messages)))  # in order of arrival
        model = self.messages[mid]
        if verb == "release":
            allowed, after, act = RELEASABLE, "authorized", self.app.release
        else:
            allowed, after, act = DISCARDABLE, "discarded", self.app.discard
        if model.state not in allowed:
            with pytest.raises(IllegalTransition):
                act(mid)
            return
        assert act(mid).state == after
        model.state = after

    # ------------------------------------------------------------------ invariants

    @invariant()
    def sender_states_agree(self) -> None:
        engine = {(s.address, s.scope): s.state for s in self.app.whitelist()}
        model = {k: s.state for k, s in self.senders.items() if s.exists}
        assert engine == model

    @invariant()
    def message_states_agree(self) -> None:
        listed = {m.id: m.state for m in self.app.quarantine()}
        assert listed == {mid: m.state for mid, m in self.messages.items() if m.quarantined}
        for mid, m in self.messages.items():
            aggregate: Any = self.app.repository.get(UUID(mid))
            assert aggregate.state == m.state, (mid, m)
            assert aggregate.reason, f"message {mid} has no recorded reason"

    @invariant()
    def every_accepted_copy_is_in_exactly_one_place(self) -> None:
        settle(self.app)
        views: Any = self.app.views
        queued = {row.message_id for row in views.delivery_queue()}
        held = {m.id for m in self.app.quarantine() if m.state in HELD}
        assert queued == {mid for mid, m in self.messages.items() if m.state == "authorized"}
        assert not queued & held
        terminal = set(self.messages) - queued - held
        assert all(self.messages[mid].state not in HELD | {"authorized"} for mid in terminal)

    @invariant()
    def at_most_one_pending_challenge_per_sender(self) -> None:
        settle(self.app)
        views: Any = self.app.views
        pending = Counter(
            (c.address, c.scope)
            for c in views.challenges()
            if c.outcome in ("queued", "sent", "deferred")
        )
        assert all(n == 1 for n in pending.values()), pending
        assert set(pending) == {k for k, s in self.senders.items() if s.state == "challenged"}
        for key in self.challenged_ever():
            row = views.challenge(challenge_id_of(self.app, *key))
            assert row.outcome == self.senders[key].outcome, (key, row, self.senders[key])

    @invariant()
    def never_amplify(self) -> None:
        assert {c.to for c in self.relay.sent} <= set(PEOPLE), "a challenge to the null sender"
        by_challenge: dict[str, set[str]] = {}
        for c in self.relay.sent:
            by_challenge.setdefault(c.challenge_id, set()).add(c.token)
        assert all(len(t) == 1 for t in by_challenge.values()), "a resend changed the token"
        sends = Counter(c.challenge_id for c in self.relay.sent)
        assert all(n <= 1 + MAX_RESENDS for n in sends.values()), "too many resends"
        copies = Counter(self.hop.accepted)
        assert all(n == 1 for n in copies.values()), "a copy delivered twice"

    @invariant()
    def every_recorded_transition_is_legal(self) -> None:
        log = self.app.recorder.select_notifications(start=0, limit=10_000)
        fault = check_events((n.id, self.app.mapper.to_domain_event(n)) for n in log)
        assert fault is None, str(fault)


class EngineAgainstModelPerMailbox(EngineAgainstModel):
    scope = "recipient"


RUNS = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
EngineAgainstModel.TestCase.settings = RUNS
EngineAgainstModelPerMailbox.TestCase.settings = settings(RUNS, max_examples=20)
TestEngineAgainstModel = EngineAgainstModel.TestCase
TestEngineAgainstModelPerMailbox = EngineAgainstModelPerMailbox.TestCase


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """One log event per decision is right for operators and far too much for 1,000 steps."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)
