"""The service layer on fakes: `SourceAuth` on eventsourcing's in-memory persistence, its views
in an in-memory SQLite database fed from that log, a clock the test moves, a dict for blobs,
and transports that record what they were given. Nothing touches a file or a socket.

Tests drive it only through the library API (`SourceAuth`'s methods and engine/api.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, Mapper

from sourceauth.adapters.storage.viewcrypt import ViewSealer
from sourceauth.adapters.storage.views import Dialect, SqlViews, sqlite_connector
from sourceauth.engine import tokens
from sourceauth.engine.api import (
    BounceInfo,
    HeldMessage,
    Incoming,
    OutgoingChallenge,
    Receipt,
)
from sourceauth.engine.application import SourceAuth
from tests.conftest import BOUNCES, CONFIRM, describe, settings_for
from tests.support.fakes import FakeBlobs, FakeChallenges, FakeClock, FakeDeliveries

IN_MEMORY = {
    "PERSISTENCE_MODULE": "eventsourcing.popo",
    "TRANSCODER_TOPIC": "sourceauth.adapters.storage.transcoder:MsgpackTranscoder",
}


def memory_views(recorder: ApplicationRecorder, mapper: Mapper[UUID]) -> SqlViews:
    """The production view tables, in a private in-memory SQLite database, fed from the
    in-memory event log by the same pull loop as on a file. With SOURCEAUTH_TEST_SEALED_VIEWS=1
    the views are sealed as on an encrypted store (the whole unit layer runs both ways)."""
    sealer = ViewSealer(bytes(32)) if os.environ.get("SOURCEAUTH_TEST_SEALED_VIEWS") else None
    return SqlViews(sqlite_connector(":memory:"), Dialect(), recorder, mapper, sealer)


def _with_extension(address: str, token: str) -> str:
    local, domain = address.split("@")
    return f"{local}+{token}@{domain}"


@dataclass
class Service:
    """One engine and the fakes around it, with the inputs a mail system would give it."""

    app: SourceAuth
    clock: FakeClock
    blobs: FakeBlobs
    relay: FakeChallenges
    next_hop: FakeDeliveries

    # ------------------------------------------------------------------ inputs

    def mail(self, mail_from: str, to: Sequence[str] | str, **kw: Any) -> Incoming:
        """An accepted message: its bytes in the blob store, its envelope and headers."""
        return describe(self.blobs, mail_from, to, **kw)

    def receive(self, mail_from: str, to: Sequence[str] | str, **kw: Any) -> Receipt:
        return self.app.receive(self.mail(mail_from, to, **kw))

    def reply(
        self,
        challenge: OutgoingChallenge,
        *,
        sender: str | None = None,
        token: str | None = None,
        **kw: Any,
    ) -> Receipt:
        """An ordinary reply to the challenge's confirm+TOKEN address, from `sender`
        (the challenged address by default)."""
        sender = challenge.to if sender is None else sender
        kw.setdefault("subject", f"Re: {challenge.subject}")
        to = _with_extension(CONFIRM, challenge.token if token is None else token)
        return self.receive(sender, to, **kw)

    def dsn(
        self, challenge: OutgoingChallenge, diagnostic: str = "550 5.1.1 no such user"
    ) -> Receipt:
        """The remote MTA's delivery status notification for the challenge, to its VERP
        return path bounces+TOKEN@."""
        return self.receive(
            "",
            _with_extension(BOUNCES, challenge.token),
            subject="Undelivered Mail Returned to Sender",
            headers=[
                ("Auto-Submitted", "auto-replied"),
                ("Content-Type", 'multipart/report; report-type=delivery-status; boundary="B"'),
            ],
            bounce=BounceInfo(failed=True, diagnostic=diagnostic),
        )

    # ------------------------------------------------------------------ the workers, driven

    def dispatch(self) -> None:
        """One pass of the challenge sender and the delivery worker."""
        self.app.dispatch_challenges()
        self.app.dispatch_deliveries()

    def challenge_to(self, address: str) -> OutgoingChallenge:
        """The latest challenge sent to `address` (the challenge sender runs first)."""
        self.app.dispatch_challenges()
        sent = self.relay.to(address)
        assert sent, f"no challenge was sent to {address}"
        return sent[-1]

    # ------------------------------------------------------------------ what an operator sees

    def state_of(self, address: str) -> str:
        return self.app.sender(address).state

    def held_states(self, sender: str) -> list[str]:
        """The states of the copies recorded from `sender` for mailboxes (its replies to
        challenges left out), sorted by name: copies received in one second have no order."""
        return sorted(m.state for m in self.app.quarantine(sender=sender) if not _to_the_filter(m))

    def copies_of(self, receipt: Receipt) -> list[HeldMessage]:
        """Every copy recorded for one accepted message."""
        return [m for m in self.app.quarantine() if m.receipt_id == receipt.receipt_id]


def _to_the_filter(m: HeldMessage) -> bool:
    bases = {CONFIRM.split("@")[0], BOUNCES.split("@")[0]}
    return all(r.split("@")[0].split("+")[0] in bases for r in m.recipients)


def open_service(
    clock: FakeClock | None = None, keyring: tokens.Keyring | None = None, **settings: Any
) -> Service:
    """A fresh engine on in-memory persistence; `settings` override the test policy
    (example.test protected, confirm@ and bounces@example.test)."""
    clock = clock or FakeClock()
    blobs, relay, next_hop = FakeBlobs(), FakeChallenges(), FakeDeliveries()
    app = SourceAuth(
        settings=settings_for(**settings),
        keyring=keyring or tokens.generate_keyring(),
        views_factory=memory_views,
        blobs=blobs,
        challenges=relay,
        deliveries=next_hop,
        clock=clock,
        env=dict(IN_MEMORY),
    )
    return Service(app, clock, blobs, relay, next_hop)
