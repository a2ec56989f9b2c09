"""The views' logic: how each recorded event changes the whitelist, quarantine,
pending-challenge and delivery-queue rows. Pure: it emits row operations that a
storage adapter applies in one transaction with its tracking position."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sourceauth.engine.message import HELD_STATES, QUEUED, Message
from sourceauth.engine.rules import Rule
from sourceauth.engine.sender import SUPERSEDE, Sender
from sourceauth.engine.statemachine import CHALLENGE, MESSAGE, RULE, SENDER

WHITELIST = "sa_whitelist"
CHALLENGES = "sa_challenges"
QUARANTINE = "sa_quarantine"
DELIVERY = "sa_delivery"
BLOBS = "sa_blobs"
HELD_COUNTS = "sa_held_counts"
RULES = "sa_rules"

TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    # name: ((column, kind), ...); the first column is the primary key
    WHITELIST: (
        ("sender_id", "text"),
        ("address", "text"),
        ("scope", "text"),
        ("state", "text"),
        ("since", "real"),
        ("via", "text"),
        ("reason", "text"),
        ("version", "int"),
    ),
    CHALLENGES: (
        ("challenge_id", "text"),
        ("sender_id", "text"),
        ("address", "text"),
        ("domain", "text"),
        ("scope", "text"),
        ("kid", "int"),
        ("created", "real"),
        ("expires", "real"),
        ("sent_at", "real"),
        ("attempts", "int"),
        ("resends", "int"),
        ("next_attempt", "real"),
        ("outcome", "text"),
        ("diagnostic", "text"),
        ("subject", "text"),
        ("in_reply_to", "text"),
        ("recipient", "text"),
    ),
    QUARANTINE: (
        ("message_id", "text"),
        ("receipt_id", "text"),
        ("sender", "text"),
        ("sender_id", "text"),
        ("recipients", "text"),
        ("subject", "text"),
        ("size", "int"),
        ("received", "real"),
        ("expires", "real"),
        ("state", "text"),
        ("reason", "text"),
        ("updated", "real"),
    ),
    DELIVERY: (
        ("message_id", "text"),
        ("receipt_id", "text"),
        ("sender", "text"),
        ("recipients", "text"),
        ("attempts", "int"),
        ("next_attempt", "real"),
        ("queued_at", "real"),
    ),
    BLOBS: (
        ("receipt_id", "text"),
        ("live", "int"),
        ("copies", "int"),
        ("collected", "int"),
    ),
    HELD_COUNTS: (
        ("recipient", "text"),
        ("held", "int"),
    ),
    RULES: (
        ("rule_id", "text"),
        ("action", "text"),
        ("pattern", "text"),
        ("kind", "text"),
        ("scope", "text"),
        ("state", "text"),
        ("reason", "text"),
        ("actor", "text"),
        ("created", "real"),
        ("updated", "real"),
        ("version", "int"),
    ),
}

INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("sa_whitelist_address", WHITELIST, ("address",)),
    ("sa_whitelist_state", WHITELIST, ("state",)),
    ("sa_challenges_outcome", CHALLENGES, ("outcome", "next_attempt")),
    ("sa_challenges_expires", CHALLENGES, ("outcome", "expires")),
    ("sa_challenges_created", CHALLENGES, ("created",)),
    ("sa_quarantine_sender", QUARANTINE, ("sender_id", "state")),
    ("sa_quarantine_state", QUARANTINE, ("state", "expires")),
    ("sa_quarantine_address", QUARANTINE, ("sender",)),
    ("sa_delivery_due", DELIVERY, ("next_attempt",)),
    ("sa_blobs_live", BLOBS, ("live", "collected")),
)


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class Upsert:
    """Insert the row, or overwrite the given columns of an existing one."""

    table: str
    key: Any
    values: dict[str, Any]


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class Update:
    table: str
    key: Any
    values: dict[str, Any]


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class Add:
    """Add `delta` to integer columns of an existing row."""

    table: str
    key: Any
    deltas: dict[str, int]


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class Delete:
    table: str
    key: Any


TERMINAL_COPY_STATES = MESSAGE.final_states()


def _join(items: list[str]) -> str:
    return "\n".join(items)


def _sender_row(e: Any, state: str) -> Op:
    return Update(
        WHITELIST,
        e.originator_id.hex,
        {
            "state": state,
            "since": e.timestamp.timestamp(),
            "reason": getattr(e, "reason", ""),
            "via": getattr(e, "actor", ""),
            "version": e.originator_version,
        },
    )


def _sender_first_seen(e: Sender.FirstSeen) -> Iterator[Op]:
    ts = e.timestamp.timestamp()
    yield Upsert(
        WHITELIST,
        e.originator_id.hex,
        {
            "address": e.address,
            "scope": e.scope,
            "state": SENDER.next_state(SENDER.initial, e.trigger),
            "since": ts,
            "via": e.actor,
            "reason": e.reason,
            "version": e.originator_version,
        },
    )
    if isinstance(e, Sender.FirstChallenged):
        yield Upsert(
            CHALLENGES,
            e.challenge_id,
            {
                "sender_id": e.originator_id.hex,
                "address": e.address,
                "domain": e.address.rsplit("@", 1)[-1],
                "scope": e.scope,
                **_challenge_values(e),
            },
        )


class Projector:
    """Turns events into row operations. It keeps a small map from sender id to its
    current challenge id, rebuilt from the same events, so that later sender events
    (sent, failed, confirmed) can find their challenge row without a read. Every state a
    row records is the destination specs/ gives the event's trigger."""

    def __init__(self, current_challenge: Callable[[str], str | None]) -> None:
        self._current_challenge = current_challenge
        self._cache: dict[str, tuple[str, str, str]] = {}

    def challenge_of(self, sender_id: str) -> str | None:
        found = self._cache.get(sender_id)
        if found is not None:
            return found[0]
        return self._current_challenge(sender_id)

    def ops(self, event: Any) -> Iterator[Op]:
        if isinstance(event, Sender.FirstSeen):
            if isinstance(event, Sender.FirstChallenged):
                self._remember(event.originator_id.hex, event.challenge_id)
            yield from _sender_first_seen(event)
        elif isinstance(event, Sender.Event):
            yield from self._sender_event(event)
        elif isinstance(event, Message.Arrived):
            yield from self._message_arrived(event)
        elif isinstance(event, Message.Event):
            yield from self._message_event(event)
        elif isinstance(event, (Rule.Added, Rule.Event)):
            yield _rule_row(event)

    def _remember(self, sender_id: str, challenge_id: str) -> None:
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[sender_id] = (challenge_id, "", "")

    def _sender_event(self, e: Sender.Event) -> Iterator[Op]:
        sid = e.originator_id.hex
        if isinstance(e, Sender.Challenged):
            self._remember(sid, e.challenge_id)
            yield Update(
                WHITELIST,
                sid,
                {
                    "state": SENDER.dest(e.trigger),
                    "since": e.timestamp.timestamp(),
                    "reason": e.reason,
                    "version": e.originator_version,
                },
            )
            yield _ChallengeFromSender(e.challenge_id, sid, _challenge_values(e))
            return
        dest = SENDER.dest(e.trigger)
        if SENDER.sources(e.trigger) == {dest}:  # bookkeeping on the challenge: state unchanged
            yield Update(WHITELIST, sid, {"version": e.originator_version})
        else:
            yield _sender_row(e, dest)
        cid = self.challenge_of(sid)
        if not cid or not e.challenge_trigger:
            return
        if e.challenge_trigger == SUPERSEDE:
            yield _SupersedeIfPending(cid)
            return
        outcome = {"outcome": CHALLENGE.dest(e.challenge_trigger)}
        if isinstance(e, Sender.ChallengeSent):
            yield Update(
                CHALLENGES,
                cid,
                {
                    **outcome,
                    "sent_at": e.timestamp.timestamp(),
                    "attempts": e.attempt,
                    "diagnostic": "",
                },
            )
        elif isinstance(e, Sender.ChallengeDeferred):
            yield Update(
                CHALLENGES,
                cid,
                {
                    **outcome,
                    "attempts": e.attempt,
                    "next_attempt": e.next_attempt_at,
                    "diagnostic": e.diagnostic,
                },
            )
        elif isinstance(e, Sender.ChallengeResent):
            yield Update(CHALLENGES, cid, {**outcome, "next_attempt": 0.0})
            yield Add(CHALLENGES, cid, {"resends": 1})
        elif isinstance(e, Sender.ChallengeFailed):
            yield Update(CHALLENGES, cid, {**outcome, "diagnostic": e.diagnostic})
        else:
            yield Update(CHALLENGES, cid, outcome)

    def _message_arrived(self, e: Message.Arrived) -> Iterator[Op]:
        mid = e.originator_id.hex
        ts = e.timestamp.timestamp()
        state = MESSAGE.next_state(MESSAGE.initial, e.trigger)
        live = 0 if state in TERMINAL_COPY_STATES else 1
        yield _BlobRef(e.receipt_id, live)
        if state == QUEUED:
            yield Upsert(
                DELIVERY,
                mid,
                {
                    "receipt_id": e.receipt_id,
                    "sender": e.sender,
                    "recipients": _join(e.recipients),
                    "attempts": 0,
                    "next_attempt": 0.0,
                    "queued_at": ts,
                },
            )
            return
        if state in HELD_STATES:
            yield _HeldDelta(tuple(e.recipients), 1)
        yield Upsert(
            QUARANTINE,
            mid,
            {
                "receipt_id": e.receipt_id,
                "sender": e.sender,
                "sender_id": e.sender_id,
                "recipients": _join(e.recipients),
                "subject": e.subject,
                "size": e.size,
                "received": ts,
                "expires": e.expires_at,
                "state": state,
                "reason": e.reason,
                "updated": ts,
            },
        )

    def _message_event(self, e: Message.Event) -> Iterator[Op]:
        mid = e.originator_id.hex
        ts = e.timestamp.timestamp()
        state = MESSAGE.dest(e.trigger)
        if isinstance(e, (Message.Released, Message.Expired, Message.DiscardedWhileHeld)):
            yield _LeaveHeld(mid)  # before the state changes: it reads whether the copy was held
        if isinstance(e, Message.Released):
            yield Update(QUARANTINE, mid, {"state": state, "reason": e.reason, "updated": ts})
            yield _QueueFromQuarantine(mid, ts)
        elif isinstance(e, Message.DeliveryDeferred):
            yield Update(DELIVERY, mid, {"attempts": e.attempt, "next_attempt": e.next_attempt_at})
            yield _DropRecipients(mid, tuple(e.delivered) + tuple(e.rejected))
        elif isinstance(e, Message.Delivered):
            yield _CopyDone(mid)  # before the delivery row goes: it names the receipt
            yield Delete(DELIVERY, mid)
            yield Update(QUARANTINE, mid, {"state": state, "updated": ts})
        elif isinstance(e, Message.DeliveryFailed):
            yield _FailedCopy(mid, ts, e.reason)
            yield Delete(DELIVERY, mid)
        elif isinstance(e, Message.Expired):
            yield Update(QUARANTINE, mid, {"state": state, "reason": e.reason, "updated": ts})
        elif isinstance(e, (Message.Purged, Message.DiscardedWhileHeld)):
            yield Update(QUARANTINE, mid, {"state": state, "reason": e.reason, "updated": ts})
            yield _CopyDone(mid)


def _rule_row(e: Rule.Added | Rule.Event) -> Op:
    """Rules are few and read whole: every event rewrites its row (version: a change count)."""
    ts = e.timestamp.timestamp()
    values: dict[str, Any] = {
        "state": RULE.dest(e.trigger),
        "reason": e.reason,  # type: ignore[union-attr]
        "actor": e.actor,  # type: ignore[union-attr]
        "updated": ts,
        "version": e.originator_version,
    }
    if isinstance(e, Rule.Added):
        values.update(action=e.action, pattern=e.pattern, kind=e.kind, scope=e.scope, created=ts)
        return Upsert(RULES, e.originator_id.hex, values)
    return Update(RULES, e.originator_id.hex, values)


def _challenge_values(e: Sender.Challenged | Sender.FirstChallenged) -> dict[str, Any]:
    return {
        "kid": e.kid,
        "created": e.timestamp.timestamp(),
        "expires": e.expires_at,
        "sent_at": 0.0,
        "attempts": 0,
        "resends": 0,
        "next_attempt": 0.0,
        "outcome": CHALLENGE.initial,
        "diagnostic": "",
        "subject": e.subject,
        "in_reply_to": e.in_reply_to,
        "recipient": e.recipient,
    }


# Operations that need a read of another row; the storage adapter implements them.
@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _BlobRef:
    receipt_id: str
    live: int


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _QueueFromQuarantine:
    message_id: str
    queued_at: float


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _DropRecipients:
    message_id: str
    recipients: tuple[str, ...]


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _CopyDone:
    """A copy reached a terminal state: one fewer live reference to its original."""

    message_id: str


# The states the storage adapters' queries name, all from specs/ (none written twice).
FAILED_COPY = MESSAGE.dest("reject")
EXPIRED_COPY = MESSAGE.dest("expire")
RELEASABLE_COPY = HELD_STATES | {EXPIRED_COPY}  # what a confirmation releases
PENDING_OUTCOMES = CHALLENGE.sources(SUPERSEDE)
DUE_OUTCOMES = CHALLENGE.sources("sent")  # waiting for the relay
SUPERSEDED = CHALLENGE.dest(SUPERSEDE)
AUTHORIZED_SENDER = SENDER.dest("authorize")


def sql_in(states: frozenset[str] | set[str]) -> str:
    """A SQL list literal of state names (names from specs/, never from input)."""
    return "(" + ", ".join(f"'{s}'" for s in sorted(states)) + ")"


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _FailedCopy:
    """Delivery failed for good: the copy stays live (kept for the operator) and visible."""

    message_id: str
    at: float
    reason: str


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _HeldDelta:
    """Held copies per protected recipient (for the held_per_recipient limit)."""

    recipients: tuple[str, ...]
    delta: int


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _LeaveHeld:
    """If the copy is still held, it stops counting against its recipients."""

    message_id: str


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _ChallengeFromSender:
    """A new challenge row whose address and scope come from the sender's whitelist row."""

    challenge_id: str
    sender_id: str
    values: dict[str, Any]


@dataclass(slots=True)  # not frozen: a frozen __init__ cost 1 us an op in a rebuild
class _SupersedeIfPending:
    challenge_id: str


Op = (
    Upsert
    | Update
    | Add
    | Delete
    | _BlobRef
    | _QueueFromQuarantine
    | _DropRecipients
    | _CopyDone
    | _FailedCopy
    | _SupersedeIfPending
    | _ChallengeFromSender
    | _HeldDelta
    | _LeaveHeld
)
BlobRef = _BlobRef
QueueFromQuarantine = _QueueFromQuarantine
DropRecipients = _DropRecipients
CopyDone = _CopyDone
FailedCopy = _FailedCopy
SupersedeIfPending = _SupersedeIfPending
ChallengeFromSender = _ChallengeFromSender
HeldDelta = _HeldDelta
LeaveHeld = _LeaveHeld
