"""In-memory stand-ins for the engine's ports that cannot exist in a unit test: a clock the
test moves, the blob store as a dict, and the two outbound transports (challenge relay, next
hop) that record what they were given and answer as the test scripts them.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Callable, Sequence

from sourceauth.engine.api import (
    Blob,
    DeliveryJob,
    DeliveryResult,
    OutgoingChallenge,
    SendOutcome,
    SendResult,
)

START = 1_800_000_000.0


class FakeClock:
    """A clock the test moves: `clock()` is now (unix seconds), `clock.advance(s)` moves it."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeBlobs:
    """The BlobStore port as a dict of key -> bytes."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> Blob:
        self.data[key] = data
        return Blob(key, len(data), hashlib.sha256(data).hexdigest())

    def get(self, key: str) -> bytes:
        return self.data[key]

    def exists(self, key: str) -> bool:
        return key in self.data

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def delete_many(self, keys: Sequence[str]) -> int:
        return sum(self.delete(k) for k in keys)


class FakeChallenges:
    """ChallengeTransport standing for the relay: records every challenge it is given.

    It answers `outcome` (sent by default); `script(...)` queues outcomes for the next sends,
    one each, before falling back to `outcome`.
    """

    def __init__(
        self, outcome: SendOutcome = SendOutcome.SENT, diagnostic: str = "250 2.0.0 Ok"
    ) -> None:
        self.outcome = outcome
        self.diagnostic = diagnostic
        self.sent: list[OutgoingChallenge] = []
        self._script: deque[tuple[SendOutcome, str]] = deque()

    def script(self, *outcomes: SendOutcome | tuple[SendOutcome, str]) -> None:
        for o in outcomes:
            self._script.append(o if isinstance(o, tuple) else (o, _diagnostic(o)))

    def send(self, challenge: OutgoingChallenge) -> SendResult:
        self.sent.append(challenge)
        if self._script:
            return SendResult(*self._script.popleft())
        return SendResult(self.outcome, self.diagnostic)

    def to(self, address: str) -> list[OutgoingChallenge]:
        return [c for c in self.sent if c.to == address]

    def tokens_to(self, address: str) -> set[str]:
        return {c.token for c in self.to(address)}


def _diagnostic(outcome: SendOutcome) -> str:
    return {
        SendOutcome.SENT: "250 2.0.0 Ok",
        SendOutcome.TEMPORARY: "451 4.3.0 try again later",
        SendOutcome.PERMANENT: "550 5.1.1 user unknown",
    }[outcome]


class FakeDeliveries:
    """DeliveryTransport standing for the next hop: records every job; by default accepts all.

    Set `answer` to a function of the job returning a DeliveryResult to script other outcomes.
    `jobs` is every attempt; `accepted` is every (message id, recipient) the next hop took,
    `taken` every (receipt id, recipient): one accepted SMTP transaction, one recipient.
    """

    def __init__(self, answer: Callable[[DeliveryJob], DeliveryResult] | None = None) -> None:
        self.answer = answer
        self.jobs: list[DeliveryJob] = []
        self.accepted: list[tuple[str, str]] = []
        self.taken: list[tuple[str, str]] = []

    def deliver(self, job: DeliveryJob) -> DeliveryResult:
        self.jobs.append(job)
        result = DeliveryResult(delivered=job.recipients, diagnostic="250 ok", next_hop="fake")
        if self.answer is not None:
            result = self.answer(job)
        self.accepted += [(job.message_id, r) for r in result.delivered]
        self.taken += [(job.receipt_id, r) for r in result.delivered]
        return result

    def per_recipient(self) -> Counter[str]:
        """How many times each recipient was delivered (taken by the next hop)."""
        return Counter(r for _, r in self.accepted)
