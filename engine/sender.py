"""The Sender aggregate: one per (whitelist scope, sender address).

Its state follows specs/sender.toml; every verb is a past-tense event with an actor and a reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from sourceauth.engine.statemachine import SENDER


class Sender(Aggregate):
    """A sender as seen by one whitelist scope ("global" or one protected mailbox)."""

    class Event(Aggregate.Event):
        trigger = ""

        def apply(self, aggregate: Any) -> None:
            sender: Sender = aggregate
            sender.state = SENDER.next_state(sender.state, self.trigger)
            sender.since = self.timestamp
            self.update(sender)

        def update(self, sender: Sender) -> None:
            """Event-specific fields; runs on trigger and on every replay."""

    class Registered(Aggregate.Created):
        """First sight of a sender, together with its first transition (one event, not two)."""

        address: str
        scope: str
        trigger: str
        actor: str
        reason: str
        challenge_id: str
        kid: int
        expires_at: float
        subject: str
        in_reply_to: str
        recipient: str

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
            if self.challenge_id:
                sender._new_challenge(self.challenge_id, self.kid, self.expires_at)

    class Challenged(Event):
        trigger = "challenge"
        actor: str
        reason: str
        challenge_id: str
        kid: int
        expires_at: float
        subject: str  # of the message that prompted it, for the challenge text
        in_reply_to: str
        recipient: str

        def update(self, sender: Sender) -> None:
            sender._new_challenge(self.challenge_id, self.kid, self.expires_at)

    class ChallengeResent(Event):
        trigger = "resend"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.resends += 1
            sender.outcome = "queued"
            sender.next_attempt_at = 0.0

    class ChallengeSent(Event):
        trigger = "sent"
        relay: str
        attempt: int

        def update(self, sender: Sender) -> None:
            sender.attempts = self.attempt
            sender.outcome = "sent"
            sender.sent_at = self.timestamp.timestamp()

    class ChallengeDeferred(Event):
        trigger = "defer"
        diagnostic: str
        attempt: int
        next_attempt_at: float

        def update(self, sender: Sender) -> None:
            sender.attempts = self.attempt
            sender.outcome = "deferred"
            sender.next_attempt_at = self.next_attempt_at

    class Confirmed(Event):
        trigger = "confirm"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.outcome = "confirmed"
            sender.via = "reply"

    class ChallengeFailed(Event):
        trigger = "fail"
        actor: str
        reason: str
        diagnostic: str

        def update(self, sender: Sender) -> None:
            sender.outcome = "failed"

    class ChallengeExpired(Event):
        trigger = "expire"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.outcome = "expired"

    class Authorized(Event):
        trigger = "authorize"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.via = self.actor
            if sender.outcome in ("queued", "sent", "deferred"):
                sender.outcome = "superseded"

    class Blocked(Event):
        trigger = "block"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.via = self.actor
            if sender.outcome in ("queued", "sent", "deferred"):
                sender.outcome = "superseded"

    class Forgotten(Event):
        trigger = "forget"
        actor: str
        reason: str

        def update(self, sender: Sender) -> None:
            sender.via = self.actor
            if sender.outcome in ("queued", "sent", "deferred"):
                sender.outcome = "superseded"

    def __init__(self, address: str, scope: str) -> None:
        self.address = address
        self.scope = scope
        self.state = SENDER.initial
        self.since: datetime | None = None
        self.via = ""
        self.challenge_id = ""
        self.kid = 0
        self.expires_at = 0.0
        self.outcome = (
            ""  # of the current challenge: queued|sent|deferred|confirmed|failed|expired|superseded
        )
        self.attempts = 0
        self.resends = 0
        self.sent_at = 0.0
        self.next_attempt_at = 0.0

    def _new_challenge(self, challenge_id: str, kid: int, expires_at: float) -> None:
        self.challenge_id = challenge_id
        self.kid = kid
        self.expires_at = expires_at
        self.outcome = "queued"
        self.attempts = 0
        self.resends = 0
        self.sent_at = 0.0
        self.next_attempt_at = 0.0

    @property
    def challenge_pending(self) -> bool:
        return self.state == "challenged" and self.outcome in ("queued", "sent", "deferred")

    def check(self, trigger: str) -> None:
        """Raise IllegalTransition unless specs/ allows `trigger` now (guards run before events)."""
        SENDER.next_state(self.state, trigger)
