"""What the schema hands on: the engine's EngineSettings, and the start-up log's summary.

engine_settings maps by name, so a key is declared once, in the schema: an EngineSettings field
`x` is the key `x` of the one section that has it, or `challenge_x`/`delivery_x` is `x` of
[challenge]/[delivery]; nested policy objects (Limits, AuthGate) are filled the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgspec

from sourceauth.adapters.config.schema import SECTIONS, Config, PolicyOverride
from sourceauth.adapters.smtp.delivery import NextHop
from sourceauth.engine.policy import ExemptAction, Exemption
from sourceauth.engine.recipient_policy import PolicyOverride as RecipientOverride
from sourceauth.engine.settings import EngineSettings


def engine_settings(cfg: Config) -> EngineSettings:
    """The engine's policy (engine/settings.py) as this configuration sets it."""
    exemptions = {e: ExemptAction(getattr(cfg.exemptions, e.value)) for e in Exemption}
    settings: EngineSettings = _fill(
        EngineSettings,
        cfg,
        exemptions=exemptions,
        domains={k: _override(v) for k, v in cfg.policy.domains.items()},
        mailboxes={k: _override(v) for k, v in cfg.policy.mailboxes.items()},
    )
    return settings


def _override(table: PolicyOverride) -> RecipientOverride:
    """One [policy.domains."…"] or [policy.mailboxes."…"] table as the engine takes it."""

    def present(section: msgspec.Struct | None) -> dict[str, Any]:
        if section is None:
            return {}
        values = {k: getattr(section, k) for k in section.__struct_fields__}
        return {k: _plain(v) for k, v in values.items() if v is not None}

    return RecipientOverride(
        challenge_lifetime=_plain(table.challenge_lifetime),  # type: ignore[arg-type]
        hold_lifetime=_plain(table.hold_lifetime),  # type: ignore[arg-type]
        failed_action=table.failed_action,
        scope=table.scope,
        exemptions={Exemption(k): ExemptAction(v) for k, v in present(table.exemptions).items()},
        auth_gate=present(table.auth_gate),
    )


def _fill(kind: Any, cfg: Config, **given: object) -> Any:
    values = dict(given)
    for item in dataclasses.fields(kind):
        if item.name in values:
            continue
        default = item.default_factory() if callable(item.default_factory) else item.default
        if dataclasses.is_dataclass(default):
            values[item.name] = _fill(type(default), cfg)
        elif (key := config_key(item.name)) is not None:
            section, _, field = key.partition(".")
            values[item.name] = _plain(getattr(getattr(cfg, section), field))
    return kind(**values)


def config_key(name: str) -> str | None:
    """The "section.key" an engine setting comes from; None: an integrator-only setting."""
    section, _, key = name.partition("_")
    if section in ("challenge", "delivery") and key in SECTIONS[section].__struct_fields__:
        return f"{section}.{key}"
    owners = [s for s, kind in SECTIONS.items() if name in kind.__struct_fields__]
    return f"{owners[0]}.{name}" if len(owners) == 1 else None


def _plain(value: object) -> object:
    """A value as the engine takes it: floats, ints and strings, not the schema's types."""
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def config_summary(cfg: Config) -> dict[str, object]:
    """Every setting as JSON-ready data for the start-up log line; no password, no key material."""
    summary: dict[str, object] = {"file": str(cfg.file) if cfg.file else None}
    for name in SECTIONS:
        section = getattr(cfg, name)
        values: dict[str, object] = {}
        for key in (*section.__struct_fields__, *section.derived):
            value = getattr(section, key)
            if key == "pg_password":
                values["pg_password_set"] = value is not None
            elif key in ("subject_template", "body_template"):
                values[key] = "built-in" if value is None else "custom"
            else:
                values[key] = _json(value)
        summary[name] = values
    return summary


def _json(value: object) -> object:
    if isinstance(value, (Path, NextHop)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, msgspec.Struct):
        fields = {k: getattr(value, k) for k in value.__struct_fields__}
        return {k: _json(v) for k, v in fields.items() if v is not None}
    if isinstance(value, tuple):
        return [_json(item) for item in value]
    return _plain(value)
