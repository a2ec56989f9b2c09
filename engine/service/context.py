"""What every use case shares: the application, its ports, the sender cache, and the one
unit-of-work runner (retry on a concurrency conflict, log only after the commit succeeded).
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from sourceauth.engine import tokens
from sourceauth.engine.api import Incoming
from sourceauth.engine.collector import collector_paused
from sourceauth.engine.errors import TemporaryFailure
from sourceauth.engine.logs import get_logger
from sourceauth.engine.message import Message
from sourceauth.engine.policy import ChallengeRateLimiter
from sourceauth.engine.ports import (
    BlobStore,
    CapClaim,
    CapsTaken,
    ChallengeTransport,
    Clock,
    DeliveryTransport,
    MailboxClaim,
    ViewStore,
)
from sourceauth.engine.rules import Rule, RuleBook, RuleCache
from sourceauth.engine.sender import Sender
from sourceauth.engine.service.routing import Plan, plan
from sourceauth.engine.settings import EngineSettings

if TYPE_CHECKING:
    from sourceauth.engine.application import SourceAuth

log = get_logger(__name__)

T = TypeVar("T")
ENGINE = "engine"  # the actor of every decision the engine takes by itself
MAX_CONFLICT_RETRIES = 8
SENDER_CACHE_SIZE = 20_000
PLAN_CACHE_SIZE = 4_096  # envelopes whose routing plan is remembered (Context.plan)
SENDER_CACHE_TTL = 2.0  # seconds a cached sender is trusted before a check for newer events
BATCH_LIMIT = 500
MAILBOXES_PRUNE_MIN = 10_000  # pending-challenge mailboxes kept before lapsed ones are dropped
WORK_LEASE = EngineSettings().work_lease  # the default of settings.work_lease (seconds)


def ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


@dataclass
class Unit:
    """Aggregates touched by one unit of work, saved together in one transaction, and the
    log lines it will emit once that transaction is committed."""

    senders: dict[UUID, Sender] = field(default_factory=dict)
    messages: list[Message | Message.Arrived] = field(default_factory=list)  # in decision order
    absent: set[UUID] = field(default_factory=set)  # senders known not to exist (no read needed)
    logs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Challenges this unit queued, counted against the caps once it commits (a retried unit
    # counts once): (registered domain, sender mailbox, sender id, challenge id, expires).
    challenges: list[tuple[str, str, UUID, str, float]] = field(default_factory=list)
    challenged_domains: Counter[str] = field(default_factory=Counter)  # of `challenges`
    challenged_mailboxes: set[str] = field(default_factory=set)  # of `challenges`
    rules: list[Rule] = field(default_factory=list)  # rules declared or removed (engine/rules.py)
    # Mailbox -> the challenge id this unit saw end there (over_cap freed the mailbox).
    replaced_mailboxes: dict[str, str] = field(default_factory=dict)

    def count_challenge(
        self, domain: str, mailbox: str, sender_id: UUID, challenge_id: str, expires: float
    ) -> None:
        self.challenges.append((domain, mailbox, sender_id, challenge_id, expires))
        self.challenged_domains[domain] += 1
        self.challenged_mailboxes.add(mailbox)

    def aggregates(self) -> list[Any]:
        return [*self.senders.values(), *self.messages, *self.rules]

    def note(self, event: str, **fields: Any) -> None:
        """A log line for after the commit (a retried unit logs nothing of its failed try)."""
        self.logs.append((event, fields))


@dataclass
class Rehearsal:
    """Units of work that record nothing (`maintain --dry-run`): each unit runs as usual, and
    what it would have saved stays here, where later units of the same pass find it."""

    senders: dict[UUID, Sender] = field(default_factory=dict)
    messages: dict[UUID, Message] = field(default_factory=dict)
    changes: list[tuple[Sender | Message, Any]] = field(default_factory=list)  # in order


class Context:
    """The engine's shared state: one per SourceAuth, used by every service module."""

    def __init__(
        self,
        app: SourceAuth,
        *,
        settings: EngineSettings,
        keyring: tokens.Keyring,
        views: ViewStore,
        blobs: BlobStore | None,
        challenges: ChallengeTransport | None,
        deliveries: DeliveryTransport | None,
        clock: Clock,
    ) -> None:
        self.app = app
        self.settings = settings
        self.keyring = keyring
        self.views = views
        self.blobs = blobs
        self.challenge_transport = challenges
        self.delivery_transport = deliveries
        self.clock = clock
        self.lock = threading.RLock()
        self.limiter = ChallengeRateLimiter(settings.limits)
        # Sender mailbox (extension removed) -> (sender id, challenge id) of the challenge it
        # was last sent: at most one pending challenge per mailbox, whatever the extension.
        self.pending_mailboxes: dict[str, tuple[UUID, str, float]] = {}  # + challenge expiry
        self._prune_mailboxes_at = MAILBOXES_PRUNE_MIN
        self.full_mailboxes: set[str] = set()
        self.in_flight: set[str] = set()  # challenge and message ids a dispatcher is sending
        self.holder = uuid.uuid4().hex  # this engine, as the holder of outbound work leases
        self._senders: OrderedDict[UUID, Sender] = OrderedDict()
        self._sender_ids: dict[tuple[str, str], UUID] = {}
        self._checked: dict[UUID, float] = {}  # when each cached sender was last read
        self.rule_cache = RuleCache()  # the compiled rules routing consults (service/rules.py)
        # (settings, rules, envelope -> its routing plan under them): one tuple, read once, so
        # a thread still planning with older settings only ever fills that older dict.
        self._plans: tuple[EngineSettings | None, RuleBook | None, dict[Any, Plan]] = (
            None,
            None,
            {},
        )
        self.rehearsal: Rehearsal | None = None  # set while units record nothing

    # ----------------------------------------------------------------- ids and views

    def sender_id(self, address: str, scope: str) -> UUID:
        """The keyed id of a sender in a scope (an HMAC: ids cannot be guessed from addresses)."""
        key = (address, scope)
        found = self._sender_ids.get(key)
        if found is None:
            found = tokens.aggregate_id(self.keyring, "sender", scope, address)
            if len(self._sender_ids) >= SENDER_CACHE_SIZE:
                self._sender_ids.clear()
            self._sender_ids[key] = found
        return found

    def observe(self, originator_id: UUID, version: int) -> None:
        """Called by the views for every event they apply: drop senders another process changed."""
        cached = self._senders.get(originator_id)
        if cached is not None and cached.version < version:
            del self._senders[originator_id]

    def catch_up(self) -> None:
        """Bring the views up to the log (call with the lock held)."""
        self.views.catch_up(self.observe)

    def is_cached(self, sender_id: UUID) -> bool:
        return sender_id in self._senders

    def cached_state(self, sender_id: UUID) -> str | None:
        """The cached sender's state, None when not cached (memory only: no read, no refresh)."""
        cached = self._senders.get(sender_id)
        return None if cached is None else cached.state

    def plan(self, incoming: Incoming, rules: RuleBook) -> Plan:
        """routing.plan of this envelope, remembered: a plan is a pure function of the
        envelope, the settings and the rules, and envelopes repeat (a whitelisted
        correspondent writes to the same people again). Forgotten when the settings or the
        rules change (another object) and when PLAN_CACHE_SIZE envelopes are held."""
        settings = self.settings
        held = self._plans
        if held[0] is not settings or held[1] is not rules:
            held = self._plans = (settings, rules, {})
        plans = held[2]
        key = (incoming.mail_from, tuple(incoming.recipients))
        found = plans.get(key)
        if found is None:
            found = plan(incoming, settings, rules)
            if len(plans) >= PLAN_CACHE_SIZE:
                plans.clear()
            plans[key] = found
        return found

    # ----------------------------------------------------------------- loading

    def load_sender(self, unit: Unit, sender_id: UUID) -> Sender | None:
        found = unit.senders.get(sender_id)
        if found is None and self.rehearsal is not None:
            found = self.rehearsal.senders.get(sender_id)
        if found is not None:
            return found
        if sender_id in unit.absent:
            return None
        cached = self._senders.get(sender_id)
        if cached is None:
            try:
                cached = self.app.repository.get(sender_id)
            except AggregateNotFoundError:
                return None
            assert isinstance(cached, Sender)
            self._remember(cached)
        else:
            self._senders.move_to_end(sender_id)
            now = time.monotonic()
            if now - self._checked.get(sender_id, 0.0) > SENDER_CACHE_TTL:
                # Another process or node may have moved this sender on: bounded staleness.
                self.refresh_sender(cached)
        return cached

    def refresh_sender(self, sender: Sender) -> None:
        """Apply events another process or node recorded since `sender` was read (a sender
        with changes of this unit not yet saved is left as it is)."""
        if sender.pending_events:
            return
        for event in self.app.events.get(sender.id, gt=sender.version):
            event.mutate(sender)  # type: ignore[attr-defined]
        self._checked[sender.id] = time.monotonic()

    def load_message(self, message_id: UUID) -> Message | None:
        if self.rehearsal is not None and message_id in self.rehearsal.messages:
            return self.rehearsal.messages[message_id]
        try:
            msg: Any = self.app.repository.get(message_id)
        except AggregateNotFoundError:
            return None
        assert isinstance(msg, Message)
        return msg

    def held_of(self, unit: Unit, sender_id_hex: str, states: frozenset[str]) -> Iterator[Message]:
        """Held copies waiting on this sender: committed ones (views, caught up first) and
        ones decided earlier in this same unit of work."""
        self.catch_up()
        seen: set[UUID] = set()
        for index, item in enumerate(list(unit.messages)):
            if isinstance(item, Message.Arrived):
                seen.add(item.originator_id)
                if not item.held_for(sender_id_hex):
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
            msg = self.load_message(uid)
            if msg is not None and msg.state in states:
                unit.messages.append(msg)
                yield msg

    # ----------------------------------------------------------------- the unit of work

    def _remember(self, sender: Sender) -> None:
        self._senders[sender.id] = sender
        self._senders.move_to_end(sender.id)
        self._checked[sender.id] = time.monotonic()
        while len(self._senders) > SENDER_CACHE_SIZE:
            evicted, _ = self._senders.popitem(last=False)
            self._checked.pop(evicted, None)

    def cap_claim(self, unit: Unit, now: float) -> CapClaim:
        """What the store counts for this unit's challenges, in its events' transaction."""
        limits = self.settings.limits
        return CapClaim(
            now=now,
            minute=int(now // 60),
            domains=tuple(unit.challenged_domains.items()),
            per_domain=limits.challenges_per_domain_per_hour,
            total=limits.challenges_per_hour,
            mailboxes=tuple(
                MailboxClaim(
                    mailbox=mailbox,
                    sender_id=sender_id.hex,
                    challenge_id=challenge_id,
                    expires=expires,
                    replaces=unit.replaced_mailboxes.get(mailbox, ""),
                )
                for _, mailbox, sender_id, challenge_id, expires in unit.challenges
            ),
        )

    def caps_taken(self, taken: CapsTaken) -> None:
        """Learn the store's counts and the mailboxes other nodes hold, for the retry."""
        self.limiter.at_least(taken.counts, self.clock())
        for mailbox, (sender_id, challenge_id, expires) in taken.mailboxes.items():
            sid = UUID(sender_id)
            self.pending_mailboxes[mailbox] = (sid, challenge_id, expires)
            self._senders.pop(sid, None)  # read that sender fresh: is its challenge pending?

    def _commit(self, unit: Unit, save_kwargs: dict[str, Any]) -> None:
        aggregates = unit.aggregates()
        if not aggregates:
            return
        if unit.challenges:
            save_kwargs = {**save_kwargs, "caps": self.cap_claim(unit, self.clock())}
        try:
            self.app.save_unit(*aggregates, **save_kwargs)
        except Exception:
            # In-memory state ran ahead of the log: forget it, reload on the retry.
            for sid in unit.senders:
                self._senders.pop(sid, None)
            raise
        for sender in unit.senders.values():
            self._remember(sender)
        self._account(unit)

    def _account(self, unit: Unit) -> None:
        """Count the challenges a unit queued (caps, one per mailbox)."""
        now = self.clock()
        for domain, mailbox, sender_id, challenge_id, expires in unit.challenges:
            self.limiter.record(domain, now)
            self.pending_mailboxes[mailbox] = (sender_id, challenge_id, expires)
        if len(self.pending_mailboxes) > self._prune_mailboxes_at:
            # Memory bounded by the challenges still within their lifetime (amortised O(1)).
            self.pending_mailboxes = {m: v for m, v in self.pending_mailboxes.items() if v[2] > now}
            self._prune_mailboxes_at = max(MAILBOXES_PRUNE_MIN, 2 * len(self.pending_mailboxes))

    def _rehearse(self, unit: Unit, rehearsal: Rehearsal) -> None:
        """What `_commit` would save, kept in the rehearsal instead (see `rehearsing`)."""
        for aggregate in unit.aggregates():
            if isinstance(aggregate, Message.Arrived):  # only receive records these
                continue
            for event in aggregate.collect_events():
                rehearsal.changes.append((aggregate, event))
            if isinstance(aggregate, Sender):
                rehearsal.senders[aggregate.id] = aggregate
                self._senders.pop(aggregate.id, None)  # changed in place, never saved
            else:
                rehearsal.messages[aggregate.id] = aggregate
        self._account(unit)

    @contextmanager
    def rehearsing(self) -> Iterator[Rehearsal]:
        """Units of work inside record nothing: no event, no view row, no log line; the
        in-memory caps and caches are as they were afterwards."""
        saved = (copy.deepcopy(self.limiter), dict(self.pending_mailboxes))
        prune_at = self._prune_mailboxes_at
        self.rehearsal = Rehearsal()
        try:
            yield self.rehearsal
        finally:
            self.rehearsal = None
            self.limiter, self.pending_mailboxes = saved
            self._prune_mailboxes_at = prune_at
            self._senders.clear()

    def run(self, what: str, work: Callable[[Unit], T], **save_kwargs: Any) -> T:
        """One unit of work under the lock: decide on fresh state, save everything it touched
        in one transaction, redo it all after a conflict; then log what it did, once."""
        for attempt in range(1, MAX_CONFLICT_RETRIES + 1):
            unit = Unit()
            with self.lock, collector_paused():
                try:
                    result = work(unit)
                    if self.rehearsal is not None:
                        self._rehearse(unit, self.rehearsal)
                        return result  # nothing happened: nothing to log
                    self._commit(unit, save_kwargs)
                except IntegrityError as exc:
                    if isinstance(exc, CapsTaken):
                        self.caps_taken(exc)
                    log.info("concurrency_conflict", use_case=what, attempt=attempt)
                    self.catch_up()
                    continue
                except BaseException:
                    # A unit that failed half-way may have moved cached senders ahead of the log.
                    self._senders.clear()
                    raise
            for event, fields in unit.logs:
                log.info(event, **fields)
            return result
        raise TemporaryFailure(f"{what}: too much contention, try again later")
