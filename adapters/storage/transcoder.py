"""Msgpack transcoder for eventsourcing event state, behind a leading format-version byte.

Exact, typed round trips for the values our events hold; select it with TRANSCODER_TOPIC.

Formats (the first byte; every one is still read):
  1: plain msgpack of the value.
  2: a dict's top-level keys written as their index in FIELDS (a msgpack map).
  3 (written now for a dict whose keys are all in FIELDS, at most 255 of them): one byte
     n, then n bytes, the field index of each key in order, then a msgpack array of the n
     values. The key header is the same for every event of a class, so encoding it is one
     cached lookup on the key tuple and decoding it `dict(zip(cached_names, values))`;
     the values are packed exactly as in format 2. Any other value is written as format 2.
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

#: First byte of what is written now. Bump it (keeping the old decoders) if the layout changes.
FORMAT_VERSION: Final = 0x03
_PREFIX: Final = bytes((FORMAT_VERSION,))
_MAP_PREFIX: Final = b"\x02"  # format 2: a map with indexed keys (written for other values)
_PLAIN_PREFIX: Final = b"\x01"  # format 1: plain msgpack, no field table (still read)
_CACHE_LIMIT: Final = 4096  # key sequences remembered (event classes: a few dozen)

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
        return _tuple_new(_ExtType, (EXT_DATETIME, state + _UTC_SUFFIX))
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
    if code == EXT_DATETIME and len(data) == 14 and data[10:] == _UTC_SUFFIX:
        return _from_state(data[:10], _UTC)  # every event's timestamp: one call saved
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise ValueError(f"unknown msgpack extension type {code}")
    return decoder(data)


class _Keys:
    """What format 3 needs about one key sequence, computed once: the header to write, and
    where the UTC timestamps usually are (encoded to their extension before packing, which
    spares msgpack's `default` round trip for the one datetime every event has)."""

    __slots__ = ("datetimes", "header")

    def __init__(self, header: bytes, datetimes: tuple[int, ...]) -> None:
        self.header = header
        self.datetimes = datetimes


_NO_KEYS: Final = _Keys(b"", ())  # a key sequence format 3 cannot write
_keys_cache: dict[tuple[Any, ...], _Keys] = {}
_names_cache: dict[bytes, tuple[str, ...]] = {}  # header (n + indexes) -> field names


def _keys_for(keys: tuple[Any, ...]) -> _Keys:
    found = _NO_KEYS
    if len(keys) <= 255 and all(type(k) is str and _FIELD_INDEX.get(k, 256) < 256 for k in keys):
        indexes = bytes(_FIELD_INDEX[k] for k in keys)
        at = tuple(i for i, k in enumerate(keys) if k in _DATETIME_FIELDS)
        found = _Keys(_PREFIX + bytes((len(keys),)) + indexes, at)
    if len(_keys_cache) < _CACHE_LIMIT:
        _keys_cache[keys] = found
    return found


def _names_for(header: bytes) -> tuple[str, ...]:
    try:
        names = tuple(FIELDS[i] for i in header[1:])
    except IndexError as e:
        raise ValueError(f"corrupt sourceauth transcoder data: unknown field index {e}") from e
    if len(_names_cache) < _CACHE_LIMIT:
        _names_cache[header] = names
    return names


# Fields that hold a datetime in our events (others take msgpack's `default` hook as usual).
_DATETIME_FIELDS: Final = frozenset({"timestamp"})


class MsgpackTranscoder(Transcoder):
    """Encodes event state as a format byte followed by msgpack (formats: module docstring).

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
            keys = tuple(obj)
            known = _keys_cache.get(keys)
            if known is None:
                known = _keys_for(keys)
            if known.header:
                values = list(obj.values())
                for i in known.datetimes:
                    v = values[i]
                    if type(v) is datetime:
                        values[i] = _encode_datetime(v)
                # pack() resets its buffer when it raises
                return known.header + cast("bytes", packer.pack(values))
            return self._encode_map(packer, obj)
        return _MAP_PREFIX + cast("bytes", packer.pack(obj))

    def _encode_map(self, packer: Any, obj: dict[Any, Any]) -> bytes:
        """Format 2, for a dict format 3 cannot write (a key not in FIELDS)."""
        index = _FIELD_INDEX
        # the same bytes as packing the re-keyed dict, without building it
        pairs = [(index.get(k, k) if type(k) is str else _escape_key(k), v) for k, v in obj.items()]
        try:
            return _MAP_PREFIX + cast("bytes", packer.pack_map_pairs(pairs))
        except BaseException:
            self._new_packer()  # unlike pack(), it leaves its partial output buffered
            raise

    def decode(self, data: bytes) -> Any:
        prefix = data[:1]
        if prefix == _PREFIX:
            return _decode_format_3(data)
        if prefix != _MAP_PREFIX and prefix != _PLAIN_PREFIX:
            raise ValueError(_unknown_format_message(data))
        obj = _unpack(data, 1)
        if prefix == _MAP_PREFIX and type(obj) is dict:
            try:
                obj = {FIELDS[k] if type(k) is int else _unescape_key(k): v for k, v in obj.items()}
            except IndexError as e:
                raise ValueError(
                    f"corrupt sourceauth transcoder data: unknown field index {e}"
                ) from e
        return obj


_unpackb = msgpack.unpackb


def _unpack(data: bytes, start: int) -> Any:
    try:
        return _unpackb(
            memoryview(data)[start:], raw=False, ext_hook=_ext_hook, strict_map_key=False
        )
    except (ValueError, TypeError, struct.error) as e:
        raise ValueError(f"corrupt sourceauth transcoder data (format 0x{data[0]:02x}): {e}") from e


def _decode_format_3(data: bytes) -> dict[str, Any]:
    end = 2 + data[1] if len(data) > 1 else 0
    header = data[1:end]
    if type(header) is not bytes:  # a memoryview or bytearray: hashable bytes for the cache
        header = bytes(header)
    names = _names_cache.get(header)
    if names is None:
        if end == 0 or len(header) != end - 1:
            raise ValueError("corrupt sourceauth transcoder data (format 0x03): short key header")
        names = _names_for(header)
    try:
        values = _unpackb(data[end:], raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except (ValueError, TypeError, struct.error) as e:
        raise ValueError(f"corrupt sourceauth transcoder data (format 0x03): {e}") from e
    if type(values) is not list or len(values) != len(names):
        raise ValueError("corrupt sourceauth transcoder data (format 0x03): values do not fit keys")
    return dict(zip(names, values, strict=False))  # lengths checked: strict costs ~0.5 us


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
