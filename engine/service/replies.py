"""Answers to a challenge: a reply that confirms its sender (and releases everything held
from it), and a failure report (DSN or relay 5xx) that expires it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from email.utils import getaddresses
from uuid import UUID

from sourceauth.engine import tokens
from sourceauth.engine.addresses import AddressError, normalize_address
from sourceauth.engine.api import (
    ChallengeRow,
    ConfirmResult,
    FailureResult,
    Headers,
    HeldMessage,
    Incoming,
    LinkState,
)
from sourceauth.engine.errors import ChallengeNotPending
from sourceauth.engine.message import EXPIRED, HELD_STATES, Message
from sourceauth.engine.policy import is_automated
from sourceauth.engine.recipient_policy import GLOBAL
from sourceauth.engine.sender import Sender
from sourceauth.engine.service.caps import CHALLENGEABLE, DEFERRED_PREFIXES, HELD
from sourceauth.engine.service.context import ENGINE, Context, Unit, ts
from sourceauth.engine.service.routing import scope_for
from sourceauth.engine.statemachine import CHALLENGE, SENDER


def confirm(ctx: Context, token: str, claimants: Iterable[str]) -> ConfirmResult:
    """A reply carrying `token` from one of `claimants` (envelope sender, From)."""
    names: set[str] = set()
    for c in claimants:
        try:
            names.add(normalize_address(c))
        except AddressError:
            continue
    return ctx.run("confirm", lambda unit: confirm_in(ctx, unit, token, names, ctx.clock()))


def confirm_by_link(ctx: Context, token: str, actor: str) -> ConfirmResult:
    """A press on the challenge link's button: the token is bound to its sender, so the claimant
    is the token's own challenged address; `actor` (e.g. "web") is recorded."""
    return ctx.run(
        "confirm", lambda unit: confirm_in(ctx, unit, token, None, ctx.clock(), actor=actor)
    )


def link_state(ctx: Context, token: str) -> LinkState:
    """What a challenge link would do now, without recording anything (a GET shows it)."""
    with ctx.lock:
        ctx.catch_up()
    found = challenge_for_token(ctx, token)
    if isinstance(found, str):
        return LinkState.INVALID
    _, row = found
    try:
        tokens.verify(ctx.keyring, token, sender=row.address, scope=row.scope, now=int(ctx.clock()))
    except tokens.TokenExpired:
        return LinkState.EXPIRED
    except tokens.TokenError:
        return LinkState.INVALID
    if row.outcome in CHALLENGE.sources("confirm"):
        return LinkState.PENDING
    return LinkState.EXPIRED if row.outcome == CHALLENGE.dest("expire") else LinkState.CLOSED


def challenge_failed(ctx: Context, token: str, diagnostic: str, source: str) -> FailureResult:
    """The challenge carrying `token` could not be delivered (a DSN, or a relay 5xx)."""
    return ctx.run(
        "challenge_failed", lambda unit: fail_in(ctx, unit, token, diagnostic, source, ctx.clock())
    )


def confirm_reply(
    ctx: Context, unit: Unit, sender: str, headers: Headers, token: str | None, now: float
) -> str:
    """A message to the confirm address, inside a receive unit: the reason its copy records."""
    automated = is_automated(sender or "<>", headers)
    if automated is not None:
        reason = f"automated reply never confirms ({automated.detail})"
        unit.note("confirm_refused", reason=reason, sender=sender)
        return f"confirm_refused: {reason}"
    if not token:
        result = confirm_threaded(ctx, unit, sender, headers, now)
        return f"confirm_{'accepted' if result.confirmed else 'refused'}: {result.reason}"
    claimants = {sender} if sender else set()
    for _, addr in getaddresses([v for k, v in headers if k.lower() == "from"]):
        try:
            claimants.add(normalize_address(addr))
        except AddressError:
            continue
    result = confirm_in(ctx, unit, token, claimants, now)
    return f"confirm_{'accepted' if result.confirmed else 'refused'}: {result.reason}"


THREAD_IDS_MAX = 32  # Message-IDs read from In-Reply-To and References, newest first
_MSGID_RE = re.compile(r"<([^<>\s]{1,300})>")


def threaded_ids(headers: Headers) -> list[str]:
    """The Message-IDs a reply is threaded onto: In-Reply-To's, then References' from the
    newest (last) back, each once, at most THREAD_IDS_MAX."""
    found: dict[str, None] = {}
    for name in ("in-reply-to", "references"):
        for key, value in headers:
            if key.lower() == name:
                ids = _MSGID_RE.findall(value[:20_000])
                found.update(dict.fromkeys(reversed(ids) if name == "references" else ids))
    return list(found)[:THREAD_IDS_MAX]


def confirm_threaded(
    ctx: Context, unit: Unit, sender: str, headers: Headers, now: float
) -> ConfirmResult:
    """A tokenless reply to the bare confirm address: it confirms when it is threaded onto a
    live challenge (its unguessable Message-ID, tokens.thread_id) and its envelope sender is
    the challenged address. From is not consulted: the thread id is the only secret here, so
    the claimant is the address SPF and the authentication gate can vouch for."""
    refusal = "no token in the confirm address and no challenge in In-Reply-To/References"
    for message_id in threaded_ids(headers):
        named = tokens.parse_thread_id(message_id)
        if named is None:
            continue
        challenge_id, kid = named
        row = challenge_row(ctx, challenge_id.hex())
        if row is None:
            refusal = "thread names an unknown challenge"
            continue
        try:
            tokens.verify_thread_id(
                ctx.keyring,
                message_id,
                challenge_id=challenge_id,
                sender=row.address,
                scope=row.scope,
                kid=kid,
            )
        except tokens.TokenError as exc:
            refusal = f"thread names a forged challenge ({exc})"
            continue
        if sender != row.address:
            unit.note("confirm_refused", reason="not from the challenged sender", sender=sender)
            return ConfirmResult(False, "threaded reply is not from the challenged sender", sender)
        if now >= row.expires:
            unit.note("confirm_refused", reason="challenge has expired", sender=row.address)
            return ConfirmResult(False, "challenge has expired", row.address)
        return confirm_row(ctx, unit, row, now, row.address, "threaded_reply")
    unit.note("confirm_refused", reason=refusal, sender=sender)
    return ConfirmResult(False, refusal, sender)


def bounce_report(
    ctx: Context, unit: Unit, incoming: Incoming, token: str | None, now: float
) -> str:
    """A message to the bounce address, inside a receive unit: the reason its copy records."""
    if not token:
        return "bounce_ignored: no token in the bounce address"
    if incoming.bounce is None or not incoming.bounce.failed:
        return "bounce_ignored: not a permanent failure report"
    result = fail_in(ctx, unit, token, incoming.bounce.diagnostic, "dsn", now)
    return f"bounce_{'recorded' if result.recorded else 'ignored'}: {result.reason}"


def challenge_for_token(ctx: Context, token: str) -> tuple[tokens.TokenClaims, ChallengeRow] | str:
    try:
        claims = tokens.parse(token)
    except tokens.TokenError as exc:
        return f"malformed token ({exc})"
    row = challenge_row(ctx, claims.challenge_id.hex())
    if row is None:
        return "unknown challenge"
    return claims, row


def challenge_row(ctx: Context, challenge_id: str) -> ChallengeRow | None:
    """The challenge's view row, reading the log first if the view has not seen it yet."""
    row = ctx.views.challenge(challenge_id)
    if row is None:
        ctx.catch_up()
        row = ctx.views.challenge(challenge_id)
    return row


def confirm_in(
    ctx: Context,
    unit: Unit,
    token: str,
    claimants: set[str] | None,
    now: float,
    actor: str | None = None,
) -> ConfirmResult:
    found = challenge_for_token(ctx, token)
    if isinstance(found, str):
        unit.note("confirm_refused", reason=found)
        return ConfirmResult(False, found)
    _, row = found
    if claimants is not None and row.address not in claimants:
        unit.note("confirm_refused", reason="not from the challenged sender", sender=row.address)
        return ConfirmResult(False, "reply is not from the challenged sender", row.address)
    try:
        tokens.verify(ctx.keyring, token, sender=row.address, scope=row.scope, now=int(now))
    except tokens.TokenError as exc:
        unit.note("confirm_refused", reason=str(exc), sender=row.address)
        return ConfirmResult(False, f"token refused: {exc}", row.address)
    return confirm_row(ctx, unit, row, now, actor or row.address, "valid_reply")


def confirm_row(
    ctx: Context, unit: Unit, row: ChallengeRow, now: float, actor: str, reason: str
) -> ConfirmResult:
    """Confirm the challenge `row` names, if it is still its sender's pending one, and release
    everything held for the sender."""
    sender = ctx.load_sender(unit, UUID(row.sender_id))
    try:
        if sender is None:
            raise ChallengeNotPending(SENDER.initial)
        sender.confirm(row.challenge_id, timestamp=ts(now), actor=actor, reason=reason)
    except ChallengeNotPending as exc:
        unit.note("confirm_refused", reason=str(exc), sender=row.address)
        return ConfirmResult(False, str(exc), row.address)
    unit.senders[sender.id] = sender
    released = release_held(ctx, unit, sender, f"sender_confirmed:{row.address}", now)
    if ctx.settings.policies.any_recipient_scope:
        released += authorize_waiting_scopes(ctx, unit, sender, now)
    unit.note("sender_confirmed", sender=row.address, scope=row.scope, released=released)
    return ConfirmResult(True, "sender confirmed", row.address, released)


def fail_in(
    ctx: Context, unit: Unit, token: str, diagnostic: str, source: str, now: float
) -> FailureResult:
    found = challenge_for_token(ctx, token)
    if isinstance(found, str):
        return FailureResult(False, found)
    _, row = found
    try:
        # Expired tokens still count: a late DSN is still proof the challenge failed.
        tokens.verify(ctx.keyring, token, sender=row.address, scope=row.scope, now=0)
    except tokens.TokenError as exc:
        return FailureResult(False, f"token refused: {exc}", row.address)
    sender = ctx.load_sender(unit, UUID(row.sender_id))
    if sender is None:
        return FailureResult(False, "challenge no longer pending", row.address)
    try:
        expired = fail_sender(ctx, unit, sender, row.challenge_id, diagnostic, source, now)
    except ChallengeNotPending:
        return FailureResult(False, "challenge no longer pending", row.address)
    return FailureResult(True, "challenge failed", sender.address, expired)


def fail_sender(
    ctx: Context,
    unit: Unit,
    sender: Sender,
    challenge_id: str,
    diagnostic: str,
    source: str,
    now: float,
) -> int:
    """Record the challenge failed; expire the held copies whose policy's failed_action is
    "purge" (the others stay held until their deadline). Returns how many copies expired."""
    sender.fail_challenge(challenge_id, timestamp=ts(now), source=source, diagnostic=diagnostic)
    unit.senders[sender.id] = sender
    expired = expire_held(ctx, unit, sender, "challenge_failed", now, purged_on_failure)
    expired += expire_waiting_scopes(ctx, unit, sender, "challenge_failed", now, purged_on_failure)
    unit.note(
        "challenge_failed",
        sender=sender.address,
        challenge_id=challenge_id,
        source=source,
        diagnostic=diagnostic[:200],
        expired=expired,
    )
    return expired


def release_held(ctx: Context, unit: Unit, sender: Sender, reason: str, now: float) -> int:
    """Release every copy held for `sender` (also those its lapsed challenge expired)."""
    count = 0
    for msg in ctx.held_of(unit, sender.id.hex, HELD_STATES | {EXPIRED}):
        msg.release(timestamp=ts(now), actor=ENGINE, reason=reason)
        count += 1
    return count


def purged_on_failure(ctx: Context, msg: Message) -> str | None:
    """The reason a failed challenge expires this held copy, or None: its policy keeps it."""
    action = msg.failed_action or (
        ctx.settings.policies.for_recipient(msg.recipients[0]).failed_action
    )
    if action != "purge":
        return None
    if msg.policy in ("", GLOBAL):
        return "challenge_failed"
    return f"challenge_failed (failed_action purge, policy {msg.policy})"


def expire_held(
    ctx: Context,
    unit: Unit,
    sender: Sender,
    reason: str,
    now: float,
    why: Callable[[Context, Message], str | None] | None = None,
) -> int:
    """Expire the copies held for `sender`; with `why`, only those it gives a reason for."""
    count = 0
    for msg in ctx.held_of(unit, sender.id.hex, HELD_STATES):
        copy_reason = reason if why is None else why(ctx, msg)
        if copy_reason is None:
            continue
        msg.expire(timestamp=ts(now), actor=ENGINE, reason=copy_reason)
        count += 1
    return count


def _waiting_in_other_scopes(ctx: Context, sender: Sender) -> list[HeldMessage]:
    """Copies from this sender's address held over a cap for other mailboxes (scope
    "recipient"): a message to several mailboxes draws one challenge (engine/service/caps.py),
    and its outcome is theirs too."""
    if not ctx.settings.policies.any_recipient_scope:
        return []
    ctx.catch_up()
    return [
        m
        for m in ctx.views.quarantine(sender=sender.address, state=HELD)
        if m.sender_id
        and m.sender_id != sender.id.hex
        and m.reason.startswith(DEFERRED_PREFIXES)
        and ctx.sender_id(sender.address, scope_for(m.recipients[0], ctx.settings)).hex
        == m.sender_id
    ]


def authorize_waiting_scopes(ctx: Context, unit: Unit, confirmed: Sender, now: float) -> int:
    """The confirmation authorizes the sender for every mailbox whose copy waited on its
    challenge. Returns how many copies that released."""
    waiting = {m.sender_id: m.recipients[0] for m in _waiting_in_other_scopes(ctx, confirmed)}
    reason = f"confirmed_in_scope:{confirmed.scope}"
    released = 0
    for sid_hex, recipient in waiting.items():
        scope = scope_for(recipient, ctx.settings)
        sid = UUID(sid_hex)
        sender = ctx.load_sender(unit, sid)
        if sender is None:
            sender = Sender.first_verdict(
                sid,
                trigger="authorize",
                address=confirmed.address,
                scope=scope,
                timestamp=ts(now),
                actor=confirmed.address,
                reason=reason,
            )
        elif sender.state in CHALLENGEABLE or sender.challenge_pending:
            sender.authorize(timestamp=ts(now), actor=confirmed.address, reason=reason)
        else:
            continue  # authorized already, or blocked: the mailbox's own verdict stands
        unit.senders[sid] = sender
        released += release_held(ctx, unit, sender, f"sender_confirmed:{confirmed.address}", now)
    return released


def expire_waiting_scopes(
    ctx: Context,
    unit: Unit,
    failed: Sender,
    reason: str,
    now: float,
    why: Callable[[Context, Message], str | None] | None = None,
) -> int:
    """The challenge failed or lapsed: the copies that waited on it in other mailboxes expire
    with it (else maintenance would challenge an address that just failed, once per mailbox)."""
    expired = 0
    for row in _waiting_in_other_scopes(ctx, failed):
        msg = ctx.load_message(UUID(row.id))
        if msg is None or msg.state != HELD or (why is not None and why(ctx, msg) is None):
            continue
        msg.expire(timestamp=ts(now), actor=ENGINE, reason=f"{reason}_in_scope:{failed.scope}")
        unit.messages.append(msg)
        expired += 1
    return expired
