"""The configuration's own value types: durations, sizes, listen addresses, endpoints, the
storage URL, addresses and domains. Each parses itself from the TOML value or raises ValueError
with what was expected; the loader puts the key path in front.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from sourceauth.adapters.smtp.delivery import NextHop, NextHopError, parse_next_hop
from sourceauth.engine.addresses import AddressError, normalize_address, normalize_pattern

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
WEEK = 7 * DAY
# Keeps every duration far inside datetime/timedelta range.
MAX_DURATION = 100 * 365 * DAY


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the bad key.

    Example: 'policy.scope: must be "global" or "recipient", got "x"'.
    """


def describe(value: object) -> str:
    """The value as an error message shows it: strings quoted, other types named."""
    if isinstance(value, str):
        shown = json.dumps(str(value), ensure_ascii=False)
        return shown if len(shown) <= 80 else shown[:76] + '..."'
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


_Text = TypeVar("_Text", bound=str)


def unset(kind: type[_Text]) -> _Text:
    """The empty value of a text type: a schema default meaning "derived from another key"."""
    return str.__new__(kind, "")


def _text(value: object, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be {expected}, got {describe(value)}")
    return value


# ---------------------------------------------------------------- durations and sizes

_DURATION_UNITS = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": MINUTE, "min": MINUTE, "mins": MINUTE, "minute": MINUTE, "minutes": MINUTE,
    "h": HOUR, "hr": HOUR, "hrs": HOUR, "hour": HOUR, "hours": HOUR,
    "d": DAY, "day": DAY, "days": DAY,
    "w": WEEK, "week": WEEK, "weeks": WEEK,
}  # fmt: skip
_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip


class Duration(float):
    """Seconds, from "7d", "36h", "90m", "30s", "1w", "1h30m" or a plain number of seconds.

    Units: s, m, h, d, w (or their English names); must be > 0 and at most 100 years.
    """

    def __new__(cls, value: object) -> Duration:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f'must be a duration such as "7d", got {describe(value)}')
        seconds = _duration_seconds(value) if isinstance(value, str) else float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"must be a duration greater than zero, got {describe(value)}")
        if seconds > MAX_DURATION:
            raise ValueError(f"must be at most 100 years, got {describe(value)}")
        return super().__new__(cls, seconds)


def _duration_seconds(text: str) -> float:
    lowered = text.strip().lower()
    bad = ValueError(
        'must be a duration such as "7d", "36h", "90m", "30s", "1w" or a number of '
        f"seconds, got {describe(text)}"
    )
    if not lowered:
        raise bad
    total, position = 0.0, 0
    while position < len(lowered):
        match = _NUMBER_UNIT.match(lowered, position)
        if match is None or (match.group(2) == "" and match.end() < len(lowered)):
            raise bad
        unit = match.group(2)
        if unit and unit not in _DURATION_UNITS:
            raise bad
        if not unit and position > 0:
            raise bad  # "1h30" is ambiguous
        total += float(match.group(1)) * _DURATION_UNITS.get(unit, 1.0)
        position = match.end()
    return total


class Size(int):
    """Bytes, from "25MB", "512KB", "1GiB" or a plain integer; MB = 10**6 bytes, MiB = 2**20.

    Units are case-insensitive: B, KB, MB, GB (powers of 1000), KiB, MiB, GiB (powers of 1024).
    """

    def __new__(cls, value: object) -> Size:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f'must be a size such as "25MB", got {describe(value)}')
        if isinstance(value, int):
            size = value
        else:
            match = _NUMBER_UNIT.fullmatch(value.lower())
            if match is None or match.group(2) not in _SIZE_UNITS:
                raise ValueError(
                    'must be a size such as "25MB", "512KB", "1MiB" or a number of bytes, '
                    f"got {describe(value)}"
                )
            size = round(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
        if size <= 0:
            raise ValueError(f"must be greater than zero, got {describe(value)}")
        return super().__new__(cls, size)


def _keyed(parse: Callable[[object], float], value: object, key: str) -> float:
    try:
        return parse(value)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None


def parse_duration(text: str | float, key: str) -> float:
    """Seconds in a duration (see Duration); ConfigError naming key if it is not one."""
    return _keyed(Duration, text, key)


def parse_size(text: str | int, key: str) -> int:
    """Bytes in a size (see Size); ConfigError naming key if it is not one."""
    return int(_keyed(Size, text, key))


# ---------------------------------------------------------------- hosts, domains, addresses


class Domain(str):
    """A host or domain name, lower-cased, IDNA-encoded; a trailing dot is dropped."""

    def __new__(cls, value: object) -> Domain:
        text = _text(value)
        name = text.strip().removesuffix(".")
        try:
            domain = normalize_pattern(name) if name else ""
        except AddressError as error:
            raise ValueError(f"{describe(text)} is not a valid domain name ({error})") from None
        if not domain or "@" in domain or domain.startswith("."):
            raise ValueError(f"{describe(text)} is not a valid domain name")
        return super().__new__(cls, domain)


@functools.cache
def default_hostname() -> str:
    """This host's fully qualified name, or "localhost" when it has no usable one."""
    try:
        return Domain(socket.getfqdn())
    except ValueError:
        return "localhost"


class Address(str):
    """A mail address, normalized (domain lower-cased and IDNA-encoded)."""

    def __new__(cls, value: object) -> Address:
        text = _text(value)
        try:
            address = normalize_address(text)
        except AddressError as error:
            raise ValueError(f"{describe(text)} is not a valid address ({error})") from None
        if address.startswith('"'):
            # Tokens ride as extensions (confirm+TOKEN@); a quoted local part has none.
            raise ValueError(f"{describe(text)} is not a valid address (quoted local part)")
        return super().__new__(cls, address)


class Protected(str):
    """A protected recipient: a domain, ".domain" (every subdomain) or an address."""

    def __new__(cls, value: object) -> Protected:
        text = _text(value)
        try:
            return super().__new__(cls, normalize_pattern(text))
        except AddressError as error:
            raise ValueError(
                f"{describe(text)} is not a domain, .domain or address ({error})"
            ) from None


class Listen(str):
    """A listen address "host:port" or "[ipv6]:port"; port 1..65535. host and port are parsed."""

    host: str
    port: int

    def __new__(cls, value: object) -> Listen:
        text = _text(value, 'a string "host:port"')
        bracketed = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", text)
        if bracketed:
            host, port_text = bracketed.groups()
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"[{host}] is not an IPv6 address") from None
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon or not host:
                raise ValueError(f'must be "host:port" or "[ipv6]:port", got {describe(text)}')
            if ":" in host:
                raise ValueError('write an IPv6 address in brackets, as "[::1]:2525"')
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                Domain(host)
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"the port must be a number from 1 to 65535, got {port_text!r}")
        listen = super().__new__(cls, text)
        listen.host, listen.port = host, int(port_text)
        return listen


class MilterListen(str):
    """Where the milter listens: "host:port" (as Listen) or "unix:/absolute/path" (a UNIX
    socket: no TCP delayed-ACK stalls between the MTA's small writes, see docs/postfix.md)."""

    host: str
    port: int
    path: str  # "" for TCP

    def __new__(cls, value: object) -> MilterListen:
        text = _text(value, 'a string "host:port" or "unix:/path"')
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path.startswith("/") or "\x00" in path:
                raise ValueError(f'must be "unix:/absolute/path", got {describe(text)}')
            listen = super().__new__(cls, text)
            listen.host, listen.port, listen.path = "", 0, path
            return listen
        tcp = Listen(text)
        listen = super().__new__(cls, text)
        listen.host, listen.port, listen.path = tcp.host, tcp.port, ""
        return listen


# ---------------------------------------------------------------- endpoints and the storage URL


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for error messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.partition("@")
    if sep and at and ":" in userinfo:
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"
    return url


def parse_endpoint(text: object, schemes: tuple[str, ...], base_dir: Path | None = None) -> NextHop:
    """Read "maildir:PATH", "smtp://host[:port]" or "lmtp://host[:port]" (those in schemes).

    The grammar is adapters.smtp.delivery.parse_next_hop's; relative maildir paths resolve
    against base_dir (default: the current directory) and "~" is expanded.
    """
    text = _text(text)
    scheme, _, rest = text.partition(":")
    if scheme.lower() == "maildir" and rest.startswith("~"):
        text = f"maildir:{Path(rest).expanduser()}"
    try:
        endpoint = parse_next_hop(text, base_dir or Path.cwd())
    except NextHopError as error:
        # The message quotes the URL; a password in it must not reach a log.
        raise ValueError(str(error).replace(text, redact_url(text))) from None
    if endpoint.scheme not in schemes:
        allowed = " or ".join(f"{name}:" for name in schemes)
        raise ValueError(f"must be {allowed}, got {describe(text)}")
    return endpoint


class Relay(str):
    """[challenge] relay: "maildir:PATH" or "smtp://host[:port]"; "" is the data_dir's outbox."""

    schemes: ClassVar[tuple[str, ...]] = ("maildir", "smtp")

    def endpoint(self, base_dir: Path | None = None) -> NextHop:
        return parse_endpoint(str(self), self.schemes, base_dir)


class NextHopUrl(Relay):
    """[delivery] next_hop: "maildir:PATH", "smtp://host[:port]" or "lmtp://host[:port]"."""

    schemes = ("maildir", "smtp", "lmtp")


class Secret(str):
    """A password: compares as its text, never shows it in repr."""

    def __repr__(self) -> str:
        return "Secret('***')"


StorageKind = Literal["sqlite", "postgresql"]
_URL_FORMS = 'must be "sqlite:///PATH" or "postgresql://USER@HOST[:PORT]/DBNAME"'


class StorageUrl(str):
    """The event store: "sqlite:///PATH" or "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?schema=S]".

    The string is the URL without its password; the parts are attributes.
    """

    kind: StorageKind
    sqlite_path: Path | None
    pg_host: str | None
    pg_port: int | None
    pg_user: str | None
    pg_dbname: str | None
    pg_schema: str | None
    password: Secret | None

    def __new__(cls, value: object) -> StorageUrl:
        if isinstance(value, StorageUrl):
            return value
        url = _text(value)
        parts = _storage_parts(url)
        made = super().__new__(cls, parts.pop("url"))
        made.__dict__.update(parts)
        return made

    def resolved(self, base: Path) -> StorageUrl:
        """The same URL with a relative SQLite path taken against base."""
        if self.sqlite_path is None:
            return self
        return StorageUrl(f"sqlite:///{resolve_path(self.sqlite_path, base)}")


def _storage_parts(url: str) -> dict[str, object]:
    shown = describe(redact_url(url))
    none = dict.fromkeys(("pg_host", "pg_port", "pg_user", "pg_dbname", "pg_schema", "password"))
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite" and colon:
        if not rest.startswith("///"):
            raise ValueError(f"{_URL_FORMS}: a sqlite URL has three slashes, got {shown}")
        path = rest[3:]
        if not path or path.startswith(":memory:") or "?" in path:
            raise ValueError(f"{_URL_FORMS}: needs a file path, got {shown}")
        return {**none, "url": f"sqlite:///{path}", "kind": "sqlite", "sqlite_path": Path(path)}
    if scheme not in ("postgresql", "postgres") or not rest.startswith("//"):
        raise ValueError(f"{_URL_FORMS}, got {shown}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = 5432 if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"{_URL_FORMS}: bad host or port (1 to 65535), got {shown}")
    host = parts.hostname
    user = urllib.parse.unquote(parts.username) if parts.username else None
    dbname = urllib.parse.unquote(parts.path.removeprefix("/"))
    if not host or not user or not dbname or "/" in dbname or parts.fragment:
        raise ValueError(f"{_URL_FORMS}, got {shown}")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"schema"})
    if unknown:
        raise ValueError(f"unknown URL parameter {unknown[0]!r} (only 'schema' is read)")
    schema = query.get("schema", [None])[-1]
    if schema is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
        raise ValueError(f"schema must be a plain SQL identifier, got {describe(schema)}")
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    host_part = f"[{host}]" if ":" in host else host
    quote = functools.partial(urllib.parse.quote, safe="")
    clean = f"postgresql://{quote(user)}@{host_part}:{port}/{quote(dbname)}"
    if schema is not None:
        clean += f"?schema={schema}"
    return {
        "url": clean,
        "kind": "postgresql",
        "sqlite_path": None,
        "pg_host": host,
        "pg_port": port,
        "pg_user": user,
        "pg_dbname": dbname,
        "pg_schema": schema,
        "password": None if password is None else Secret(password),
    }


# ---------------------------------------------------------------- paths


def check_path(value: object) -> Path:
    text = _text(value)
    if not text.strip() or "\0" in text:
        raise ValueError(f"must be a non-empty path, got {describe(text)}")
    return Path(text)


def resolve_path(path: Path, base: Path) -> Path:
    """An absolute, normalized path; relative ones are taken against base (the file's dir)."""
    return Path(os.path.normpath(base / path.expanduser()))
