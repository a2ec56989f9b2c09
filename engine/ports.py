"""What the engine needs from outside: a clock, the blob store, the two outbound transports and
the projections. Adapters implement these; the engine imports no adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from sourceauth.engine.api import (
    Blob,
    ChallengeRow,
    DeliveryJob,
    DeliveryResult,
    DeliveryRow,
    HeldMessage,
    OutgoingChallenge,
    SenderView,
    SendResult,
)
from sourceauth.engine.rules import RuleView

Clock = Callable[[], float]
"""Unix seconds now; injectable so tests can move time."""


class ChallengeTransport(Protocol):
    """Sends one challenge (blocking; the engine calls it outside its lock)."""

    def send(self, challenge: OutgoingChallenge) -> SendResult: ...


@runtime_checkable
class BatchChallengeTransport(ChallengeTransport, Protocol):
    """A challenge transport that sends many at once (one kept-open session to the relay, or
    one fsync for a chunk of an outbox). One result per challenge, in order; None for one it
    did not try because `stop()` became true first: that challenge stays due, untouched."""

    def send_batch(
        self, challenges: Sequence[OutgoingChallenge], stop: Callable[[], bool]
    ) -> list[SendResult | None]: ...


class DeliveryTransport(Protocol):
    """Hands one message copy to the next hop (blocking; called outside the engine's lock)."""

    def deliver(self, job: DeliveryJob) -> DeliveryResult: ...


@runtime_checkable
class BatchDeliveryTransport(DeliveryTransport, Protocol):
    """A delivery transport that hands many copies on at once (kept-open sessions, several
    in parallel). One result per job, in order; None for a copy it did not try: that copy is
    left queued, untouched, and taken again by the next round."""

    def deliver_batch(self, jobs: Sequence[DeliveryJob]) -> list[DeliveryResult | None]: ...


class BlobError(Exception):
    """Base class of what a blob store raises on purpose."""


class BlobNotFound(BlobError, KeyError):
    """No blob under that key."""


class BlobCorrupt(BlobError, ValueError):
    """The stored bytes no longer match the SHA-256 recorded for them."""


class BlobStoreUnavailable(BlobError, OSError):
    """Storage trouble (disk full, permissions, I/O, database down): try again later (SMTP 4xx).

    `errno` and `filename` are those of the failing system call when there was one.
    """


@dataclass(frozen=True)
class StagedBlobs:
    """Originals staged for one group commit, in the order given.

    `with_events` holds the (key, bytes) pairs the event recorder must write in the same
    transaction as the events (pass them to `receive_many(..., attachments=...)`); it is
    empty when `stage` already made every original durable on its own.
    """

    blobs: tuple[Blob, ...]
    with_events: tuple[tuple[str, bytes], ...] = ()

    def with_events_for(self, key: str) -> tuple[tuple[str, bytes], ...]:
        """The pairs of one original (for a unit retried message by message)."""
        return tuple(pair for pair in self.with_events if pair[0] == key)


class BlobStore(Protocol):
    """Message originals, keyed by receipt id (32 lowercase hex digits).

    Flow of one group commit: `stage` every original of the batch, then commit the events
    with `StagedBlobs.with_events`; answer 250 only after both. Delivery reads an original
    back with `get` (checking its SHA-256); maintenance deletes it once no copy needs it.
    Trouble with the storage raises BlobStoreUnavailable; a bad key raises ValueError.
    """

    def stage(self, items: Sequence[tuple[str, bytes]]) -> StagedBlobs:
        """Make these originals durable, or hand them to the event transaction."""
        ...

    def get(self, key: str, *, verify_sha256: str | None = None) -> bytes:
        """The bytes of `key`; BlobNotFound, or BlobCorrupt if they fail `verify_sha256`."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool:
        """Remove one original, durably: True if removed, False if it was already gone."""
        ...

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove several originals; how many were there."""
        ...


@dataclass(frozen=True)
class MailboxClaim:
    """A new pending challenge to a sender mailbox (extension removed). `replaces` is the
    challenge id this node saw end for that mailbox ("" if none): a row still naming it may
    be overwritten, any other live row of another sender may not."""

    mailbox: str
    sender_id: str
    challenge_id: str
    expires: float
    replaces: str = ""


@dataclass(frozen=True)
class CapClaim:
    """The challenges one unit of work queued, for the event recorder to count in the store
    in the transaction of their events (`save(..., caps=claim)`): every node shares the
    counts, so the caps hold across nodes. Over a cap, or a mailbox another sender's live
    challenge holds, the recorder raises CapsTaken and nothing of the unit is written."""

    now: float
    minute: int  # the unit's minute (Unix seconds // 60): a challenge counts for 61 of them
    domains: tuple[tuple[str, int], ...]  # (registered domain, challenges queued)
    per_domain: int  # challenges_per_domain_per_hour
    total: int  # challenges_per_hour
    mailboxes: tuple[MailboxClaim, ...] = ()


class CapsTaken(IntegrityError):
    """Another node's challenges took what a unit counted on: the unit retries, knowing
    `counts` (registered domain -> challenges in the window, "*" for all domains, without
    this unit's) and `mailboxes` (mailbox -> (sender id, challenge id, expires) of the live
    challenge holding it)."""

    def __init__(
        self, counts: dict[str, int], mailboxes: dict[str, tuple[str, str, float]]
    ) -> None:
        super().__init__(
            "challenge caps taken by another node: "
            + ", ".join([*(f"{d}={n}" for d, n in sorted(counts.items())), *sorted(mailboxes)])
        )
        self.counts = counts
        self.mailboxes = mailboxes


class ViewStore(Protocol):
    """The projections, read by the engine for queues and queries (adapters/storage)."""

    def catch_up(self, observer: Callable[[UUID, int], None] | None = None) -> int: ...

    def challenge(self, challenge_id: str) -> ChallengeRow | None: ...

    def known_senders(self, sender_ids: Sequence[str]) -> set[str]: ...

    def sender_states(self, sender_ids: Sequence[str]) -> dict[str, str]: ...

    def held_count(self, recipient: str) -> int: ...

    def recipients_holding(self, at_least: int) -> set[str]: ...

    def challenges_due(self, now: float, limit: int) -> list[ChallengeRow]: ...

    def challenges_lapsed(self, now: float, limit: int) -> list[ChallengeRow]: ...

    def recent_challenges(self, since: float) -> list[tuple[str, float]]: ...

    def held_of_sender(self, sender_id: str) -> list[str]: ...

    def held_lapsed(self, now: float, limit: int) -> list[str]: ...

    def held_of_authorized_senders(self, limit: int) -> list[str]: ...

    def held_evictable(self, recipient: str, limit: int) -> list[str]:
        """Held copies for `recipient` whose sender is not authorized: those with no
        challenge out first, then oldest first."""
        ...

    def held_awaiting_challenge(self, now: float, limit: int) -> list[str]:
        """Copies held over a cap (reason with a prefix of caps.DEFERRED_PREFIXES), still
        within their hold lifetime, whose sender may be challenged; oldest first."""
        ...

    def expired_messages(self, limit: int) -> list[str]: ...

    def deliveries_due(self, now: float, limit: int) -> list[DeliveryRow]: ...

    def blobs_unreferenced(self, limit: int) -> list[str]: ...

    def mark_blobs_collected(self, receipt_ids: Sequence[str]) -> None: ...

    def live_copies(self, receipt_id: str) -> int: ...

    def claim_work(
        self,
        work: Sequence[str],
        holder: str,
        now: float,
        until: float,
        taken_over: set[str] | None = None,
    ) -> set[str]:
        """Lease outbound work (challenge sends, deliveries) to one worker across processes
        and nodes: returns the keys now held by `holder` until `until`; a key leased to
        anyone else and not lapsed by `now` is left out. Keys that had a (lapsed) lease row
        already are added to `taken_over`: their last holder may have sent them."""
        ...

    def release_work(self, work: Sequence[str], holder: str) -> None:
        """End `holder`'s leases on these keys."""
        ...

    def senders(
        self, *, state: str | None = None, address: str | None = None, limit: int | None = None
    ) -> list[SenderView]: ...

    def quarantine(
        self,
        *,
        state: str | None = None,
        sender: str | None = None,
        limit: int | None = None,
        states: Collection[str] | None = None,
        recipient: str | None = None,
        offset: int = 0,  # rows skipped, with a limit: paging
    ) -> list[HeldMessage]: ...

    def held_message(self, message_id: str) -> HeldMessage | None: ...

    def rules(self) -> list[RuleView]:
        """Every rule the log declared, removed ones included, oldest first."""
        ...

    def rules_version(self) -> int:
        """A number that grows with every rule event (to know when to compile again)."""
        ...

    def close(self) -> None: ...
