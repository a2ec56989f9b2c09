"""Loads the TOML file into the schema (msgspec), with messages that name the key path.

Unknown keys are refused (all of them, each with a did-you-mean hint) before msgspec converts;
a msgspec error is rewritten from the schema's own types into "key: must be …, got …".
"""

from __future__ import annotations

import difflib
import enum
import functools
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
from msgspec.structs import replace

from sourceauth.adapters.config.schema import (
    NOT_FILE_KEYS,
    SECTIONS,
    Config,
    Section,
)
from sourceauth.adapters.config.values import (
    Address,
    ConfigError,
    Domain,
    Duration,
    Listen,
    MilterListen,
    NextHopUrl,
    Protected,
    Relay,
    Secret,
    Size,
    StorageUrl,
    check_path,
    describe,
    parse_endpoint,
    resolve_path,
)

DEFAULT_CONFIG_FILE = "sourceauth.toml"
DB_PASSWORD_ENV = "SOURCEAUTH_DB_PASSWORD"


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
        return build_config({}, Path.cwd(), env)
    file = Path(os.path.normpath(file.absolute()))
    return build_config(_read_toml(file), file.parent, env, file)


def _read_toml(file: Path) -> dict[str, Any]:
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


def build_config(
    document: Mapping[str, Any], base: Path, env: Mapping[str, str], file: Path | None = None
) -> Config:
    """The Config a parsed TOML document describes; relative paths are taken against base."""
    prepared = _prepare(document)
    try:
        cfg = msgspec.convert(prepared, Config, dec_hook=_decode)
    except msgspec.ValidationError as error:
        raise _explain(str(error), prepared) from None
    cfg = _resolved(cfg, base, env, file)
    _check(cfg)
    return cfg


# ---------------------------------------------------------------- before msgspec


def _prepare(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the document with unknown keys refused and choices folded to their case."""
    _reject_unknown(document, set(SECTIONS), "")
    prepared: dict[str, Any] = {}
    for name, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table [{name}], got {describe(table)}")
        prepared[name] = _prepare_table(table, SECTIONS[name], f"{name}.")
    return prepared


def _prepare_table(table: Mapping[str, Any], kind: type, prefix: str) -> dict[str, Any]:
    """One table: unknown keys refused, choices folded; nested tables (the overrides of
    [policy.domains."…"]) likewise, each named by its whole key path."""
    _reject_unknown(table, set(kind.__struct_fields__) - NOT_FILE_KEYS, prefix)
    hints = _hints(kind)
    prepared: dict[str, Any] = {}
    for key, value in table.items():
        inner, _ = _unwrap(hints[key])
        args = typing.get_args(inner)
        if isinstance(value, dict) and _is_struct(inner):
            prepared[key] = _prepare_table(value, inner, f"{prefix}{key}.")
        elif isinstance(value, dict) and len(args) == 2 and _is_struct(args[1]):
            prepared[key] = {
                name: _checked(item, args[1], f'{prefix}{key}."{name}".')
                for name, item in value.items()
            }
        else:
            prepared[key] = _fold(value, hints[key])
    return prepared


def _checked(item: object, kind: type, prefix: str) -> object:
    """A table under a name (msgspec's own errors would not say which name): checked here."""
    if not isinstance(item, dict):
        return item
    prepared = _prepare_table(item, kind, prefix)
    try:
        msgspec.convert(prepared, kind, dec_hook=_decode)
    except msgspec.ValidationError as error:
        raise _explain(str(error), prepared, kind, prefix) from None
    return prepared


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


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


def _fold(value: object, kind: Any) -> object:
    """A choice written in any case ("Recipient", "full") becomes the schema's spelling."""
    if isinstance(value, str):
        for choice in _choices(kind):
            if value.strip().lower() == choice.lower():
                return choice
    return value


# ---------------------------------------------------------------- the custom types


_PARSERS: dict[type, Any] = {
    Duration: Duration,
    Size: Size,
    Listen: Listen,
    MilterListen: MilterListen,
    Domain: Domain,
    Address: Address,
    Protected: Protected,
    StorageUrl: StorageUrl,
    Path: check_path,
}


def _decode(kind: type, value: object) -> object:
    if kind in _PARSERS:
        return _PARSERS[kind](value)
    if issubclass(kind, Relay):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {describe(value)}")
        if value or kind is NextHopUrl:  # an empty relay is the outbox Maildir
            parse_endpoint(value, kind.schemes)
        return kind(value)
    raise NotImplementedError(kind)


# ---------------------------------------------------------------- msgspec's errors, explained


def _explain(
    error: str, document: Mapping[str, Any], root: Any = Config, prefix: str = ""
) -> ConfigError:
    message, at, where = error.rpartition(" - at `$")
    if not at:
        return ConfigError(f"{prefix}{error}")
    key = where.rstrip("`").lstrip(".")
    if not (message.startswith("Expected `") or message.startswith("Invalid enum value")):
        # raised by a value type: already explained
        return ConfigError(f"{prefix}{key}: {message}")
    value: Any = document
    kind: Any = root
    try:
        for part in re.findall(r"[^.\[\]]+", key):
            value = value[int(part)] if isinstance(value, list) else value[part]
            kind = _member(kind, part)
    except (KeyError, IndexError, ValueError):  # not a value of the file: say what msgspec said
        return ConfigError(f"{prefix}{key}: {message}")
    return ConfigError(f"{prefix}{key}: {_expected(kind, value)}")


def _expected(kind: Any, value: object) -> str:
    """What a value of this schema type must be, in the operator's words, and what it was."""
    kind, meta = _unwrap(kind)
    got = f"got {describe(value)}"
    choices = _choices(kind)
    if choices:
        quoted = [f'"{choice}"' for choice in choices]
        return f"must be {', '.join(quoted[:-1])} or {quoted[-1]}, {got}"
    base = typing.get_origin(kind) or kind
    if not _is(value, base):
        return f"{_BASE_WORDS.get(base, 'must be valid')}, {got}"
    if meta is not None and meta.description:
        return f"{meta.description}, {got}"
    if meta is not None and meta.ge is not None:
        return f"must be at least {meta.ge}, got {value}"
    return f"{_BASE_WORDS.get(base, 'must be valid')}, {got}"


_BASE_WORDS: dict[Any, str] = {
    bool: "must be true or false",
    int: "must be an integer",
    float: "must be a number",
    str: "must be a string",
    tuple: "must be an array",
}


def _is(value: object, base: Any) -> bool:
    if base is tuple:
        return isinstance(value, list)
    if base in (int, float) and isinstance(value, bool):
        return False
    if base is float:
        return isinstance(value, (int, float))
    return isinstance(base, type) and isinstance(value, base)


def _unwrap(kind: Any) -> tuple[Any, msgspec.Meta | None]:
    """The type without `| None` and Annotated, and its constraint, if any."""
    meta = None
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is typing.Annotated:
        kind, *extras = typing.get_args(kind)
        meta = next((extra for extra in extras if isinstance(extra, msgspec.Meta)), None)
    return kind, meta


def _choices(kind: Any) -> tuple[str, ...]:
    kind, _ = _unwrap(kind)
    if typing.get_origin(kind) is typing.Literal:
        return typing.get_args(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return tuple(str(member.value) for member in kind)
    return ()


def _member(kind: Any, part: str) -> Any:
    """The schema type of a table's key or an array's element."""
    kind, _ = _unwrap(kind)
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return _hints(kind)[part]
    args = typing.get_args(kind)
    return args[0] if len(args) == 2 and args[1] is Ellipsis else args[int(part)]


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind, include_extras=True)


# ---------------------------------------------------------------- after msgspec


def _resolved(cfg: Config, base: Path, env: Mapping[str, str], file: Path | None) -> Config:
    """Relative paths taken against base, repeated array entries dropped, the DB password."""
    sections: dict[str, Section] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        changes: dict[str, object] = {}
        for key in section.__struct_fields__:
            value = getattr(section, key)
            if isinstance(value, Path):
                changes[key] = resolve_path(value, base)
            elif isinstance(value, StorageUrl):
                changes[key] = value.resolved(base)
            elif isinstance(value, Relay) and value:
                changes[key] = type(value)(parse_endpoint(value, value.schemes, base))
            elif isinstance(value, tuple):
                changes[key] = tuple(dict.fromkeys(value))
        sections[name] = replace(section, **changes)
    password = env.get(DB_PASSWORD_ENV)
    if password:
        sections["storage"] = replace(sections["storage"], pg_password=Secret(password))
    return replace(cfg, file=file, **sections)


def _check(cfg: Config) -> None:
    """The rules that tie one key to another."""
    challenge = cfg.challenge
    delimiter = cfg.policy.recipient_delimiter
    for name in ("confirm_address", "bounce_address"):
        address = getattr(challenge, name)
        if delimiter in address.rpartition("@")[0]:
            raise ConfigError(
                f"challenge.{name}: {address} must not contain the recipient delimiter "
                f'"{delimiter}" (policy.recipient_delimiter): the token is added after it'
            )
    if challenge.confirm_address == challenge.bounce_address:
        raise ConfigError(
            "challenge.bounce_address: must differ from challenge.confirm_address, "
            "so a bounce can never be taken for a reply"
        )
    for name in ("challenge", "delivery"):
        section = getattr(cfg, name)
        if section.retry_initial > section.retry_max:
            raise ConfigError(
                f"{name}.retry_initial: must not exceed {name}.retry_max "
                f"({section.retry_initial:g}s > {section.retry_max:g}s)"
            )
    _check_correspondents(cfg)
    if cfg.auth_gate.enabled and not cfg.auth_gate.trusted_authserv_ids:
        raise ConfigError(
            "auth_gate.trusted_authserv_ids: must name at least one authserv-id "
            "when auth_gate.enabled is true (the gate trusts no other Authentication-Results)"
        )


def _check_correspondents(cfg: Config) -> None:
    listen = cfg.correspondents.listen
    if listen is None:
        return
    for name, other in (
        ("server.listen", cfg.server.listen),
        ("web.listen", cfg.web.listen),
        ("metrics.listen", cfg.metrics.listen),
    ):
        if other is not None and str(other) == str(listen):
            raise ConfigError(f"correspondents.listen: must differ from {name} ({listen})")
    if cfg.delivery.next_hop_endpoint.scheme != "smtp":
        raise ConfigError(
            "delivery.next_hop: must be an smtp:// URL when correspondents.listen is set "
            "(mail sent out goes on to the MTA's reinjection port, never to a local Maildir)"
        )
