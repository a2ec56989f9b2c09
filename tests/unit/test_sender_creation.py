"""A sender's creation verbs build the event and the aggregate eventsourcing's own
`Aggregate._create` builds (the hot path skips its generic steps, not its result)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sourceauth.engine.sender import ChallengeDetails, Sender


def _state(sender: Sender) -> dict[str, Any]:
    return {k: v for k, v in vars(sender).items() if k != "_pending_events"}


def test_first_challenge_records_what_eventsourcing_create_records() -> None:
    details = ChallengeDetails(
        actor="engine",
        challenge_id="ab" * 10,
        kid=3,
        expires_at=1_800_000_000.0,
        subject="hello",
        in_reply_to="<m@x>",
        recipient="alice@example.test",
    )
    sid, when = uuid.uuid4(), datetime(2026, 12, 1, 19, 0, tzinfo=UTC)
    fast = Sender.first_challenge(
        sid,
        address="bob@example.net",
        scope="global",
        timestamp=when,
        reason="r",
        challenge=details,
    )
    generic = Sender._create(
        Sender.FirstChallenged,
        id=sid,
        timestamp=when,
        address="bob@example.net",
        scope="global",
        actor="engine",
        reason="r",
        **details.fields(),
    )
    assert fast.pending_events == generic.pending_events
    assert _state(fast) == _state(generic)
    assert fast.state == "challenged" and fast.challenge_id == "ab" * 10


def test_first_verdict_records_what_eventsourcing_create_records() -> None:
    sid, when = uuid.uuid4(), datetime(2026, 12, 1, 19, 0, tzinfo=UTC)
    for trigger, created in (("authorize", Sender.FirstAuthorized), ("block", Sender.FirstBlocked)):
        fast = Sender.first_verdict(
            sid, trigger=trigger, address="a@b.c", scope="s", timestamp=when, actor="op", reason="r"
        )
        generic = Sender._create(
            created, id=sid, timestamp=when, address="a@b.c", scope="s", actor="op", reason="r"
        )
        assert fast.pending_events == generic.pending_events
        assert _state(fast) == _state(generic)
