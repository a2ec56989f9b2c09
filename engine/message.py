"""The Message aggregate: one copy of an accepted message for a set of recipients.

A message to protected and unprotected recipients becomes two copies of one blob:
one delivered at once, one held. States follow specs/message.toml.
"""

from __future__ import annotations

from typing import Any

from eventsourcing.domain import Aggregate

from sourceauth.engine.statemachine import MESSAGE

LIVE_STATES = frozenset({"held", "challenged", "authorized", "expired", "failed"})
HELD_STATES = frozenset({"held", "challenged"})


class Message(Aggregate):
    """One copy of a message: where it came from, for whom, and what became of it."""

    class Event(Aggregate.Event):
        trigger = ""

        def apply(self, aggregate: Any) -> None:
            message: Message = aggregate
            message.state = MESSAGE.next_state(message.state, self.trigger)
            self.update(message)

        def update(self, message: Message) -> None:
            """Event-specific fields; runs on trigger and on every replay."""

    class Received(Aggregate.Created):
        """Accepted over SMTP (250) and its first decision: accept, challenge, hold or discard."""

        receipt_id: str
        size: int
        sha256: str
        sender: str
        sender_id: str
        recipients: list[str]
        subject: str
        message_id_header: str
        trigger: str
        actor: str
        reason: str
        expires_at: float

        def mutate(self, aggregate: Any) -> Any:
            # The generic version inspects __init__'s signature on every call; this class's
            # fields are known, and replay and the hot path both go through here.
            assert aggregate is None
            message = Message.__new__(Message)
            message.__base_init__(self.originator_id, self.originator_version, self.timestamp)
            message.__init__(  # type: ignore[misc]
                self.receipt_id,
                self.size,
                self.sha256,
                self.sender,
                self.sender_id,
                self.recipients,
                self.subject,
                self.message_id_header,
                self.expires_at,
            )
            self.apply(message)
            return message

        def apply(self, aggregate: Any) -> None:
            message: Message = aggregate
            message.state = MESSAGE.next_state(MESSAGE.initial, self.trigger)
            message.reason = self.reason
            if self.trigger in ("challenge", "hold"):
                message.held = True

    class Released(Event):
        trigger = "release"
        actor: str
        reason: str

        def update(self, message: Message) -> None:
            message.reason = self.reason
            message.attempts = 0
            message.next_attempt_at = 0.0

    class DeliveryDeferred(Event):
        trigger = "defer"
        delivered: list[str]
        rejected: list[str]
        diagnostic: str
        attempt: int
        next_attempt_at: float

        def update(self, message: Message) -> None:
            message.pending = [
                r for r in message.pending if r not in self.delivered and r not in self.rejected
            ]
            message.attempts = self.attempt
            message.next_attempt_at = self.next_attempt_at

    class Delivered(Event):
        trigger = "deliver"
        delivered: list[str]
        rejected: list[str]
        next_hop: str
        diagnostic: str

        def update(self, message: Message) -> None:
            message.pending = []

    class DeliveryFailed(Event):
        trigger = "reject"
        actor: str
        reason: str
        rejected: list[str]
        diagnostic: str

        def update(self, message: Message) -> None:
            message.reason = self.reason

    class Expired(Event):
        trigger = "expire"
        actor: str
        reason: str

        def update(self, message: Message) -> None:
            message.reason = self.reason

    class Purged(Event):
        trigger = "purge"
        actor: str
        reason: str
        blob_deleted: bool

        def update(self, message: Message) -> None:
            message.reason = self.reason

    class Discarded(Event):
        trigger = "discard"
        actor: str
        reason: str

        def update(self, message: Message) -> None:
            message.reason = self.reason

    def __init__(
        self,
        receipt_id: str,
        size: int,
        sha256: str,
        sender: str,
        sender_id: str,
        recipients: list[str],
        subject: str,
        message_id_header: str,
        expires_at: float,
    ) -> None:
        self.receipt_id = receipt_id
        self.size = size
        self.sha256 = sha256
        self.sender = sender
        self.sender_id = sender_id
        self.recipients = list(recipients)
        self.pending = list(recipients)  # recipients the next hop has not yet taken or refused
        self.subject = subject
        self.message_id_header = message_id_header
        self.expires_at = expires_at
        self.state = MESSAGE.initial
        self.reason = ""
        self.held = False
        self.attempts = 0
        self.next_attempt_at = 0.0

    def check(self, trigger: str) -> None:
        """Raise IllegalTransition unless specs/ allows `trigger` now (guards run before events)."""
        MESSAGE.next_state(self.state, trigger)
