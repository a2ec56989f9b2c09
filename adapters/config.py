"""Operator configuration: one TOML file loaded into a frozen dataclass tree, validated at start.

Also reads (or creates, mode 0600) the challenge keyring from the environment or the secret file.
"""

from __future__ import annotations

import difflib
import errno
import functools
import ipaddress
import json
import math
import os
import re
import secrets
import socket
import stat
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, TypeVar

from sourceauth.adapters.smtp.delivery import NextHop, NextHopError, parse_next_hop
from sourceauth.engine.addresses import AddressError, normalize_address, normalize_pattern
from sourceauth.engine.policy import AuthGate, ExemptAction, Exemption, Limits
from sourceauth.engine.settings import EngineSettings
from sourceauth.engine.tokens import Keyring, generate_keyring, parse_keyring, render_keyring

Scope = Literal["global", "recipient"]
FailedAction = Literal["purge", "keep"]
ExemptionAction = Literal["hold", "deliver", "discard"]
AuthRequirement = Literal["spf", "dkim", "spf_or_dkim"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
SqliteSynchronous = Literal["NORMAL", "FULL"]
StorageKind = Literal["sqlite", "postgresql"]
_SCOPES: tuple[Scope, ...] = ("global", "recipient")
_FAILED_ACTIONS: tuple[FailedAction, ...] = ("purge", "keep")
_EXEMPTION_ACTIONS: tuple[ExemptionAction, ...] = ("hold", "deliver", "discard")
_REQUIREMENTS: tuple[AuthRequirement, ...] = ("spf", "dkim", "spf_or_dkim")
_LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
_LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
_SYNCHRONOUS: tuple[SqliteSynchronous, ...] = ("NORMAL", "FULL")
BlobLocation = Literal["database", "files"]
_BLOB_LOCATIONS: tuple[BlobLocation, ...] = ("database", "files")
_RELAY_SCHEMES = ("maildir", "smtp")
_NEXT_HOP_SCHEMES = ("maildir", "smtp", "lmtp")

DEFAULT_CONFIG_FILE = "sourceauth.toml"
DB_PASSWORD_ENV = "SOURCEAUTH_DB_PASSWORD"
MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
WEEK = 7 * DAY
# Keeps every duration far inside datetime/timedelta range.
MAX_DURATION = 100 * 365 * DAY

_T = TypeVar("_T")
_S = TypeVar("_S", bound=str)


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the bad key.

    Example: 'policy.scope: must be "global" or "recipient", got "x"'.
    """


@functools.cache
def default_hostname() -> str:
    """This host's fully qualified name, or "localhost" when it has no usable one."""
    try:
        return _check_domain(socket.getfqdn(), "server.hostname")
    except ConfigError:
        return "localhost"


@dataclass(frozen=True)
class ServerConfig:
    """[server]: the inbound SMTP listener, this host's name and the data directory."""

    listen: str = "127.0.0.1:2525"
    hostname: str = field(default_factory=default_hostname)
    data_dir: Path = Path("var")
    listen_host: str = field(init=False)
    listen_port: int = field(init=False)

    def __post_init__(self) -> None:
        host, port = parse_listen(self.listen, "server.listen")
        object.__setattr__(self, "listen_host", host)
        object.__setattr__(self, "listen_port", port)


@dataclass(frozen=True)
class StorageConfig:
    """[storage]: the event store (SQLite file or PostgreSQL) and the blob directory.

    kind, sqlite_path and pg_* are derived from url; url never holds the password.
    """

    url: str = "sqlite:///var/sourceauth.db"
    blob_dir: Path = Path("var/blobs")
    sqlite_synchronous: SqliteSynchronous = "FULL"
    group_commit_max: int = 256
    group_commit_wait_ms: float = 2.0
    # Where message originals live: "database" (SQLite only: in the same file and the same
    # transaction as their events, one fsync per group commit) or "files" (blob_dir).
    # Default: "database" on SQLite, "files" on PostgreSQL.
    blobs: BlobLocation | None = None
    # From the URL or SOURCEAUTH_DB_PASSWORD; kept out of repr, str and url.
    pg_password: str | None = field(default=None, repr=False)
    kind: StorageKind = field(init=False)
    sqlite_path: Path | None = field(init=False)
    pg_host: str | None = field(init=False)
    pg_port: int | None = field(init=False)
    pg_user: str | None = field(init=False)
    pg_dbname: str | None = field(init=False)
    pg_schema: str | None = field(init=False)

    def __post_init__(self) -> None:
        parsed = _parse_storage_url(self.url, "storage.url")
        password = self.pg_password if self.pg_password is not None else parsed.pg_password
        for name, value in (
            ("url", parsed.url),
            ("pg_password", password if parsed.kind == "postgresql" else None),
            ("kind", parsed.kind),
            ("sqlite_path", parsed.sqlite_path),
            ("pg_host", parsed.pg_host),
            ("pg_port", parsed.pg_port),
            ("pg_user", parsed.pg_user),
            ("pg_dbname", parsed.pg_dbname),
            ("pg_schema", parsed.pg_schema),
        ):
            object.__setattr__(self, name, value)
        if self.blobs is None:
            object.__setattr__(self, "blobs", "database" if parsed.kind == "sqlite" else "files")
        elif self.blobs == "database" and parsed.kind != "sqlite":
            raise ConfigError(
                'storage.blobs: "database" is only available with SQLite; use "files"'
            )


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: who is protected, whitelist scope, lifetimes and resend rules."""

    protected: tuple[str, ...] = ()
    scope: Scope = "global"
    challenge_lifetime: float = 7 * DAY
    failed_action: FailedAction = "purge"
    hold_lifetime: float = 7 * DAY
    recipient_delimiter: str = "+"
    max_resends: int = 2
    resend_after: float = DAY


@dataclass(frozen=True)
class ChallengeConfig:
    """[challenge]: how challenges leave, the VERP addresses, the secret and the wording.

    relay_endpoint is derived from relay; load_config turns an empty relay into the outbox Maildir.
    """

    relay: str = ""
    confirm_address: str = field(default_factory=lambda: f"confirm@{default_hostname()}")
    bounce_address: str = field(default_factory=lambda: f"bounces@{default_hostname()}")
    secret_file: Path = Path("var/secret")
    secret_env: str = "SOURCEAUTH_SECRET"
    subject_template: str | None = None
    body_template: str | None = None
    display_name: str = "Mail Source Authentication"
    retry_initial: float = MINUTE
    retry_max: float = HOUR
    give_up_after: float = 2 * DAY
    relay_endpoint: NextHop = field(init=False)

    def __post_init__(self) -> None:
        relay = self.relay or "maildir:var/outbox"
        endpoint = parse_endpoint(relay, "challenge.relay", _RELAY_SCHEMES)
        object.__setattr__(self, "relay_endpoint", endpoint)


@dataclass(frozen=True)
class DeliveryConfig:
    """[delivery]: the next hop for released and unprotected mail, and its retry schedule."""

    next_hop: str = "maildir:var/mail"
    retry_initial: float = MINUTE
    retry_max: float = HOUR
    give_up_after: float = 5 * DAY
    next_hop_endpoint: NextHop = field(init=False)

    def __post_init__(self) -> None:
        endpoint = parse_endpoint(self.next_hop, "delivery.next_hop", _NEXT_HOP_SCHEMES)
        object.__setattr__(self, "next_hop_endpoint", endpoint)


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: rate limits and size caps; excess mail is held without a challenge."""

    challenges_per_domain_per_hour: int = 100
    challenges_per_hour: int = 1000
    held_per_recipient: int = 100_000
    max_message_size: int = 25_000_000
    max_recipients: int = 100


@dataclass(frozen=True)
class ExemptionsConfig:
    """[exemptions]: what to do with each class of mail that must never be challenged."""

    null_sender: ExemptionAction = "hold"
    mailer_daemon: ExemptionAction = "hold"
    auto_submitted: ExemptionAction = "hold"
    mailing_list: ExemptionAction = "hold"
    bulk: ExemptionAction = "hold"
    dsn: ExemptionAction = "hold"
    spam: ExemptionAction = "hold"
    spam_headers: tuple[tuple[str, str], ...] = (("X-Spam-Flag", "YES"), ("X-Spam-Status", "Yes"))


@dataclass(frozen=True)
class AuthGateConfig:
    """[auth_gate]: challenge only senders whose domain passed SPF and/or DKIM upstream."""

    enabled: bool = False
    trusted_authserv_ids: tuple[str, ...] = ()
    require: AuthRequirement = "spf_or_dkim"


@dataclass(frozen=True)
class LoggingConfig:
    """[logging]: structlog output format and level."""

    format: LogFormat = "json"
    level: LogLevel = "info"


@dataclass(frozen=True)
class MaintenanceConfig:
    """[maintenance]: the maintenance timer inside `sourceauth serve`."""

    interval: float = 5 * MINUTE


@dataclass(frozen=True)
class Config:
    """The whole configuration; build it with load_config. file is None for built-in defaults."""

    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    challenge: ChallengeConfig = field(default_factory=ChallengeConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    exemptions: ExemptionsConfig = field(default_factory=ExemptionsConfig)
    auth_gate: AuthGateConfig = field(default_factory=AuthGateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    file: Path | None = None


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "policy": PolicyConfig,
    "challenge": ChallengeConfig,
    "delivery": DeliveryConfig,
    "limits": LimitsConfig,
    "exemptions": ExemptionsConfig,
    "auth_gate": AuthGateConfig,
    "logging": LoggingConfig,
    "maintenance": MaintenanceConfig,
}
# Fields an operator cannot set in the file (the password comes from the URL or the environment).
_NOT_FILE_KEYS = frozenset({"pg_password"})


# ---------------------------------------------------------------- value parsers


_DURATION_UNITS = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": MINUTE, "min": MINUTE, "mins": MINUTE, "minute": MINUTE, "minutes": MINUTE,
    "h": HOUR, "hr": HOUR, "hrs": HOUR, "hour": HOUR, "hours": HOUR,
    "d": DAY, "day": DAY, "days": DAY,
    "w": WEEK, "week": WEEK, "weeks": WEEK,
}  # fmt: skip
_DURATION_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*")
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip


def parse_duration(text: str | float, key: str) -> float:
    """Seconds in "7d", "36h", "90m", "30s", "1w", "1h30m" or a plain number of seconds.

    Units: s, m, h, d, w (or their English names); the result must be > 0 and at most 100 years.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(f'{key}: must be a duration such as "7d", got {_describe(text)}')
    if isinstance(text, str):
        seconds = _duration_seconds(text, key)
    else:
        seconds = float(text)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}: must be a duration greater than zero, got {_describe(text)}")
    if seconds > MAX_DURATION:
        raise ConfigError(f"{key}: must be at most 100 years, got {_describe(text)}")
    return seconds


def _duration_seconds(text: str, key: str) -> float:
    lowered = text.strip().lower()
    bad = ConfigError(
        f'{key}: must be a duration such as "7d", "36h", "90m", "30s", "1w" or a number of '
        f"seconds, got {_describe(text)}"
    )
    if not lowered:
        raise bad
    total, position = 0.0, 0
    while position < len(lowered):
        match = _DURATION_PART.match(lowered, position)
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


def parse_size(text: str | int, key: str) -> int:
    """Bytes in "25MB", "512KB", "1GiB" or a plain integer; MB = 10**6 bytes, MiB = 2**20.

    Units are case-insensitive: B, KB, MB, GB (powers of 1000), KiB, MiB, GiB (powers of 1024).
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigError(f'{key}: must be a size such as "25MB", got {_describe(text)}')
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.fullmatch(text.lower())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise ConfigError(
                f'{key}: must be a size such as "25MB", "512KB", "1MiB" or a number of bytes, '
                f"got {_describe(text)}"
            )
        size = round(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError(f"{key}: must be greater than zero, got {_describe(text)}")
    return size


def parse_listen(text: str, key: str) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port" into (host, port); port must be 1..65535."""
    if not isinstance(text, str):
        raise ConfigError(f'{key}: must be a string "host:port", got {_describe(text)}')
    bracketed = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", text)
    if bracketed:
        host, port_text = bracketed.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{key}: [{host}] is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ConfigError(f'{key}: must be "host:port" or "[ipv6]:port", got {_describe(text)}')
        if ":" in host:
            raise ConfigError(f'{key}: write an IPv6 address in brackets, as "[::1]:2525"')
        _check_host(host, key)
    return host, _check_port(port_text, key)


def parse_endpoint(
    text: str, key: str, schemes: tuple[str, ...], base_dir: Path | None = None
) -> NextHop:
    """Read "maildir:PATH", "smtp://host[:port]" or "lmtp://host[:port]" (those in schemes).

    The grammar is adapters.smtp.delivery.parse_next_hop's; relative maildir paths resolve
    against base_dir (default: the current directory) and "~" is expanded.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{key}: must be a string, got {_describe(text)}")
    scheme, _, rest = text.partition(":")
    if scheme.lower() == "maildir" and rest.startswith("~"):
        text = f"maildir:{Path(rest).expanduser()}"
    try:
        endpoint = parse_next_hop(text, base_dir or Path.cwd())
    except NextHopError as error:
        # The message quotes the URL; a password in it must not reach a log.
        raise ConfigError(f"{key}: {str(error).replace(text, _redact_url(text))}") from None
    if endpoint.scheme not in schemes:
        allowed = " or ".join(f"{name}:" for name in schemes)
        raise ConfigError(f"{key}: must be {allowed}, got {_describe(text)}")
    return endpoint


@dataclass(frozen=True)
class _StorageUrl:
    url: str
    kind: StorageKind
    sqlite_path: Path | None = None
    pg_host: str | None = None
    pg_port: int | None = None
    pg_user: str | None = None
    pg_password: str | None = None
    pg_dbname: str | None = None
    pg_schema: str | None = None


def _parse_storage_url(url: str, key: str) -> _StorageUrl:
    if not isinstance(url, str):
        raise ConfigError(f"{key}: must be a string, got {_describe(url)}")
    shown = _describe(_redact_url(url))
    forms = 'must be "sqlite:///PATH" or "postgresql://USER@HOST[:PORT]/DBNAME"'
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite" and colon:
        if not rest.startswith("///"):
            raise ConfigError(f"{key}: {forms}: a sqlite URL has three slashes, got {shown}")
        path = rest[3:]
        if not path or path.startswith(":memory:") or "?" in path:
            raise ConfigError(f"{key}: {forms}: needs a file path, got {shown}")
        return _StorageUrl(url=f"sqlite:///{path}", kind="sqlite", sqlite_path=Path(path))
    if scheme not in ("postgresql", "postgres") or not rest.startswith("//"):
        raise ConfigError(f"{key}: {forms}, got {shown}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = 5432 if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: {forms}: bad host or port (1 to 65535), got {shown}")
    host = parts.hostname
    user = urllib.parse.unquote(parts.username) if parts.username else None
    dbname = urllib.parse.unquote(parts.path.removeprefix("/"))
    if not host or not user or not dbname or "/" in dbname or parts.fragment:
        raise ConfigError(f"{key}: {forms}, got {shown}")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"schema"})
    if unknown:
        raise ConfigError(f"{key}: unknown URL parameter {unknown[0]!r} (only 'schema' is read)")
    schema = query.get("schema", [None])[-1]
    if schema is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
        raise ConfigError(f"{key}: schema must be a plain SQL identifier, got {_describe(schema)}")
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    host_part = f"[{host}]" if ":" in host else host
    quote = functools.partial(urllib.parse.quote, safe="")
    clean = f"postgresql://{quote(user)}@{host_part}:{port}/{quote(dbname)}"
    if schema is not None:
        clean += f"?schema={schema}"
    return _StorageUrl(
        url=clean,
        kind="postgresql",
        pg_host=host,
        pg_port=port,
        pg_user=user,
        pg_password=password,
        pg_dbname=dbname,
        pg_schema=schema,
    )


def _redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for error messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.partition("@")
    if sep and at and ":" in userinfo:
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"
    return url


def _check_port(text: str, key: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{key}: the port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def _check_host(host: str, key: str) -> None:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        _check_domain(host, key)


def _check_domain(text: str, key: str) -> str:
    """A host or domain name, lower-cased, IDNA-encoded; a trailing dot is dropped."""
    name = text.strip().removesuffix(".")
    try:
        domain = normalize_pattern(name) if name else ""
    except AddressError as error:
        raise ConfigError(
            f"{key}: {_describe(text)} is not a valid domain name ({error})"
        ) from None
    if not domain or "@" in domain or domain.startswith("."):
        raise ConfigError(f"{key}: {_describe(text)} is not a valid domain name")
    return domain


def _address(value: object, key: str) -> str:
    text = _string(value, key)
    try:
        return normalize_address(text)
    except AddressError as error:
        raise ConfigError(f"{key}: {_describe(text)} is not a valid address ({error})") from None


def _describe(value: object) -> str:
    """The value as an error message shows it: strings quoted, other types named."""
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
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


# ---------------------------------------------------------------- converters (TOML value -> field)


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {_describe(value)}")
    return value


def _line(value: object, key: str) -> str:
    text = _string(value, key)
    if not text or any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ConfigError(f"{key}: must be a non-empty single line, got {_describe(text)}")
    return text


def _template(value: object, key: str) -> str:
    text = _string(value, key)
    if not text.strip():
        raise ConfigError(f"{key}: must not be empty (leave the key out for the built-in text)")
    return text


def _boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {_describe(value)}")
    return value


def _integer(minimum: int) -> Callable[[object, str], int]:
    def convert(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {_describe(value)}")
        if value < minimum:
            raise ConfigError(f"{key}: must be at least {minimum}, got {value}")
        return value

    return convert


def _non_negative_number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: must be a number, got {_describe(value)}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key}: must be zero or more, got {_describe(value)}")
    return float(value)


def _duration(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f'{key}: must be a duration such as "7d", got {_describe(value)}')
    return parse_duration(value, key)


def _size(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f'{key}: must be a size such as "25MB", got {_describe(value)}')
    return parse_size(value, key)


def _choice(
    choices: tuple[_S, ...], fold: Callable[[str], str] = str.lower
) -> Callable[[object, str], _S]:
    if len(choices) == 2:
        allowed = f'"{choices[0]}" or "{choices[1]}"'
    else:
        allowed = ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'

    def convert(value: object, key: str) -> _S:
        if isinstance(value, str):
            for choice in choices:
                if fold(value.strip()) == choice:
                    return choice
        raise ConfigError(f"{key}: must be {allowed}, got {_describe(value)}")

    return convert


def _array(item: Callable[[object, str], _T]) -> Callable[[object, str], tuple[_T, ...]]:
    def convert(value: object, key: str) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be an array, got {_describe(value)}")
        result: list[_T] = []
        for index, element in enumerate(value):
            converted = item(element, f"{key}[{index}]")
            if converted not in result:
                result.append(converted)
        return tuple(result)

    return convert


def _protected_entry(value: object, key: str) -> str:
    text = _string(value, key)
    try:
        return normalize_pattern(text)
    except AddressError as error:
        raise ConfigError(
            f"{key}: {_describe(text)} is not a domain, .domain or address ({error})"
        ) from None


def _authserv_id(value: object, key: str) -> str:
    text = _line(value, key)
    if any(char.isspace() or char in ';"()' for char in text):
        raise ConfigError(f"{key}: {_describe(text)} is not an authserv-id")
    return text


_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ":"


def _spam_header(value: object, key: str) -> tuple[str, str]:
    if not (isinstance(value, list) and len(value) == 2):
        raise ConfigError(f'{key}: must be a pair ["Header-Name", "value"], got {_describe(value)}')
    name, text = _line(value[0], f"{key}[0]"), _line(value[1], f"{key}[1]")
    if not _HEADER_NAME.fullmatch(name):
        raise ConfigError(f"{key}[0]: {_describe(name)} is not a header field name")
    return name, text


def _delimiter(value: object, key: str) -> str:
    text = _string(value, key)
    if len(text) != 1 or text not in "+-=_~#%&!$*/?^{|}":
        raise ConfigError(f'{key}: must be one character such as "+" or "-", got {_describe(text)}')
    return text


def _env_name(value: object, key: str) -> str:
    text = _string(value, key)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise ConfigError(f"{key}: {_describe(text)} is not an environment variable name")
    return text


# ---------------------------------------------------------------- the loader


class _Table:
    """One [section] of the file; get() converts a key's value or returns the default."""

    def __init__(self, document: Mapping[str, object], name: str) -> None:
        raw = document.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: must be a table [{name}], got {_describe(raw)}")
        known = {f.name for f in fields(_SECTIONS[name]) if f.init} - _NOT_FILE_KEYS
        _reject_unknown(raw, known, f"{name}.")
        self.name = name
        self.raw: dict[str, object] = raw

    def key(self, name: str) -> str:
        return f"{self.name}.{name}"

    def has(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, convert: Callable[[object, str], _T], default: _T) -> _T:
        if name not in self.raw:
            return default
        return convert(self.raw[name], self.key(name))

    def path(self, name: str, default: Path, base: Path) -> Path:
        return _resolve(self.get(name, _path_text, default), base)


def _path_text(value: object, key: str) -> Path:
    text = _string(value, key)
    if not text.strip() or "\0" in text:
        raise ConfigError(f"{key}: must be a non-empty path, got {_describe(text)}")
    return Path(text)


def _resolve(path: Path, base: Path) -> Path:
    """An absolute, normalized path; relative ones are taken against base (the file's dir)."""
    return Path(os.path.normpath(base / path.expanduser()))


def _reject_unknown(raw: Mapping[str, object], known: set[str], prefix: str) -> None:
    unknown = sorted(set(raw) - known)
    if not unknown:
        return
    messages = []
    for name in unknown:
        is_section = not prefix and isinstance(raw[name], dict)
        message = f"unknown section [{name}]" if is_section else f"unknown key {prefix}{name}"
        close = difflib.get_close_matches(name, sorted(known), n=1)
        if close:
            guess = f"[{close[0]}]" if is_section else f"{prefix}{close[0]}"
            message += f" (did you mean {guess}?)"
        messages.append(message)
    raise ConfigError("; ".join(messages))


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Load and validate the configuration; raises ConfigError naming the bad key or file.

    path None: ./sourceauth.toml if it exists, else the built-in defaults. Relative paths in
    the file resolve against the file's directory (the current directory when there is no file).
    """
    env = os.environ if environ is None else environ
    file: Path | None
    if path is None:
        candidate = Path(DEFAULT_CONFIG_FILE)
        file = candidate if candidate.is_file() else None
    else:
        file = Path(path)
    if file is None:
        return _build({}, Path.cwd(), env, None)
    file = Path(os.path.normpath(file.absolute()))
    return _build(_read_toml(file), file.parent, env, file)


def _read_toml(file: Path) -> dict[str, object]:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {file}") from None
    except OSError as error:
        raise ConfigError(f"config file {file}: cannot read it ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{file}: line {line}: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: invalid TOML: {error}") from None


def _build(
    document: Mapping[str, object], base: Path, env: Mapping[str, str], file: Path | None
) -> Config:
    _reject_unknown(document, set(_SECTIONS), "")
    server = _build_server(_Table(document, "server"), base)
    storage = _build_storage(_Table(document, "storage"), base, server.data_dir, env)
    policy = _build_policy(_Table(document, "policy"))
    challenge = _build_challenge(_Table(document, "challenge"), base, server, policy)
    delivery = _build_delivery(_Table(document, "delivery"), base, server.data_dir)
    limits = _build_limits(_Table(document, "limits"))
    exemptions = _build_exemptions(_Table(document, "exemptions"))
    auth_gate = _build_auth_gate(_Table(document, "auth_gate"))
    table = _Table(document, "logging")
    logging = LoggingConfig(
        format=table.get("format", _choice(_LOG_FORMATS), LoggingConfig.format),
        level=table.get("level", _choice(_LOG_LEVELS), LoggingConfig.level),
    )
    table = _Table(document, "maintenance")
    maintenance = MaintenanceConfig(
        interval=table.get("interval", _duration, MaintenanceConfig.interval)
    )
    return Config(
        server=server,
        storage=storage,
        policy=policy,
        challenge=challenge,
        delivery=delivery,
        limits=limits,
        exemptions=exemptions,
        auth_gate=auth_gate,
        logging=logging,
        maintenance=maintenance,
        file=file,
    )


def _build_server(table: _Table, base: Path) -> ServerConfig:
    listen = table.get("listen", _string, ServerConfig.listen)
    # Only look the FQDN up (a DNS query) when the file does not name the host.
    if table.has("hostname"):
        hostname = table.get("hostname", _check_domain_value, "")
    else:
        hostname = default_hostname()
    data_dir = table.path("data_dir", ServerConfig.data_dir, base)
    return ServerConfig(listen=listen, hostname=hostname, data_dir=data_dir)


def _check_domain_value(value: object, key: str) -> str:
    return _check_domain(_string(value, key), key)


def _build_storage(
    table: _Table, base: Path, data_dir: Path, env: Mapping[str, str]
) -> StorageConfig:
    key = table.key("url")
    url = table.get("url", _string, f"sqlite:///{data_dir / 'sourceauth.db'}")
    parsed = _parse_storage_url(url, key)
    if parsed.sqlite_path is not None:
        url = f"sqlite:///{_resolve(parsed.sqlite_path, base)}"
    password = env.get(DB_PASSWORD_ENV) or None
    return StorageConfig(
        url=url,
        pg_password=password,
        blob_dir=table.path("blob_dir", data_dir / "blobs", base),
        sqlite_synchronous=table.get(
            "sqlite_synchronous", _choice(_SYNCHRONOUS, str.upper), StorageConfig.sqlite_synchronous
        ),
        group_commit_max=table.get("group_commit_max", _integer(1), StorageConfig.group_commit_max),
        group_commit_wait_ms=table.get(
            "group_commit_wait_ms", _non_negative_number, StorageConfig.group_commit_wait_ms
        ),
        blobs=table.get("blobs", _choice(_BLOB_LOCATIONS, str.lower), None),
    )


def _build_policy(table: _Table) -> PolicyConfig:
    challenge_lifetime = table.get("challenge_lifetime", _duration, PolicyConfig.challenge_lifetime)
    return PolicyConfig(
        protected=table.get("protected", _array(_protected_entry), PolicyConfig.protected),
        scope=table.get("scope", _choice(_SCOPES), PolicyConfig.scope),
        challenge_lifetime=challenge_lifetime,
        failed_action=table.get(
            "failed_action", _choice(_FAILED_ACTIONS), PolicyConfig.failed_action
        ),
        # Unset, it follows challenge_lifetime, so one knob sets how long anything is held.
        hold_lifetime=table.get("hold_lifetime", _duration, challenge_lifetime),
        recipient_delimiter=table.get(
            "recipient_delimiter", _delimiter, PolicyConfig.recipient_delimiter
        ),
        max_resends=table.get("max_resends", _integer(0), PolicyConfig.max_resends),
        resend_after=table.get("resend_after", _duration, PolicyConfig.resend_after),
    )


def _build_challenge(
    table: _Table, base: Path, server: ServerConfig, policy: PolicyConfig
) -> ChallengeConfig:
    relay = table.get("relay", _string, "") or f"maildir:{server.data_dir / 'outbox'}"
    endpoint = parse_endpoint(relay, table.key("relay"), _RELAY_SCHEMES, base)
    confirm = table.get("confirm_address", _address, f"confirm@{server.hostname}")
    bounce = table.get("bounce_address", _address, f"bounces@{server.hostname}")
    delimiter = policy.recipient_delimiter
    for name, address in (("confirm_address", confirm), ("bounce_address", bounce)):
        if delimiter in address.rpartition("@")[0]:
            raise ConfigError(
                f"{table.key(name)}: {address} must not contain the recipient delimiter "
                f'"{delimiter}" (policy.recipient_delimiter): the token is added after it'
            )
    if confirm == bounce:
        raise ConfigError(
            f"{table.key('bounce_address')}: must differ from challenge.confirm_address, "
            "so a bounce can never be taken for a reply"
        )
    challenge = ChallengeConfig(
        relay=str(endpoint),
        confirm_address=confirm,
        bounce_address=bounce,
        secret_file=table.path("secret_file", server.data_dir / "secret", base),
        secret_env=table.get("secret_env", _env_name, ChallengeConfig.secret_env),
        subject_template=table.get("subject_template", _line, None),
        body_template=table.get("body_template", _template, None),
        display_name=table.get("display_name", _line, ChallengeConfig.display_name),
        retry_initial=table.get("retry_initial", _duration, ChallengeConfig.retry_initial),
        retry_max=table.get("retry_max", _duration, ChallengeConfig.retry_max),
        give_up_after=table.get("give_up_after", _duration, ChallengeConfig.give_up_after),
    )
    _check_retry(challenge.retry_initial, challenge.retry_max, table)
    return challenge


def _build_delivery(table: _Table, base: Path, data_dir: Path) -> DeliveryConfig:
    next_hop = table.get("next_hop", _string, f"maildir:{data_dir / 'mail'}")
    endpoint = parse_endpoint(next_hop, table.key("next_hop"), _NEXT_HOP_SCHEMES, base)
    delivery = DeliveryConfig(
        next_hop=str(endpoint),
        retry_initial=table.get("retry_initial", _duration, DeliveryConfig.retry_initial),
        retry_max=table.get("retry_max", _duration, DeliveryConfig.retry_max),
        give_up_after=table.get("give_up_after", _duration, DeliveryConfig.give_up_after),
    )
    _check_retry(delivery.retry_initial, delivery.retry_max, table)
    return delivery


def _check_retry(initial: float, maximum: float, table: _Table) -> None:
    if initial > maximum:
        raise ConfigError(
            f"{table.key('retry_initial')}: must not exceed {table.key('retry_max')} "
            f"({initial:g}s > {maximum:g}s)"
        )


def _build_limits(table: _Table) -> LimitsConfig:
    positive = _integer(1)
    return LimitsConfig(
        challenges_per_domain_per_hour=table.get(
            "challenges_per_domain_per_hour", positive, LimitsConfig.challenges_per_domain_per_hour
        ),
        challenges_per_hour=table.get(
            "challenges_per_hour", positive, LimitsConfig.challenges_per_hour
        ),
        held_per_recipient=table.get(
            "held_per_recipient", positive, LimitsConfig.held_per_recipient
        ),
        max_message_size=table.get("max_message_size", _size, LimitsConfig.max_message_size),
        max_recipients=table.get("max_recipients", positive, LimitsConfig.max_recipients),
    )


def _build_exemptions(table: _Table) -> ExemptionsConfig:
    action = _choice(_EXEMPTION_ACTIONS)
    return ExemptionsConfig(
        null_sender=table.get("null_sender", action, ExemptionsConfig.null_sender),
        mailer_daemon=table.get("mailer_daemon", action, ExemptionsConfig.mailer_daemon),
        auto_submitted=table.get("auto_submitted", action, ExemptionsConfig.auto_submitted),
        mailing_list=table.get("mailing_list", action, ExemptionsConfig.mailing_list),
        bulk=table.get("bulk", action, ExemptionsConfig.bulk),
        dsn=table.get("dsn", action, ExemptionsConfig.dsn),
        spam=table.get("spam", action, ExemptionsConfig.spam),
        spam_headers=table.get("spam_headers", _array(_spam_header), ExemptionsConfig.spam_headers),
    )


def _build_auth_gate(table: _Table) -> AuthGateConfig:
    gate = AuthGateConfig(
        enabled=table.get("enabled", _boolean, AuthGateConfig.enabled),
        trusted_authserv_ids=table.get(
            "trusted_authserv_ids",
            _array(_authserv_id),
            AuthGateConfig.trusted_authserv_ids,
        ),
        require=table.get("require", _choice(_REQUIREMENTS), AuthGateConfig.require),
    )
    if gate.enabled and not gate.trusted_authserv_ids:
        raise ConfigError(
            f"{table.key('trusted_authserv_ids')}: must name at least one authserv-id "
            "when auth_gate.enabled is true (the gate trusts no other Authentication-Results)"
        )
    return gate


# ---------------------------------------------------------------- the engine's view


def engine_settings(cfg: Config) -> EngineSettings:
    """The engine's policy (engine/settings.py) as this configuration sets it."""
    policy, challenge, delivery, limits = cfg.policy, cfg.challenge, cfg.delivery, cfg.limits
    return EngineSettings(
        protected=policy.protected,
        scope=policy.scope,
        challenge_lifetime=policy.challenge_lifetime,
        hold_lifetime=policy.hold_lifetime,
        failed_action=policy.failed_action,
        recipient_delimiter=policy.recipient_delimiter,
        confirm_address=challenge.confirm_address,
        bounce_address=challenge.bounce_address,
        exemptions={e: ExemptAction(getattr(cfg.exemptions, e.value)) for e in Exemption},
        spam_headers=cfg.exemptions.spam_headers,
        auth_gate=AuthGate(
            enabled=cfg.auth_gate.enabled,
            trusted_authserv_ids=cfg.auth_gate.trusted_authserv_ids,
            require=cfg.auth_gate.require,
        ),
        limits=Limits(
            challenges_per_domain_per_hour=limits.challenges_per_domain_per_hour,
            challenges_per_hour=limits.challenges_per_hour,
            max_resends=policy.max_resends,
        ),
        resend_after=policy.resend_after,
        challenge_retry_initial=challenge.retry_initial,
        challenge_retry_max=challenge.retry_max,
        challenge_give_up_after=challenge.give_up_after,
        delivery_retry_initial=delivery.retry_initial,
        delivery_retry_max=delivery.retry_max,
        delivery_give_up_after=delivery.give_up_after,
        max_recipients=limits.max_recipients,
        held_per_recipient=limits.held_per_recipient,
    )


# ---------------------------------------------------------------- the secret keyring


def load_or_create_keyring(cfg: ChallengeConfig, environ: Mapping[str, str]) -> Keyring:
    """The token keyring: from env var cfg.secret_env if set, else cfg.secret_file.

    A missing file is created with mode 0600 (parents 0700) from a new random keyring. A file
    readable or writable by group or others is refused. Errors never contain key material.
    """
    if cfg.secret_env in environ:
        text = environ[cfg.secret_env]
        if not text.strip():
            raise ConfigError(f"environment variable {cfg.secret_env} is set but empty")
        return _parse_secret(text, f"environment variable {cfg.secret_env}")
    path = cfg.secret_file
    try:
        return _read_secret_file(path)
    except FileNotFoundError:
        pass
    return _create_secret_file(path)


def _parse_secret(text: str, where: str) -> Keyring:
    try:
        return parse_keyring(text)
    except ValueError as error:
        # parse_keyring's messages name the line, never the key material.
        raise ConfigError(f"{where}: not a valid keyring: {error}") from None


def _read_secret_file(path: Path) -> Keyring:
    key = "challenge.secret_file"
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigError(f"{key}: {path} is a symlink; name the file itself") from None
        raise ConfigError(f"{key}: cannot open {path} ({error.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"{key}: {path} is not a regular file")
        if status.st_mode & 0o077:
            raise ConfigError(
                f"{key}: {path} is readable or writable by group or others "
                f"(mode {status.st_mode & 0o777:04o}); run: chmod 600 {path}"
            )
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not a valid keyring (not UTF-8 text)") from None
    return _parse_secret(text, f"{key}: {path}")


def _create_secret_file(path: Path) -> Keyring:
    key = "challenge.secret_file"
    keyring = generate_keyring()
    data = render_keyring(keyring).encode("utf-8")
    try:
        _make_private_dirs(path.parent)
        # Write a private temporary file, then link it into place: readers never see a partial
        # file, and a process racing us keeps whichever keyring was linked first.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                return _read_secret_file(path)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as error:
        raise ConfigError(f"{key}: cannot create {path} ({error.strerror})") from None
    return keyring


def _make_private_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        created.mkdir(mode=0o700, exist_ok=True)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------- start-up summary


def config_summary(cfg: Config) -> dict[str, object]:
    """Every setting as JSON-ready data for the start-up log line; no password, no key material."""
    summary: dict[str, object] = {"file": str(cfg.file) if cfg.file else None}
    for name in _SECTIONS:
        section = getattr(cfg, name)
        values: dict[str, object] = {}
        for item in fields(section):
            value = getattr(section, item.name)
            if item.name == "pg_password":
                values["pg_password_set"] = value is not None
            elif item.name in ("subject_template", "body_template"):
                values[item.name] = "built-in" if value is None else "custom"
            else:
                values[item.name] = _plain(value)
        summary[name] = values
    return summary


def _plain(value: object) -> object:
    if isinstance(value, (Path, NextHop)):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value
