"""Benchmark: MsgpackTranscoder against eventsourcing's JSONTranscoder on event-state dicts.

Speed (encode + decode per event, best of 5 interleaved rounds, in this thread's CPU time:
a shared machine preempts the process at random, which wall time charges to whichever side
was running; the wall-time ratio is in the details) and size (bytes per event), same run.
"""

from __future__ import annotations

import gc
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import msgpack
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Transcoder,
    UUIDAsHex,
)

from benchmarks.result import BenchResult
from sourceauth.adapters.storage.transcoder import MsgpackTranscoder

_REASONS = (
    "challenge_sent",
    "challenge_answered",
    "sender_whitelisted",
    "message_quarantined",
    "message_released",
    "quarantine_expired",
)
_ACTORS = ("smtp-in", "challenge-web", "admin:alice", "maintenance", "bounce-handler")
_WORDS = (
    "invoice quarterly meeting report update your account delivery order request payment "
    "schedule project review notice reminder urgent weekly summary board numbers draft"
).split()


def _address(rng: random.Random) -> str:
    user = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789.", k=rng.randint(4, 14)))
    domain = rng.choice(("example.org", "mail.example.com", "corp.example.net", "ex.io"))
    return f"{user.strip('.') or 'x'}@{domain}"


def _subject(rng: random.Random) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < 40:
        words.append(rng.choice(_WORDS))
    return " ".join(words)[:40].capitalize()


def make_events(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """The states of real engine events, as the mapper hands them to a transcoder (no
    originator_id/version): a mix of Message creation events, Sender.FirstChallenged,
    Sender.ChallengeSent and Message.Delivered, as a day of mail records them."""
    from sourceauth.engine.message import Message
    from sourceauth.engine.sender import Sender

    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    events: list[dict[str, Any]] = []
    for i in range(n):
        ts = start + timedelta(microseconds=rng.randrange(10**14))
        oid = uuid.UUID(int=rng.getrandbits(128), version=4)
        kind = i % 10
        event: Any
        if kind < 6:
            created = rng.choice((Message.Accepted, Message.Challenged, Message.Held))
            event = created(
                originator_id=oid,
                originator_version=1,
                timestamp=ts,
                originator_topic="sourceauth.engine.message:Message",
                receipt_id=uuid.UUID(int=rng.getrandbits(128), version=4).hex,
                size=rng.randint(300, 5_000_000),
                sha256=rng.getrandbits(256).to_bytes(32, "big").hex(),
                sender=_address(rng),
                sender_id=oid.hex if kind < 3 else "",
                recipients=[_address(rng) for _ in range(rng.randint(1, 3))],
                subject=_subject(rng),
                message_id_header=f"<{oid.hex[:20]}@{_address(rng).split('@')[1]}>",
                actor="engine",
                reason=rng.choice(_REASONS),
                expires_at=ts.timestamp() + 604800.0,
            )
        elif kind < 8:
            event = Sender.FirstChallenged(
                originator_id=oid,
                originator_version=1,
                timestamp=ts,
                originator_topic="sourceauth.engine.sender:Sender",
                address=_address(rng),
                scope="global",
                actor="engine",
                reason="first_message_from_unknown_sender",
                challenge_id=rng.getrandbits(80).to_bytes(10, "big").hex(),
                kid=1,
                expires_at=ts.timestamp() + 604800.0,
                subject=_subject(rng),
                in_reply_to=f"<{oid.hex[:20]}@example.org>",
                recipient=_address(rng),
            )
        elif kind < 9:
            event = Sender.ChallengeSent(
                originator_id=oid,
                originator_version=2,
                timestamp=ts,
                challenge_id=rng.getrandbits(80).to_bytes(10, "big").hex(),
                relay="smtp://127.0.0.1:10031: 250 2.0.0 Ok: queued",
                attempt=1,
            )
        else:
            event = Message.Delivered(
                originator_id=oid,
                originator_version=2,
                timestamp=ts,
                delivered=[_address(rng)],
                rejected=[],
                next_hop="smtp://127.0.0.1:10031",
                diagnostic="",
            )
        state = dict(vars(event))
        state.pop("originator_id")
        state.pop("originator_version")
        events.append(state)
    return events


def json_transcoder() -> JSONTranscoder:
    """JSONTranscoder with the transcodings eventsourcing's Application registers."""
    transcoder = JSONTranscoder()
    transcoder.register(UUIDAsHex())
    transcoder.register(DecimalAsStr())
    transcoder.register(DatetimeAsISO())
    return transcoder


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call, the collector paused for both sides."""
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # as timeit does: collector pauses are noise here
    try:
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        return time.thread_time() - c0, time.perf_counter() - t0
    finally:
        if gc_was_enabled:
            gc.enable()


def _round_trip(t: Transcoder, events: Sequence[dict[str, Any]]) -> list[Any]:
    encode, decode = t.encode, t.decode
    return [decode(encode(e)) for e in events]


def _encode_all(t: Transcoder, events: Sequence[dict[str, Any]]) -> list[bytes]:
    encode = t.encode
    return [encode(e) for e in events]


def _decode_all(t: Transcoder, blobs: Sequence[bytes]) -> list[Any]:
    decode = t.decode
    return [decode(b) for b in blobs]


def _measure(
    transcoders: dict[str, Transcoder], events: Sequence[dict[str, Any]], repeat: int = 5
) -> dict[str, dict[str, float]]:
    """Best of `repeat` rounds; rounds interleave the transcoders, so load hits both alike."""
    n = len(events)
    blobs: dict[str, list[bytes]] = {}
    for name, t in transcoders.items():
        blobs[name] = [t.encode(e) for e in events]  # warm-up, and the size figure
        if [t.decode(b) for b in blobs[name]] != list(events):
            raise AssertionError(f"{name} did not round-trip the events")
    keys = ("both", "encode", "decode", "both_wall")
    best = {name: dict.fromkeys(keys, float("inf")) for name in transcoders}
    for _ in range(repeat):
        for name, t in transcoders.items():
            b = best[name]
            cpu, wall = _time(partial(_round_trip, t, events))
            b["both"], b["both_wall"] = min(b["both"], cpu), min(b["both_wall"], wall)
            b["encode"] = min(b["encode"], _time(partial(_encode_all, t, events))[0])
            b["decode"] = min(b["decode"], _time(partial(_decode_all, t, blobs[name]))[0])
    return {
        name: {
            "ops_per_s": n / b["both"],
            "wall_ops_per_s": n / b["both_wall"],
            "encode_us": b["encode"] / n * 1e6,
            "decode_us": b["decode"] / n * 1e6,
            "bytes_per_event": sum(map(len, blobs[name])) / n,
        }
        for name, b in best.items()
    }


class PlainMsgpack(Transcoder):
    """(Informative) our msgpack without the field-name table: the same extension types,
    written as format 1, which MsgpackTranscoder still reads. What the table costs and buys."""

    def __init__(self) -> None:
        from sourceauth.adapters.storage import transcoder as ours

        self._packer = msgpack.Packer(use_bin_type=True, strict_types=True, default=ours._default)
        self._prefix = ours._PLAIN_PREFIX
        self.decode = MsgpackTranscoder().decode  # type: ignore[method-assign]

    def register(self, transcoding: Any) -> None:  # pragma: no cover - never called
        raise NotImplementedError

    def encode(self, obj: Any) -> bytes:
        return self._prefix + self._packer.pack(obj)  # type: ignore[no-any-return]

    def decode(self, data: bytes) -> Any:  # replaced per instance in __init__
        raise NotImplementedError


def run(scale: float = 1.0) -> list[BenchResult]:
    """Measure both transcoders on int(20000 * scale) events; two results."""
    n = max(1, int(20000 * scale))
    events = make_events(n)
    figures = _measure(
        {"msgpack": MsgpackTranscoder(), "json": json_transcoder(), "plain": PlainMsgpack()},
        events,
    )
    mp, js, plain = figures["msgpack"], figures["json"], figures["plain"]
    speed_ratio = mp["ops_per_s"] / js["ops_per_s"]
    size_ratio = mp["bytes_per_event"] / js["bytes_per_event"]
    return [
        BenchResult(
            name="transcoder_speed",
            value=round(mp["ops_per_s"], 1),
            unit="encode+decode ops/CPU-s",
            baseline_name="eventsourcing JSONTranscoder",
            baseline_value=round(js["ops_per_s"], 1),
            ratio=round(speed_ratio, 3),
            target="≥ 2.0×",  # noqa: RUF001
            passed=speed_ratio >= 2.0,
            details={
                "events": n,
                "msgpack_encode_us": round(mp["encode_us"], 2),
                "msgpack_decode_us": round(mp["decode_us"], 2),
                "json_encode_us": round(js["encode_us"], 2),
                "json_decode_us": round(js["decode_us"], 2),
                "without_field_table_encode_us": round(plain["encode_us"], 2),
                "without_field_table_decode_us": round(plain["decode_us"], 2),
                "without_field_table_speed_ratio": round(plain["ops_per_s"] / js["ops_per_s"], 3),
                "wall_time_speed_ratio": round(mp["wall_ops_per_s"] / js["wall_ops_per_s"], 3),
                "timing": "thread CPU time, best of 5 interleaved rounds, collector paused",
            },
        ),
        BenchResult(
            name="transcoder_size",
            value=round(mp["bytes_per_event"], 1),
            unit="bytes/event",
            baseline_name="eventsourcing JSONTranscoder",
            baseline_value=round(js["bytes_per_event"], 1),
            ratio=round(size_ratio, 3),
            target="≤ 0.6×",  # noqa: RUF001
            passed=size_ratio <= 0.6,
            details={
                "events": n,
                "without_field_table_bytes": round(plain["bytes_per_event"], 1),
                "without_field_table_size_ratio": round(
                    plain["bytes_per_event"] / js["bytes_per_event"], 3
                ),
            },
        ),
    ]


if __name__ == "__main__":
    import sys

    for result in run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0):
        print(result)
