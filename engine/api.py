"""Typed inputs and results of the library API: plain data, no sockets, files or SQL.

What the engine needs from outside (clock, blobs, transports, views) is in ports.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from uuid import UUID

Headers = Sequence[tuple[str, str]]


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
    # Why the inbound adapter read the body as a bounce in no report format (a plain-text
    # notice from an ordinary sender); "" when it did not look or found none.
    bounce_like: str = ""
    client_address: str = ""  # the original SMTP client (XFORWARD ADDR, else the peer)
    client_helo: str = ""  # its HELO/EHLO name (XFORWARD HELO, else the peer's)
    # Milter mode: the MTA keeps the recipients decided DELIVER in its own queue and delivers
    # them itself; their copy is recorded delivered (next hop MTA_QUEUE) in the same unit.
    kept_by_mta: bool = False


MTA_QUEUE = "mta-queue"  # the next hop of copies the MTA delivers itself (milter mode)


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
    kept_by_mta: bool = False  # milter mode: its DELIVER copies are the MTA's to deliver

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


class LinkState(StrEnum):
    """What a challenge link does when its button is pressed now."""

    PENDING = "pending"  # confirms
    EXPIRED = "expired"  # the token or the challenge's lifetime has passed
    CLOSED = "closed"  # already confirmed, failed or superseded
    INVALID = "invalid"  # not a token of ours: malformed, forged or unknown


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
    challenged_later: int = 0  # senders of mail held over a cap, challenged now
    evicted: int = 0  # held copies expired to bring a full mailbox back under its quota

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class PlannedAction:
    """One thing a maintenance pass would do (`maintain --dry-run`)."""

    id: str  # the message copy, or the challenge
    address: str  # the sender
    reason: str
    recipients: tuple[str, ...] = ()


@dataclass
class MaintenancePlan:
    """What one maintenance pass would do now, computed by the pass itself with nothing
    recorded: challenges to lapse, copies to expire, release, purge or evict, senders to
    challenge later, and the challenges and deliveries due to be sent or retried."""

    lapse: list[PlannedAction] = field(default_factory=list)
    expire: list[PlannedAction] = field(default_factory=list)
    release: list[PlannedAction] = field(default_factory=list)
    purge: list[PlannedAction] = field(default_factory=list)
    evict: list[PlannedAction] = field(default_factory=list)
    challenge_later: list[PlannedAction] = field(default_factory=list)
    send_challenges: list[PlannedAction] = field(default_factory=list)
    retry_deliveries: list[PlannedAction] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {
            name: [
                {**vars(item), "recipients": list(item.recipients)} for item in getattr(self, name)
            ]
            for name in self.__dataclass_fields__
        }


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
    from_state: str = ""  # the transition of specs/ the event took
    to_state: str = ""
    actor: str = ""  # who decided: "engine", "operator", "relay", "next_hop", a sender…
    reason: str = ""


@dataclass(frozen=True)
class StateAt:
    """Senders and message copies as the log had them at one moment (`audit state --at`)."""

    at: str
    senders: list[dict[str, Any]]
    messages: list[dict[str, Any]]


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
    thread_id: str = ""  # the Message-ID's local part (tokens.thread_id): replies thread on it
    # False only when this challenge cannot have been sent before (first attempt, lease not
    # taken over from a lapsed holder): a Maildir outbox may then skip its scan for a copy
    # a client already moved to cur/.
    maybe_sent: bool = True


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
    # False only when this copy cannot have been handed on before (first attempt, lease not
    # taken over from a lapsed holder): see OutgoingChallenge.maybe_sent.
    maybe_sent: bool = True


@dataclass(frozen=True)
class DeliveryResult:
    delivered: tuple[str, ...] = ()
    temporary: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    diagnostic: str = ""
    next_hop: str = ""
