"""A message's creation event, built by `Message.Arrived.record` on the hot path, is the event
the dataclass constructor builds: equal, the same fields in the same order (so the same stored
bytes), and refused for what the constructor refuses."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from eventsourcing.persistence import Mapper
from hypothesis import given
from hypothesis import strategies as st

from sourceauth.adapters.storage.transcoder import MsgpackTranscoder
from sourceauth.engine.message import Message

KINDS = (Message.Accepted, Message.Challenged, Message.Held, Message.Discarded)
WHEN = datetime(2026, 12, 1, 22, 0, 1, 123456, tzinfo=UTC)


def fields(**over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "timestamp": WHEN,
        "receipt_id": "r" * 32,
        "size": 2048,
        "sha256": "a" * 64,
        "sender": "bob@example.net",
        "sender_id": "",
        "recipients": ["alice@example.test"],
        "subject": "hello",
        "message_id_header": "<m@example.net>",
        "actor": "engine",
        "reason": "sender_authorized",
        "expires_at": 0.0,
    }
    values.update(over)
    return values


def constructed(kind: type[Message.Arrived], mid: uuid.UUID, **values: Any) -> Message.Arrived:
    return kind(
        originator_id=mid,
        originator_version=1,
        originator_topic=f"{kind.__module__}:{kind.__qualname__}",
        **values,
    )


@given(
    kind=st.sampled_from(KINDS),
    text=st.text(max_size=40),
    size=st.integers(min_value=0, max_value=2**40),
    expires=st.floats(allow_nan=False),
    optional=st.fixed_dictionaries(
        {},
        optional={
            "client_address": st.text(max_size=20),
            "client_helo": st.text(max_size=20),
            "policy": st.text(max_size=20),
            "failed_action": st.sampled_from(["expire", "deliver", "discard"]),
        },
    ),
)
def test_record_builds_what_the_constructor_builds(
    kind: type[Message.Arrived], text: str, size: int, expires: float, optional: dict[str, str]
) -> None:
    mid = uuid.uuid4()
    values = fields(subject=text, size=size, expires_at=expires, **optional)
    fast, slow = kind.record(mid, **values), constructed(kind, mid, **values)
    assert type(fast) is kind
    assert fast == slow
    assert list(vars(fast).items()) == list(vars(slow).items())  # order too: same bytes
    mapper = Mapper(transcoder=MsgpackTranscoder())
    assert mapper.to_stored_event(fast) == mapper.to_stored_event(slow)


def test_the_event_is_frozen_and_replays_to_the_same_message() -> None:
    mid = uuid.uuid4()
    event = Message.Held.record(mid, **fields(sender_id="ab" * 16, policy="global"))
    with pytest.raises(AttributeError):
        event.reason = "changed"  # type: ignore[misc]
    message = event.mutate(None)
    assert isinstance(message, Message)
    assert (message.id, message.version, message.state) == (mid, 1, "held")
    assert message.policy == "global" and message.recipients == ["alice@example.test"]


def test_record_refuses_what_the_constructor_refuses() -> None:
    mid = uuid.uuid4()
    missing = fields()
    del missing["reason"]
    with pytest.raises(TypeError, match="reason"):
        Message.Accepted.record(mid, **missing)
    with pytest.raises(TypeError, match="colour"):
        Message.Accepted.record(mid, **fields(colour="blue"))
    with pytest.raises(TypeError, match="non-UUID"):
        Message.Accepted.record(str(mid), **fields())  # type: ignore[arg-type]
