"""The log's hash chain: one keyed digest per stored event, in commit order, each covering
the one before it. Written by the recorders in the events' own transaction; read by verify.

digest(n) = HMAC-SHA256(key, digest(n-1) | position | version | len(topic) | id | topic | state)
with digest(0) = 32 zero bytes, the key from `tokens.audit_chain_key` (never in the database).
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from uuid import UUID

from eventsourcing.persistence import PersistenceError, StoredEvent

CHAIN_TABLE = "sa_audit_chain"
GENESIS = bytes(32)
_HEAD = struct.Struct(">QQI")


class ChainBroken(PersistenceError):
    """The chain's head is at or past a position being written: the log was cut or altered
    (a node refuses to extend a chain it cannot trust; `sourceauth audit verify` names why)."""


@dataclass(frozen=True)
class Seal:
    """The chain's head: what an auditor keeps elsewhere to prove the log's end later."""

    position: int
    digest: str  # hex

    def as_dict(self) -> dict[str, int | str]:
        return {"position": self.position, "digest": self.digest}


def link(
    key: bytes,
    previous: bytes,
    position: int,
    originator_id: UUID | str,
    version: int,
    topic: str,
    state: bytes,
) -> bytes:
    """The digest of one stored event at `position`, chained to `previous`."""
    oid = originator_id if isinstance(originator_id, UUID) else UUID(originator_id)
    head = _HEAD.pack(position, version, len(topic))
    return hmac.digest(key, previous + head + oid.bytes + topic.encode() + bytes(state), "sha256")


def chain_rows(
    key: bytes, previous: bytes, events: Sequence[StoredEvent], positions: Sequence[int]
) -> Iterator[tuple[int, bytes]]:
    """(position, digest) for events just inserted at these positions, after `previous`."""
    for event, position in zip(events, positions, strict=True):
        previous = link(
            key,
            previous,
            position,
            event.originator_id,
            event.originator_version,
            event.topic,
            event.state,
        )
        yield position, previous


def check_extends(head_position: int, positions: Sequence[int]) -> None:
    if positions and positions[0] <= head_position:
        raise ChainBroken(
            f"audit chain: its head is at position {head_position}, an event is being written "
            f"at {positions[0]}: the log was altered; run 'sourceauth audit verify'"
        )
