"""Msgpack transcoder for eventsourcing event state, behind a leading format-version byte.

Exact, typed round trips for the values our events hold; select it with TRANSCODER_TOPIC.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Final, cast
from uuid import UUID, SafeUUID

import msgpack  # type: ignore[import-untyped]
from eventsourcing.persistence import Transcoder

__all__ = ["FORMAT_VERSION", "TOPIC", "MsgpackTranscoder"]

#: First byte of every encoded value. Bump it (keeping the old decoder) if the layout changes.
FORMAT_VERSION: Final = 0x02
_PREFIX: Final = bytes((FORMAT_VERSION,))
_PLAIN_PREFIX: Final = b"\x01"  # format 1: plain msgpack, no field table (still read)

# Format 2 writes the top-level field names of an event's state as their index in this table
# (one byte instead of up to 20). APPEND-ONLY: an index, once written, names its field forever.
# A name not in the table is written as itself; tests check every engine event field is here.
FIELDS: Final[tuple[str, ...]] = (
    "timestamp",
    "originator_topic",
    "class_version",
    "address",
    "scope",
    "trigger",
    "actor",
    "reason",
    "challenge_id",
    "kid",
    "expires_at",
    "subject",
    "in_reply_to",
    "recipient",
    "relay",
    "attempt",
    "diagnostic",
    "next_attempt_at",
    "receipt_id",
    "size",
    "sha256",
    "sender",
    "sender_id",
    "recipients",
    "message_id_header",
    "delivered",
    "rejected",
    "next_hop",
    "blob_deleted",
    "client_address",
    "client_helo",
    "policy",
    "failed_action",
)
_FIELD_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(FIELDS)}

#: Value for the application's TRANSCODER_TOPIC setting.
TOPIC: Final = "sourceauth.adapters.storage.transcoder:MsgpackTranscoder"

# Msgpack extension type codes (application range 0..127). They are on disk: never renumber.
EXT_UUID: Final = 1  # 16 raw bytes (UUID.bytes)
EXT_DATETIME: Final = 2  # 10-byte wall clock [+ int32 offset s | int64 offset us], see below
EXT_DATE: Final = 3  # >HBB year, month, day
EXT_DECIMAL: Final = 4  # str(d) in ASCII: keeps exponent, sign of zero, NaN/sNaN/Infinity
EXT_BIGINT: Final = 5  # two's complement, big-endian (ints outside msgpack's 64-bit range)
EXT_TUPLE: Final = 6  # nested msgpack array (no version byte)
EXT_SET: Final = 7  # nested msgpack array
EXT_FROZENSET: Final = 8  # nested msgpack array
EXT_TIMEDELTA: Final = 9  # >iii days, seconds, microseconds
_INT_KEY_EXT: Final = 10  # a top-level int key in format 2 (ints there are field indexes)


@dataclass(frozen=True)
class _IntKey:
    value: int


# EXT_DATETIME payload. The first 10 bytes are the wall-clock time: year (2 bytes BE),
# month (high bit = fold), day, hour, minute, second, microsecond (3 bytes BE). That is
# the layout of CPython's datetime pickle state (fixed forever by pickle compatibility),
# so __reduce_ex__(4) / datetime(state, tz) do the work in C. Then by total length:
#   10: naive;  14: aware, utcoffset in whole seconds (>i);  18: aware, offset in us (>q).
_OFF_S = struct.Struct(">i")
_OFF_US = struct.Struct(">q")
_UTC_SUFFIX: Final = _OFF_S.pack(0)
_DATE = struct.Struct(">HBB")
_TIMEDELTA = struct.Struct(">iii")

_UTC: Final = UTC
_tz_cache: dict[int, timezone] = {0: _UTC}  # utcoffset in microseconds -> fixed timezone

_ExtType = msgpack.ExtType
_tuple_new = tuple.__new__  # ExtType(...) validates in Python: ~0.6 us; this skips it


def _ext(code: int, data: bytes) -> Any:
    return _tuple_new(_ExtType, (code, data))


def _tz_for(offset_us: int) -> timezone:
    tz = _tz_cache.get(offset_us)
    if tz is None:
        tz = timezone(timedelta(microseconds=offset_us))
        if len(_tz_cache) < 1024:  # bounded: offsets come from stored data
            _tz_cache[offset_us] = tz
    return tz


_datetime_reduce = datetime.__reduce_ex__  # the C one, whatever a subclass overrides


def _encode_datetime(o: datetime) -> msgpack.ExtType:
    args = cast("tuple[Any, ...]", _datetime_reduce(o, 4)[1])
    state = cast("bytes", args[0])
    if len(args) == 1:
        return _ext(EXT_DATETIME, state)
    if args[1] is _UTC:
        return _ext(EXT_DATETIME, state + _UTC_SUFFIX)
    offset = o.utcoffset()
    if offset is None:  # a tzinfo that declines to give an offset: naive by definition
        return _ext(EXT_DATETIME, state)
    seconds = offset.days * 86400 + offset.seconds
    if offset.microseconds:
        return _ext(EXT_DATETIME, state + _OFF_US.pack(seconds * 1_000_000 + offset.microseconds))
    return _ext(EXT_DATETIME, state + _OFF_S.pack(seconds))


# datetime(state[, tzinfo]): the unpickling constructor (C, no field validation: the store
# is trusted; a payload that is not a state raises TypeError, reported as corrupt data).
_from_state = cast("Callable[..., datetime]", datetime)


def _decode_datetime(data: bytes) -> datetime:
    n = len(data)
    if n == 14:
        if data[10:] == _UTC_SUFFIX:
            return _from_state(data[:10], _UTC)
        return _from_state(data[:10], _tz_for(_OFF_S.unpack_from(data, 10)[0] * 1_000_000))
    if n == 10:
        return _from_state(data)
    if n == 18:
        return _from_state(data[:10], _tz_for(_OFF_US.unpack_from(data, 10)[0]))
    raise ValueError(f"bad datetime payload length {n}")


def _encode_bigint(o: int) -> msgpack.ExtType:
    return _ext(EXT_BIGINT, o.to_bytes(o.bit_length() // 8 + 1, "big", signed=True))


def _pack_nested(items: list[Any]) -> bytes:
    # A fresh Packer: the calling packer is part-way through its own buffer.
    packed = msgpack.packb(items, use_bin_type=True, strict_types=True, default=_default)
    return cast("bytes", packed)


def _unpack_nested(data: bytes) -> list[Any]:
    value = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    if type(value) is not list:
        raise ValueError("bad container payload")
    return value


def _decode_uuid_slow(data: bytes) -> UUID:
    return UUID(bytes=data)


_object_new = object.__new__
_object_setattr = object.__setattr__
_UUID_UNKNOWN = SafeUUID.unknown


def _decode_uuid_fast(data: bytes) -> UUID:
    # What UUID.__init__ ends with, without its argument parsing (~2x faster).
    if len(data) != 16:
        raise ValueError("bad UUID payload length")
    u = _object_new(UUID)
    _object_setattr(u, "int", int.from_bytes(data, "big"))
    _object_setattr(u, "is_safe", _UUID_UNKNOWN)
    return u


def _pick_uuid_decoder() -> Callable[[bytes], UUID]:
    probe = UUID("12345678-9abc-4def-8123-456789abcdef")
    try:
        fast = _decode_uuid_fast(probe.bytes)
        if fast == probe and str(fast) == str(probe) and hash(fast) == hash(probe):
            return _decode_uuid_fast
    except Exception:  # pragma: no cover - a future UUID layout
        pass
    return _decode_uuid_slow  # pragma: no cover


_decode_uuid = _pick_uuid_decoder()

_ENCODERS: dict[type, Callable[[Any], Any]] = {
    datetime: _encode_datetime,
    UUID: lambda o: _ext(EXT_UUID, o.bytes),
    date: lambda o: _ext(EXT_DATE, _DATE.pack(o.year, o.month, o.day)),
    Decimal: lambda o: _ext(EXT_DECIMAL, str(o).encode("ascii")),
    int: _encode_bigint,  # msgpack calls default only for ints outside [-2**63, 2**64)
    tuple: lambda o: _ext(EXT_TUPLE, _pack_nested(list(o))),
    set: lambda o: _ext(EXT_SET, _pack_nested(list(o))),
    frozenset: lambda o: _ext(EXT_FROZENSET, _pack_nested(list(o))),
    timedelta: lambda o: _ext(EXT_TIMEDELTA, _TIMEDELTA.pack(o.days, o.seconds, o.microseconds)),
}

_DECODERS: dict[int, Callable[[bytes], Any]] = {
    EXT_DATETIME: _decode_datetime,
    EXT_UUID: _decode_uuid,
    EXT_DATE: lambda b: date(*_DATE.unpack(b)),
    EXT_DECIMAL: lambda b: Decimal(bytes(b).decode("ascii")),
    EXT_BIGINT: lambda b: int.from_bytes(b, "big", signed=True),
    EXT_TUPLE: lambda b: tuple(_unpack_nested(b)),
    EXT_SET: lambda b: set(_unpack_nested(b)),
    EXT_FROZENSET: lambda b: frozenset(_unpack_nested(b)),
    EXT_TIMEDELTA: lambda b: timedelta(*_TIMEDELTA.unpack(b)),
    _INT_KEY_EXT: lambda b: _IntKey(_unpack_nested(b)[0]),
}

# Subclass fallbacks, most specific first (datetime before date; bool never gets here).
_BASES: tuple[type, ...] = (datetime, date, UUID, Decimal, timedelta, frozenset, set)


def _default(o: Any) -> Any:
    """Msgpack `default` hook (with strict_types): ext types, then built-in subclasses."""
    encoder = _ENCODERS.get(type(o))
    if encoder is not None:
        return encoder(o)
    # strict_types hands us subclasses of the built-ins too. Like JSON, they come back as
    # the plain built-in: StrEnum/IntEnum members as str/int, namedtuples as tuples.
    if isinstance(o, str):
        return str.__str__(o)
    if isinstance(o, int):
        return int.__index__(o)
    if isinstance(o, float):
        return float.__float__(o)
    if isinstance(o, bytes):
        return bytes(o)
    if isinstance(o, dict):
        return dict(o)
    if isinstance(o, list):
        return list(o)
    if isinstance(o, tuple):
        return _ext(EXT_TUPLE, _pack_nested(list(o)))
    for base in _BASES:
        if isinstance(o, base):
            return _ENCODERS[base](o)
    t = type(o)
    raise TypeError(
        f"MsgpackTranscoder cannot encode object of type {t.__module__}.{t.__qualname__}"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise ValueError(f"unknown msgpack extension type {code}")
    return decoder(data)


class MsgpackTranscoder(Transcoder):
    """Encodes event state as byte 0x01 followed by one msgpack value.

    Round trips exactly, value and type: None, bool, int (any size), float, str, bytes,
    list, dict (keys of any supported hashable type), tuple, set, frozenset, UUID,
    datetime (naive, or aware: it comes back with a fixed `datetime.timezone` of the same
    utcoffset; fold is kept), date, timedelta, Decimal. bytearray/memoryview come back as
    bytes; subclasses of str/int/float/bytes/dict/list/tuple (StrEnum, IntEnum, namedtuple,
    OrderedDict...) come back as the plain built-in. Anything else: TypeError naming the
    type. `decode` raises ValueError for data of another format (e.g. JSONTranscoder's).

    eventsourcing builds it with no arguments from TRANSCODER_TOPIC. One instance may be
    shared by threads: each thread packs with its own msgpack.Packer.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _new_packer(self) -> Any:
        packer = msgpack.Packer(use_bin_type=True, strict_types=True, default=_default)
        self._local.packer = packer
        return packer

    def encode(self, obj: Any) -> bytes:
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._new_packer()
        if type(obj) is dict:
            # the same bytes as packing the re-keyed dict, without building it (~10 % faster)
            index = _FIELD_INDEX
            pairs = [
                (index.get(k, k) if type(k) is str else _escape_key(k), v) for k, v in obj.items()
            ]
            try:
                return _PREFIX + cast("bytes", packer.pack_map_pairs(pairs))
            except BaseException:
                self._new_packer()  # unlike pack(), it leaves its partial output buffered
                raise
        return _PREFIX + cast("bytes", packer.pack(obj))

    def decode(self, data: bytes) -> Any:
        prefix = data[:1]
        if prefix != _PREFIX and prefix != _PLAIN_PREFIX:
            raise ValueError(_unknown_format_message(data))
        try:
            obj = msgpack.unpackb(
                memoryview(data)[1:], raw=False, ext_hook=_ext_hook, strict_map_key=False
            )
        except (ValueError, TypeError, struct.error) as e:
            raise ValueError(
                f"corrupt sourceauth transcoder data (format 0x{data[0]:02x}): {e}"
            ) from e
        if prefix == _PREFIX and type(obj) is dict:
            try:
                obj = {FIELDS[k] if type(k) is int else _unescape_key(k): v for k, v in obj.items()}
            except IndexError as e:
                raise ValueError(
                    f"corrupt sourceauth transcoder data: unknown field index {e}"
                ) from e
        return obj


def _escape_key(key: Any) -> Any:
    """Top-level int keys would read as field indexes: wrap them (event states have none)."""
    if type(key) is int:
        return msgpack.ExtType(_INT_KEY_EXT, _pack_nested([key]))
    return key


def _unescape_key(key: Any) -> Any:
    if isinstance(key, _IntKey):
        return key.value
    return key


def _unknown_format_message(data: bytes) -> str:
    if not data:
        return "unknown sourceauth transcoder format: empty data"
    first = data[0]
    hint = " (looks like JSON, e.g. eventsourcing's JSONTranscoder)" if first == 0x7B else ""
    return (
        f"unknown sourceauth transcoder format byte 0x{first:02x}{hint}; "
        f"this version reads format 0x{FORMAT_VERSION:02x} only"
    )
