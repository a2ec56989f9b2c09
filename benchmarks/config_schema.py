"""msgspec against pydantic for the configuration schema: import time and load time.

`python -m benchmarks.config_schema [--runs N]` (pydantic is not a dependency: install it in a
scratch venv to compare). Both libraries get the same schema, built here from one field table
shaped like sourceauth.example.toml (ten sections, durations and sizes as custom types), and load
that file. "cold" is what one CLI command pays: a fresh interpreter that imports the library,
defines the schema and loads the file once (median of N processes, interpreter start subtracted).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Literal

EXAMPLE = Path(__file__).resolve().parents[1] / "sourceauth.example.toml"

# section -> key -> (kind, default); kinds: str int float bool duration size list pairs, or a
# tuple of choices.
FIELDS: dict[str, dict[str, tuple[Any, Any]]] = {
    "server": {"listen": ("str", "127.0.0.1:2525"), "hostname": ("str", "localhost"),
               "data_dir": ("str", "var")},
    "storage": {"url": ("str", ""), "blob_dir": ("str", ""),
                "sqlite_synchronous": (("NORMAL", "FULL"), "FULL"),
                "group_commit_max": ("int", 256), "group_commit_wait_ms": ("float", 2.0),
                "blobs": (("database", "files"), "database")},
    "policy": {"protected": ("list", []), "scope": (("global", "recipient"), "global"),
               "challenge_lifetime": ("duration", 604800.0),
               "failed_action": (("purge", "keep"), "purge"),
               "hold_lifetime": ("duration", 604800.0), "recipient_delimiter": ("str", "+"),
               "max_resends": ("int", 2), "resend_after": ("duration", 86400.0)},
    "challenge": {"relay": ("str", ""), "confirm_address": ("str", ""),
                  "bounce_address": ("str", ""), "secret_file": ("str", "var/secret"),
                  "secret_env": ("str", "SOURCEAUTH_SECRET"), "display_name": ("str", "x"),
                  "retry_initial": ("duration", 60.0), "retry_max": ("duration", 3600.0),
                  "give_up_after": ("duration", 172800.0)},
    "delivery": {"next_hop": ("str", ""), "retry_initial": ("duration", 60.0),
                 "retry_max": ("duration", 3600.0), "give_up_after": ("duration", 432000.0)},
    "limits": {"challenges_per_domain_per_hour": ("int", 100), "challenges_per_hour": ("int", 1000),
               "held_per_recipient": ("int", 100000), "max_message_size": ("size", 25000000),
               "max_recipients": ("int", 100)},
    "exemptions": {**{name: (("hold", "deliver", "discard"), "hold") for name in (
        "null_sender", "mailer_daemon", "auto_submitted", "mailing_list", "bulk", "dsn", "spam")},
        "spam_headers": ("pairs", [])},
    "auth_gate": {"enabled": ("bool", False), "trusted_authserv_ids": ("list", []),
                  "require": (("spf", "dkim", "spf_or_dkim"), "spf_or_dkim")},
    "logging": {"format": (("json", "console"), "json"),
                "level": (("debug", "info", "warning", "error"), "info")},
    "maintenance": {"interval": ("duration", 300.0)},
}  # fmt: skip

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "kb": 10**3, "mb": 10**6}


def _scaled(value: object) -> float:
    """Enough of "7d" / "25MB" parsing that both libraries call the same Python code."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    return float(digits) * _UNITS.get(text[len(digits) :], 1)


def msgspec_loader() -> Any:
    import msgspec

    class Duration(float):
        pass

    class Size(int):
        pass

    def dec_hook(kind: type, value: object) -> object:
        if kind is Duration:
            return Duration(_scaled(value))
        if kind is Size:
            return Size(int(_scaled(value)))
        raise NotImplementedError

    simple = {"str": str, "int": int, "float": float, "bool": bool, "list": list[str],
              "pairs": list[tuple[str, str]], "duration": Duration, "size": Size}  # fmt: skip
    sections = []
    for section, keys in FIELDS.items():
        items = []
        for key, (kind, default) in keys.items():
            kind_type = Literal[kind] if isinstance(kind, tuple) else simple[kind]
            value = msgspec.field(default_factory=list) if default == [] else default
            items.append((key, kind_type, value))
        struct = msgspec.defstruct(section, items, forbid_unknown_fields=True, frozen=True)
        sections.append((section, struct, msgspec.field(default_factory=struct)))
    config = msgspec.defstruct("Config", sections, forbid_unknown_fields=True, frozen=True)
    return lambda document: msgspec.convert(document, config, dec_hook=dec_hook)


def pydantic_loader() -> Any:
    from typing import Annotated

    import pydantic

    duration = Annotated[float, pydantic.BeforeValidator(_scaled)]
    size = Annotated[int, pydantic.BeforeValidator(lambda value: int(_scaled(value)))]
    simple = {"str": str, "int": int, "float": float, "bool": bool, "list": list[str],
              "pairs": list[list[str]], "duration": duration, "size": size}  # fmt: skip
    strict = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)
    sections: dict[str, Any] = {}
    for section, keys in FIELDS.items():
        items: dict[str, Any] = {}
        for key, (kind, default) in keys.items():
            kind_type = Literal[kind] if isinstance(kind, tuple) else simple[kind]
            items[key] = (
                kind_type,
                pydantic.Field(default_factory=list) if default == [] else default,
            )
        model = pydantic.create_model(section, __config__=strict, **items)
        sections[section] = (model, pydantic.Field(default_factory=model))
    config = pydantic.create_model("Config", __config__=strict, **sections)
    return config.model_validate


LOADERS = {"msgspec": msgspec_loader, "pydantic": pydantic_loader}


def _cold(name: str) -> float:
    """Seconds for import + schema + one load in a fresh interpreter."""
    code = (
        "import time, tomllib; t = time.perf_counter(); "
        "from benchmarks.config_schema import LOADERS, EXAMPLE; "
        f"LOADERS[{name!r}]()(tomllib.loads(EXAMPLE.read_text())); "
        "print(time.perf_counter() - t)"
    )
    root = str(EXAMPLE.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    out.check_returncode()
    return float(out.stdout)


def _import_only(name: str) -> float:
    code = f"import time; t = time.perf_counter(); import {name}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    document = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    print(f"{'library':10} {'version':9} {'import ms':>10} {'cold ms':>8} {'load µs':>8}")
    for name, make in LOADERS.items():
        try:
            module = __import__(name)
        except ImportError:
            print(f"{name:10} not installed")
            continue
        imported = statistics.median(_import_only(name) for _ in range(runs)) * 1e3
        cold = statistics.median(_cold(name) for _ in range(runs)) * 1e3
        load = make()
        load(document)
        count = 2000
        start = time.perf_counter()
        for _ in range(count):
            load(document)
        warm = (time.perf_counter() - start) / count * 1e6
        version = getattr(module, "__version__", "?")
        print(f"{name:10} {version:9} {imported:10.1f} {cold:8.1f} {warm:8.1f}")


if __name__ == "__main__":
    main()
