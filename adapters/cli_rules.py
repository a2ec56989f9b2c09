"""The `rules` commands and `senders import|export` of the `sourceauth` command (docs/rules.md).

adapters/cli.py calls `register(itself)`: the commands are built with its helpers for the
configuration, the engine, errors (exit 2) and output (never imported from here: cli.py
also runs as `python -m`, as a module of another name).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from sourceauth.adapters.config import Config
from sourceauth.adapters.imports import (
    FORMATS,
    RECIPIENT,
    Address,
    BadLine,
    PatternLine,
    read_list,
    write_plain,
)
from sourceauth.engine.logs import get_logger
from sourceauth.engine.rules import ACTIONS, GLOBAL

log = get_logger(__name__)

# The helpers of adapters/cli.py (set by `register`).
h: Any = None


def _rule_dict(r: Any) -> dict[str, Any]:
    return {
        "id": r.rule_id,
        "action": r.action,
        "pattern": r.pattern,
        "scope": r.scope,
        "kind": r.kind,
        "state": r.state,
        "reason": r.reason,
        "actor": r.actor,
        "created_at": h._iso(r.created),
        "updated_at": h._iso(r.updated),
    }


def senders_import(cfg: Config, file: Path, fmt: str, state: str, scope: str, reason: str) -> None:
    """Import a list of senders: addresses are authorized (or blocked), patterns become
    rules. Each bad line is named on stderr; exit 0 when a line was good (imported now or
    already there), 1 when none was."""
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise h.BadInput(f"cannot read {file}: {exc.strerror or exc}") from exc
    action = "allow" if state == "authorized" else "block"
    addresses: list[str] = []
    patterns: list[tuple[str, str, str]] = []
    bad = lines = 0
    for entry in read_list(text, fmt):
        if isinstance(entry, BadLine):
            bad += 1
            click.echo(
                h._printable(f"{file}:{entry.line}: {entry.reason}: {entry.text!r}"), err=True
            )
        elif isinstance(entry, Address):
            addresses.append(entry.address)
        elif isinstance(entry, PatternLine):
            if entry.side == RECIPIENT and state != "authorized":
                bad += 1
                click.echo(
                    h._printable(
                        f"{file}:{entry.line}: recipient lines only import as exempt "
                        f"(--as authorized): {entry.pattern!r}"
                    ),
                    err=True,
                )
                continue
            if entry.side == RECIPIENT:
                patterns.append(("exempt", entry.pattern, GLOBAL))
            else:
                patterns.append((action, entry.pattern, scope))
    lines = len(addresses) + len(patterns)
    if not lines:
        click.echo(f"sourceauth: nothing to import from {file} ({bad} bad lines)", err=True)
        sys.exit(1)
    started = time.perf_counter()
    # A bar on a terminal (quiet otherwise), counting the addresses handled.
    with h.progress("imported", len(addresses), unit="senders") as ticker, h.engine_for(cfg) as app:
        result = app.import_senders(
            addresses,
            patterns,
            state=state,
            scope=scope,
            actor="import",
            reason=reason or f"import {fmt} {file.name}",
            progress=ticker,
        )
    took = time.perf_counter() - started
    log.info(
        "senders_imported",
        format=fmt,
        state=state,
        scope=scope,
        lines=lines,
        senders=result.senders,
        rules=result.rules,
        unchanged=result.unchanged,
        bad=bad,
    )
    click.echo(
        f"imported {result.senders} senders as {state} and {result.rules} rules "
        f"({result.unchanged} already in place, {bad} bad lines) in {took:.2f}s"
    )


def senders_export(cfg: Config, fmt: str, state: str, scope: str) -> None:
    """Print the senders in STATE of SCOPE and the matching rules, in the plain format
    (`senders import --format plain` reads it back)."""
    action = "allow" if state == "authorized" else "block"
    with h.engine_for(cfg) as app:
        addresses = sorted(v.address for v in app.whitelist(state=state) if v.scope == scope)
        patterns = sorted(r.pattern for r in app.rules() if r.action == action and r.scope == scope)
    header = f"sourceauth senders export: {state} senders and {action} rules of scope {scope}"
    for line in write_plain(addresses, patterns, header):
        click.echo(h._printable(line))


def register(module: Any) -> None:
    """Add these commands to `module.cli` (the `sourceauth` group) and `module.senders`."""
    global h
    h = module
    with_config = module.with_config
    read_only = module.read_only

    @module.cli.group()
    def rules() -> None:
        """Operator rules: allow, block or discard senders, protect or exempt recipients, by
        exact address, domain, wildcard or regex (docs/rules.md)."""

    @rules.command("add")
    @click.argument("action", type=click.Choice(ACTIONS))
    @click.argument("pattern")
    @click.option(
        "--scope",
        default=GLOBAL,
        show_default=True,
        help='"global", or a protected mailbox whose mail alone the rule decides (sender rules).',
    )
    @click.option("--reason", default="manual", show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print the rule as a JSON object.")
    @with_config
    def rules_add(
        cfg: Config, action: str, pattern: str, scope: str, reason: str, as_json: bool
    ) -> None:
        """Add a rule. PATTERN: an address, *@domain (or @domain), a wildcard with * and ?,
        or re:REGEX (matched against the whole address)."""
        with h.engine_for(cfg) as app:
            found, added = app.add_rules(
                [(action, pattern, scope)], actor="operator", reason=reason
            )
        row = _rule_dict(found[0])
        if as_json:
            click.echo(h._json(row))
            return
        what = "added" if added else "already active"
        click.echo(
            h._printable(f"{row['id']}: {row['action']} {row['pattern']} ({row['scope']}) {what}")
        )

    @rules.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
    @click.option("--all", "include_removed", is_flag=True, help="Removed rules too.")
    @with_config
    @read_only
    def rules_list(cfg: Config, as_json: bool, include_removed: bool) -> None:
        """List the rules, oldest first."""
        with h.engine_for(cfg) as app:
            rows = [_rule_dict(r) for r in app.rules(include_removed=include_removed)]
        columns = ["id", "action", "pattern", "scope", "state", "actor", "reason", "created_at"]
        h._emit(rows, as_json, columns)

    @rules.command("remove")
    @click.argument("rule_id", metavar="ID")
    @click.option("--reason", default="manual", show_default=True)
    @with_config
    def rules_remove(cfg: Config, rule_id: str, reason: str) -> None:
        """Remove a rule (ID, or a unique prefix of 4+ hex digits). It stays in the log."""
        with h.engine_for(cfg) as app:
            found = app.remove_rule(h._resolve(app, rule_id), actor="operator", reason=reason)
        click.echo(h._printable(f"{found.rule_id}: {found.action} {found.pattern} removed"))

    @module.senders.command("import")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--format", "fmt", type=click.Choice(FORMATS), default="plain", show_default=True)
    @click.option(
        "--as",
        "state",
        type=click.Choice(["authorized", "blocked"]),
        default="authorized",
        show_default=True,
        help="What the listed senders become (patterns: allow or block rules).",
    )
    @click.option("--scope", default=GLOBAL, show_default=True)
    @click.option("--reason", default="", help="Recorded with every verdict (default: the file).")
    @with_config
    def import_command(
        cfg: Config, file: Path, fmt: str, state: str, scope: str, reason: str
    ) -> None:
        """Import a sender list (plain, tmda, ask or postconfirm; docs/rules.md). Bad lines
        are named on stderr and skipped; importing the same file again records nothing.
        Exit 0 when a line was good, 1 when none was."""
        senders_import(cfg, file, fmt, state, scope, reason)

    @module.senders.command("export")
    @click.option("--format", "fmt", type=click.Choice(["plain"]), default="plain")
    @click.option("--state", type=click.Choice(["authorized", "blocked"]), default="authorized")
    @click.option("--scope", default=GLOBAL, show_default=True)
    @with_config
    @read_only
    def export_command(cfg: Config, fmt: str, state: str, scope: str) -> None:
        """Print senders and their rules as a plain list (one per line)."""
        senders_export(cfg, fmt, state, scope)
