"""Read-only use cases: the whitelist, the quarantine, one sender, a history, and whether a
recipient's quarantine is full. They read the views (caught up first) or the log."""

from __future__ import annotations

from uuid import UUID

from sourceauth.engine.addresses import AddressError, is_null_sender, normalize_address
from sourceauth.engine.api import HeldMessage, HistoryEntry, SenderView
from sourceauth.engine.errors import InvalidInput, NotFound
from sourceauth.engine.policy import is_protected
from sourceauth.engine.sender import Sender
from sourceauth.engine.service.context import Context, Unit
from sourceauth.engine.service.routing import AUTHORIZED, scope_for
from sourceauth.engine.statemachine import SENDER

_COMMON = ("originator_id", "originator_version", "timestamp", "originator_topic")


def sender_view(sender: Sender) -> SenderView:
    return SenderView(
        sender_id=sender.id.hex,
        address=sender.address,
        scope=sender.scope,
        state=sender.state,
        since=sender.since.timestamp() if sender.since else 0.0,
        via=sender.via,
        reason="",
    )


def sender(ctx: Context, address: str, scope: str) -> SenderView:
    try:
        addr = normalize_address(address)
    except AddressError as exc:
        raise InvalidInput(f"bad address {address!r}: {exc}") from exc
    with ctx.lock:
        found = ctx.load_sender(Unit(), ctx.sender_id(addr, scope))
    if found is None:
        return SenderView("", addr, scope, SENDER.initial, 0.0, "", "")
    return sender_view(found)


def whitelist(ctx: Context, state: str | None, limit: int | None) -> list[SenderView]:
    with ctx.lock:
        ctx.catch_up()
        return ctx.views.senders(state=state, limit=limit)


def quarantine(
    ctx: Context, state: str | None, sender: str | None, limit: int | None
) -> list[HeldMessage]:
    with ctx.lock:
        ctx.catch_up()
        return ctx.views.quarantine(state=state, sender=sender, limit=limit)


def held_message(ctx: Context, message_id: str) -> HeldMessage:
    with ctx.lock:
        ctx.catch_up()
        found = ctx.views.held_message(message_id.replace("-", ""))
    if found is None:
        raise NotFound(f"no held message {message_id}")
    return found


def refresh_full_mailboxes(ctx: Context) -> None:
    ctx.full_mailboxes = ctx.views.recipients_holding(ctx.settings.held_per_recipient)


def mailbox_may_be_full(ctx: Context, recipient: str) -> bool:
    if not ctx.full_mailboxes:
        return False
    try:
        return normalize_address(recipient) in ctx.full_mailboxes
    except AddressError:
        return False


def quarantine_full(ctx: Context, mail_from: str, recipient: str) -> bool:
    s = ctx.settings
    try:
        rcpt = normalize_address(recipient)
    except AddressError:
        return False
    if not is_protected(rcpt, s.protected, s.recipient_delimiter):
        return False
    if ctx.views.held_count(rcpt) < s.held_per_recipient:
        return False
    if not is_null_sender(mail_from):  # only near the limit: is this sender let through?
        try:
            found = sender(ctx, mail_from, scope_for(rcpt, s))
        except InvalidInput:
            return False
        if found.state == AUTHORIZED:
            return False
    return True


def history(ctx: Context, subject: str) -> list[HistoryEntry]:
    """Every recorded event about an address (its senders, their held mail) or a message id."""
    ids: list[tuple[str, UUID]] = []
    try:
        ids.append(("message", UUID(subject)))
    except ValueError:
        try:
            addr = normalize_address(subject)
        except AddressError as exc:
            raise InvalidInput(f"not an address or message id: {subject!r}") from exc
        with ctx.lock:
            ctx.catch_up()
            rows = ctx.views.senders(address=addr)
            scopes = {r.scope for r in rows} | {"global"}
            for scope in sorted(scopes):
                ids.append(("sender", ctx.sender_id(addr, scope)))
            for held in ctx.views.quarantine(sender=addr):
                ids.append(("message", UUID(held.id)))
    entries: list[HistoryEntry] = []
    for kind, aid in ids:
        for event in ctx.app.events.get(aid):
            fields = {k: v for k, v in vars(event).items() if k not in _COMMON}
            trigger = getattr(type(event), "trigger", "")
            if trigger:
                fields["trigger"] = trigger  # the spec trigger the event took
            entries.append(
                HistoryEntry(
                    aggregate=kind,
                    aggregate_id=aid.hex,
                    version=event.originator_version,
                    timestamp=getattr(event, "timestamp").isoformat(),  # noqa: B009
                    event=type(event).__qualname__,
                    fields=fields,
                )
            )
    entries.sort(key=lambda e: (e.timestamp, e.aggregate_id, e.version))
    return entries
