"""The Sender aggregate: one per (whitelist scope, sender address), and its current challenge.

Verbs name what the engine or an operator does; each records one past-tense event. The code
names the trigger; specs/sender.toml and specs/challenge.toml say where it leads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from sourceauth.engine.errors import ChallengeNotPending
from sourceauth.engine.statemachine import CHALLENGE, SENDER

# Challenge outcomes a reply, a report or the lifetime can still end (from the spec).
PENDING_OUTCOMES = CHALLENGE.sources("expire")
SUPERSEDE = "supersede"


class Sender(Aggregate):
    """A sender as seen by one whitelist scope ("global" or one protected mailbox)."""

    class Event(Aggregate.Event):
        trigger: ClassVar[str] = ""  # of specs/sender.toml
        challenge_trigger: ClassVar[str] = ""  # of specs/challenge.toml, for the current challenge
        # Who took the decision and why, for events that record no actor or reason field
        # (bookkeeping of the relay's answer): what `audit history` shows for them.
        implied_actor: ClassVar[str] = ""
        implied_reason: ClassVar[str] = ""

        def apply(self, aggregate: Any) -> None:
            sender: Sender = aggregate
            state = SENDER.next_state(sender.state, self.trigger)
            outcome = sender.outcome
            trigger = self.challenge_trigger
            # Both lookups before any change: a refused trigger leaves no trace.
            if trigger and (trigger != SUPERSEDE or CHALLENGE.allows(outcome, trigger)):
                outcome = CHALLENGE.next_state(outcome, trigger)  # supersede: only one still out
            sender.state = state
            sender.outcome = outcome
            sender.since = self.timestamp
            self.update(sender)

        def update(self, sender: Sender) -> None:
            """Event-specific fields; runs on trigger and on every replay."""

    class FirstSeen(Aggregate.Created):
        """First sight of a sender together with its first transition (one event, not two).
        Only its subclasses are recorded; each names the trigger it takes from `unknown`."""

        trigger: ClassVar[str] = ""
        address: str
        scope: str
        actor: str
        reason: str

        def mutate(self, aggregate: Any) -> Any:
            # The generic version inspects __init__'s signature on every call; this class's
            # fields are known, and replay and the hot path both go through here.
            assert aggregate is None
            sender = Sender.__new__(Sender)
            sender.__base_init__(self.originator_id, self.originator_version, self.timestamp)
            sender.__init__(self.address, self.scope)  # type: ignore[misc]
            self.apply(sender)
            return sender

        def apply(self, aggregate: Any) -> None:
            sender: Sender = aggregate
            sender.state = SENDER.next_state(SENDER.initial, self.trigger)
            sender.since = self.timestamp
            sender.via = self.actor

    class FirstChallenged(FirstSeen):
        """First message from an unknown sender: its first challenge is queued."""

        trigger: ClassVar[str] = "challenge"
        challenge_id: str
        kid: int
        expires_at: float
        subject: str  # of the message that prompted it, for the challenge text
        in_reply_to: str
        recipient: str

        def apply(self, aggregate: Any) -> None:
            super().apply(aggregate)
            aggregate._new_challenge(self.challenge_id, self.kid, self.expires_at)

    class FirstAuthorized(FirstSeen):
        """An operator or integrator whitelisted a sender never seen before."""

        trigger: ClassVar[str] = "authorize"

    class FirstBlocked(FirstSeen):
        """An operator blocked a sender never seen before."""

        trigger: ClassVar[str] = "block"

    class Challenged(Event):
        trigger: ClassVar[str] = "challenge"
        actor: str
        reason: str
        challenge_id: str
        kid: int
        expires_at: float
        subject: str
        in_reply_to: str
        recipient: str

        def update(self, sender: Sender) -> None:
            sender._new_challenge(self.challenge_id, self.kid, self.expires_at)

    class ChallengeResent(Event):
        trigger: ClassVar[str] = "resend"
        challenge_trigger: ClassVar[str] = "resend"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.resends += 1
            sender.next_attempt_at = 0.0

    class ChallengeSent(Event):
        """Version 2 names the challenge it reports on (version 1 did not)."""

        class_version: ClassVar[int] = 2
        trigger: ClassVar[str] = "sent"
        challenge_trigger: ClassVar[str] = "sent"
        implied_actor: ClassVar[str] = "relay"
        implied_reason: ClassVar[str] = "relay_accepted_challenge"
        challenge_id: str
        relay: str
        attempt: int

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["challenge_id"] = ""  # not recorded then: the sender's current challenge

        def update(self, sender: Sender) -> None:
            sender.attempts = self.attempt
            sender.sent_at = self.timestamp.timestamp()

    class ChallengeDeferred(Event):
        trigger: ClassVar[str] = "defer"
        challenge_trigger: ClassVar[str] = "defer"
        implied_actor: ClassVar[str] = "relay"
        implied_reason: ClassVar[str] = "relay_deferred_challenge"
        diagnostic: str
        attempt: int
        next_attempt_at: float

        def update(self, sender: Sender) -> None:
            sender.attempts = self.attempt
            sender.next_attempt_at = self.next_attempt_at

    class Confirmed(Event):
        trigger: ClassVar[str] = "confirm"
        challenge_trigger: ClassVar[str] = "confirm"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.via = "reply"

    class ChallengeFailed(Event):
        trigger: ClassVar[str] = "fail"
        challenge_trigger: ClassVar[str] = "fail"
        actor: str
        reason: str
        diagnostic: str

    class ChallengeExpired(Event):
        trigger: ClassVar[str] = "expire"
        challenge_trigger: ClassVar[str] = "expire"
        actor: str
        reason: str

    class Authorized(Event):
        trigger: ClassVar[str] = "authorize"
        challenge_trigger: ClassVar[str] = SUPERSEDE
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.via = self.actor

    class Blocked(Event):
        trigger: ClassVar[str] = "block"
        challenge_trigger: ClassVar[str] = SUPERSEDE
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.via = self.actor

    class Forgotten(Event):
        trigger: ClassVar[str] = "forget"
        challenge_trigger: ClassVar[str] = SUPERSEDE
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.via = self.actor

    def __init__(self, address: str, scope: str) -> None:
        self.address = address
        self.scope = scope
        self.state = SENDER.initial
        self.since: datetime | None = None
        self.via = ""
        self.challenge_id = ""
        self.kid = 0
        self.expires_at = 0.0
        self.outcome = ""  # of the current challenge: a state of specs/challenge.toml
        self.attempts = 0
        self.resends = 0
        self.sent_at = 0.0
        self.next_attempt_at = 0.0

    def _new_challenge(self, challenge_id: str, kid: int, expires_at: float) -> None:
        self.challenge_id = challenge_id
        self.kid = kid
        self.expires_at = expires_at
        self.outcome = CHALLENGE.initial
        self.attempts = 0
        self.resends = 0
        self.sent_at = 0.0
        self.next_attempt_at = 0.0

    # ------------------------------------------------------------------ creation verbs

    @classmethod
    def first_challenge(
        cls,
        sender_id: UUID,
        *,
        address: str,
        scope: str,
        timestamp: datetime,
        reason: str,
        challenge: ChallengeDetails,
    ) -> Sender:
        """The first message from an unknown sender: the sender and its challenge, queued."""
        return cls._first(
            cls.FirstChallenged,
            sender_id,
            timestamp=timestamp,
            address=address,
            scope=scope,
            actor=challenge.actor,
            reason=reason,
            **challenge.fields(),
        )

    @classmethod
    def first_verdict(
        cls,
        sender_id: UUID,
        *,
        trigger: str,
        address: str,
        scope: str,
        timestamp: datetime,
        actor: str,
        reason: str,
    ) -> Sender:
        """An operator's verdict (`authorize` or `block`) on a sender never seen before."""
        created = {"authorize": cls.FirstAuthorized, "block": cls.FirstBlocked}[trigger]
        return cls._first(
            created,
            sender_id,
            timestamp=timestamp,
            address=address,
            scope=scope,
            actor=actor,
            reason=reason,
        )

    @classmethod
    def _first(cls, created: type[Sender.FirstSeen], sender_id: UUID, **fields: Any) -> Sender:
        """eventsourcing's `_create` without its generic steps (an id to make, a timestamp to
        default, the created event's fields to look up): the same event, applied, pending."""
        if not isinstance(sender_id, UUID):
            raise TypeError(f"a sender id is a UUID, not {sender_id!r}")
        event = created(
            originator_topic=_SENDER_TOPIC,
            originator_id=sender_id,
            originator_version=cls.INITIAL_VERSION,
            **fields,
        )
        sender: Sender = event.mutate(None)
        sender.pending_events.append(event)
        return sender

    # ------------------------------------------------------------------ guards

    @property
    def challenge_pending(self) -> bool:
        return SENDER.allows(self.state, "confirm") and self.outcome in PENDING_OUTCOMES

    def check_challenge_is_pending(self, challenge_id: str) -> None:
        """The one guard of every answer to a challenge: it must be this sender's current,
        unanswered challenge (a late reply, report or send result finds it stale)."""
        if self.challenge_id != challenge_id or not self.challenge_pending:
            raise ChallengeNotPending(self.state)

    def check(self, trigger: str) -> None:
        """Raise IllegalTransition unless specs/ allows `trigger` now (guards run before events)."""
        SENDER.next_state(self.state, trigger)

    def may_resend(self, now: float, resend_after: float, max_resends: int) -> bool:
        return (
            CHALLENGE.allows(self.outcome, "resend")
            and now - self.sent_at >= resend_after
            and self.resends < max_resends
        )

    # ------------------------------------------------------------------ verbs

    def challenge(self, *, timestamp: datetime, reason: str, challenge: ChallengeDetails) -> None:
        """A new challenge for a known sender (unknown after `forget`, or expired)."""
        self.trigger_event(
            self.Challenged,
            timestamp=timestamp,
            actor=challenge.actor,
            reason=reason,
            **challenge.fields(),
        )

    def resend_challenge(self, *, timestamp: datetime, actor: str, reason: str) -> None:
        self.trigger_event(self.ChallengeResent, timestamp=timestamp, actor=actor, reason=reason)

    def record_sent(
        self, challenge_id: str, *, timestamp: datetime, relay: str, attempt: int
    ) -> None:
        self.check_challenge_is_pending(challenge_id)
        self.trigger_event(
            self.ChallengeSent,
            timestamp=timestamp,
            challenge_id=challenge_id,
            relay=relay[:200],
            attempt=attempt,
        )

    def record_deferred(
        self,
        challenge_id: str,
        *,
        timestamp: datetime,
        diagnostic: str,
        attempt: int,
        next_attempt_at: float,
    ) -> None:
        self.check_challenge_is_pending(challenge_id)
        self.trigger_event(
            self.ChallengeDeferred,
            timestamp=timestamp,
            diagnostic=diagnostic[:500],
            attempt=attempt,
            next_attempt_at=next_attempt_at,
        )

    def confirm(
        self, challenge_id: str, *, timestamp: datetime, actor: str, reason: str = "valid_reply"
    ) -> None:
        """`reason`: "valid_reply" (the token), or "threaded_reply" (the challenge's thread)."""
        self.check_challenge_is_pending(challenge_id)
        self.trigger_event(self.Confirmed, timestamp=timestamp, actor=actor, reason=reason)

    def fail_challenge(
        self, challenge_id: str, *, timestamp: datetime, source: str, diagnostic: str
    ) -> None:
        self.check_challenge_is_pending(challenge_id)
        self.trigger_event(
            self.ChallengeFailed,
            timestamp=timestamp,
            actor=source,
            reason="challenge_undeliverable",
            diagnostic=diagnostic[:500],
        )

    def expire_challenge(self, challenge_id: str, *, timestamp: datetime, actor: str) -> None:
        self.check_challenge_is_pending(challenge_id)
        self.trigger_event(
            self.ChallengeExpired,
            timestamp=timestamp,
            actor=actor,
            reason="challenge_lifetime_passed",
        )

    def authorize(self, *, timestamp: datetime, actor: str, reason: str) -> None:
        self.trigger_event(self.Authorized, timestamp=timestamp, actor=actor, reason=reason)

    def block(self, *, timestamp: datetime, actor: str, reason: str) -> None:
        self.trigger_event(self.Blocked, timestamp=timestamp, actor=actor, reason=reason)

    def forget(self, *, timestamp: datetime, actor: str, reason: str) -> None:
        self.trigger_event(self.Forgotten, timestamp=timestamp, actor=actor, reason=reason)


_SENDER_TOPIC = get_topic(Sender)


@dataclass(frozen=True, slots=True)
class ChallengeDetails:
    """What a new challenge records: its id, key, deadline and what prompted it."""

    actor: str
    challenge_id: str
    kid: int
    expires_at: float
    subject: str  # of the message that prompted it, for the challenge text
    in_reply_to: str
    recipient: str

    def fields(self) -> dict[str, Any]:
        return {
            "challenge_id": self.challenge_id,
            "kid": self.kid,
            "expires_at": self.expires_at,
            "subject": self.subject,
            "in_reply_to": self.in_reply_to,
            "recipient": self.recipient,
        }
