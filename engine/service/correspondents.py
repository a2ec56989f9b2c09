"""Correspondents: mail a protected local user sent out on a path the operator marks as
authenticated is queued for its next hop, and its recipients become authorized senders in the
user's whitelist scope, so their answers are never challenged."""

from __future__ import annotations

from collections.abc import Sequence

from sourceauth.engine.addresses import is_null_sender, normalize_address, split_extension
from sourceauth.engine.api import Decision, Incoming, Receipt, RecipientDecision
from sourceauth.engine.message import Message
from sourceauth.engine.policy import is_protected
from sourceauth.engine.service import operator, replies
from sourceauth.engine.service.caps import CHALLENGEABLE
from sourceauth.engine.service.context import Context, Unit, ts
from sourceauth.engine.service.receive import (
    _prompted_by,
    log_decisions,
    record_arrival,
    validate,
)
from sourceauth.engine.service.routing import _answer_bases, scope_for

OUTBOUND = "outbound_submission"  # the reason an outgoing copy is queued with


def submit_many(
    ctx: Context,
    batch: Sequence[Incoming],
    attachments: Sequence[tuple[str, bytes]],
    learn: bool,
) -> list[Receipt]:
    """Record each outgoing message as queued for the next hop (all its recipients) and, when
    `learn` and its envelope sender is protected, authorize its recipients in that sender's
    scope; one transaction for the batch, as receive does."""
    for incoming in batch:
        validate(ctx, incoming)
    kwargs = {"blobs": list(attachments)} if attachments else {}
    receipts = ctx.run(
        "submit", lambda unit: [_submit(ctx, unit, i, learn) for i in batch], **kwargs
    )
    log_decisions(receipts)
    return receipts


def _submit(ctx: Context, unit: Unit, incoming: Incoming, learn: bool) -> Receipt:
    now = ctx.clock()
    s = ctx.settings
    sender = "" if is_null_sender(incoming.mail_from) else normalize_address(incoming.mail_from)
    recipients = list(dict.fromkeys(normalize_address(r) for r in incoming.recipients))
    local = ""
    if learn and sender and is_protected(sender, s.protected, s.recipient_delimiter):
        local = split_extension(sender, s.recipient_delimiter)[0]
    reason = f"{OUTBOUND}: from {local}" if local else OUTBOUND
    prompted = _prompted_by(incoming.headers)
    mid = record_arrival(
        unit, Message.Accepted, incoming, sender, recipients, reason, now, prompted
    )
    if local:
        for rcpt in recipients:
            learn_correspondent(ctx, unit, local, rcpt, now)
    decisions = tuple(RecipientDecision(r, Decision.DELIVER, reason, mid) for r in recipients)
    return Receipt(incoming.blob.key, decisions, ())


def learn_correspondent(ctx: Context, unit: Unit, local: str, rcpt: str, now: float) -> None:
    """Authorize `rcpt` for `local`'s scope, unless already authorized or blocked (a verdict
    stands); mail held from it for that scope is released."""
    base = split_extension(rcpt, ctx.settings.recipient_delimiter)[0]
    if base == local or base in _answer_bases(
        ctx.settings.confirm_address, ctx.settings.bounce_address
    ):
        return
    scope = scope_for(local, ctx.settings)
    why = f"correspondent of {local}"
    sender, created = operator._load_or_first(ctx, unit, "authorize", rcpt, scope, local, why)
    if not created:
        if sender.state not in CHALLENGEABLE and not sender.challenge_pending:
            return  # authorized already (nothing new to record), or blocked
        sender.authorize(timestamp=ts(now), actor=local, reason=why)
    unit.senders[sender.id] = sender
    released = replies.release_held(ctx, unit, sender, f"sender_authorized_by:{local}", now)
    unit.note("correspondent_learned", sender=rcpt, scope=scope, actor=local, released=released)
