"""The `sourceauth` command: a thin driving adapter over the engine's library API.

Bad input exits 2 with a one-line message; `audit verify` exits 1 naming the first fault.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from sourceauth.adapters.config import Config, ConfigError, load_config
from sourceauth.adapters.progress import on_terminal, progress, quiet
from sourceauth.engine.errors import IllegalTransition, InvalidInput, NotFound, SourceAuthError
from sourceauth.engine.statemachine import MACHINES, MESSAGE, SENDER

F = TypeVar("F", bound=Callable[..., Any])


class BadInput(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(_printable(f"sourceauth: error: {self.format_message()}"), err=True)


# What a terminal may act on: C0/C1 controls (escape sequences, CR, LF), DEL, line and
# paragraph separators, and the bidi controls that reorder what is shown.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _printable(value: object, *, rendered_json: bool = False) -> str:
    """Text safe to print: every character a terminal could act on becomes a \\uXXXX escape.

    Mail supplies subjects, addresses and reasons, so an escape sequence or an encoded CRLF in a
    Subject must never retitle the terminal or forge a table row. `rendered_json`: the text is
    json.dumps output, whose own line breaks are layout and whose strings escape C0 already.
    """
    pattern = _UNSAFE_IN_JSON if rendered_json else _UNSAFE
    return pattern.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))


def _json(value: Any, **options: Any) -> str:
    return _printable(json.dumps(value, ensure_ascii=False, **options), rendered_json=True)


class Unavailable(click.ClickException):
    """The store cannot be reached: one line, exit 1 (not the operator's input)."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"sourceauth: error: {self.format_message()}", err=True)


def _iso(seconds: float) -> str | None:
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def read_only(func: F) -> F:
    """A command that only reads: on a data directory without a store it says so and exits 2,
    creating nothing (no database, no secret, no directory). Put it under @with_config."""

    @functools.wraps(func)
    def wrapper(cfg: Config, *args: Any, **kwargs: Any) -> Any:
        from sourceauth.adapters.runtime import storage_of
        from sourceauth.adapters.storage.figures import StoreMissing, require_store

        try:
            require_store(storage_of(cfg))
        except ConfigError as exc:
            raise BadInput(str(exc)) from exc
        except StoreMissing as exc:
            if exc.__cause__ is None:  # (a store it cannot reach: opening it says why, exit 1)
                raise BadInput(str(exc)) from exc
        return func(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def with_config(func: F) -> F:
    """Every command takes --config (default ./sourceauth.toml, else built-in defaults)."""

    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="TOML configuration file (default: ./sourceauth.toml, else built-in defaults).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, config_path: Path | None, **kwargs: Any) -> Any:
        from sourceauth.adapters.runtime import configure_logging

        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            raise BadInput(str(exc)) from exc
        # Every command logs as [logging] says, to stderr: stdout is the command's output.
        configure_logging(cfg.logging.format, cfg.logging.level)
        return func(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def engine_for(cfg: Config, *, transports: bool = False) -> Iterator[Any]:
    from sourceauth.adapters.runtime import build_engine
    from sourceauth.adapters.storage.wiring import StorageUnreachable

    try:
        app = build_engine(cfg, transports=transports)
    except ConfigError as exc:
        raise BadInput(str(exc)) from exc
    except StorageUnreachable as exc:
        raise Unavailable(str(exc)) from exc
    try:
        yield app
    except (InvalidInput, NotFound, IllegalTransition) as exc:
        raise BadInput(str(exc)) from exc
    except SourceAuthError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()


def _emit(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(_json(rows, indent=2))
        return
    if not rows:
        click.echo("(none)")
        return
    cells = [{c: _printable("" if r.get(c) is None else r[c]) for c in columns} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in cells:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in columns))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sourceauth")
def cli() -> None:
    """sourceauth: challenge-response source authentication for mail servers."""


# ---------------------------------------------------------------------------- serve / maintain


@cli.command()
@with_config
def serve(cfg: Config) -> None:
    """Run the filter: inbound SMTP, challenge sender, delivery worker, maintenance timer."""
    from sourceauth.adapters.runtime import serve as run
    from sourceauth.adapters.storage.wiring import StorageUnreachable

    try:
        code = run(cfg)
    except ConfigError as exc:
        raise BadInput(str(exc)) from exc
    except StorageUnreachable as exc:
        raise Unavailable(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {cfg.server.listen}: {exc}") from exc
    sys.exit(code)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show what a pass would lapse, expire, release, purge, challenge and retry; "
    "record nothing, send nothing.",
)
@with_config
def maintain(cfg: Config, as_json: bool, dry_run: bool) -> None:
    """Run one maintenance pass: expire, release, purge, collect, retry sends and deliveries."""
    from sourceauth.adapters.status import run_maintenance

    if dry_run:
        _existing_store(cfg, code=2)
        with engine_for(cfg) as app:
            plan = app.maintain_dry_run().as_dict()
        _show_plan(plan, as_json)
        return
    with engine_for(cfg, transports=True) as app:
        report = run_maintenance(app, cfg).as_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in report.items()))


def _show_plan(plan: dict[str, list[dict[str, Any]]], as_json: bool) -> None:
    if as_json:
        click.echo(_json(plan, indent=2))
        return
    click.echo("dry run: nothing was recorded")
    for action, items in plan.items():
        click.echo(f"{action}: {len(items)}")
        for item in items:
            to = f" -> {', '.join(item['recipients'])}" if item["recipients"] else ""
            click.echo(_printable(f"  {item['id']}  {item['address']}{to}  {item['reason']}"))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@with_config
def status(cfg: Config, as_json: bool) -> None:
    """Held mail, pending challenges, the delivery queue, recent failures, the last maintenance
    run, store size and version. Exits 2, creating nothing, where there is no store."""
    import time

    from sourceauth.adapters.status import render, status_report

    storage = _existing_store(cfg, code=2)
    with engine_for(cfg) as app:
        report = status_report(cfg, storage, app, time.time())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo("\n".join(render(report)))


def _existing_store(cfg: Config, code: int = 1) -> Any:
    """The configured storage, or exit `code` (creating nothing) when there is no store there."""
    from sourceauth.adapters.runtime import storage_of
    from sourceauth.adapters.storage.figures import StoreMissing, require_store

    storage = storage_of(cfg)
    try:
        require_store(storage)
    except StoreMissing as exc:
        click.echo(f"sourceauth: error: {exc}", err=True)
        sys.exit(code)
    secret = cfg.challenge.secret_file
    if cfg.challenge.secret_env not in os.environ and secret is not None and not secret.exists():
        click.echo(
            f"sourceauth: error: the store has no secret file at {secret} (tokens and sender "
            "ids depend on it): restore it from the backup, or set "
            f"{cfg.challenge.secret_env}",
            err=True,
        )
        sys.exit(1)
    return storage


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@with_config
def backup(cfg: Config, file: Path) -> None:
    """Write a consistent copy of the SQLite store and its keyring to FILE (a new file), while
    `serve` runs. FILE is as secret as the keyring. On PostgreSQL use pg_dump."""
    from sourceauth.adapters.backup import BackupError
    from sourceauth.adapters.backup import backup as take

    storage = _existing_store(cfg)
    try:
        summary = take(cfg, storage, file, os.environ)
    except BackupError as exc:
        raise BadInput(str(exc)) from exc
    click.echo(f"backup written: {summary.line()}")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--force", is_flag=True, help="Replace an existing store and secret file (kept beside them)."
)
@with_config
def restore(cfg: Config, file: Path, force: bool) -> None:
    """Put the backup FILE in place of the configured store and secret file (stop `serve` first).
    An existing store is replaced only with --force."""
    from sourceauth.adapters.backup import BackupError
    from sourceauth.adapters.backup import restore as put_back
    from sourceauth.adapters.runtime import storage_of

    try:
        summary = put_back(cfg, storage_of(cfg), file, force=force, environ=os.environ)
    except BackupError as exc:
        raise BadInput(str(exc)) from exc
    click.echo(
        f"restored {summary.events} events into {summary.store} "
        f"(backup of {_iso(summary.taken_at)}, sourceauth {summary.backup_version})"
    )


# ---------------------------------------------------------------------------- senders


@cli.group()
def senders() -> None:
    """The whitelist: list, allow, block or forget senders."""


def _sender_dict(v: Any) -> dict[str, Any]:
    return {
        "address": v.address,
        "state": v.state,
        "scope": v.scope,
        "since": _iso(v.since),
        "via": v.via,
        "reason": v.reason,
        "id": v.sender_id,
    }


@senders.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--state", type=click.Choice(list(SENDER.states)))
@click.option("--limit", type=click.IntRange(min=1), default=None)
@with_config
@read_only
def senders_list(cfg: Config, as_json: bool, state: str | None, limit: int | None) -> None:
    """List known senders and their state."""
    with engine_for(cfg) as app:
        rows = [_sender_dict(v) for v in app.whitelist(state=state, limit=limit)]
    _emit(rows, as_json, ["address", "state", "scope", "since", "via"])


def _sender_command(verb: str, doc: str) -> None:
    @senders.command(verb, help=doc)
    @click.argument("address")
    @click.option(
        "--scope", default="global", show_default=True, help='"global" or a protected mailbox.'
    )
    @click.option("--reason", default="manual", show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    @with_config
    def command(cfg: Config, address: str, scope: str, reason: str, as_json: bool) -> None:
        method = {"allow": "authorize", "block": "block", "forget": "forget"}[verb]
        with engine_for(cfg) as app:
            view = getattr(app, method)(address, scope=scope, actor="operator", reason=reason)
        row = _sender_dict(view)
        click.echo(
            _json(row)
            if as_json
            else _printable(f"{row['address']} ({row['scope']}): {row['state']}")
        )


_sender_command("allow", "Put a sender on the whitelist and release its held mail.")
_sender_command(
    "block", "Block a sender: its held mail is discarded, nothing is ever delivered or challenged."
)
_sender_command("forget", "Forget a sender: its next message is challenged again.")


# ---------------------------------------------------------------------------- quarantine


@cli.group()
def quarantine() -> None:
    """Held messages: list, show, release or discard."""


PAGE_SIZE = 50  # quarantine list rows per page, unless --limit


def _held_dict(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "sender": m.sender,
        "recipients": list(m.recipients),
        "recipient": ", ".join(m.recipients),
        "subject": m.subject,
        "size": m.size,
        "received": _iso(m.received),
        "expires": _iso(m.expires),
        "state": m.state,
        "reason": m.reason,
    }


@quarantine.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--all", "every", is_flag=True, help="Every state, not only what is still held.")
@click.option(
    "--state",
    type=click.Choice([s for s in MESSAGE.states if s != MESSAGE.initial]),
    help="Only copies in this state.",
)
@click.option("--sender", default=None, help="Only mail from this address.")
@click.option("--recipient", default=None, help="Only mail for this address.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help=f"Rows per page (default {PAGE_SIZE}; with --json, every row unless given).",
)
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True)
@with_config
@read_only
def quarantine_list(
    cfg: Config,
    as_json: bool,
    every: bool,
    state: str | None,
    sender: str | None,
    recipient: str | None,
    limit: int | None,
    page: int,
) -> None:
    """List what is still held (--all: every state), oldest first, a page at a time."""
    from sourceauth.engine.message import HELD_STATES

    if limit is None and (page > 1 or not as_json):
        limit = PAGE_SIZE
    offset = (page - 1) * limit if limit else 0
    states = None if every or state else HELD_STATES
    with engine_for(cfg) as app:
        found = app.quarantine(
            state=state,
            states=states,
            sender=sender,
            recipient=recipient,
            limit=None if limit is None else limit + 1,  # one more: are there more?
            offset=offset,
        )
    more = limit is not None and len(found) > limit
    rows = [_held_dict(m) for m in found[:limit]]
    _emit(rows, as_json, ["id", "recipient", "sender", "state", "subject", "received"])
    if more:
        note = f"more: showing {offset + 1}-{offset + len(rows)}; next page: --page {page + 1}"
        click.echo(note, err=as_json)


@quarantine.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True)
@click.option("--headers", is_flag=True, help="Show the original's header section.")
@click.option("--raw", is_flag=True, help="Write the original's bytes to stdout, as accepted.")
@with_config
@read_only
def quarantine_show(cfg: Config, message_id: str, as_json: bool, headers: bool, raw: bool) -> None:
    """Show one held message and its history; or its original (--headers, --raw)."""
    if headers and raw:
        raise BadInput("--headers and --raw: choose one")
    original = b""
    with engine_for(cfg) as app:
        row = _held_dict(app.held_message(_resolve(app, message_id)))
        if headers or raw:
            original = app.original(row["id"])
        else:
            row["history"] = [asdict(h) for h in app.history(row["id"])]
    if raw:
        sys.stdout.buffer.write(original)
        sys.stdout.buffer.flush()
        return
    if headers:
        head = re.split(rb"\r?\n\r?\n", original, maxsplit=1)[0]
        for line in head.decode("utf-8", errors="replace").splitlines():
            click.echo(_printable(line))
        return
    if as_json:
        click.echo(_json(row, indent=2, default=str))
        return
    for key in (
        "id",
        "sender",
        "recipients",
        "subject",
        "size",
        "received",
        "expires",
        "state",
        "reason",
    ):
        click.echo(f"{key:>10}: {_printable(row[key])}")
    for h in row["history"]:
        click.echo(_printable(f"  {h['timestamp']}  {h['event']}  {h['fields'].get('reason', '')}"))


def _message_command(verb: str, doc: str) -> None:
    @quarantine.command(verb, help=doc)
    @click.argument("message_id")
    @click.option("--reason", default="manual", show_default=True)
    @with_config
    def command(cfg: Config, message_id: str, reason: str) -> None:
        with engine_for(cfg, transports=verb == "release") as app:
            view = getattr(app, verb)(_resolve(app, message_id), actor="operator", reason=reason)
            if verb == "release":
                app.dispatch_deliveries()
                view = app.held_message(view.id)
        click.echo(_printable(f"{view.id}: {view.state}"))


_message_command("release", "Release a held message to its recipients now.")
_message_command(
    "discard", "Discard a held message (recorded; its original is removed at maintenance)."
)


@quarantine.command("link")
@click.argument("recipient")
@click.option("--ttl", default=None, help="How long the link works (default: [web] review_ttl).")
@with_config
def quarantine_link(cfg: Config, recipient: str, ttl: str | None) -> None:
    """Print a signed, expiring URL that shows RECIPIENT's held mail (and only theirs)."""
    from sourceauth.adapters.config.values import parse_duration
    from sourceauth.engine.addresses import AddressError, normalize_address
    from sourceauth.engine.tokens import sign_review_link

    if not cfg.web.url:
        raise BadInput("the web pages are off: set [web] listen (and base_url) first")
    try:
        address = normalize_address(recipient)
        seconds = cfg.web.review_ttl if ttl is None else parse_duration(ttl, "--ttl")
    except (AddressError, ValueError) as exc:
        raise BadInput(str(exc)) from exc
    _existing_store(cfg, code=2)  # read-only: never create a store or a secret to sign with
    with engine_for(cfg) as app:
        link = sign_review_link(app.keyring, address, int(app.clock() + seconds))
    click.echo(f"{cfg.web.url}/review/{link}")


# ---------------------------------------------------------------------------- audit


@cli.group()
def audit() -> None:
    """Read the event log: history, explain, state at a moment, seal, verify, export."""


def _resolve(app: Any, text: str) -> str:
    """An id argument as 32 hex digits (a unique prefix of 4+ digits is enough)."""
    from sourceauth.adapters.storage.audit import resolve_id

    return resolve_id(app, text)


def _short_time(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ")


def _moment(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadInput(f"--at/--since/--until: not an ISO 8601 time: {text!r}") from exc
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # a time without zone is UTC


@audit.command("history")
@click.argument("subject", metavar="ADDRESS|ID")
@click.option("--json", "as_json", is_flag=True)
@with_config
@read_only
def audit_history(cfg: Config, subject: str, as_json: bool) -> None:
    """Every event about an ADDRESS (its senders and their held mail) or an ID (a unique
    prefix is enough): time, transition from → to, actor and reason."""
    with engine_for(cfg) as app:
        entries = [asdict(h) for h in app.history(_resolve(app, subject))]
    if as_json:
        click.echo(_json(entries, indent=2, default=str))
        return
    rows = [
        {
            "time": _short_time(e["timestamp"]),
            "kind": e["aggregate"],
            "id": e["aggregate_id"],
            "event": e["event"],
            "transition": f"{e['from_state']} → {e['to_state']}",
            "actor": e["actor"],
            "reason": e["reason"],
        }
        for e in entries
    ]
    _emit(rows, False, ["time", "kind", "id", "event", "transition", "actor", "reason"])


@audit.command("explain")
@click.argument("message_id", metavar="ID")
@with_config
@read_only
def audit_explain(cfg: Config, message_id: str) -> None:
    """One paragraph on a message: received, held, challenged, answered, and how it ended."""
    with engine_for(cfg) as app:
        text = app.explain(_resolve(app, message_id))
    click.echo(_printable(text))


@audit.command("state")
@click.option("--at", "at", required=True, help="ISO 8601 time (UTC when it names no zone).")
@click.argument("subject", metavar="[ADDRESS|ID]", required=False)
@click.option("--json", "as_json", is_flag=True)
@with_config
@read_only
def audit_state(cfg: Config, at: str, subject: str | None, as_json: bool) -> None:
    """Senders and held messages as they stood at a moment, replayed from the log."""
    moment = _moment(at)
    with engine_for(cfg) as app:
        found = app.state_at(moment, _resolve(app, subject) if subject else None)
    if as_json:
        click.echo(_json(asdict(found), indent=2))
        return
    click.echo(f"as of {found.at}")
    click.echo("senders:")
    senders = [{**r, "since": _short_time(r.get("since"))} for r in found.senders]
    _emit(senders, False, ["address", "scope", "state", "since", "actor", "reason"])
    click.echo("messages:")
    messages = [{**r, "since": _short_time(r.get("since"))} for r in found.messages]
    _emit(messages, False, ["id", "sender", "state", "since", "reason"])


@audit.command("seal")
@with_config
@read_only
def audit_seal(cfg: Config) -> None:
    """Print the hash chain's head (position and digest) to keep outside this machine."""
    from sourceauth.adapters.storage.audit import seal

    with engine_for(cfg) as app:
        head = seal(app)
    click.echo(json.dumps(head.as_dict()))


@audit.command("verify")
@click.option(
    "--seal",
    "seal_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A seal printed earlier by 'audit seal': the log must still contain that head.",
)
@with_config
@read_only
def audit_verify(cfg: Config, seal_file: Path | None) -> None:
    """Check the hash chain, every transition and the views. Exit 1 naming the first fault."""
    from sourceauth.adapters.storage.audit import read_seal, verify

    sealed = read_seal(seal_file.read_text(encoding="utf-8")) if seal_file else None
    with engine_for(cfg) as app:
        fault, summary = verify(app, sealed, progress)
    if fault is not None:
        click.echo(_printable(f"FAULT: {fault}"), err=True)
        sys.exit(1)
    click.echo(f"log sound: {summary}")


@audit.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--since", default=None, help="Only events recorded at or after this ISO 8601 time.")
@click.option("--until", default=None, help="Only events recorded before this ISO 8601 time.")
@with_config
@read_only
def audit_export(cfg: Config, output: Path | None, since: str | None, until: str | None) -> None:
    """Write events as JSON Lines, one object per event (to stdout or --output), streaming."""
    from sourceauth.adapters.storage.audit import export_events

    start = _moment(since) if since else None
    end = _moment(until) if until else None
    # A bar only when the lines do not go to the same terminal (`-o FILE`, `> FILE`, a pipe).
    shown = progress if output is not None or not on_terminal(sys.stdout) else quiet
    with engine_for(cfg) as app:
        if output is None:
            n = export_events(app, sys.stdout, since=start, until=end, progress=shown)
        else:
            with output.open("w", encoding="utf-8") as fh:
                n = export_events(app, fh, since=start, until=end, progress=shown)
    click.echo(f"exported {n} events", err=True)


# ---------------------------------------------------------------------------- projections / diagram


@cli.group()
def projections() -> None:
    """The views (whitelist, quarantine, pending challenges, delivery queue)."""


@projections.command("rebuild")
@with_config
def projections_rebuild(cfg: Config) -> None:
    """Drop every view and rebuild it from the event log."""
    import time

    with engine_for(cfg) as app:
        started = time.perf_counter()
        with progress("rebuilding the views", app.recorder.max_notification_id() or 0) as bar:
            with app.exclusive():
                n = app.views.rebuild(bar)
        took = time.perf_counter() - started
    click.echo(f"rebuilt views from {n} events in {took:.2f}s")


# ---------------------------------------------------------------------------- encryption keys


@cli.group()
def encryption() -> None:
    """Encryption at rest: the keys, re-encrypting originals under the current key, retiring."""


def _keys_of(cfg: Config) -> tuple[Any, Any]:
    """The storage and this node's key set; exit 2 when no key is configured."""
    from sourceauth.adapters.runtime import storage_of

    try:
        storage = storage_of(cfg)
    except ConfigError as exc:
        raise BadInput(str(exc)) from exc
    if storage.encryption_keys is None:
        raise BadInput(
            "no encryption key: set [storage] encryption_key_file or SOURCEAUTH_ENCRYPTION_KEY"
        )
    return storage, storage.encryption_keys


def _show_keys(storage: Any, keys: Any, as_json: bool) -> list[Any]:
    from sourceauth.adapters.storage.rotation import usage

    uses = usage(storage, keys)
    _emit(
        [u.as_dict() for u in uses],
        as_json,
        ["key", "current", "first", "held", "events", "originals", "retirable"],
    )
    return uses


@encryption.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_config
@read_only
def encryption_status(cfg: Config, as_json: bool) -> None:
    """Each key: current or not, and how many events and originals it encrypts."""
    storage, keys = _keys_of(cfg)
    with engine_for(cfg):  # refuses a key set that lacks a key the store uses
        _show_keys(storage, keys, as_json)


@encryption.command("rotate")
@click.option("--json", "as_json", is_flag=True, help="Print the keys' use as JSON.")
@with_config
@read_only
def encryption_rotate(cfg: Config, as_json: bool) -> None:
    """Re-encrypt every original under the current key (the first in the key file), then
    show what each key still encrypts. Safe on a live store; run again after a kill."""
    from sourceauth.adapters.storage.rotation import rotate_originals
    from sourceauth.adapters.storage.wiring import open_blobs

    storage, keys = _keys_of(cfg)
    with engine_for(cfg):  # checks the key set and records its new keys in the store
        blobs = open_blobs(storage)
        try:
            with progress("re-encrypting originals", None, unit="originals") as bar:
                n = rotate_originals(blobs, lambda seen, _: bar.update(seen))  # type: ignore[arg-type]
        finally:
            blobs.close()
        uses = _show_keys(storage, keys, as_json)
    old = [u for u in uses if not u.current and u.originals]
    click.echo(f"re-encrypted {n} originals under key {keys.current.id}", err=True)
    if old:
        click.echo(
            "still under older keys: "
            + ", ".join(f"{u.id} ({u.originals} originals)" for u in old)
            + " (written by a node not yet restarted with the new key: run this again)",
            err=True,
        )


@encryption.command("retire")
@click.argument("key_id")
@with_config
@read_only
def encryption_retire(cfg: Config, key_id: str) -> None:
    """Remove a key nothing uses any more from the store's record (then from every node's
    key file); refused while an event or an original is under it."""
    from sourceauth.adapters.storage.rotation import KeyInUse, retire

    storage, keys = _keys_of(cfg)
    with engine_for(cfg):
        try:
            retire(storage, keys, key_id.strip().lower())
        except KeyInUse as exc:
            raise BadInput(str(exc)) from exc
    click.echo(f"retired key {key_id}: remove it from every node's key file")


@cli.command()
@click.option("--machine", type=click.Choice([*MACHINES, "all"]), default="all", show_default=True)
@with_config
def diagram(cfg: Config, machine: str) -> None:
    """Print the state machines from specs/ as Mermaid state diagrams."""
    names = list(MACHINES) if machine == "all" else [machine]
    for name in names:
        click.echo(MACHINES[name].mermaid())
        click.echo()


# `rules` and `senders import|export` live in their own module (it uses the helpers above).
from sourceauth.adapters.cli_rules import register  # noqa: E402

register(sys.modules[__name__])


def main() -> None:
    cli(prog_name="sourceauth")


if __name__ == "__main__":
    main()
