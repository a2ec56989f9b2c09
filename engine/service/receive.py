"""Receive: decide every recipient of accepted messages and record the decisions, many
messages per transaction (group commit: every 250 waits for its own commit)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from sourceauth.engine.addresses import AddressError, is_null_sender, normalize_address
from sourceauth.engine.api import (
    MTA_QUEUE,
    Decision,
    Headers,
    Incoming,
    Receipt,
    RecipientDecision,
)
from sourceauth.engine.errors import InvalidInput
from sourceauth.engine.logs import get_logger
from sourceauth.engine.message import Message
from sourceauth.engine.policy import check_auth_gate
from sourceauth.engine.recipient_policy import RecipientPolicy
from sourceauth.engine.rules import EMPTY_BOOK, RuleBook
from sourceauth.engine.service import caps, replies
from sourceauth.engine.service import rules as rulebook
from sourceauth.engine.service.context import ENGINE, Context, Unit, ts
from sourceauth.engine.service.routing import (
    AUTHORIZED,
    AwaitSender,
    ChallengeReply,
    ChallengeReport,
    DeliverNow,
    HoldSilently,
    Plan,
    route,
)
from sourceauth.engine.statemachine import SENDER

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Hold:
    """How mail from a sender not yet authorized is held."""

    challenged: bool  # its sender has a challenge out (new, pending or resent)
    reason: str
    expires_at: float
    new_challenge: str = ""  # the id of a challenge this unit queued
    resent: bool = False  # the sender's pending challenge goes out again


def receive_many(
    ctx: Context, batch: Sequence[Incoming], attachments: Sequence[tuple[str, bytes]]
) -> list[Receipt]:
    for incoming in batch:
        validate(ctx, incoming)
    rules = rulebook.book(ctx)
    plans = [ctx.plan(incoming, rules) for incoming in batch]

    def work(unit: Unit) -> list[Receipt]:
        _prefetch_senders(ctx, unit, plans)
        return [decide(ctx, unit, i, p, rules) for i, p in zip(batch, plans, strict=True)]

    kwargs = {"blobs": list(attachments)} if attachments else {}
    receipts = ctx.run("receive", work, **kwargs)
    log_decisions(receipts)
    return receipts


def log_decisions(receipts: Sequence[Receipt]) -> None:
    """Logged from the committed result: a unit redone after a conflict logs once."""
    if not log.enabled(logging.INFO):
        return
    log.info_many(
        "message_decided",
        [
            {
                "receipt_id": receipt.receipt_id,
                "message_id": d.message_id.hex if d.message_id else None,
                "recipient": d.recipient,
                "decision": d.decision.value,
                "reason": d.reason,
            }
            for receipt in receipts
            for d in receipt.decisions
        ],
    )


def validate(ctx: Context, incoming: Incoming) -> None:
    if not incoming.recipients:
        raise InvalidInput("a message needs at least one recipient")
    if len(incoming.recipients) > ctx.settings.max_recipients:
        raise InvalidInput(f"more than {ctx.settings.max_recipients} recipients")
    if not is_null_sender(incoming.mail_from):
        try:
            normalize_address(incoming.mail_from)
        except AddressError as exc:
            raise InvalidInput(f"bad sender address: {exc}") from exc
    for rcpt in incoming.recipients:
        try:
            normalize_address(rcpt)
        except AddressError as exc:
            raise InvalidInput(f"bad recipient address {rcpt!r}: {exc}") from exc


def _prefetch_senders(ctx: Context, unit: Unit, plans: Sequence[Plan]) -> None:
    """One view query for the whole batch instead of one event-store read per stranger.
    A sender the (possibly lagging) view does not know yet is created at version 1, which
    the event store refuses if another writer got there first: the unit is then redone."""
    wanted: set[UUID] = set()
    for p in plans:
        for scope in p.scopes:
            sid = ctx.sender_id(p.sender, scope)
            if not ctx.is_cached(sid):
                wanted.add(sid)
    if wanted:
        known = ctx.views.known_senders([w.hex for w in wanted])
        unit.absent = {w for w in wanted if w.hex not in known}


def _subject_and_id(headers: Headers) -> tuple[str, str]:
    """The first Subject and Message-ID (each "" when absent), in one pass over the headers."""
    subject: str | None = None
    message_id: str | None = None
    for key, value in headers:
        lname = key.lower()
        if lname == "subject":
            if subject is None:
                subject = value
        elif lname == "message-id" and message_id is None:
            message_id = value
    return subject or "", message_id or ""


def decide(
    ctx: Context, unit: Unit, incoming: Incoming, p: Plan, rules: RuleBook = EMPTY_BOOK
) -> Receipt:
    now = ctx.clock()
    policies = ctx.settings.policies
    deliver_now: list[tuple[str, str]] = []
    # (kind, decision, reason, linked scope or "", policy) -> recipients: a held copy per
    # policy, so each recipient's copy keeps its own deadline and failed_action.
    settled: dict[tuple[type[Message.Arrived], Decision, str, str, RecipientPolicy], list[str]] = {}
    awaiting: dict[tuple[str, RecipientPolicy], list[str]] = {}  # (scope, policy) -> recipients
    for rcpt, answer in p.answers:
        outcome = _answer(ctx, unit, p.sender, incoming, answer, now)
        settled.setdefault((*outcome, "", policies.default), []).append(rcpt)
    states: dict[str, str] = {}
    for scope in p.scopes:
        found = ctx.load_sender(unit, ctx.sender_id(p.sender, scope))
        if found is not None and found.state != AUTHORIZED:
            # Mail right after an operator's verdict in another process must see it: only
            # a sender about to be held pays for the read (authorized is the hot path).
            ctx.refresh_sender(found)
        states[scope] = SENDER.initial if found is None else found.state
    routes = route(p, incoming, ctx.settings, states, rules)
    if not p.answers and len(routes) == 1:
        only, first = routes[0]
        if isinstance(first, DeliverNow):
            return _deliver_one(ctx, unit, incoming, p, only, first, now)  # most mail
    for rcpt, r in routes:
        if isinstance(r, DeliverNow):
            deliver_now.append((rcpt, r.reason))
        elif isinstance(r, AwaitSender):
            awaiting.setdefault((r.scope, policies.for_recipient(rcpt)), []).append(rcpt)
        elif isinstance(r, HoldSilently):
            held = (Message.Held, Decision.HOLD, r.reason, r.scope or "")
            settled.setdefault((*held, policies.for_recipient(rcpt)), []).append(rcpt)
        else:
            dropped = (Message.Discarded, Decision.DISCARD, r.reason, "", policies.default)
            settled.setdefault(dropped, []).append(rcpt)

    decisions: list[RecipientDecision] = []
    challenges: list[str] = []
    prompted = _prompted_by(incoming.headers)

    def record(
        kind: type[Message.Arrived],
        rcpts: list[str],
        reason: str,
        sid: str,
        expires: float,
        policy: RecipientPolicy | None = None,
    ) -> UUID:
        return record_arrival(
            unit, kind, incoming, p.sender, rcpts, reason, now, prompted, sid, expires, policy
        )

    if deliver_now:
        reasons = (
            deliver_now[0][1]  # one recipient, one reason (most mail)
            if len(deliver_now) == 1
            else "; ".join(sorted({r for _, r in deliver_now}))
        )
        mid = record(Message.Accepted, [r for r, _ in deliver_now], reasons, "", 0.0)
        if incoming.kept_by_mta:
            _kept_by_mta(unit, now)
        decisions += [RecipientDecision(r, Decision.DELIVER, why, mid) for r, why in deliver_now]
    # Held copies before dropped ones (stable: each kind in routing order).
    for (kind, decision, reason, scope, policy), rcpts in (
        sorted(settled.items(), key=lambda item: item[0][0] is not Message.Held)
        if len(settled) > 1
        else settled.items()
    ):
        is_held = kind is Message.Held
        expires = now + policy.hold_lifetime if is_held else 0.0
        # An exempt copy is linked to its sender: authorizing the sender releases it.
        linked = ctx.sender_id(p.sender, scope).hex if scope else ""
        mid = record(kind, rcpts, reason, linked, expires, policy if is_held else None)
        decisions += [RecipientDecision(r, decision, reason, mid) for r in rcpts]
    may_challenge = True  # one message never causes more than one challenge
    for (scope, policy), rcpts in awaiting.items():
        sid = ctx.sender_id(p.sender, scope)
        hold = _hold_for(
            ctx,
            unit,
            sid,
            scope,
            policy,
            p.sender,
            rcpts,
            incoming,
            now,
            may_challenge,
            prompted,
        )
        if hold.new_challenge:
            challenges.append(hold.new_challenge)
        may_challenge = may_challenge and not (hold.new_challenge or hold.resent)
        kind = Message.Challenged if hold.challenged else Message.Held
        mid = record(kind, rcpts, hold.reason, sid.hex, hold.expires_at, policy)
        decision = Decision.CHALLENGE if hold.challenged else Decision.HOLD
        decisions += [RecipientDecision(r, decision, hold.reason, mid) for r in rcpts]
    if len(decisions) > 1:
        order = {r: i for i, r in enumerate(p.recipients)}
        decisions.sort(key=lambda d: order.get(d.recipient, 0))
    return Receipt(incoming.blob.key, tuple(decisions), tuple(challenges), incoming.kept_by_mta)


def _deliver_one(
    ctx: Context, unit: Unit, incoming: Incoming, p: Plan, rcpt: str, r: DeliverNow, now: float
) -> Receipt:
    """`decide` for a message whose one recipient is delivered now (an authorized sender, an
    unprotected recipient): the same event and receipt, without the general case's groupings."""
    prompted = _prompted_by(incoming.headers)
    mid = record_arrival(
        unit, Message.Accepted, incoming, p.sender, [rcpt], r.reason, now, prompted
    )
    if incoming.kept_by_mta:
        _kept_by_mta(unit, now)
    decision = RecipientDecision(rcpt, Decision.DELIVER, r.reason, mid)
    return Receipt(incoming.blob.key, (decision,), (), incoming.kept_by_mta)


def _prompted_by(headers: Headers) -> tuple[str, str]:
    """The Subject and Message-ID a copy records (and a challenge quotes), cut to 300."""
    subject, message_id = _subject_and_id(headers)
    return subject[:300], message_id[:300]


def record_arrival(
    unit: Unit,
    kind: type[Message.Arrived],
    incoming: Incoming,
    sender: str,
    rcpts: list[str],
    reason: str,
    now: float,
    prompted: tuple[str, str],
    sid: str = "",
    expires: float = 0.0,
    policy: RecipientPolicy | None = None,
) -> UUID:
    """Record one copy of `incoming` for `rcpts` (its creation event alone) and return its id.
    `prompted`: `_prompted_by(incoming.headers)`. A held copy names the policy that set its
    deadline and its fate if the challenge fails (`policy`); other copies leave both empty."""
    mid = uuid.uuid4()
    unit.messages.append(
        kind.record(
            mid,
            timestamp=ts(now),
            receipt_id=incoming.blob.key,
            size=incoming.blob.size,
            sha256=incoming.blob.sha256,
            sender=sender,
            sender_id=sid,
            recipients=rcpts,
            subject=prompted[0],
            message_id_header=prompted[1],
            actor=ENGINE,
            reason=reason,
            expires_at=expires,
            client_address=incoming.client_address,
            client_helo=incoming.client_helo,
            policy=policy.source if policy else "",
            failed_action=policy.failed_action if policy else "",
        )
    )
    return mid


def _kept_by_mta(unit: Unit, now: float) -> None:
    """Milter mode: the copy just recorded stays in the MTA's queue, which delivers it; it is
    delivered as far as the filter is concerned, in the same transaction (no next-hop send)."""
    arrived = unit.messages[-1]
    assert isinstance(arrived, Message.Accepted)
    built = arrived.mutate(None)
    assert isinstance(built, Message)
    built.pending_events.append(arrived)
    built.record_delivered(
        timestamp=ts(now),
        delivered=list(arrived.recipients),
        rejected=[],
        next_hop=MTA_QUEUE,
        diagnostic="left in the MTA's queue for it to deliver",
    )
    unit.messages[-1] = built


def _answer(
    ctx: Context,
    unit: Unit,
    sender: str,
    incoming: Incoming,
    answer: ChallengeReply | ChallengeReport,
    now: float,
) -> tuple[type[Message.Arrived], Decision, str]:
    """A reply or a report: settle it; its copy is recorded as discarded with the outcome."""
    if isinstance(answer, ChallengeReply):
        reason = replies.confirm_reply(ctx, unit, sender, incoming.headers, answer.token, now)
        return Message.Discarded, Decision.CONFIRM, reason
    reason = replies.bounce_report(ctx, unit, incoming, answer.token, now)
    return Message.Discarded, Decision.BOUNCE, reason


def _hold_for(
    ctx: Context,
    unit: Unit,
    sid: UUID,
    scope: str,
    policy: RecipientPolicy,
    sender: str,
    rcpts: list[str],
    incoming: Incoming,
    now: float,
    may_challenge: bool,
    prompted_by: tuple[str, str],
) -> Hold:
    """Hold mail from a sender not yet authorized; challenge it at most once, and only if
    this message has not caused a challenge already (`may_challenge`) and no cap stands in
    the way (engine/service/caps.py); mail held over a cap is challenged later.
    `prompted_by`: the message's Subject and Message-ID (cut to 300 characters, as the
    challenge records them)."""
    s = ctx.settings
    current = ctx.load_sender(unit, sid)
    hold_deadline = now + policy.hold_lifetime
    if current is not None and current.challenge_pending:
        unit.senders[sid] = current
        deadline = max(current.expires_at, hold_deadline)
        if may_challenge and current.may_resend(now, s.resend_after, s.limits.max_resends):
            current.resend_challenge(
                timestamp=ts(now), actor=ENGINE, reason="new_message_after_resend_interval"
            )
            return Hold(True, "challenge_resent", deadline, resent=True)
        return Hold(True, "challenge_pending", deadline)
    domain = sender.rsplit("@", 1)[1]
    gate_ok, gate_reason = check_auth_gate(policy.auth_gate, domain, incoming.headers)
    if not gate_ok:
        return Hold(False, f"auth_gate: {gate_reason}", hold_deadline)
    if not may_challenge:
        return Hold(False, caps.ONE_PER_MESSAGE, hold_deadline)
    waits = caps.over_cap(ctx, unit, sender, sid, now)
    if waits is not None:
        return Hold(False, waits, hold_deadline)
    details = caps.queue_challenge(
        ctx,
        unit,
        sender_id=sid,
        scope=scope,
        sender=sender,
        current=current,
        subject=prompted_by[0],
        in_reply_to=prompted_by[1],
        recipient=rcpts[0],
        now=now,
        reason="",
        lifetime=policy.challenge_lifetime,
    )
    return Hold(
        True, "challenge_queued", max(details.expires_at, hold_deadline), details.challenge_id
    )
