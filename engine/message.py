"""The Message aggregate: one copy of an accepted message for a set of recipients.

A message to protected and unprotected recipients becomes two copies of one blob: one
delivered at once, one held. Verbs record past-tense events; specs/message.toml says where
each trigger leads.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from sourceauth.engine.errors import MessageNotHeld, NotAwaitingDelivery
from sourceauth.engine.statemachine import MESSAGE

# Derived from the spec: held = what a lapse can expire; live = not yet in a final state.
HELD_STATES = MESSAGE.sources("expire")
EXPIRED = MESSAGE.dest("expire")
QUEUED = MESSAGE.dest("accept")  # awaiting the next hop
LIVE_STATES = frozenset(MESSAGE.states) - MESSAGE.final_states() - {MESSAGE.initial}


class Message(Aggregate):
    """One copy of a message: where it came from, for whom, and what became of it."""

    class Event(Aggregate.Event):
        trigger: ClassVar[str] = ""  # of specs/message.toml
        # Who took the decision and why, for events that record no actor or reason field
        # (bookkeeping of the next hop's answer): what `audit history` shows for them.
        implied_actor: ClassVar[str] = ""
        implied_reason: ClassVar[str] = ""

        def apply(self, aggregate: Any) -> None:
            message: Message = aggregate
            message.state = MESSAGE.next_state(message.state, self.trigger)
            self.update(message)

        def update(self, message: Message) -> None:
            """Event-specific fields; runs on trigger and on every replay."""

    class Arrived(Aggregate.Created):
        """Accepted over SMTP (250) together with its first decision. Only its subclasses
        are recorded; each names the trigger it takes from `unknown`."""

        trigger: ClassVar[str] = ""
        receipt_id: str
        size: int
        sha256: str
        sender: str
        sender_id: str
        recipients: list[str]
        subject: str
        message_id_header: str
        actor: str
        reason: str
        expires_at: float
        # Where the message came from (absent from events recorded before they existed).
        client_address: str = ""
        client_helo: str = ""
        # The recipient policy that set a held copy's deadline, and what a failed challenge
        # does to it (issue 10; "" on copies not held, and on events recorded before).
        policy: str = ""
        failed_action: str = ""

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
                self.policy,
                self.failed_action,
            )
            self.apply(message)
            return message

        def apply(self, aggregate: Any) -> None:
            message: Message = aggregate
            message.state = MESSAGE.next_state(MESSAGE.initial, self.trigger)
            message.reason = self.reason

        @classmethod
        def record(cls, message_id: UUID, **fields: Any) -> Message.Arrived:
            """The creation event alone, without the aggregate (the hot path: most copies are
            never read back in the unit that decided them).

            Built as the dataclass constructor builds it (every field, in field order, the
            defaults filled in: the same `__dict__`, so the same stored bytes) without its
            one frozen `object.__setattr__` per field: about a third of its cost. What the
            constructor would refuse is refused: a missing or unknown field (TypeError) and
            a message id that is not a UUID (TypeError, as DomainEvent.__post_init__)."""
            values = _FIELDS[cls].copy()
            values["originator_id"] = message_id
            values["originator_version"] = 1
            values["originator_topic"] = _TOPICS[cls]
            values.update(fields)
            if len(values) != len(_FIELDS[cls]) or _REQUIRED in values.values():
                return cls(  # the constructor's own error for what is missing or unknown
                    originator_id=message_id,
                    originator_version=1,
                    originator_topic=_TOPICS[cls],
                    **fields,
                )
            if not isinstance(message_id, UUID):
                raise TypeError(f"{cls} was initialized with a non-UUID id: {message_id!r}")
            event = _new_event(cls)
            _set_dict(event, "__dict__", values)
            return event

        def held_for(self, sender_id: str) -> bool:
            return self.sender_id == sender_id and MESSAGE.dest(self.trigger) in HELD_STATES

    class Accepted(Arrived):
        """Queued for the next hop at once (recipient unprotected, or sender authorized)."""

        trigger: ClassVar[str] = "accept"

    class Challenged(Arrived):
        """Held while its sender's challenge is out."""

        trigger: ClassVar[str] = "challenge"

    class Held(Arrived):
        """Held without a challenge (never-challenge class, rate limit, auth gate)."""

        trigger: ClassVar[str] = "hold"

    class Discarded(Arrived):
        """Recorded and dropped (blocked sender, never-challenge discard, a processed reply
        or report)."""

        trigger: ClassVar[str] = "discard"

    class Released(Event):
        trigger: ClassVar[str] = "release"
        actor: str
        reason: str

        def update(self, message: Message) -> None:
            message.reason = self.reason
            message.attempts = 0
            message.next_attempt_at = 0.0

    class DeliveryDeferred(Event):
        trigger: ClassVar[str] = "defer"
        implied_actor: ClassVar[str] = "next_hop"
        implied_reason: ClassVar[str] = "next_hop_deferred"
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
        trigger: ClassVar[str] = "deliver"
        implied_actor: ClassVar[str] = "next_hop"
        implied_reason: ClassVar[str] = "next_hop_accepted"
        delivered: list[str]
        rejected: list[str]
        next_hop: str
        diagnostic: str

        def update(self, message: Message) -> None:
            message.pending = []

    class DeliveryFailed(Event):
        trigger: ClassVar[str] = "reject"
        actor: str
        reason: str
        rejected: list[str]
        diagnostic: str

        def update(self, message: Message) -> None:
            message.reason = self.reason

    class Expired(Event):
        trigger: ClassVar[str] = "expire"
        actor: str
        reason: str

        def update(self, message: Message) -> None:
            message.reason = self.reason

    class Purged(Event):
        trigger: ClassVar[str] = "purge"
        actor: str
        reason: str
        blob_deleted: bool

        def update(self, message: Message) -> None:
            message.reason = self.reason

    class DiscardedWhileHeld(Event):
        """Dropped after it was held (blocked sender, or an operator)."""

        trigger: ClassVar[str] = "discard"
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
        policy: str = "",
        failed_action: str = "",
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
        self.policy = policy
        self.failed_action = failed_action
        self.state = MESSAGE.initial
        self.reason = ""
        self.attempts = 0
        self.next_attempt_at = 0.0

    # ------------------------------------------------------------------ guards

    def check_is_held(self) -> None:
        if self.state not in HELD_STATES:
            raise MessageNotHeld(f"message {self.id} is {self.state}, not held")

    def check_awaits_delivery(self) -> None:
        if self.state != QUEUED:
            raise NotAwaitingDelivery(f"message {self.id} is {self.state}, not queued")

    def check(self, trigger: str) -> None:
        """Raise IllegalTransition unless specs/ allows `trigger` now (guards run before events)."""
        MESSAGE.next_state(self.state, trigger)

    # ------------------------------------------------------------------ verbs

    def release(self, *, timestamp: datetime, actor: str, reason: str) -> None:
        self.trigger_event(self.Released, timestamp=timestamp, actor=actor, reason=reason)

    def discard(self, *, timestamp: datetime, actor: str, reason: str) -> None:
        self.trigger_event(self.DiscardedWhileHeld, timestamp=timestamp, actor=actor, reason=reason)

    def expire(self, *, timestamp: datetime, actor: str, reason: str) -> None:
        self.check_is_held()
        self.trigger_event(self.Expired, timestamp=timestamp, actor=actor, reason=reason)

    def purge(self, *, timestamp: datetime, actor: str, blob_deleted: bool) -> None:
        kept = "original deleted" if blob_deleted else "original kept for another copy"
        self.trigger_event(
            self.Purged,
            timestamp=timestamp,
            actor=actor,
            reason=f"{self.reason}; {kept}",
            blob_deleted=blob_deleted,
        )

    def record_delivery_deferred(
        self,
        *,
        timestamp: datetime,
        delivered: list[str],
        rejected: list[str],
        diagnostic: str,
        attempt: int,
        next_attempt_at: float,
    ) -> None:
        self.check_awaits_delivery()
        self.trigger_event(
            self.DeliveryDeferred,
            timestamp=timestamp,
            delivered=delivered,
            rejected=rejected,
            diagnostic=diagnostic[:500],
            attempt=attempt,
            next_attempt_at=next_attempt_at,
        )

    def record_delivered(
        self,
        *,
        timestamp: datetime,
        delivered: list[str],
        rejected: list[str],
        next_hop: str,
        diagnostic: str,
    ) -> None:
        self.check_awaits_delivery()
        self.trigger_event(
            self.Delivered,
            timestamp=timestamp,
            delivered=delivered,
            rejected=rejected,
            next_hop=next_hop,
            diagnostic=diagnostic[:500],
        )

    def record_delivery_failed(
        self, *, timestamp: datetime, actor: str, reason: str, rejected: list[str], diagnostic: str
    ) -> None:
        self.check_awaits_delivery()
        self.trigger_event(
            self.DeliveryFailed,
            timestamp=timestamp,
            actor=actor,
            reason=reason,
            rejected=rejected,
            diagnostic=diagnostic[:500],
        )


_ARRIVALS = (Message.Accepted, Message.Challenged, Message.Held, Message.Discarded)
_TOPICS: dict[type[Any], str] = {cls: get_topic(cls) for cls in _ARRIVALS}
_REQUIRED: Any = dataclasses.MISSING  # a field `record` was not given and has no default
# Each arrival's fields in the constructor's order, with their defaults (none is a factory).
_FIELDS: dict[type[Any], dict[str, Any]] = {
    cls: {f.name: f.default for f in dataclasses.fields(cls)} for cls in _ARRIVALS
}
assert all(
    f.default_factory is dataclasses.MISSING for cls in _ARRIVALS for f in dataclasses.fields(cls)
)
_new_event = object.__new__
_set_dict = object.__setattr__  # how the frozen dataclass's own __init__ sets a field
