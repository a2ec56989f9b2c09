"""Read-only use cases: the whitelist, the quarantine, one sender, a history, and whether a
recipient's quarantine is full. They read the views (caught up first) or the log."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sourceauth.engine import audit
from sourceauth.engine.addresses import AddressError, is_null_sender, normalize_address
from sourceauth.engine.api import HeldMessage, HistoryEntry, SenderView, StateAt
from sourceauth.engine.errors import InvalidInput, NotFound
from sourceauth.engine.ports import BlobNotFound
from sourceauth.engine.sender import Sender
from sourceauth.engine.service.context import Context, Unit
from sourceauth.engine.service.routing import (
    AUTHORIZED,
    BLOCKED,
    plan_envelope,
    protected_by,
    scope_for,
)
from sourceauth.engine.service.rules import book
from sourceauth.engine.statemachine import SENDER

PAGE = 5000  # events read per query while replaying the whole log
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
    ctx: Context,
    state: str | None,
    sender: str | None,
    limit: int | None,
    *,
    states: Collection[str] | None = None,
    recipient: str | None = None,
    offset: int = 0,
) -> list[HeldMessage]:
    try:
        rcpt = normalize_address(recipient) if recipient else None
        from_ = normalize_address(sender) if sender else None
    except AddressError as exc:
        raise InvalidInput(f"not an address: {exc}") from exc
    with ctx.lock:
        ctx.catch_up()
        return ctx.views.quarantine(
            state=state,
            sender=from_,
            limit=limit,
            states=states,
            recipient=rcpt,
            offset=offset,
        )


def held_message(ctx: Context, message_id: str) -> HeldMessage:
    with ctx.lock:
        ctx.catch_up()
        found = ctx.views.held_message(message_id.replace("-", ""))
    if found is None:
        raise NotFound(f"no held message {message_id}")
    return found


def original(ctx: Context, message_id: str) -> bytes:
    """The original bytes of a held (or once held) copy, as they were accepted."""
    held = held_message(ctx, message_id)
    if ctx.blobs is None:
        raise NotFound("no blob store is configured")
    try:
        return ctx.blobs.get(held.receipt_id)
    except BlobNotFound:
        raise NotFound(f"the original of {held.id} is gone ({held.state}: {held.reason})") from None


def refresh_full_mailboxes(ctx: Context) -> None:
    ctx.full_mailboxes = ctx.views.recipients_holding(ctx.settings.held_per_recipient)


def mailbox_may_be_full(ctx: Context, recipient: str) -> bool:
    if not ctx.full_mailboxes:
        return False
    try:
        return normalize_address(recipient) in ctx.full_mailboxes
    except AddressError:
        return False


def may_be_challenged(ctx: Context, mail_from: str, recipients: Sequence[str]) -> bool:
    """Memory only, safe on an event loop: False when this envelope cannot draw a challenge
    (null sender, no protected recipient, or a sender cached as authorized or blocked in
    every scope it reaches); True means "perhaps" (the engine decides on the commit path)."""
    try:
        # The rules as last compiled (memory only; a hint, decided again on the commit path).
        found = plan_envelope(mail_from, recipients, ctx.settings, ctx.rule_cache.book)
    except AddressError:
        return False
    return any(
        ctx.cached_state(ctx.sender_id(found.sender, scope)) not in (AUTHORIZED, BLOCKED)
        for scope in found.scopes
    )


def quarantine_full(ctx: Context, mail_from: str, recipient: str) -> bool:
    s = ctx.settings
    try:
        rcpt = normalize_address(recipient)
    except AddressError:
        return False
    # protected as routing sees it: a protect or exempt rule first, else [policy] protected
    if not protected_by(book(ctx).recipient_rule(rcpt, s.recipient_delimiter), rcpt, s):
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


def aggregate_ids(ctx: Context, subject: str) -> list[UUID]:
    """The aggregates a subject names: one id (32 hex digits; dashes allowed), or an address:
    its sender in every scope and every copy held from it."""
    try:
        return [UUID(subject)]
    except ValueError:
        pass
    try:
        addr = normalize_address(subject)
    except AddressError as exc:
        raise InvalidInput(f"not an address or an id: {subject!r}") from exc
    ids: list[UUID] = []
    with ctx.lock:
        ctx.catch_up()
        rows = ctx.views.senders(address=addr)
        for scope in sorted({r.scope for r in rows} | {"global"}):
            ids.append(ctx.sender_id(addr, scope))
        for held in ctx.views.quarantine(sender=addr):
            ids.append(UUID(held.id))
    return ids


def history(ctx: Context, subject: str) -> list[HistoryEntry]:
    """Every recorded event about an address (its senders, their held mail) or an id, each
    with the transition of specs/ it took, its actor and its reason."""
    entries: list[HistoryEntry] = []
    for aid in aggregate_ids(ctx, subject):
        for step in audit.steps(ctx.app.events.get(aid)):
            event = step.event
            fields = {k: v for k, v in vars(event).items() if k not in _COMMON}
            trigger = getattr(type(event), "trigger", "")
            if trigger:
                fields["trigger"] = trigger  # the spec trigger the event took
            entries.append(
                HistoryEntry(
                    aggregate=audit.kind_of(event),
                    aggregate_id=aid.hex,
                    version=event.originator_version,
                    timestamp=getattr(event, "timestamp").isoformat(),  # noqa: B009
                    event=type(event).__qualname__,
                    fields=fields,
                    from_state=step.source,
                    to_state=step.dest,
                    actor=audit.actor_of(event),
                    reason=audit.reason_of(event),
                )
            )
    entries.sort(key=lambda e: (e.timestamp, e.aggregate_id, e.version))
    return entries


def _whole_log(ctx: Context) -> Iterator[Any]:
    """Every event of the log in commit order, a page at a time (constant memory)."""
    start = 1
    while True:
        page = ctx.app.recorder.select_notifications(start, PAGE)
        if not page:
            return
        for notification in page:
            yield ctx.app.mapper.to_domain_event(notification)
        start = page[-1].id + 1


def state_at(ctx: Context, at: datetime, subject: str | None) -> StateAt:
    """Senders and message copies as they stood at `at`, by replaying the log up to it: every
    sender and every copy that was ever held, or only what `subject` names."""
    replay = audit.Replay(keep_delivered_at_once=bool(subject))
    events: Iterator[Any] = (
        (e for aid in aggregate_ids(ctx, subject) for e in ctx.app.events.get(aid))
        if subject
        else _whole_log(ctx)
    )
    for event in events:
        if event.timestamp <= at:
            replay.apply(event)
    senders = sorted(replay.senders.values(), key=lambda r: (r["address"], r["scope"]))
    messages = sorted(replay.messages.values(), key=lambda r: (r["received"], r["id"]))
    return StateAt(at=at.isoformat(), senders=senders, messages=messages)


def explain(ctx: Context, message_id: str) -> str:
    """One paragraph on a message copy, from its events and its sender's."""
    try:
        mid = UUID(message_id)
    except ValueError as exc:
        raise InvalidInput(f"bad message id {message_id!r}") from exc
    events: list[Any] = list(ctx.app.events.get(mid))
    if not events or audit.kind_of(events[0]) != "message":
        raise NotFound(f"no message {mid.hex}")
    sid = events[0].sender_id
    sender_events: Any = ctx.app.events.get(UUID(sid)) if sid else []
    return audit.explain(events, sender_events)
