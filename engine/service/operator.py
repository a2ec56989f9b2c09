"""The operator's verbs: authorize, block or forget a sender; release or discard one held
message. Each loads, calls one verb, and saves in one unit of work."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from sourceauth.engine.addresses import AddressError, normalize_address
from sourceauth.engine.api import HeldMessage, SenderView
from sourceauth.engine.errors import InvalidInput, NotFound
from sourceauth.engine.message import HELD_STATES, Message
from sourceauth.engine.policy import is_protected
from sourceauth.engine.sender import Sender
from sourceauth.engine.service import replies
from sourceauth.engine.service.context import Context, Unit, ts
from sourceauth.engine.service.queries import sender_view
from sourceauth.engine.service.routing import scope_for


def _address_and_scope(address: str, scope: str) -> tuple[str, str]:
    try:
        addr = normalize_address(address)
    except AddressError as exc:
        raise InvalidInput(f"bad address {address!r}: {exc}") from exc
    if scope != "global":
        try:
            scope = normalize_address(scope)
        except AddressError as exc:
            raise InvalidInput(f"bad scope {scope!r}: {exc}") from exc
    return addr, scope


def _verdict_scope(ctx: Context, address: str, scope: str) -> tuple[str, str]:
    """The address and a scope the policy has: "global", or a protected mailbox with a
    whitelist of its own (scope "recipient"); anything else is refused, naming why."""
    addr, scope = _address_and_scope(address, scope)
    if scope == "global":
        return addr, scope
    s = ctx.settings
    if not is_protected(scope, s.protected, s.recipient_delimiter):
        raise InvalidInput(f"scope {scope} is not a protected mailbox (policy.protected)")
    mailbox = scope_for(scope, s)
    if mailbox == "global":
        raise InvalidInput(
            f"scope {scope}: its mailbox uses the global whitelist (policy scope "
            '"global"): use --scope global'
        )
    return addr, mailbox


def _load_or_first(
    ctx: Context, unit: Unit, trigger: str, addr: str, scope: str, actor: str, reason: str
) -> tuple[Sender, bool]:
    """The sender, or a new one created by this verdict (True when just created)."""
    sid = ctx.sender_id(addr, scope)
    sender = ctx.load_sender(unit, sid)
    if sender is not None:
        return sender, False
    created = Sender.first_verdict(
        sid,
        trigger=trigger,
        address=addr,
        scope=scope,
        timestamp=ts(ctx.clock()),
        actor=actor,
        reason=reason,
    )
    return created, True


def verdict(
    ctx: Context, unit: Unit, trigger: str, addr: str, scope: str, actor: str, reason: str
) -> Sender:
    """`authorize` or `block` one sender in this unit of work: authorizing releases its held
    mail, blocking discards it (both also what `senders import` records per sender)."""
    now = ctx.clock()
    sender, created = _load_or_first(ctx, unit, trigger, addr, scope, actor, reason)
    if not created:
        getattr(sender, trigger)(timestamp=ts(now), actor=actor, reason=reason)
    unit.senders[sender.id] = sender
    if created and sender.id in unit.absent:
        # A bulk import vouched that the views know no such sender: copies held linked to
        # it are left to maintenance (it releases those of authorized senders).
        return sender
    if trigger == "authorize":
        replies.release_held(ctx, unit, sender, f"sender_authorized_by:{actor}", now)
    else:
        for msg in ctx.held_of(unit, sender.id.hex, HELD_STATES):
            msg.discard(timestamp=ts(now), actor=actor, reason="sender_blocked")
    return sender


def authorize(ctx: Context, address: str, scope: str, actor: str, reason: str) -> SenderView:
    addr, scope = _verdict_scope(ctx, address, scope)

    def work(unit: Unit) -> SenderView:
        sender = verdict(ctx, unit, "authorize", addr, scope, actor, reason)
        unit.note("sender_authorized", sender=addr, scope=scope, actor=actor, reason=reason)
        return sender_view(sender)

    return ctx.run("authorize", work)


def block(ctx: Context, address: str, scope: str, actor: str, reason: str) -> SenderView:
    addr, scope = _verdict_scope(ctx, address, scope)

    def work(unit: Unit) -> SenderView:
        sender = verdict(ctx, unit, "block", addr, scope, actor, reason)
        unit.note("sender_blocked", sender=addr, scope=scope, actor=actor, reason=reason)
        return sender_view(sender)

    return ctx.run("block", work)


def forget(ctx: Context, address: str, scope: str, actor: str, reason: str) -> SenderView:
    addr, scope = _address_and_scope(address, scope)

    def work(unit: Unit) -> SenderView:
        sender = ctx.load_sender(unit, ctx.sender_id(addr, scope))
        if sender is None:
            raise NotFound(f"no sender {addr} in scope {scope}")
        sender.forget(timestamp=ts(ctx.clock()), actor=actor, reason=reason)
        unit.senders[sender.id] = sender
        unit.note("sender_forgotten", sender=addr, scope=scope, actor=actor, reason=reason)
        return sender_view(sender)

    return ctx.run("forget", work)


def _message_id(message_id: str) -> UUID:
    try:
        return UUID(message_id)
    except ValueError as exc:
        raise InvalidInput(f"bad message id {message_id!r}") from exc


def _load(ctx: Context, message_id: str, mid: UUID) -> Message:
    msg = ctx.load_message(mid)
    if msg is None:
        raise NotFound(f"no message {message_id}")
    return msg


def _quarantine_row(ctx: Context, message_id: str, mid: UUID) -> HeldMessage:
    with ctx.lock:
        ctx.catch_up()
        view = ctx.views.held_message(mid.hex)
    if view is None:
        raise NotFound(f"message {message_id} is not in the quarantine")
    return view


def _message_verb(
    ctx: Context,
    message_id: str,
    what: str,
    verb: Callable[[Unit, Message, datetime], None],
) -> HeldMessage:
    mid = _message_id(message_id)

    def work(unit: Unit) -> None:
        msg = _load(ctx, message_id, mid)
        verb(unit, msg, ts(ctx.clock()))
        unit.messages.append(msg)

    ctx.run(what, work)
    return _quarantine_row(ctx, message_id, mid)


def release(ctx: Context, message_id: str, actor: str, reason: str) -> HeldMessage:
    def verb(unit: Unit, msg: Message, now: datetime) -> None:
        msg.release(timestamp=now, actor=actor, reason=reason)
        unit.note("message_released", message_id=msg.id.hex, actor=actor, reason=reason)

    return _message_verb(ctx, message_id, "release", verb)


def discard(ctx: Context, message_id: str, actor: str, reason: str) -> HeldMessage:
    def verb(unit: Unit, msg: Message, now: datetime) -> None:
        msg.discard(timestamp=now, actor=actor, reason=reason)
        unit.note("message_discarded", message_id=msg.id.hex, actor=actor, reason=reason)

    return _message_verb(ctx, message_id, "discard", verb)
