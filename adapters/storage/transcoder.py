"""Msgpack transcoder for eventsourcing event state, with a leading format-version byte.

Exact round trips for the value types our events use; selected by TRANSCODER_TOPIC.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

import msgpack
import structlog
from eventsourcing.persistence import Transcoder

log = structlog.get_logger(__name__)

__all__ = ["FORMAT_VERSION", "TOPIC", "MsgpackTranscoder"]

#: First byte of every encoded value. Bump it (and keep a decoder) if the layout changes.
FORMAT_VERSION: Final = 0x01
_PREFIX: Final = bytes((FORMAT_VERSION,))

#: Value for the application's TRANSCODER_TOPIC setting.
TOPIC: Final = "adapters.storage.transcoder:MsgpackTranscoder"

# Msgpack extension type codes (application range 0..127). Never renumber: they are on disk.
EXT_UUID: Final = 1  # 16 raw bytes
EXT_DATETIME: Final = 2  # wall-clock fields [+ utcoffset]
EXT_DATE: Final = 3  # year, month, day
EXT_DECIMAL: Final = 4  # str(d) as ASCII (keeps exponent, sign of zero, NaN/Infinity)
EXT_BIGINT: Final = 5  # two's complement, big-endian, minimal length
EXT_TUPLE: Final = 6  # nested msgpack array (same format, no version byte)
EXT_SET: Final = 7  # nested msgpack array
EXT_FROZENSET: Final = 8  # nested msgpack array
EXT_TIMEDELTA: Final = 9  # days, seconds, microseconds as three int32

_DT_NAIVE = struct.Struct(">HBBBBBI")  # 11 bytes
_DT_AWARE_S = struct.Struct(">HBBBBBIi")  # 15 bytes: offset in whole seconds
_DT_AWARE_US = struct.Struct(">HBBBBBIq")  # 19 bytes: offset in microseconds (sub-second)
_DATE = struct.Struct(">HBB")
_TIMEDELTA = struct.Struct(">iii")

_UTC: Final = UTC
_ZERO: Final = timedelta(0)
_tz_cache: dict[int, timezone] = {0: _UTC}


def _tz_for(offset_us: int) -> timezone:
    tz = _tz_cache.get(offset_us)
    if tz is None:
        tz = timezone(timedelta(microseconds=offset_us))
        if len(_tz_cache) < 1024:  # bounded: offsets come from stored data
            _tz_cache[offset_us] = tz
    return tz


def _encode_datetime(o: datetime) -> msgpack.ExtType:
    offset = o.utcoffset()
    if offset is None:
        packed = _DT_NAIVE.pack(o.year, o.month, o.day, o.hour, o.minute, o.second, o.microsecond)
    elif offset is _ZERO or not offset.microseconds:
        packed = _DT_AWARE_S.pack(
            o.year,
            o.month,
            o.day,
            o.hour,
            o.minute,
            o.second,
            o.microsecond,
            offset.days * 86400 + offset.seconds,
        )
    else:
        packed = _DT_AWARE_US.pack(
            o.year,
            o.month,
            o.day,
            o.hour,
            o.minute,
            o.second,
            o.microsecond,
            (offset.days * 86400 + offset.seconds) * 1_000_000 + offset.microseconds,
        )
    return msgpack.ExtType(EXT_DATETIME, packed)


def _decode_datetime(data: bytes) -> datetime:
    n = len(data)
    if n == 15:
        y, mo, d, h, mi, s, us, off = _DT_AWARE_S.unpack(data)
        return datetime(y, mo, d, h, mi, s, us, _tz_for(off * 1_000_000))
    if n == 11:
        y, mo, d, h, mi, s, us = _DT_NAIVE.unpack(data)
        return datetime(y, mo, d, h, mi, s, us)
    if n == 19:
        y, mo, d, h, mi, s, us, off = _DT_AWARE_US.unpack(data)
        return datetime(y, mo, d, h, mi, s, us, _tz_for(off))
    raise ValueError(f"bad datetime payload length {n}")


def _encode_bigint(o: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_BIGINT, o.to_bytes(o.bit_length() // 8 + 1, "big", signed=True))


def _pack_nested(items: Any) -> bytes:
    # A fresh Packer: the caller's packer is mid-way through its own buffer.
    return msgpack.packb(items, use_bin_type=True, strict_types=True, default=_default)


def _unpack_nested(data: bytes) -> list[Any]:
    value = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    if type(value) is not list:
        raise ValueError("bad container payload")
    return value


def _encode_set(o: set[Any]) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SET, _pack_nested(list(o)))


def _encode_frozenset(o: frozenset[Any]) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_FROZENSET, _pack_nested(list(o)))


def _encode_tuple(o: tuple[Any, ...]) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_TUPLE, _pack_nested(list(o)))


def _encode_timedelta(o: timedelta) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_TIMEDELTA, _TIMEDELTA.pack(o.days, o.seconds, o.microseconds))


def _decode_timedelta(data: bytes) -> timedelta:
    days, seconds, microseconds = _TIMEDELTA.unpack(data)
    return timedelta(days, seconds, microseconds)


def _decode_date(data: bytes) -> date:
    return date(*_DATE.unpack(data))


def _decode_uuid(data: bytes) -> UUID:
    return UUID(bytes=data)


_ENCODERS: dict[type, Callable[[Any], Any]] = {
    datetime: _encode_datetime,
    UUID: lambda o: msgpack.ExtType(EXT_UUID, o.bytes),
    date: lambda o: msgpack.ExtType(EXT_DATE, _DATE.pack(o.year, o.month, o.day)),
    Decimal: lambda o: msgpack.ExtType(EXT_DECIMAL, str(o).encode("ascii")),
    int: _encode_bigint,  # msgpack calls default only for ints outside [-2**63, 2**64)
    tuple: _encode_tuple,
    set: _encode_set,
    frozenset: _encode_frozenset,
    timedelta: _encode_timedelta,
}

_DECODERS: dict[int, Callable[[bytes], Any]] = {
    EXT_DATETIME: _decode_datetime,
    EXT_UUID: _decode_uuid,
    EXT_DATE: _decode_date,
    EXT_DECIMAL: lambda b: Decimal(b.decode("ascii")),
    EXT_BIGINT: lambda b: int.from_bytes(b, "big", signed=True),
    EXT_TUPLE: lambda b: tuple(_unpack_nested(b)),
    EXT_SET: lambda b: set(_unpack_nested(b)),
    EXT_FROZENSET: lambda b: frozenset(_unpack_nested(b)),
    EXT_TIMEDELTA: _decode_timedelta,
}


def _default(o: Any) -> Any:
    """Msgpack `default` hook (strict_types): ext types, then subclasses of built-ins."""
    encoder = _ENCODERS.get(type(o))
    if encoder is not None:
        return encoder(o)
    # Subclasses of built-in types (strict_types hands them to us). Enum members that
    # subclass str/int/float (StrEnum, IntEnum) and namedtuples lose their class, as
    # they do with JSON: they come back as the plain built-in value.
    if isinstance(o, bool):
        return bool(o)
    if isinstance(o, int):
        return int.__index__(o)
    if isinstance(o, str):
        return str.__str__(o)
    if isinstance(o, float):
        return float.__float__(o)
    if isinstance(o, bytes):
        return bytes(o)
    if isinstance(o, dict):
        return dict(o)
    if isinstance(o, list):
        return list(o)
    if isinstance(o, tuple):
        return _encode_tuple(o)
    for cls in (datetime, date, UUID, Decimal, timedelta, frozenset, set):
        if isinstance(o, cls):
            return _ENCODERS[cls](o)
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
    """Msgpack transcoder: `0x01` then one msgpack value.

    Round trips exactly (value and type): None, bool, int (any size), float, str, bytes,
    list, dict (any hashable supported keys), tuple, set, frozenset, UUID, datetime (naive
    or aware; aware ones come back with a fixed `datetime.timezone` of the same utcoffset),
    date, timedelta, Decimal. bytearray/memoryview come back as bytes; subclasses of
    str/int/float/dict/list/tuple (StrEnum, IntEnum, namedtuple...) come back as the
    plain built-in. Anything else raises TypeError naming the type.

    Instances hold no mutable state and are safe to share between threads.
    """

    __slots__ = ()

    def encode(self, obj: Any) -> bytes:
        return _PREFIX + msgpack.packb(obj, use_bin_type=True, strict_types=True, default=_default)

    def decode(self, data: bytes) -> Any:
        if data[:1] != _PREFIX:
            raise ValueError(_unknown_format_message(data))
        try:
            return msgpack.unpackb(
                memoryview(data)[1:], raw=False, ext_hook=_ext_hook, strict_map_key=False
            )
        except (ValueError, TypeError, struct.error) as e:
            raise ValueError(f"corrupt sourceauth transcoder data (format 0x01): {e}") from e


def _unknown_format_message(data: bytes) -> str:
    if not data:
        return "unknown sourceauth transcoder format: empty data"
    first = data[0]
    hint = ""
    if first == 0x7B:  # '{'
        hint = " (looks like JSON, e.g. eventsourcing's JSONTranscoder)"
    return (
        f"unknown sourceauth transcoder format byte 0x{first:02x}{hint}; "
        f"this version reads format 0x{FORMAT_VERSION:02x}"
    )


_ = threading  # reserved for a per-thread Packer if measurements ever justify it
