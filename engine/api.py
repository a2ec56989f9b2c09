"""Typed inputs and results of the library API, and the small ports adapters implement.

Everything here is plain data or a Protocol: no sockets, files or SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from uuid import UUID

Headers = Sequence[tuple[str, str]]
Clock = Callable[[], float]
"""Unix seconds now; injectable so tests can move time."""


@dataclass(frozen=True)
class Blob:
    """Where the accepted bytes are: the blob store key, their size and SHA-256."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BounceInfo:
    """What the adapter read from a report sent to the bounce address."""

    failed: bool
    diagnostic: str


@dataclass(frozen=True)
class Incoming:
    """One SMTP transaction the filter is about to answer 250 to."""

    mail_from: str
    recipients: tuple[str, ...]
    blob: Blob
    headers: Headers = ()
    bounce: BounceInfo | None = None


class Decision(StrEnum):
    DELIVER = "deliver"  # queued for the next hop now
    CHALLENGE = "challenge"  # held; its sender has a challenge out
    HOLD = "hold"  # held without a challenge
    DISCARD = "discard"  # recorded and dropped (never delivered, never answered)
    CONFIRM = "confirm"  # a reply to a challenge, processed
    BOUNCE = "bounce"  # a report about a challenge, processed


@dataclass(frozen=True)
class RecipientDecision:
    recipient: str
    decision: Decision
    reason: str
    message_id: UUID | None


@dataclass(frozen=True)
class Receipt:
    """The outcome of `receive`: one decision per recipient, each with its reason."""

    receipt_id: str
    decisions: tuple[RecipientDecision, ...]
    challenges: tuple[str, ...] = ()

    def decision_for(self, recipient: str) -> RecipientDecision:
        for d in self.decisions:
            if d.recipient == recipient:
                return d
        raise KeyError(recipient)


@dataclass(frozen=True)
class ConfirmResult:
    confirmed: bool
    reason: str
    sender: str = ""
    released: int = 0


@dataclass(frozen=True)
class FailureResult:
    recorded: bool
    reason: str
    sender: str = ""
    expired: int = 0


@dataclass
class MaintenanceReport:
    """What one maintenance pass did; every count is of recorded events."""

    challenges_expired: int = 0
    messages_expired: int = 0
    released: int = 0
    purged: int = 0
    blobs_collected: int = 0
    challenges_sent: int = 0
    challenges_deferred: int = 0
    challenges_failed: int = 0
    delivered: int = 0
    deliveries_deferred: int = 0
    deliveries_failed: int = 0
    conflicts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class SenderView:
    sender_id: str
    address: str
    scope: str
    state: str
    since: float
    via: str
    reason: str


@dataclass(frozen=True)
class HeldMessage:
    id: str
    receipt_id: str
    sender: str
    sender_id: str
    recipients: tuple[str, ...]
    subject: str
    size: int
    received: float
    expires: float
    state: str
    reason: str


@dataclass(frozen=True)
class ChallengeRow:
    challenge_id: str
    sender_id: str
    address: str
    scope: str
    kid: int
    created: float
    expires: float
    sent_at: float
    attempts: int
    next_attempt: float
    outcome: str
    subject: str = ""
    in_reply_to: str = ""
    recipient: str = ""


@dataclass(frozen=True)
class DeliveryRow:
    message_id: str
    receipt_id: str
    sender: str
    recipients: tuple[str, ...]
    attempts: int
    next_attempt: float
    queued_at: float


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded event, as an auditor reads it."""

    aggregate: str
    aggregate_id: str
    version: int
    timestamp: str
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutgoingChallenge:
    challenge_id: str
    token: str
    to: str
    scope: str
    expires_at: float
    subject: str
    in_reply_to: str
    recipient: str


class SendOutcome(StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class SendResult:
    outcome: SendOutcome
    diagnostic: str = ""


@dataclass(frozen=True)
class DeliveryJob:
    message_id: str
    receipt_id: str
    sha256: str
    mail_from: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class DeliveryResult:
    delivered: tuple[str, ...] = ()
    temporary: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    diagnostic: str = ""
    next_hop: str = ""


class ChallengeTransport(Protocol):
    """Sends one challenge (blocking; the engine calls it outside its lock)."""

    def send(self, challenge: OutgoingChallenge) -> SendResult: ...


class DeliveryTransport(Protocol):
    """Hands one message copy to the next hop (blocking; called outside the engine's lock)."""

    def deliver(self, job: DeliveryJob) -> DeliveryResult: ...


class BlobStore(Protocol):
    def delete(self, key: str) -> bool: ...

    def delete_many(self, keys: Sequence[str]) -> int: ...

    def exists(self, key: str) -> bool: ...


class ViewStore(Protocol):
    """The projections, read by the engine for queues and queries (adapters/storage)."""

    def catch_up(self, observer: Callable[[UUID, int], None] | None = None) -> int: ...

    def challenge(self, challenge_id: str) -> ChallengeRow | None: ...

    def known_senders(self, sender_ids: Sequence[str]) -> set[str]: ...

    def held_count(self, recipient: str) -> int: ...

    def recipients_holding(self, at_least: int) -> set[str]: ...

    def challenges_due(self, now: float, limit: int) -> list[ChallengeRow]: ...

    def challenges_lapsed(self, now: float, limit: int) -> list[ChallengeRow]: ...

    def recent_challenges(self, since: float) -> list[tuple[str, float]]: ...

    def held_of_sender(self, sender_id: str) -> list[str]: ...

    def held_lapsed(self, now: float, limit: int) -> list[str]: ...

    def held_of_authorized_senders(self, limit: int) -> list[str]: ...

    def expired_messages(self, limit: int) -> list[str]: ...

    def deliveries_due(self, now: float, limit: int) -> list[DeliveryRow]: ...

    def blobs_unreferenced(self, limit: int) -> list[str]: ...

    def mark_blobs_collected(self, receipt_ids: Sequence[str]) -> None: ...

    def live_copies(self, receipt_id: str) -> int: ...

    def senders(
        self, *, state: str | None = None, address: str | None = None, limit: int | None = None
    ) -> list[SenderView]: ...

    def quarantine(
        self,
        *,
        state: str | None = None,
        sender: str | None = None,
        limit: int | None = None,
    ) -> list[HeldMessage]: ...

    def held_message(self, message_id: str) -> HeldMessage | None: ...

    def close(self) -> None: ...
