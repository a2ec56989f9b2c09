"""The library API: one application service over the Sender and Message aggregates.

Each use case loads aggregates, calls a verb, and saves every touched aggregate in one
transaction; optimistic-concurrency conflicts are retried on fresh state.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import getaddresses
from typing import Any, TypeVar
from uuid import UUID

import structlog
from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEvent
from eventsourcing.persistence import ApplicationRecorder, IntegrityError, Mapper, Recording
from eventsourcing.utils import get_topic

from sourceauth.engine import tokens
from sourceauth.engine.addresses import (
    AddressError,
    is_null_sender,
    normalize_address,
    split_extension,
)
from sourceauth.engine.api import (
    ChallengeRow,
    ConfirmResult,
    Decision,
    DeliveryJob,
    DeliveryResult,
    FailureResult,
    Headers,
    HeldMessage,
    HistoryEntry,
    Incoming,
    MaintenanceReport,
    OutgoingChallenge,
    Receipt,
    RecipientDecision,
    SenderView,
    SendOutcome,
    SendResult,
)
from sourceauth.engine.errors import IllegalTransition, InvalidInput, NotFound, TemporaryFailure
from sourceauth.engine.message import HELD_STATES, Message
from sourceauth.engine.policy import (
    ChallengeRateLimiter,
    ExemptAction,
    check_auth_gate,
    classify,
    is_automated,
    is_protected,
)
from sourceauth.engine.ports import (
    BlobStore,
    ChallengeTransport,
    Clock,
    DeliveryTransport,
    ViewStore,
)
from sourceauth.engine.sender import Sender
from sourceauth.engine.settings import EngineSettings

log = structlog.get_logger(__name__)
MESSAGE_TOPIC = get_topic(Message)

T = TypeVar("T")
ENGINE = "engine"
MAX_CONFLICT_RETRIES = 8
SENDER_CACHE_SIZE = 20_000
SENDER_CACHE_TTL = 2.0  # seconds a cached sender is trusted before a check for newer events
BATCH_LIMIT = 500


def system_clock() -> float:
    return time.time()


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _header(headers: Headers, name: str) -> str:
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return ""


def _backoff(attempt: int, initial: float, maximum: float) -> float:
    return float(min(maximum, initial * (2 ** max(0, attempt - 1))))


class _Batch:
    """Aggregates touched by one unit of work, saved together in one transaction."""

    def __init__(self) -> None:
        self.senders: dict[UUID, Sender] = {}
        self.messages: list[Aggregate | Message.Received] = []  # new copies, in decision order
        self.absent: set[UUID] = set()  # senders known not to exist (no read needed)

    def aggregates(self) -> list[Any]:
        return [*self.senders.values(), *self.messages]


class SourceAuth(Application[UUID]):
    """Challenge-response source authentication as an event-sourced application.

    Persistence is chosen by `env` (eventsourcing settings); the views, the blob store
    and the outbound transports are ports the adapters provide.
    """

    name = "SourceAuth"

    def __init__(
        self,
        *,
        settings: EngineSettings,
        keyring: tokens.Keyring,
        views_factory: Callable[[ApplicationRecorder, Mapper[UUID]], ViewStore],
        blobs: BlobStore | None = None,
        challenges: ChallengeTransport | None = None,
        deliveries: DeliveryTransport | None = None,
        clock: Clock = system_clock,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(env=env)
        self.settings = settings
        self.keyring = keyring
        self.clock = clock
        self.blobs = blobs
        self.challenge_transport = challenges
        self.delivery_transport = deliveries
        self.views: ViewStore = views_factory(self.recorder, self.mapper)
        self._lock = threading.RLock()
        self._senders: OrderedDict[UUID, Sender] = OrderedDict()
        self._sender_ids: dict[tuple[str, str], UUID] = {}
        self._checked: dict[UUID, float] = {}  # when each cached sender was last read from the log
        self._full_mailboxes: set[str] = set()
        self._in_flight: set[str] = set()
        self.limiter = ChallengeRateLimiter(settings.limits)
        now = clock()
        with self._lock:
            self.views.catch_up(self._observe)
            self.limiter.seed(self.views.recent_challenges(now - 3600.0))

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        """eventsourcing's save, without its per-object runtime Protocol checks (they cost
        more than encoding the event): everything this service saves is one of its aggregates."""
        if not all(isinstance(o, (Aggregate, DomainEvent)) for o in objs):
            return super().save(*objs, **kwargs)
        processing: ProcessingEvent[UUID] = ProcessingEvent()
        processing.saved_kwargs.update(kwargs)
        for obj in objs:
            if isinstance(obj, DomainEvent):
                processing.events.append(obj)
                continue
            processing.events.extend(obj.collect_events())
            processing.aggregates[obj.id] = obj
        recordings = self._record(processing)
        self._notify(recordings)
        return recordings

    # ----------------------------------------------------------------- ids and cache

    def sender_id(self, address: str, scope: str = "global") -> UUID:
        """The keyed id of a sender in a scope (an HMAC: ids cannot be guessed from addresses)."""
        key = (address, scope)
        found = self._sender_ids.get(key)
        if found is None:
            found = tokens.aggregate_id(self.keyring, "sender", scope, address)
            if len(self._sender_ids) >= SENDER_CACHE_SIZE:
                self._sender_ids.clear()
            self._sender_ids[key] = found
        return found

    def scope_for(self, recipient: str) -> str:
        if self.settings.scope == "global":
            return "global"
        base, _ = split_extension(recipient, self.settings.recipient_delimiter)
        return base

    def _observe(self, originator_id: UUID, version: int) -> None:
        """Called by the views for every event they apply: drop senders another process changed."""
        cached = self._senders.get(originator_id)
        if cached is not None and cached.version < version:
            del self._senders[originator_id]

    def _load_sender(self, batch: _Batch, sender_id: UUID) -> Sender | None:
        found = batch.senders.get(sender_id)
        if found is not None:
            return found
        if sender_id in batch.absent:
            return None
        cached = self._senders.get(sender_id)
        if cached is None:
            try:
                cached = self.repository.get(sender_id)
            except AggregateNotFoundError:
                return None
            assert isinstance(cached, Sender)
            self._remember(cached)
        else:
            self._senders.move_to_end(sender_id)
            now = time.monotonic()
            if now - self._checked.get(sender_id, 0.0) > SENDER_CACHE_TTL:
                # Another process or node may have moved this sender on: bounded staleness.
                for event in self.events.get(sender_id, gt=cached.version):
                    event.mutate(cached)  # type: ignore[attr-defined]
                self._checked[sender_id] = now
        return cached

    def _remember(self, sender: Sender) -> None:
        self._senders[sender.id] = sender
        self._senders.move_to_end(sender.id)
        self._checked[sender.id] = time.monotonic()
        while len(self._senders) > SENDER_CACHE_SIZE:
            evicted, _ = self._senders.popitem(last=False)
            self._checked.pop(evicted, None)

    def _commit(self, batch: _Batch, **recorder_kwargs: Any) -> None:
        aggregates = batch.aggregates()
        if not aggregates:
            return
        try:
            self.save(*aggregates, **recorder_kwargs)
        except Exception:
            # In-memory state ran ahead of the log: forget it, reload on the retry.
            for sid in batch.senders:
                self._senders.pop(sid, None)
            raise
        for sender in batch.senders.values():
            self._remember(sender)

    def _retrying(self, what: str, work: Callable[[], T]) -> T:
        """Run one unit of work under the lock, redoing it on fresh state after a conflict."""
        for attempt in range(1, MAX_CONFLICT_RETRIES + 1):
            with self._lock:
                try:
                    return work()
                except IntegrityError:
                    log.info("concurrency_conflict", use_case=what, attempt=attempt)
                    self.views.catch_up(self._observe)
                except BaseException:
                    # A unit that failed half-way may have moved cached senders ahead of the log.
                    self._senders.clear()
                    raise
        raise TemporaryFailure(f"{what}: too much contention, try again later")

    # ----------------------------------------------------------------- receive

    def receive(self, incoming: Incoming) -> Receipt:
        """Decide every recipient of one accepted message and record the decisions."""
        return self.receive_many([incoming])[0]

    def receive_many(
        self, batch: Sequence[Incoming], *, attachments: Sequence[tuple[str, bytes]] = ()
    ) -> list[Receipt]:
        """Group commit: decide each message, then save all of them in one transaction.
        `attachments` go to the event recorder with the events (a recorder that stores
        message originals in the same transaction uses them; see adapters/storage)."""
        for incoming in batch:
            self._validate(incoming)

        def work() -> list[Receipt]:
            unit = _Batch()
            self._prefetch_senders(unit, batch)
            receipts = [self._decide(unit, incoming) for incoming in batch]
            self._commit(unit, **({"blobs": list(attachments)} if attachments else {}))
            return receipts

        receipts = self._retrying("receive", work)
        for receipt in receipts:
            for d in receipt.decisions:
                log.info(
                    "message_decided",
                    receipt_id=receipt.receipt_id,
                    message_id=str(d.message_id) if d.message_id else None,
                    recipient=d.recipient,
                    decision=d.decision.value,
                    reason=d.reason,
                )
        return receipts

    def _prefetch_senders(self, unit: _Batch, batch: Sequence[Incoming]) -> None:
        """One view query for the whole batch instead of one event-store read per stranger.
        A sender the (possibly lagging) view does not know yet is created at version 1, which
        the event store refuses if another writer got there first: the unit is then redone."""
        wanted: set[UUID] = set()
        s = self.settings
        for incoming in batch:
            if is_null_sender(incoming.mail_from):
                continue
            sender = normalize_address(incoming.mail_from)
            for rcpt in incoming.recipients:
                address = normalize_address(rcpt)
                if is_protected(address, s.protected, s.recipient_delimiter):
                    sid = self.sender_id(sender, self.scope_for(address))
                    if sid not in self._senders:
                        wanted.add(sid)
        if wanted:
            known = self.views.known_senders([w.hex for w in wanted])
            unit.absent = {w for w in wanted if w.hex not in known}

    def _validate(self, incoming: Incoming) -> None:
        if not incoming.recipients:
            raise InvalidInput("a message needs at least one recipient")
        if len(incoming.recipients) > self.settings.max_recipients:
            raise InvalidInput(f"more than {self.settings.max_recipients} recipients")
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

    def _decide(self, unit: _Batch, incoming: Incoming) -> Receipt:
        now = self.clock()
        s = self.settings
        sender = "" if is_null_sender(incoming.mail_from) else normalize_address(incoming.mail_from)
        # A recipient named twice (in any case) gets one copy.
        recipients = list(dict.fromkeys(normalize_address(r) for r in incoming.recipients))
        decisions: list[RecipientDecision] = []
        deliver_now: list[tuple[str, str]] = []
        held: dict[UUID, list[str]] = {}
        hold_silently: dict[str, list[str]] = {}  # reason -> recipients, no sender to wait on
        discard: dict[str, list[str]] = {}
        challenges: list[str] = []
        exemption = None
        exemption_checked = False
        confirm_base = normalize_address(s.confirm_address)
        bounce_base = normalize_address(s.bounce_address)

        split = [(r, *split_extension(r, s.recipient_delimiter)) for r in recipients]
        if len(split) > 1:  # replies and reports first: a "reply all" confirms, then delivers
            split.sort(key=lambda item: item[1] not in (confirm_base, bounce_base))
        for rcpt, base, token in split:
            if base == confirm_base:
                reason = self._confirm_reply(unit, sender, incoming.headers, token, now)
                discard.setdefault(reason, []).append(rcpt)
                continue
            if base == bounce_base:
                reason = self._bounce_report(unit, incoming, token, now)
                discard.setdefault(reason, []).append(rcpt)
                continue
            if not is_protected(rcpt, s.protected, s.recipient_delimiter):
                deliver_now.append((rcpt, "recipient_unprotected"))
                continue
            sender_obj: Sender | None = None
            sid: UUID | None = None
            if sender:
                sid = self.sender_id(sender, self.scope_for(rcpt))
                sender_obj = self._load_sender(unit, sid)
                if sender_obj is not None and sender_obj.state == "blocked":
                    discard.setdefault("sender_blocked", []).append(rcpt)
                    continue
                if sender_obj is not None and sender_obj.state == "authorized":
                    deliver_now.append((rcpt, "sender_authorized"))
                    continue
            if not exemption_checked:  # only for mail that would otherwise be challenged
                exemption = classify(
                    incoming.mail_from, incoming.headers, spam_headers=s.spam_headers
                )
                exemption_checked = True
            if exemption is not None:
                action = s.exemptions.get(exemption.exemption, ExemptAction.HOLD)
                reason = f"never_challenge:{exemption.exemption.value}: {exemption.detail}"
                if action == ExemptAction.DELIVER:
                    deliver_now.append((rcpt, reason))
                elif action == ExemptAction.DISCARD:
                    discard.setdefault(reason, []).append(rcpt)
                else:
                    hold_silently.setdefault(reason, []).append(rcpt)
                continue
            assert sid is not None
            held.setdefault(sid, []).append(rcpt)

        def message(
            rcpts: list[str], trigger: str, reason: str, sender_id: str, expires: float
        ) -> UUID:
            mid = uuid.uuid4()
            fields = dict(
                timestamp=_ts(now),
                receipt_id=incoming.blob.key,
                size=incoming.blob.size,
                sha256=incoming.blob.sha256,
                sender=sender,
                sender_id=sender_id,
                recipients=rcpts,
                subject=_header(incoming.headers, "Subject")[:300],
                message_id_header=_header(incoming.headers, "Message-ID")[:300],
                trigger=trigger,
                actor=ENGINE,
                reason=reason,
                expires_at=expires,
            )
            # Record the event alone and skip building an aggregate object nobody may read
            # (the hot path); _held_of builds one if a later input in this unit needs it.
            unit.messages.append(
                Message.Received(
                    originator_id=mid,
                    originator_version=1,
                    originator_topic=MESSAGE_TOPIC,
                    **fields,  # type: ignore[arg-type]
                )
            )
            return mid

        if deliver_now:
            reasons = sorted({r for _, r in deliver_now})
            mid = message([r for r, _ in deliver_now], "accept", "; ".join(reasons), "", 0.0)
            decisions += [
                RecipientDecision(r, Decision.DELIVER, why, mid) for r, why in deliver_now
            ]
        for reason, rcpts in hold_silently.items():
            mid = message(rcpts, "hold", reason, "", now + s.hold_lifetime)
            decisions += [RecipientDecision(r, Decision.HOLD, reason, mid) for r in rcpts]
        for reason, rcpts in discard.items():
            mid = message(rcpts, "discard", reason, "", 0.0)
            decision = Decision.DISCARD
            if reason.startswith("confirm"):
                decision = Decision.CONFIRM
            elif reason.startswith("bounce"):
                decision = Decision.BOUNCE
            decisions += [RecipientDecision(r, decision, reason, mid) for r in rcpts]
        for sid, rcpts in held.items():
            trigger, reason, expires = self._hold_for(unit, sid, sender, rcpts, incoming, now)
            if trigger == "challenge" and reason.startswith("challenge_queued"):
                challenges.append(unit.senders[sid].challenge_id)
            mid = message(rcpts, trigger, reason, sid.hex, expires)
            decision = Decision.CHALLENGE if trigger == "challenge" else Decision.HOLD
            decisions += [RecipientDecision(r, decision, reason, mid) for r in rcpts]
        if len(decisions) > 1:
            order = {r: i for i, r in enumerate(recipients)}
            decisions.sort(key=lambda d: order.get(d.recipient, 0))
        return Receipt(incoming.blob.key, tuple(decisions), tuple(challenges))

    def _hold_for(
        self,
        unit: _Batch,
        sid: UUID,
        sender: str,
        rcpts: list[str],
        incoming: Incoming,
        now: float,
    ) -> tuple[str, str, float]:
        """Hold mail from a sender not yet authorized; challenge it at most once. Returns
        (message trigger, reason, hold deadline)."""
        s = self.settings
        current = self._load_sender(unit, sid)
        hold_deadline = now + s.hold_lifetime
        if current is not None and current.challenge_pending:
            unit.senders[sid] = current
            if (
                current.outcome == "sent"
                and now - current.sent_at >= s.resend_after
                and current.resends < s.limits.max_resends
            ):
                current.trigger_event(
                    Sender.ChallengeResent,
                    timestamp=_ts(now),
                    actor=ENGINE,
                    reason="new_message_after_resend_interval",
                )
                return "challenge", "challenge_resent", max(current.expires_at, hold_deadline)
            return "challenge", "challenge_pending", max(current.expires_at, hold_deadline)
        gate_ok, gate_reason = check_auth_gate(
            s.auth_gate, sender.rsplit("@", 1)[1], incoming.headers
        )
        if not gate_ok:
            return "hold", f"auth_gate: {gate_reason}", hold_deadline
        domain = sender.rsplit("@", 1)[1]
        limited = self.limiter.check(domain, now)
        if limited is not None:
            return "hold", f"rate_limited: {limited}", hold_deadline
        challenge_id = tokens.new_challenge_id().hex()
        expires = float(int(now + s.challenge_lifetime) // 60 * 60)
        details = {
            "timestamp": _ts(now),
            "actor": ENGINE,
            "challenge_id": challenge_id,
            "kid": self.keyring.active_kid,
            "expires_at": expires,
            "subject": _header(incoming.headers, "Subject")[:300],
            "in_reply_to": _header(incoming.headers, "Message-ID")[:300],
            "recipient": rcpts[0],
        }
        if current is None:
            new = Sender._create(
                Sender.Registered,
                id=sid,
                address=sender,
                scope=self.scope_for(rcpts[0]),
                trigger="challenge",
                reason="first_message_from_unknown_sender",
                **details,
            )
            unit.senders[sid] = new
        else:
            current.trigger_event(
                Sender.Challenged, reason=f"new_message_from_{current.state}_sender", **details
            )
            unit.senders[sid] = current
        self.limiter.record(domain, now)
        return "challenge", "challenge_queued", max(expires, hold_deadline)

    # ----------------------------------------------------------------- replies and reports

    def _confirm_reply(
        self, unit: _Batch, sender: str, headers: Headers, token: str | None, now: float
    ) -> str:
        automated = is_automated(sender or "<>", headers)
        if automated is not None:
            return f"confirm_refused: automated reply never confirms ({automated.detail})"
        if not token:
            return "confirm_refused: no token in the confirm address"
        claimants = {sender} if sender else set()
        for _, addr in getaddresses([v for k, v in headers if k.lower() == "from"]):
            try:
                claimants.add(normalize_address(addr))
            except AddressError:
                continue
        result = self._confirm_in(unit, token, claimants, now)
        return f"confirm_{'accepted' if result.confirmed else 'refused'}: {result.reason}"

    def _bounce_report(
        self, unit: _Batch, incoming: Incoming, token: str | None, now: float
    ) -> str:
        if not token:
            return "bounce_ignored: no token in the bounce address"
        if incoming.bounce is None or not incoming.bounce.failed:
            return "bounce_ignored: not a permanent failure report"
        result = self._fail_in(unit, token, incoming.bounce.diagnostic, "dsn", now)
        return f"bounce_{'recorded' if result.recorded else 'ignored'}: {result.reason}"

    def _challenge_for_token(self, token: str) -> tuple[tokens.TokenClaims, ChallengeRow] | str:
        try:
            claims = tokens.parse(token)
        except tokens.TokenError as exc:
            return f"malformed token ({exc})"
        row = self.views.challenge(claims.challenge_id.hex())
        if row is None:
            self.views.catch_up(self._observe)
            row = self.views.challenge(claims.challenge_id.hex())
        if row is None:
            return "unknown challenge"
        return claims, row

    def confirm(self, token: str, claimants: Iterable[str]) -> ConfirmResult:
        """A reply carrying `token` from one of `claimants` (envelope sender, From)."""
        names: set[str] = set()
        for c in claimants:
            try:
                names.add(normalize_address(c))
            except AddressError:
                continue

        def work() -> ConfirmResult:
            unit = _Batch()
            result = self._confirm_in(unit, token, names, self.clock())
            self._commit(unit)
            return result

        return self._retrying("confirm", work)

    def _confirm_in(
        self, unit: _Batch, token: str, claimants: set[str], now: float
    ) -> ConfirmResult:
        found = self._challenge_for_token(token)
        if isinstance(found, str):
            log.info("confirm_refused", reason=found)
            return ConfirmResult(False, found)
        _, row = found
        if row.address not in claimants:
            log.info("confirm_refused", reason="not from the challenged sender", sender=row.address)
            return ConfirmResult(False, "reply is not from the challenged sender", row.address)
        try:
            tokens.verify(self.keyring, token, sender=row.address, scope=row.scope, now=int(now))
        except tokens.TokenError as exc:
            log.info("confirm_refused", reason=str(exc), sender=row.address)
            return ConfirmResult(False, f"token refused: {exc}", row.address)
        sender = self._load_sender(unit, UUID(row.sender_id))
        if (
            sender is None
            or sender.challenge_id != row.challenge_id
            or not sender.challenge_pending
        ):
            state = sender.state if sender is not None else "unknown"
            return ConfirmResult(
                False, f"challenge no longer pending (sender {state})", row.address
            )
        unit.senders[sender.id] = sender
        sender.trigger_event(
            Sender.Confirmed, timestamp=_ts(now), actor=row.address, reason="valid_reply"
        )
        released = self._release_held(unit, sender.id.hex, f"sender_confirmed:{row.address}", now)
        log.info("sender_confirmed", sender=row.address, scope=row.scope, released=released)
        return ConfirmResult(True, "sender confirmed", row.address, released)

    def _held_of(
        self, unit: _Batch, sender_id_hex: str, states: frozenset[str]
    ) -> Iterator[Message]:
        """Held copies waiting on this sender: committed ones (views, caught up first) and
        ones decided earlier in this same unit of work."""
        self.views.catch_up(self._observe)
        seen: set[UUID] = set()
        for index, item in enumerate(list(unit.messages)):
            if isinstance(item, Message.Received):
                seen.add(item.originator_id)
                if item.sender_id != sender_id_hex or item.trigger not in ("challenge", "hold"):
                    continue
                # A copy decided earlier in this unit: now it needs its aggregate after all.
                built = item.mutate(None)
                assert isinstance(built, Message)
                built.pending_events.append(item)
                unit.messages[index] = built
                item = built
            if not isinstance(item, Message):
                continue
            seen.add(item.id)
            if item.sender_id == sender_id_hex and item.state in states:
                yield item
        for mid in self.views.held_of_sender(sender_id_hex):
            uid = UUID(mid)
            if uid in seen:
                continue
            msg = self._load_message(uid)
            if msg is not None and msg.state in states:
                unit.messages.append(msg)
                yield msg

    def _release_held(self, unit: _Batch, sender_id_hex: str, reason: str, now: float) -> int:
        count = 0
        for msg in self._held_of(unit, sender_id_hex, HELD_STATES | {"expired"}):
            msg.trigger_event(Message.Released, timestamp=_ts(now), actor=ENGINE, reason=reason)
            count += 1
        return count

    def _expire_held(self, unit: _Batch, sender_id_hex: str, reason: str, now: float) -> int:
        count = 0
        for msg in self._held_of(unit, sender_id_hex, HELD_STATES):
            msg.trigger_event(Message.Expired, timestamp=_ts(now), actor=ENGINE, reason=reason)
            count += 1
        return count

    def _load_message(self, mid: UUID) -> Message | None:
        try:
            msg: Aggregate = self.repository.get(mid)
        except AggregateNotFoundError:
            return None
        assert isinstance(msg, Message)
        return msg

    def challenge_failed(self, token: str, diagnostic: str, source: str = "dsn") -> FailureResult:
        """The challenge carrying `token` could not be delivered (a DSN, or a relay 5xx)."""

        def work() -> FailureResult:
            unit = _Batch()
            result = self._fail_in(unit, token, diagnostic, source, self.clock())
            self._commit(unit)
            return result

        return self._retrying("challenge_failed", work)

    def _fail_in(
        self, unit: _Batch, token: str, diagnostic: str, source: str, now: float
    ) -> FailureResult:
        found = self._challenge_for_token(token)
        if isinstance(found, str):
            return FailureResult(False, found)
        _, row = found
        try:
            # Expired tokens still count: a late DSN is still proof the challenge failed.
            tokens.verify(self.keyring, token, sender=row.address, scope=row.scope, now=0)
        except tokens.TokenError as exc:
            return FailureResult(False, f"token refused: {exc}", row.address)
        sender = self._load_sender(unit, UUID(row.sender_id))
        if (
            sender is None
            or sender.challenge_id != row.challenge_id
            or not sender.challenge_pending
        ):
            return FailureResult(False, "challenge no longer pending", row.address)
        return self._fail_sender(unit, sender, diagnostic, source, now)

    def _fail_sender(
        self, unit: _Batch, sender: Sender, diagnostic: str, source: str, now: float
    ) -> FailureResult:
        unit.senders[sender.id] = sender
        sender.trigger_event(
            Sender.ChallengeFailed,
            timestamp=_ts(now),
            actor=source,
            reason="challenge_undeliverable",
            diagnostic=diagnostic[:500],
        )
        expired = 0
        if self.settings.failed_action == "purge":
            expired = self._expire_held(unit, sender.id.hex, "challenge_failed", now)
        log.info(
            "challenge_failed",
            sender=sender.address,
            source=source,
            diagnostic=diagnostic[:200],
            expired=expired,
        )
        return FailureResult(True, "challenge failed", sender.address, expired)

    # ----------------------------------------------------------------- operator verbs

    def _sender_verb(
        self, address: str, scope: str, verb: str, actor: str, reason: str
    ) -> SenderView:
        try:
            addr = normalize_address(address)
        except AddressError as exc:
            raise InvalidInput(f"bad address {address!r}: {exc}") from exc
        if scope != "global":
            try:
                scope = normalize_address(scope)
            except AddressError as exc:
                raise InvalidInput(f"bad scope {scope!r}: {exc}") from exc
        event_class = {
            "authorize": Sender.Authorized,
            "block": Sender.Blocked,
            "forget": Sender.Forgotten,
        }[verb]

        def work() -> SenderView:
            now = self.clock()
            unit = _Batch()
            sid = self.sender_id(addr, scope)
            sender = self._load_sender(unit, sid)
            if sender is None:
                if verb == "forget":
                    raise NotFound(f"no sender {addr} in scope {scope}")
                sender = Sender._create(
                    Sender.Registered,
                    id=sid,
                    timestamp=_ts(now),
                    address=addr,
                    scope=scope,
                    trigger=verb,
                    actor=actor,
                    reason=reason,
                    challenge_id="",
                    kid=0,
                    expires_at=0.0,
                    subject="",
                    in_reply_to="",
                    recipient="",
                )
            else:
                sender.trigger_event(event_class, timestamp=_ts(now), actor=actor, reason=reason)
            unit.senders[sid] = sender
            if verb == "authorize":
                self._release_held(unit, sid.hex, f"sender_authorized_by:{actor}", now)
            elif verb == "block":
                for msg in self._held_of(unit, sid.hex, HELD_STATES):
                    msg.trigger_event(
                        Message.Discarded, timestamp=_ts(now), actor=actor, reason="sender_blocked"
                    )
            self._commit(unit)
            log.info(f"sender_{verb}", sender=addr, scope=scope, actor=actor, reason=reason)
            return self._sender_view(sender)

        return self._retrying(verb, work)

    def authorize(
        self,
        address: str,
        *,
        scope: str = "global",
        actor: str = "operator",
        reason: str = "manual",
    ) -> SenderView:
        """Put a sender on the whitelist and release everything held from it."""
        return self._sender_verb(address, scope, "authorize", actor, reason)

    def block(
        self,
        address: str,
        *,
        scope: str = "global",
        actor: str = "operator",
        reason: str = "manual",
    ) -> SenderView:
        """Never deliver and never challenge this sender; its held mail is discarded."""
        return self._sender_verb(address, scope, "block", actor, reason)

    def forget(
        self,
        address: str,
        *,
        scope: str = "global",
        actor: str = "operator",
        reason: str = "manual",
    ) -> SenderView:
        """Make a sender a stranger again (its next message is challenged)."""
        return self._sender_verb(address, scope, "forget", actor, reason)

    def _message_verb(self, message_id: str, verb: str, actor: str, reason: str) -> HeldMessage:
        try:
            mid = UUID(message_id)
        except ValueError as exc:
            raise InvalidInput(f"bad message id {message_id!r}") from exc

        def work() -> HeldMessage:
            msg = self._load_message(mid)
            if msg is None:
                raise NotFound(f"no message {message_id}")
            msg.check("release" if verb == "release" else "discard")
            cls = Message.Released if verb == "release" else Message.Discarded
            msg.trigger_event(cls, timestamp=_ts(self.clock()), actor=actor, reason=reason)
            self.save(msg)
            log.info(f"message_{verb}d", message_id=str(mid), actor=actor, reason=reason)
            self.views.catch_up(self._observe)
            view = self.views.held_message(mid.hex)
            if view is None:
                raise NotFound(f"message {message_id} is not in the quarantine")
            return view

        return self._retrying(verb, work)

    def release(
        self, message_id: str, *, actor: str = "operator", reason: str = "manual"
    ) -> HeldMessage:
        """Release one held message to its recipients."""
        return self._message_verb(message_id, "release", actor, reason)

    def discard(
        self, message_id: str, *, actor: str = "operator", reason: str = "manual"
    ) -> HeldMessage:
        """Drop one held message (recorded; its original is removed at maintenance)."""
        return self._message_verb(message_id, "discard", actor, reason)

    # ----------------------------------------------------------------- queues

    def dispatch_challenges(self, limit: int = BATCH_LIMIT) -> tuple[int, int, int]:
        """Send due challenges through the transport, then record every outcome in one
        transaction; returns (sent, deferred, failed)."""
        if self.challenge_transport is None:
            return (0, 0, 0)
        with self._lock:
            self.views.catch_up(self._observe)
            due = [
                r
                for r in self.views.challenges_due(self.clock(), limit)
                if r.challenge_id not in self._in_flight
            ]
            self._in_flight.update(r.challenge_id for r in due)
        try:
            results = [(row, self._send(row)) for row in due]  # network I/O, outside the lock
            outcomes = self._retrying("challenge_send", lambda: self._record_sends(results))
        finally:
            with self._lock:
                self._in_flight.difference_update(r.challenge_id for r in due)
        return outcomes.count("sent"), outcomes.count("deferred"), outcomes.count("failed")

    def _send(self, row: ChallengeRow) -> SendResult:
        assert self.challenge_transport is not None
        challenge = OutgoingChallenge(
            challenge_id=row.challenge_id,
            token=self._mint_with(row),
            to=row.address,
            scope=row.scope,
            expires_at=row.expires,
            subject=row.subject,
            in_reply_to=row.in_reply_to,
            recipient=row.recipient,
        )
        return self.challenge_transport.send(challenge)

    def _record_sends(self, results: list[tuple[ChallengeRow, SendResult]]) -> list[str]:
        now = self.clock()
        unit = _Batch()
        outcomes: list[str] = []
        for row, result in results:
            sender = self._load_sender(unit, UUID(row.sender_id))
            if (
                sender is None
                or sender.challenge_id != row.challenge_id
                or not sender.challenge_pending
            ):
                outcomes.append("stale")
                continue
            unit.senders[sender.id] = sender
            attempt = sender.attempts + 1
            if result.outcome == SendOutcome.SENT:
                sender.trigger_event(
                    Sender.ChallengeSent,
                    timestamp=_ts(now),
                    relay=result.diagnostic[:200],
                    attempt=attempt,
                )
                outcome = "sent"
            elif result.outcome == SendOutcome.PERMANENT or (
                now - row.created >= self.settings.challenge_give_up_after
            ):
                self._fail_sender(unit, sender, result.diagnostic, "relay", now)
                outcome = "failed"
            else:
                delay = _backoff(
                    attempt,
                    self.settings.challenge_retry_initial,
                    self.settings.challenge_retry_max,
                )
                sender.trigger_event(
                    Sender.ChallengeDeferred,
                    timestamp=_ts(now),
                    diagnostic=result.diagnostic[:500],
                    attempt=attempt,
                    next_attempt_at=now + delay,
                )
                outcome = "deferred"
            outcomes.append(outcome)
            log.info(
                "challenge_" + outcome,
                sender=row.address,
                challenge_id=row.challenge_id,
                diagnostic=result.diagnostic[:200],
            )
        self._commit(unit)
        return outcomes

    def _mint_with(self, row: ChallengeRow) -> str:
        # A resend after a key rotation keeps the key it was first minted with: same token.
        if row.kid not in self.keyring.token_keys:
            raise TemporaryFailure(
                f"token key {row.kid} retired while challenge {row.challenge_id} pending"
            )
        keyring = tokens.Keyring(
            token_keys=self.keyring.token_keys, active_kid=row.kid, id_key=self.keyring.id_key
        )
        return tokens.mint(
            keyring,
            challenge_id=bytes.fromhex(row.challenge_id),
            sender=row.address,
            scope=row.scope,
            expires_at=int(row.expires),
        )

    def token_for(self, challenge_id: str) -> str:
        """The token of a pending challenge (for tests and operators; the same on every resend)."""
        with self._lock:
            self.views.catch_up(self._observe)
            row = self.views.challenge(challenge_id)
        if row is None:
            raise NotFound(f"no challenge {challenge_id}")
        return self._mint_with(row)

    def dispatch_deliveries(self, limit: int = BATCH_LIMIT) -> tuple[int, int, int]:
        """Hand due message copies to the next hop, then record every outcome in one
        transaction; returns (delivered, deferred, failed)."""
        if self.delivery_transport is None:
            return (0, 0, 0)
        with self._lock:
            self.views.catch_up(self._observe)
            due = [
                r
                for r in self.views.deliveries_due(self.clock(), limit)
                if r.message_id not in self._in_flight
            ]
            self._in_flight.update(r.message_id for r in due)
            copies = [self._load_message(UUID(r.message_id)) for r in due]
        try:
            results: list[tuple[UUID, DeliveryResult]] = []
            for msg in copies:  # network and disk I/O, outside the lock
                if msg is None or msg.state != "authorized" or not msg.pending:
                    continue
                job = DeliveryJob(
                    message_id=msg.id.hex,
                    receipt_id=msg.receipt_id,
                    sha256=msg.sha256,
                    mail_from=msg.sender,
                    recipients=tuple(msg.pending),
                )
                results.append((msg.id, self.delivery_transport.deliver(job)))
            outcomes = self._retrying("deliver", lambda: self._record_deliveries(results))
        finally:
            with self._lock:
                self._in_flight.difference_update(r.message_id for r in due)
        return outcomes.count("delivered"), outcomes.count("deferred"), outcomes.count("failed")

    def _record_deliveries(self, results: list[tuple[UUID, DeliveryResult]]) -> list[str]:
        now = self.clock()
        unit = _Batch()
        outcomes: list[str] = []
        for message_id, result in results:
            current = self._load_message(message_id)
            if current is None or current.state != "authorized":
                outcomes.append("stale")
                continue
            attempt = current.attempts + 1
            gave_up = now - current.created_on.timestamp() >= self.settings.delivery_give_up_after
            if result.temporary and not gave_up:
                delay = _backoff(
                    attempt, self.settings.delivery_retry_initial, self.settings.delivery_retry_max
                )
                current.trigger_event(
                    Message.DeliveryDeferred,
                    timestamp=_ts(now),
                    delivered=list(result.delivered),
                    rejected=list(result.rejected),
                    diagnostic=result.diagnostic[:500],
                    attempt=attempt,
                    next_attempt_at=now + delay,
                )
                outcome = "deferred"
            elif result.delivered or (
                current.pending and len(current.pending) < len(current.recipients)
            ):
                current.trigger_event(
                    Message.Delivered,
                    timestamp=_ts(now),
                    delivered=list(result.delivered),
                    rejected=list(result.rejected) + (list(result.temporary) if gave_up else []),
                    next_hop=result.next_hop,
                    diagnostic=result.diagnostic[:500],
                )
                outcome = "delivered"
            else:
                current.trigger_event(
                    Message.DeliveryFailed,
                    timestamp=_ts(now),
                    actor="next_hop",
                    reason="delivery_gave_up" if gave_up else "next_hop_refused",
                    rejected=list(result.rejected) + list(result.temporary),
                    diagnostic=result.diagnostic[:500],
                )
                outcome = "failed"
            unit.messages.append(current)
            outcomes.append(outcome)
            log.info(
                "message_" + outcome,
                message_id=message_id.hex,
                next_hop=result.next_hop,
                diagnostic=result.diagnostic[:200],
            )
        self._commit(unit)
        return outcomes

    # ----------------------------------------------------------------- maintenance

    def maintain(self, *, dispatch: bool = True) -> MaintenanceReport:
        """One idempotent maintenance pass: lapse, expire, release, purge, collect, retry."""
        report = MaintenanceReport()
        with self._lock:
            self.views.catch_up(self._observe)
        now = self.clock()

        for row in self._drain(lambda: self.views.challenges_lapsed(now, BATCH_LIMIT)):
            report.challenges_expired += self._each(
                report, functools.partial(self._lapse, row, now)
            )
        for mid in self._drain(lambda: self.views.held_lapsed(now, BATCH_LIMIT)):
            step = functools.partial(self._expire_message, mid, now)
            report.messages_expired += self._each(report, step)
        for mid in self._drain(lambda: self.views.held_of_authorized_senders(BATCH_LIMIT)):
            report.released += self._each(report, functools.partial(self._sweep_release, mid, now))
        for mid in self._drain(lambda: self.views.expired_messages(BATCH_LIMIT)):
            report.purged += self._each(report, functools.partial(self._purge, mid, now))
        with self._lock:
            self.views.catch_up(self._observe)
        if dispatch:
            report.challenges_sent, report.challenges_deferred, f1 = self.dispatch_challenges()
            report.challenges_failed += f1
            report.delivered, report.deliveries_deferred, report.deliveries_failed = (
                self.dispatch_deliveries()
            )
        # Last: originals whose every copy is done (delivered in this very pass included).
        # (A receipt's live count only falls once its copies exist, so no copy can need it again.)
        while self.blobs is not None:
            with self._lock:
                self.views.catch_up(self._observe)
                done = self.views.blobs_unreferenced(BATCH_LIMIT)
            if not done:
                break
            report.blobs_collected += self.blobs.delete_many(done)
            self.views.mark_blobs_collected(done)
        with self._lock:
            self.views.catch_up(self._observe)
        log.info("maintenance_done", **report.as_dict())
        return report

    def _drain(self, fetch: Callable[[], Sequence[T]]) -> Iterator[T]:
        """Rows from a view query, re-fetched until it comes back empty or stops changing."""
        seen: set[Any] = set()
        while True:
            with self._lock:
                self.views.catch_up(self._observe)
                rows = [r for r in fetch() if self._key(r) not in seen]
            if not rows:
                return
            for r in rows:
                seen.add(self._key(r))
                yield r

    @staticmethod
    def _key(row: Any) -> Any:
        return getattr(row, "challenge_id", row)

    def _each(self, report: MaintenanceReport, step: Callable[[], bool]) -> int:
        try:
            return int(self._retrying("maintain", step))
        except (IllegalTransition, TemporaryFailure) as exc:
            report.conflicts += 1
            log.warning("maintenance_step_skipped", error=str(exc))
            return 0

    def _lapse(self, row: ChallengeRow, now: float) -> bool:
        unit = _Batch()
        sender = self._load_sender(unit, UUID(row.sender_id))
        if (
            sender is None
            or sender.challenge_id != row.challenge_id
            or not sender.challenge_pending
        ):
            return False
        unit.senders[sender.id] = sender
        sender.trigger_event(
            Sender.ChallengeExpired,
            timestamp=_ts(now),
            actor=ENGINE,
            reason="challenge_lifetime_passed",
        )
        self._expire_held(unit, sender.id.hex, "challenge_expired", now)
        self._commit(unit)
        log.info("challenge_expired", sender=sender.address, challenge_id=row.challenge_id)
        return True

    def _expire_message(self, mid: str, now: float) -> bool:
        msg = self._load_message(UUID(mid))
        if msg is None or msg.state not in HELD_STATES or msg.expires_at > now:
            return False
        msg.trigger_event(
            Message.Expired, timestamp=_ts(now), actor=ENGINE, reason="hold_lifetime_passed"
        )
        self.save(msg)
        log.info("message_expired", message_id=mid, reason="hold_lifetime_passed")
        return True

    def _sweep_release(self, mid: str, now: float) -> bool:
        msg = self._load_message(UUID(mid))
        if msg is None or msg.state not in HELD_STATES or not msg.sender_id:
            return False
        unit = _Batch()
        sender = self._load_sender(unit, UUID(msg.sender_id))
        if sender is None or sender.state != "authorized":
            return False
        msg.trigger_event(
            Message.Released, timestamp=_ts(now), actor=ENGINE, reason="sender_authorized"
        )
        self.save(msg)
        log.info("message_released", message_id=mid, reason="sender_authorized")
        return True

    def _purge(self, mid: str, now: float) -> bool:
        msg = self._load_message(UUID(mid))
        if msg is None or msg.state != "expired":
            return False
        deleted = False
        if self.blobs is not None and not self._blob_shared(msg):
            # Delete first, record second: a crash in between leaves an idempotent retry.
            deleted = self.blobs.delete(msg.receipt_id)
            deleted = deleted or not self.blobs.exists(msg.receipt_id)
        msg.trigger_event(
            Message.Purged,
            timestamp=_ts(now),
            actor=ENGINE,
            reason=f"{msg.reason}; original deleted"
            if deleted
            else f"{msg.reason}; original kept for another copy",
            blob_deleted=deleted,
        )
        self.save(msg)
        log.info("message_purged", message_id=mid, blob_deleted=deleted)
        return True

    def _blob_shared(self, msg: Message) -> bool:
        """True if another live copy still needs the same original (this expired one counts)."""
        return self.views.live_copies(msg.receipt_id) > 1

    # ----------------------------------------------------------------- queries

    def refresh_full_mailboxes(self) -> None:
        """Re-read which protected mailboxes hold `held_per_recipient` copies (a timer calls it;
        whoever runs the dispatchers keeps the views current)."""
        self._full_mailboxes = self.views.recipients_holding(self.settings.held_per_recipient)

    def mailbox_may_be_full(self, recipient: str) -> bool:
        """Memory-only first check for `quarantine_full`, safe on an event loop."""
        if not self._full_mailboxes:
            return False
        try:
            return normalize_address(recipient) in self._full_mailboxes
        except AddressError:
            return False

    def quarantine_full(self, mail_from: str, recipient: str) -> bool:
        """True when `recipient` already has `held_per_recipient` held copies and this mail
        would be held too (the SMTP side answers 452 for that recipient: no loss, a retry later)."""
        s = self.settings
        try:
            rcpt = normalize_address(recipient)
        except AddressError:
            return False
        if not is_protected(rcpt, s.protected, s.recipient_delimiter):
            return False
        if self.views.held_count(rcpt) < s.held_per_recipient:
            return False
        if not is_null_sender(mail_from):  # only near the limit: is this sender let through?
            try:
                sender = self.sender(mail_from, self.scope_for(rcpt))
            except InvalidInput:
                return False
            if sender.state == "authorized":
                return False
        return True

    def whitelist(self, *, state: str | None = None, limit: int | None = None) -> list[SenderView]:
        with self._lock:
            self.views.catch_up(self._observe)
            return self.views.senders(state=state, limit=limit)

    def sender(self, address: str, scope: str = "global") -> SenderView:
        try:
            addr = normalize_address(address)
        except AddressError as exc:
            raise InvalidInput(f"bad address {address!r}: {exc}") from exc
        with self._lock:
            sender = self._load_sender(_Batch(), self.sender_id(addr, scope))
        if sender is None:
            return SenderView("", addr, scope, "unknown", 0.0, "", "")
        return self._sender_view(sender)

    @staticmethod
    def _sender_view(sender: Sender) -> SenderView:
        return SenderView(
            sender_id=sender.id.hex,
            address=sender.address,
            scope=sender.scope,
            state=sender.state,
            since=sender.since.timestamp() if sender.since else 0.0,
            via=sender.via,
            reason="",
        )

    def quarantine(
        self, *, state: str | None = None, sender: str | None = None, limit: int | None = None
    ) -> list[HeldMessage]:
        with self._lock:
            self.views.catch_up(self._observe)
            return self.views.quarantine(state=state, sender=sender, limit=limit)

    def held_message(self, message_id: str) -> HeldMessage:
        with self._lock:
            self.views.catch_up(self._observe)
            found = self.views.held_message(message_id.replace("-", ""))
        if found is None:
            raise NotFound(f"no held message {message_id}")
        return found

    def history(self, subject: str) -> list[HistoryEntry]:
        """Every recorded event about an address (its senders, their held mail) or a message id."""
        ids: list[tuple[str, UUID]] = []
        try:
            ids.append(("message", UUID(subject)))
        except ValueError:
            try:
                addr = normalize_address(subject)
            except AddressError as exc:
                raise InvalidInput(f"not an address or message id: {subject!r}") from exc
            with self._lock:
                self.views.catch_up(self._observe)
                rows = self.views.senders(address=addr)
                scopes = {r.scope for r in rows} | {"global"}
                for scope in sorted(scopes):
                    ids.append(("sender", self.sender_id(addr, scope)))
                for held in self.views.quarantine(sender=addr):
                    ids.append(("message", UUID(held.id)))
        entries: list[HistoryEntry] = []
        for kind, aid in ids:
            for event in self.events.get(aid):
                fields = {
                    k: v
                    for k, v in vars(event).items()
                    if k
                    not in ("originator_id", "originator_version", "timestamp", "originator_topic")
                }
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

    def close(self) -> None:
        self.views.close()
        super().close()
