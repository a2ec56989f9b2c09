"""The log's hash chain: one keyed digest per stored event, in commit order, each covering
the one before it. Written by the recorders in the events' own transaction (one row per
transaction: `position` is its last event's, `links` packs each event's position and digest);
read by verify.

digest(n) = HMAC-SHA256(key, digest(n-1) | position | version | len(topic) | id | topic | state)
with digest(0) = 32 zero bytes, the key from `tokens.audit_chain_key` (never in the database).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from uuid import UUID

from eventsourcing.persistence import PersistenceError, StoredEvent

from sourceauth.engine.tokens import Mac

CHAIN_TABLE = "sa_audit_chain"
GENESIS = bytes(32)
_HEAD = struct.Struct(">QQI")
_LINK = struct.Struct(">Q32s")


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


def keyed(key: bytes) -> Mac:
    return Mac(key)


def link(
    mac: Mac,
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
    # oid.int.to_bytes: UUID.bytes itself, without the property's Python frame
    return mac.digest(
        b"".join((previous, head, oid.int.to_bytes(16, "big"), topic.encode(), state))
    )


def links(
    mac: Mac, previous: bytes, events: Sequence[StoredEvent], positions: Sequence[int]
) -> tuple[bytes, bytes]:
    """The links of events just inserted at these positions, after `previous`, packed as one
    value (position and digest per event: one row per transaction), and the last digest."""
    pairs = []
    for event, position in zip(events, positions, strict=True):
        previous = link(
            mac,
            previous,
            position,
            event.originator_id,
            event.originator_version,
            event.topic,
            event.state,
        )
        pairs.append((position, previous))
    return pack(pairs), previous


def unpack(packed: bytes) -> Iterator[tuple[int, bytes]]:
    """(position, digest) of each event a chain row covers, in order."""
    yield from _LINK.iter_unpack(packed)


def pack(pairs: Sequence[tuple[int, bytes]]) -> bytes:
    return b"".join(_LINK.pack(position, digest) for position, digest in pairs)


def last_digest(packed: bytes) -> bytes:
    return bytes(packed[-32:])


def check_extends(head_position: int, positions: Sequence[int]) -> None:
    if positions and positions[0] <= head_position:
        raise ChainBroken(
            f"audit chain: its head is at position {head_position}, an event is being written "
            f"at {positions[0]}: the log was altered; run 'sourceauth audit verify'"
        )
