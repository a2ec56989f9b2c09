"""One idempotent maintenance pass: lapse challenges, expire held mail past its lifetime,
release mail of senders authorized elsewhere, purge expired originals, retry sends,
collect originals no copy needs. Safe on several nodes at once."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from uuid import UUID

from sourceauth.engine.api import ChallengeRow, MaintenancePlan, MaintenanceReport, PlannedAction
from sourceauth.engine.errors import (
    ChallengeNotPending,
    IllegalTransition,
    MessageNotHeld,
    TemporaryFailure,
)
from sourceauth.engine.logs import get_logger
from sourceauth.engine.message import HELD_STATES, Message
from sourceauth.engine.sender import Sender
from sourceauth.engine.service import caps, dispatch, replies
from sourceauth.engine.service.context import (
    BATCH_LIMIT,
    ENGINE,
    Context,
    Rehearsal,
    Unit,
    ts,
)
from sourceauth.engine.service.routing import AUTHORIZED
from sourceauth.engine.statemachine import MESSAGE

log = get_logger(__name__)
T = TypeVar("T")
QUARANTINE_FULL_EVICTED = "quarantine_full_evicted"


def maintain(ctx: Context, *, dispatch_now: bool = True) -> MaintenanceReport:
    report = _pass(ctx, dispatch_now=dispatch_now)
    log.info("maintenance_done", **report.as_dict())
    return report


def rehearse(ctx: Context) -> MaintenancePlan:
    """What a pass would do now, recording nothing: the same pass, its units rehearsed
    (Context.rehearsing), no original deleted, nothing sent."""
    with ctx.rehearsing() as rehearsal:
        _pass(ctx, dispatch_now=False)
        plan = _plan(rehearsal)
    now = ctx.clock()
    with ctx.lock:
        ctx.catch_up()
        challenges = ctx.views.challenges_due(now, BATCH_LIMIT)
        deliveries = ctx.views.deliveries_due(now, BATCH_LIMIT)
    for row in challenges:
        why = "first send" if not row.attempts else f"retry {row.attempts + 1}"
        plan.send_challenges.append(
            PlannedAction(row.challenge_id, row.address, why, (row.recipient,))
        )
    for d in deliveries:
        why = "first attempt" if not d.attempts else f"retry {d.attempts + 1}"
        plan.retry_deliveries.append(PlannedAction(d.message_id, d.sender, why, d.recipients))
    log.info("maintenance_rehearsed", **{k: len(v) for k, v in plan.as_dict().items()})
    return plan


# A rehearsed event -> the list of the plan it belongs to.
_PLANNED: dict[type[Any], str] = {
    Sender.ChallengeExpired: "lapse",
    Message.Expired: "expire",
    Message.Released: "release",
    Message.Purged: "purge",
    Sender.Challenged: "challenge_later",
    Sender.FirstChallenged: "challenge_later",
}


def _plan(rehearsal: Rehearsal) -> MaintenancePlan:
    plan = MaintenancePlan()
    for aggregate, event in rehearsal.changes:
        action = _PLANNED.get(type(event))
        if action is None:
            continue
        reason = str(getattr(event, "reason", ""))
        if isinstance(aggregate, Sender):
            challenge = str(getattr(event, "challenge_id", "") or aggregate.challenge_id or "")
            planned = PlannedAction(challenge, aggregate.address, reason or type(event).__name__)
        else:
            planned = PlannedAction(
                aggregate.id.hex, aggregate.sender, reason, tuple(aggregate.recipients)
            )
            if reason == QUARANTINE_FULL_EVICTED:
                action = "evict"
        getattr(plan, action).append(planned)
    return plan


def _pass(ctx: Context, *, dispatch_now: bool) -> MaintenanceReport:
    report = MaintenanceReport()
    with ctx.lock:
        ctx.catch_up()
    now = ctx.clock()

    def each(what: Callable[[Unit], bool]) -> int:
        try:
            return int(ctx.run("maintain", what))
        except (IllegalTransition, TemporaryFailure) as exc:
            report.conflicts += 1
            log.warning("maintenance_step_skipped", error=str(exc))
            return 0

    views = ctx.views
    for row in _drain(ctx, lambda: views.challenges_lapsed(now, BATCH_LIMIT)):
        report.challenges_expired += each(functools.partial(_lapse, ctx, row, now))
    for mid in _drain(ctx, lambda: views.held_lapsed(now, BATCH_LIMIT)):
        report.messages_expired += each(functools.partial(_expire, ctx, mid, now))
    for mid in _drain(ctx, lambda: views.held_of_authorized_senders(BATCH_LIMIT)):
        report.released += each(functools.partial(_sweep_release, ctx, mid, now))
    for mid in _drain(ctx, lambda: _expired(ctx)):
        report.purged += each(functools.partial(_purge, ctx, mid, now))
    # A full quarantine answers 452: make room, so a flood cannot outlast the MTA's retries.
    for mid in _evictable(ctx):
        report.evicted += each(functools.partial(_evict, ctx, mid, now))
    # Mail held over a cap, oldest first: one page a pass, while the caps allow.
    with ctx.lock:
        ctx.catch_up()
        deferred = views.held_awaiting_challenge(now, ctx.settings.limits.challenged_later_per_pass)
    for mid in deferred:
        report.challenged_later += each(functools.partial(caps.challenge_later, ctx, mid, now))
    with ctx.lock:
        ctx.catch_up()
    if dispatch_now:
        report.challenges_sent, report.challenges_deferred, failed = dispatch.dispatch_challenges(
            ctx
        )
        report.challenges_failed += failed
        report.delivered, report.deliveries_deferred, report.deliveries_failed = (
            dispatch.dispatch_deliveries(ctx)
        )
    # Last: originals whose every copy is done (delivered in this very pass included).
    # (A receipt's live count only falls once its copies exist, so no copy can need it again.)
    while ctx.blobs is not None and ctx.rehearsal is None:
        with ctx.lock:
            ctx.catch_up()
            done = views.blobs_unreferenced(BATCH_LIMIT)
        if not done:
            break
        report.blobs_collected += ctx.blobs.delete_many(done)
        views.mark_blobs_collected(done)
    with ctx.lock:
        ctx.catch_up()
    return report


def _expired(ctx: Context) -> list[str]:
    """Expired copies to purge; in a rehearsal also those it expired itself (the views only
    show what was recorded)."""
    found = ctx.views.expired_messages(BATCH_LIMIT)
    if ctx.rehearsal is not None:
        found += [
            m.id.hex
            for m in ctx.rehearsal.messages.values()
            if MESSAGE.allows(m.state, "purge") and m.id.hex not in found
        ]
    return found


def _drain(ctx: Context, fetch: Callable[[], Sequence[T]]) -> Iterator[T]:
    """Rows from a view query, re-fetched until it comes back empty or stops changing."""
    seen: set[Any] = set()
    while True:
        with ctx.lock:
            ctx.catch_up()
            rows = [r for r in fetch() if _key(r) not in seen]
        if not rows:
            return
        for r in rows:
            seen.add(_key(r))
            yield r


def _key(row: Any) -> Any:
    return row.challenge_id if isinstance(row, ChallengeRow) else row


def _lapse(ctx: Context, row: ChallengeRow, now: float, unit: Unit) -> bool:
    sender = ctx.load_sender(unit, UUID(row.sender_id))
    if sender is None:
        return False
    try:
        sender.expire_challenge(row.challenge_id, timestamp=ts(now), actor=ENGINE)
    except ChallengeNotPending:
        return False
    unit.senders[sender.id] = sender
    replies.expire_held(ctx, unit, sender, "challenge_expired", now)
    replies.expire_waiting_scopes(ctx, unit, sender, "challenge_expired", now)
    unit.note("challenge_expired", sender=sender.address, challenge_id=row.challenge_id)
    return True


def _expire(ctx: Context, mid: str, now: float, unit: Unit) -> bool:
    msg = ctx.load_message(UUID(mid))
    if msg is None or msg.expires_at > now:
        return False
    try:
        msg.expire(timestamp=ts(now), actor=ENGINE, reason="hold_lifetime_passed")
    except MessageNotHeld:
        return False
    unit.messages.append(msg)
    unit.note("message_expired", message_id=mid, reason="hold_lifetime_passed")
    return True


def _evictable(ctx: Context) -> list[str]:
    """Held copies to expire so that every full mailbox gets back under its quota with a
    tenth of it free: oldest first among senders with no challenge out, then the others;
    never mail of an authorized sender."""
    cap = ctx.settings.held_per_recipient
    with ctx.lock:
        ctx.catch_up()
        full = sorted(ctx.views.recipients_holding(cap))[:BATCH_LIMIT]
        chosen: dict[str, None] = {}
        for rcpt in full:
            excess = ctx.views.held_count(rcpt) - (cap - max(1, cap // 10))
            if excess > 0:
                chosen.update(dict.fromkeys(ctx.views.held_evictable(rcpt, excess)))
    return list(chosen)


def _evict(ctx: Context, mid: str, now: float, unit: Unit) -> bool:
    msg = ctx.load_message(UUID(mid))
    if msg is None or msg.state not in HELD_STATES:
        return False
    msg.expire(timestamp=ts(now), actor=ENGINE, reason=QUARANTINE_FULL_EVICTED)
    unit.messages.append(msg)
    unit.note("message_expired", message_id=mid, reason=QUARANTINE_FULL_EVICTED)
    return True


def _sweep_release(ctx: Context, mid: str, now: float, unit: Unit) -> bool:
    """A copy still held although its sender is authorized (authorized on another node)."""
    msg = ctx.load_message(UUID(mid))
    if msg is None or msg.state not in HELD_STATES or not msg.sender_id:
        return False
    sender = ctx.load_sender(unit, UUID(msg.sender_id))
    if sender is None or sender.state != AUTHORIZED:
        return False
    msg.release(timestamp=ts(now), actor=ENGINE, reason="sender_authorized")
    unit.messages.append(msg)
    unit.note("message_released", message_id=mid, actor=ENGINE, reason="sender_authorized")
    return True


def _purge(ctx: Context, mid: str, now: float, unit: Unit) -> bool:
    msg = ctx.load_message(UUID(mid))
    if msg is None or not MESSAGE.allows(msg.state, "purge"):
        return False
    deleted = False
    blobs = ctx.blobs
    # Another live copy may still need the same original (this expired one counts).
    if blobs is not None and ctx.views.live_copies(msg.receipt_id) <= 1:
        # Delete first, record second: a crash in between leaves an idempotent retry.
        # A rehearsal deletes nothing: it records what the pass would do.
        deleted = ctx.rehearsal is not None or (
            blobs.delete(msg.receipt_id) or not blobs.exists(msg.receipt_id)
        )
    msg.purge(timestamp=ts(now), actor=ENGINE, blob_deleted=deleted)
    unit.messages.append(msg)
    unit.note("message_purged", message_id=mid, blob_deleted=deleted)
    return True
