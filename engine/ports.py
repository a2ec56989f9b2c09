"""What the engine needs from outside: a clock, the blob store, the two outbound transports and
the projections. Adapters implement these; the engine imports no adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol
from uuid import UUID

from sourceauth.engine.api import (
    ChallengeRow,
    DeliveryJob,
    DeliveryResult,
    DeliveryRow,
    HeldMessage,
    OutgoingChallenge,
    SenderView,
    SendResult,
)

Clock = Callable[[], float]
"""Unix seconds now; injectable so tests can move time."""


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
