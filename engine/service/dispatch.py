"""Outbound work: send due challenges and hand released copies to the next hop, outside the
lock, then record every outcome in one unit of work; backoff and token minting for sends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from uuid import UUID

from sourceauth.engine import tokens
from sourceauth.engine.api import (
    ChallengeRow,
    DeliveryJob,
    DeliveryResult,
    DeliveryRow,
    OutgoingChallenge,
    SendOutcome,
    SendResult,
)
from sourceauth.engine.errors import ChallengeNotPending, NotAwaitingDelivery, TemporaryFailure
from sourceauth.engine.message import QUEUED, Message
from sourceauth.engine.ports import BatchChallengeTransport, BatchDeliveryTransport
from sourceauth.engine.service import replies
from sourceauth.engine.service.context import BATCH_LIMIT, Context, Unit, ts
from sourceauth.engine.settings import EngineSettings


def backoff(attempt: int, initial: float, maximum: float) -> float:
    return float(min(maximum, initial * (2 ** max(0, attempt - 1))))


def mint_with(ctx: Context, row: ChallengeRow) -> str:
    """The challenge's token. A resend after a key rotation keeps the key it was first
    minted with: the same token every time."""
    if row.kid not in ctx.keyring.token_keys:
        raise TemporaryFailure(
            f"token key {row.kid} retired while challenge {row.challenge_id} pending"
        )
    keyring = tokens.Keyring(
        token_keys=ctx.keyring.token_keys, active_kid=row.kid, id_key=ctx.keyring.id_key
    )
    return tokens.mint(
        keyring,
        challenge_id=bytes.fromhex(row.challenge_id),
        sender=row.address,
        scope=row.scope,
        expires_at=int(row.expires),
    )


R = TypeVar("R")


@contextmanager
def _claimed(
    ctx: Context, kind: str, fetch: Callable[[], list[R]], key: Callable[[R], str]
) -> Iterator[tuple[list[R], set[str]]]:
    """Due rows leased to this engine until their outcomes are recorded: no other thread,
    process or node sends them meanwhile. A crashed holder's lease lapses after settings.work_lease
    seconds; whoever takes the work over then sends it again (same token, same id).

    Yields the rows and the keys of those taken over from a lapsed lease (their last holder
    may have sent them: the transport then checks harder for an earlier copy). When the body
    raises (an outcome not recorded after a send), the leases are not released but left to
    lapse, so that whoever sends the work next knows it may have gone out already."""
    taken: set[str] = set()
    with ctx.lock:
        ctx.catch_up()
        due = [r for r in fetch() if key(r) not in ctx.in_flight]
        ctx.in_flight.update(key(r) for r in due)
    leased: set[str] = set()
    work: dict[str, R] = {}
    try:
        mine: list[R] = []
        if due:
            now = ctx.clock()
            work = {f"{kind}:{key(r)}": r for r in due}
            leased = ctx.views.claim_work(
                list(work), ctx.holder, now, now + ctx.settings.work_lease, taken
            )
            if leased:
                # Another worker may have finished some of these between our read and our
                # lease (and released it): read the queue again, now that we hold them.
                with ctx.lock:
                    ctx.catch_up()
                    still = {key(r) for r in fetch()}
                mine = [r for k, r in work.items() if k in leased and key(r) in still]
        yield mine, {key(r) for k, r in work.items() if k in taken}
        if leased:
            ctx.views.release_work(sorted(leased), ctx.holder)
    finally:
        with ctx.lock:
            ctx.in_flight.difference_update(key(r) for r in due)


def _challenge_key(row: ChallengeRow) -> str:
    return row.challenge_id


def _copy_key(row: DeliveryRow) -> str:
    return row.message_id


# ----------------------------------------------------------------- challenges


def never() -> bool:
    """The default `stop` of a dispatcher: it sends its whole batch."""
    return False


def dispatch_challenges(
    ctx: Context, limit: int = BATCH_LIMIT, stop: Callable[[], bool] = never
) -> tuple[int, int, int]:
    """Send due challenges, then record every outcome; returns (sent, deferred, failed).
    Once `stop()` is true no further challenge of the batch is sent (the process stops)."""
    transport = ctx.challenge_transport
    if transport is None:
        return (0, 0, 0)

    def due_now() -> list[ChallengeRow]:
        return ctx.views.challenges_due(ctx.clock(), limit)

    def outgoing(row: ChallengeRow, taken: set[str]) -> OutgoingChallenge:
        return OutgoingChallenge(
            challenge_id=row.challenge_id,
            token=mint_with(ctx, row),
            to=row.address,
            scope=row.scope,
            expires_at=row.expires,
            subject=row.subject,
            in_reply_to=row.in_reply_to,
            recipient=row.recipient,
            thread_id=tokens.thread_id(
                ctx.keyring,
                challenge_id=bytes.fromhex(row.challenge_id),
                sender=row.address,
                scope=row.scope,
                kid=row.kid,
            ),
            maybe_sent=row.attempts > 0 or row.challenge_id in taken,
        )

    with _claimed(ctx, "challenge", due_now, _challenge_key) as (due, taken):
        results: list[tuple[ChallengeRow, SendResult]] = []
        # Network I/O, outside the lock. Those not sent once stop() is true stay due: their
        # leases are released below, for the next taker.
        if isinstance(transport, BatchChallengeTransport):
            sent = transport.send_batch([outgoing(row, taken) for row in due], stop)
            results = [(row, r) for row, r in zip(due, sent, strict=True) if r is not None]
        else:
            for row in due:
                if stop():
                    break
                results.append((row, transport.send(outgoing(row, taken))))
        outcomes = ctx.run("challenge_send", lambda unit: _record_sends(ctx, unit, results))
    return outcomes.count("sent"), outcomes.count("deferred"), outcomes.count("failed")


def _record_sends(
    ctx: Context, unit: Unit, results: list[tuple[ChallengeRow, SendResult]]
) -> list[str]:
    now = ctx.clock()
    s = ctx.settings
    outcomes: list[str] = []
    for row, result in results:
        sender = ctx.load_sender(unit, UUID(row.sender_id))
        if sender is None:
            outcomes.append("stale")
            continue
        attempt = sender.attempts + 1
        try:
            if result.outcome == SendOutcome.SENT:
                sender.record_sent(
                    row.challenge_id, timestamp=ts(now), relay=result.diagnostic, attempt=attempt
                )
                unit.note(
                    "challenge_sent",
                    sender=row.address,
                    challenge_id=row.challenge_id,
                    diagnostic=result.diagnostic[:200],
                )
                outcomes.append("sent")
            elif (
                result.outcome == SendOutcome.PERMANENT
                or now - row.created >= s.challenge_give_up_after
            ):
                replies.fail_sender(
                    ctx, unit, sender, row.challenge_id, result.diagnostic, "relay", now
                )
                outcomes.append("failed")
            else:
                delay = backoff(attempt, s.challenge_retry_initial, s.challenge_retry_max)
                sender.record_deferred(
                    row.challenge_id,
                    timestamp=ts(now),
                    diagnostic=result.diagnostic,
                    attempt=attempt,
                    next_attempt_at=now + delay,
                )
                unit.note(
                    "challenge_deferred",
                    sender=row.address,
                    challenge_id=row.challenge_id,
                    diagnostic=result.diagnostic[:200],
                    next_attempt_at=now + delay,
                )
                outcomes.append("deferred")
        except ChallengeNotPending:
            outcomes.append("stale")
            continue
        unit.senders[sender.id] = sender
    return outcomes


def token_for(ctx: Context, challenge_id: str) -> str | None:
    with ctx.lock:
        ctx.catch_up()
        row = ctx.views.challenge(challenge_id)
    return None if row is None else mint_with(ctx, row)


# ----------------------------------------------------------------- deliveries


def dispatch_deliveries(
    ctx: Context, limit: int = BATCH_LIMIT, stop: Callable[[], bool] = never
) -> tuple[int, int, int]:
    """Hand due copies to the next hop, then record every outcome; returns (delivered,
    deferred, failed). Once `stop()` is true no further copy is tried (a batch transport is
    told to halt by its owner)."""
    transport = ctx.delivery_transport
    if transport is None:
        return (0, 0, 0)

    def due_now() -> list[DeliveryRow]:
        return ctx.views.deliveries_due(ctx.clock(), limit)

    with _claimed(ctx, "delivery", due_now, _copy_key) as (due, taken):
        with ctx.lock:
            copies = [ctx.load_message(UUID(r.message_id)) for r in due]
        taken_ids = {UUID(k) for k in taken}
        jobs = [
            DeliveryJob(
                message_id=msg.id.hex,
                receipt_id=msg.receipt_id,
                sha256=msg.sha256,
                mail_from=msg.sender,
                recipients=tuple(msg.pending),
                maybe_sent=msg.attempts > 0 or msg.id in taken_ids,
            )
            for msg in copies
            if msg is not None and msg.state == QUEUED and msg.pending
        ]
        # network and disk I/O, outside the lock
        if not jobs:
            done: list[DeliveryResult | None] = []
        elif isinstance(transport, BatchDeliveryTransport):
            done = transport.deliver_batch(jobs)
        else:
            done = []
            for job in jobs:
                done.append(None if stop() else transport.deliver(job))
        # A copy the transport did not try records nothing: it stays queued for the next round.
        results = [
            (UUID(job.message_id), result)
            for job, result in zip(jobs, done, strict=True)
            if result is not None
        ]
        outcomes = ctx.run("deliver", lambda unit: _record_deliveries(ctx, unit, results))
    return outcomes.count("delivered"), outcomes.count("deferred"), outcomes.count("failed")


def _record_deliveries(
    ctx: Context, unit: Unit, results: list[tuple[UUID, DeliveryResult]]
) -> list[str]:
    now = ctx.clock()
    s = ctx.settings
    outcomes: list[str] = []
    for message_id, result in results:
        current = ctx.load_message(message_id)
        if current is None:
            outcomes.append("stale")
            continue
        try:
            outcomes.append(_record_delivery(unit, current, result, now, s))
        except NotAwaitingDelivery:
            outcomes.append("stale")
            continue
        unit.messages.append(current)
    return outcomes


def _record_delivery(
    unit: Unit, current: Message, result: DeliveryResult, now: float, s: EngineSettings
) -> str:
    attempt = current.attempts + 1
    gave_up = now - current.created_on.timestamp() >= s.delivery_give_up_after
    fields = {"message_id": current.id.hex, "next_hop": result.next_hop}
    if result.temporary and not gave_up:
        delay = backoff(attempt, s.delivery_retry_initial, s.delivery_retry_max)
        current.record_delivery_deferred(
            timestamp=ts(now),
            delivered=list(result.delivered),
            rejected=list(result.rejected),
            diagnostic=result.diagnostic,
            attempt=attempt,
            next_attempt_at=now + delay,
        )
        unit.note("delivery_deferred", **fields, diagnostic=result.diagnostic[:200])
        return "deferred"
    if result.delivered or (current.pending and len(current.pending) < len(current.recipients)):
        current.record_delivered(
            timestamp=ts(now),
            delivered=list(result.delivered),
            rejected=list(result.rejected) + (list(result.temporary) if gave_up else []),
            next_hop=result.next_hop,
            diagnostic=result.diagnostic,
        )
        unit.note("message_delivered", **fields, diagnostic=result.diagnostic[:200])
        return "delivered"
    current.record_delivery_failed(
        timestamp=ts(now),
        actor="next_hop",
        reason="delivery_gave_up" if gave_up else "next_hop_refused",
        rejected=list(result.rejected) + list(result.temporary),
        diagnostic=result.diagnostic,
    )
    unit.note("delivery_failed", **fields, diagnostic=result.diagnostic[:200])
    return "failed"
