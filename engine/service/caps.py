"""Caps on challenges that a flood of forged senders cannot turn against real ones: the rate
limits (per registered domain and server-wide), one pending challenge per sender mailbox, one
challenge per message; mail held over a cap is challenged later, oldest first, by maintenance.
"""

from __future__ import annotations

import math
from uuid import UUID

from sourceauth.engine import tokens
from sourceauth.engine.addresses import split_extension
from sourceauth.engine.policy import registered_domain
from sourceauth.engine.sender import ChallengeDetails, Sender
from sourceauth.engine.service.context import ENGINE, Context, Unit, ts
from sourceauth.engine.service.routing import scope_for
from sourceauth.engine.statemachine import MESSAGE, SENDER

# Reasons of copies held over a cap: maintenance challenges their senders later. The
# views select them by these prefixes (adapters/storage/views.py held_awaiting_challenge).
RATE_LIMITED = "rate_limited: "
DEFERRED = "challenge_deferred: "
DEFERRED_PREFIXES = (RATE_LIMITED, DEFERRED)
ONE_PER_MESSAGE = DEFERRED + "one challenge per message"
MAILBOX_PENDING = DEFERRED + "a challenge to this mailbox is pending"
HELD = MESSAGE.dest("hold")
SEED_LIMIT = 1_000_000
# Senders a new challenge may go to (a challenged one has one out; others are decided).
CHALLENGEABLE = SENDER.sources("challenge")
CHALLENGED = SENDER.dest("challenge")


def mailbox_of(ctx: Context, sender: str) -> str:
    """The sender's mailbox: its address without a recipient-delimiter extension."""
    return split_extension(sender, ctx.settings.recipient_delimiter)[0]


def over_cap(ctx: Context, unit: Unit, sender: str, sender_id: UUID, now: float) -> str | None:
    """The reason a new challenge to `sender` must wait, or None if it may go now.

    Counts what this unit already queued (not yet in the limiter: it counts at commit)."""
    domain = registered_domain(sender.rpartition("@")[2])
    limited = ctx.limiter.check(
        domain,
        now,
        pending_total=len(unit.challenges),
        pending_domain=unit.challenged_domains[domain],
    )
    if limited is not None:
        return RATE_LIMITED + limited
    mailbox = mailbox_of(ctx, sender)
    if mailbox in unit.challenged_mailboxes:
        return MAILBOX_PENDING
    found = ctx.pending_mailboxes.get(mailbox)
    if found is None or found[0] == sender_id:
        return None
    other = ctx.load_sender(unit, found[0])
    if other is not None and other.challenge_pending and other.challenge_id == found[1]:
        return MAILBOX_PENDING
    del ctx.pending_mailboxes[mailbox]  # that challenge ended: the mailbox is free
    unit.replaced_mailboxes[mailbox] = found[1]  # the store may overwrite that one's row
    return None


def queue_challenge(
    ctx: Context,
    unit: Unit,
    *,
    sender_id: UUID,
    scope: str,
    sender: str,
    current: Sender | None,
    subject: str,
    in_reply_to: str,
    recipient: str,
    now: float,
    reason: str,
    lifetime: float,
) -> ChallengeDetails:
    """A new challenge for `sender` in `scope` (the caller checked over_cap), valid for
    `lifetime` seconds: the challenge_lifetime of the recipient it is sent for."""
    expires = float(int(now + lifetime) // 60 * 60)
    details = ChallengeDetails(
        actor=ENGINE,
        challenge_id=tokens.new_challenge_id().hex(),
        kid=ctx.keyring.active_kid,
        expires_at=expires,
        subject=subject[:300],
        in_reply_to=in_reply_to[:300],
        recipient=recipient,
    )
    if current is None:
        current = Sender.first_challenge(
            sender_id,
            address=sender,
            scope=scope,
            timestamp=ts(now),
            reason=reason or "first_message_from_unknown_sender",
            challenge=details,
        )
    else:
        current.challenge(
            timestamp=ts(now),
            reason=reason or f"new_message_from_{current.state}_sender",
            challenge=details,
        )
    unit.senders[sender_id] = current
    domain = registered_domain(sender.rpartition("@")[2])
    unit.count_challenge(
        domain, mailbox_of(ctx, sender), sender_id, details.challenge_id, details.expires_at
    )
    return details


def challenge_later(ctx: Context, message_id: str, now: float, unit: Unit) -> bool:
    """A copy held over a cap: challenge its sender now if no cap stands in the way."""
    msg = ctx.load_message(UUID(message_id))
    if msg is None or msg.state != HELD or not msg.sender_id or msg.expires_at <= now:
        return False
    if not msg.reason.startswith(DEFERRED_PREFIXES):
        return False
    sid = UUID(msg.sender_id)
    current = ctx.load_sender(unit, sid)
    if current is not None and current.state not in CHALLENGEABLE:
        return False  # authorized (the sweep releases it), challenged, or blocked
    if over_cap(ctx, unit, msg.sender, sid, now) is not None:
        return False
    queue_challenge(
        ctx,
        unit,
        sender_id=sid,
        scope=current.scope if current is not None else scope_for(msg.recipients[0], ctx.settings),
        sender=msg.sender,
        current=current,
        subject=msg.subject,
        in_reply_to=msg.message_id_header,
        recipient=msg.recipients[0],
        now=now,
        reason="held_over_a_cap_challenged_later",
        lifetime=ctx.settings.policies.for_recipient(msg.recipients[0]).challenge_lifetime,
    )
    unit.note("challenge_queued_later", sender=msg.sender, message_id=message_id)
    return True


def seed(ctx: Context) -> None:
    """After a start: the mailboxes with a challenge pending, from the store."""
    for row in ctx.views.challenges_lapsed(math.inf, SEED_LIMIT):
        ctx.pending_mailboxes[mailbox_of(ctx, row.address)] = (
            UUID(row.sender_id),
            row.challenge_id,
            row.expires,
        )
