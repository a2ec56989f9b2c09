"""The library API: `SourceAuth`, a thin facade over the use cases in engine/service/.

Each use case loads aggregates, calls a verb, and saves every touched aggregate in one
transaction (service/context.py retries it on fresh state after a concurrency conflict).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEvent
from eventsourcing.persistence import ApplicationRecorder, Mapper, Recording

from sourceauth.engine import tokens
from sourceauth.engine.api import (
    ConfirmResult,
    FailureResult,
    HeldMessage,
    HistoryEntry,
    Incoming,
    LinkState,
    MaintenancePlan,
    MaintenanceReport,
    Receipt,
    SenderView,
    StateAt,
)
from sourceauth.engine.errors import NotFound
from sourceauth.engine.policy import ChallengeRateLimiter
from sourceauth.engine.ports import (
    BlobStore,
    ChallengeTransport,
    Clock,
    DeliveryTransport,
    ViewStore,
)
from sourceauth.engine.rules import GLOBAL, RuleView
from sourceauth.engine.service import (
    caps,
    correspondents,
    dispatch,
    imports,
    maintenance,
    operator,
    queries,
    receive,
    replies,
)
from sourceauth.engine.service import rules as rulebook
from sourceauth.engine.service.context import BATCH_LIMIT, Context
from sourceauth.engine.service.routing import scope_for
from sourceauth.engine.settings import EngineSettings


def system_clock() -> float:
    return time.time()


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
        self.views: ViewStore = views_factory(self.recorder, self.mapper)
        self._ctx = Context(
            self,
            settings=settings,
            keyring=keyring,
            views=self.views,
            blobs=blobs,
            challenges=challenges,
            deliveries=deliveries,
            clock=clock,
        )
        now = clock()
        with self._ctx.lock:
            self._ctx.catch_up()
            self.limiter.seed(self.views.recent_challenges(now - 3600.0))
            caps.seed(self._ctx)

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

    def save_unit(self, *objs: Aggregate | DomainEvent, **kwargs: Any) -> None:
        """What the engine's units of work save through (service/context.py): `save`'s events
        in one transaction, without the Recording and Notification of each event, which
        nobody reads (SourceAuth has no `_notify` subscriber). With eventsourcing's aggregate
        cache on, it is `save` (the cache learns the saved aggregates there)."""
        if self.repository.cache:
            self.save(*objs, **kwargs)
            return
        events: list[Any] = []
        for obj in objs:
            if isinstance(obj, DomainEvent):
                events.append(obj)
            else:
                events.extend(obj.collect_events())
        to_stored = self.mapper.to_stored_event
        stored = [to_stored(event) for event in events]
        self.recorder.insert_events(stored, tracking=None, **kwargs)  # as EventStore.put

    # ----------------------------------------------------------------- what it runs with

    @property
    def settings(self) -> EngineSettings:
        return self._ctx.settings

    @settings.setter
    def settings(self, settings: EngineSettings) -> None:
        self._ctx.settings = settings

    @property
    def keyring(self) -> tokens.Keyring:
        return self._ctx.keyring

    @property
    def clock(self) -> Clock:
        return self._ctx.clock

    @property
    def blobs(self) -> BlobStore | None:
        return self._ctx.blobs

    @property
    def challenge_transport(self) -> ChallengeTransport | None:
        return self._ctx.challenge_transport

    @property
    def delivery_transport(self) -> DeliveryTransport | None:
        return self._ctx.delivery_transport

    @property
    def limiter(self) -> ChallengeRateLimiter:
        return self._ctx.limiter

    # ----------------------------------------------------------------- views and ids

    def sender_id(self, address: str, scope: str = "global") -> UUID:
        """The keyed id of a sender in a scope (an HMAC: ids cannot be guessed from addresses)."""
        return self._ctx.sender_id(address, scope)

    def scope_for(self, recipient: str) -> str:
        return scope_for(recipient, self.settings)

    def catch_up(self) -> None:
        """Bring the views up to the log (other processes or nodes may have written to it)."""
        with self._ctx.lock:
            self._ctx.catch_up()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every use case of this instance (e.g. while the views are rebuilt)."""
        with self._ctx.lock:
            yield

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
        return receive.receive_many(self._ctx, batch, attachments)

    def submit_outbound_many(
        self,
        batch: Sequence[Incoming],
        *,
        attachments: Sequence[tuple[str, bytes]] = (),
        learn: bool = True,
    ) -> list[Receipt]:
        """Mail local users sent out on a path the operator trusts as authenticated: queued
        for the next hop as it is, and with `learn` its recipients authorized in the sending
        protected user's scope (engine/service/correspondents.py). One transaction."""
        return correspondents.submit_many(self._ctx, batch, attachments, learn)

    # ----------------------------------------------------------------- replies and reports

    def confirm(self, token: str, claimants: Iterable[str]) -> ConfirmResult:
        """A reply carrying `token` from one of `claimants` (envelope sender, From)."""
        return replies.confirm(self._ctx, token, claimants)

    def confirm_by_link(self, token: str, *, actor: str = "web") -> ConfirmResult:
        """The challenge link's button was pressed: confirm the token's own challenged sender."""
        return replies.confirm_by_link(self._ctx, token, actor)

    def link_state(self, token: str) -> LinkState:
        """What pressing the challenge link's button would do now (records nothing)."""
        return replies.link_state(self._ctx, token)

    def challenge_failed(self, token: str, diagnostic: str, source: str = "dsn") -> FailureResult:
        """The challenge carrying `token` could not be delivered (a DSN, or a relay 5xx)."""
        return replies.challenge_failed(self._ctx, token, diagnostic, source)

    # ----------------------------------------------------------------- operator verbs

    def authorize(
        self,
        address: str,
        *,
        scope: str = "global",
        actor: str = "operator",
        reason: str = "manual",
    ) -> SenderView:
        """Put a sender on the whitelist and release everything held from it."""
        return operator.authorize(self._ctx, address, scope, actor, reason)

    def block(
        self,
        address: str,
        *,
        scope: str = "global",
        actor: str = "operator",
        reason: str = "manual",
    ) -> SenderView:
        """Never deliver and never challenge this sender; its held mail is discarded."""
        return operator.block(self._ctx, address, scope, actor, reason)

    def forget(
        self,
        address: str,
        *,
        scope: str = "global",
        actor: str = "operator",
        reason: str = "manual",
    ) -> SenderView:
        """Make a sender a stranger again (its next message is challenged)."""
        return operator.forget(self._ctx, address, scope, actor, reason)

    def release(
        self, message_id: str, *, actor: str = "operator", reason: str = "manual"
    ) -> HeldMessage:
        """Release one held message to its recipients."""
        return operator.release(self._ctx, message_id, actor, reason)

    def discard(
        self, message_id: str, *, actor: str = "operator", reason: str = "manual"
    ) -> HeldMessage:
        """Drop one held message (recorded; its original is removed at maintenance)."""
        return operator.discard(self._ctx, message_id, actor, reason)

    # ----------------------------------------------------------------- rules

    def add_rule(
        self,
        action: str,
        pattern: str,
        *,
        scope: str = GLOBAL,
        actor: str = "operator",
        reason: str = "manual",
    ) -> RuleView:
        """Declare a rule (docs/rules.md); an identical active rule records nothing."""
        found, _ = rulebook.add_many(
            self._ctx, [rulebook.declared(action, pattern, scope)], actor, reason
        )
        return found[0]

    def add_rules(
        self,
        rules: Iterable[tuple[str, str, str]],
        *,
        actor: str = "operator",
        reason: str = "manual",
    ) -> tuple[list[RuleView], int]:
        """Declare (action, pattern, scope) rules in one transaction; returns them as they
        stand and how many were recorded now (an active one records nothing)."""
        declared = [rulebook.declared(a, p, s) for a, p, s in rules]
        return rulebook.add_many(self._ctx, declared, actor, reason)

    def import_senders(
        self,
        addresses: Sequence[str],
        rules: Iterable[tuple[str, str, str]] = (),
        *,
        state: str = "authorized",
        scope: str = GLOBAL,
        actor: str = "import",
        reason: str = "import",
        progress: Callable[[int], None] | None = None,
    ) -> imports.ImportResult:
        """Authorize or block (`state`) many senders in `scope`, in batches, and declare the
        (action, pattern, scope) rules; what is already so records nothing."""
        declared = [rulebook.declared(a, p, s) for a, p, s in rules]
        return imports.import_senders(
            self._ctx,
            addresses,
            declared,
            state=state,
            scope=scope,
            actor=actor,
            reason=reason,
            progress=progress,
        )

    def remove_rule(
        self, rule_id: str, *, actor: str = "operator", reason: str = "manual"
    ) -> RuleView:
        """Remove an active rule (it stays in the log and in `rules(include_removed=True)`)."""
        return rulebook.remove(self._ctx, rule_id, actor, reason)

    def rules(self, *, include_removed: bool = False) -> list[RuleView]:
        """The rules, oldest first: the active ones, or every rule ever declared."""
        return rulebook.list_rules(self._ctx, include_removed=include_removed)

    # ----------------------------------------------------------------- outbound and maintenance

    def dispatch_challenges(
        self, limit: int = BATCH_LIMIT, stop: Callable[[], bool] | None = None
    ) -> tuple[int, int, int]:
        """Send due challenges through the transport, then record every outcome in one
        transaction; returns (sent, deferred, failed). Once `stop()` is true (the process
        stops) the rest of the batch is left due, its leases released, for the next taker."""
        return dispatch.dispatch_challenges(self._ctx, limit, stop or dispatch.never)

    def dispatch_deliveries(
        self, limit: int = BATCH_LIMIT, stop: Callable[[], bool] | None = None
    ) -> tuple[int, int, int]:
        """Hand due message copies to the next hop, then record every outcome in one
        transaction; returns (delivered, deferred, failed). `stop` as for challenges."""
        return dispatch.dispatch_deliveries(self._ctx, limit, stop or dispatch.never)

    def token_for(self, challenge_id: str) -> str:
        """The token of a pending challenge (for tests and operators; the same on every resend)."""
        token = dispatch.token_for(self._ctx, challenge_id)
        if token is None:
            raise NotFound(f"no challenge {challenge_id}")
        return token

    def maintain(self, *, dispatch: bool = True) -> MaintenanceReport:
        """One idempotent maintenance pass: lapse, expire, release, purge, collect, retry."""
        return maintenance.maintain(self._ctx, dispatch_now=dispatch)

    def maintain_dry_run(self) -> MaintenancePlan:
        """What `maintain` would do now, computed by the same pass, recording nothing."""
        return maintenance.rehearse(self._ctx)

    # ----------------------------------------------------------------- queries

    def refresh_full_mailboxes(self) -> None:
        """Re-read which protected mailboxes hold `held_per_recipient` copies (a timer calls it;
        whoever runs the dispatchers keeps the views current)."""
        queries.refresh_full_mailboxes(self._ctx)

    def mailbox_may_be_full(self, recipient: str) -> bool:
        """Memory-only first check for `quarantine_full`, safe on an event loop."""
        return queries.mailbox_may_be_full(self._ctx, recipient)

    def may_be_challenged(self, mail_from: str, recipients: Sequence[str]) -> bool:
        """Memory-only, safe on an event loop: False when this envelope cannot draw a
        challenge (see queries.may_be_challenged), so an adapter may skip costly checks."""
        return queries.may_be_challenged(self._ctx, mail_from, recipients)

    def quarantine_full(self, mail_from: str, recipient: str) -> bool:
        """True when `recipient` already has `held_per_recipient` held copies and this mail
        would be held too (the SMTP side answers 452 for that recipient: no loss, a retry later)."""
        return queries.quarantine_full(self._ctx, mail_from, recipient)

    def whitelist(self, *, state: str | None = None, limit: int | None = None) -> list[SenderView]:
        return queries.whitelist(self._ctx, state, limit)

    def sender(self, address: str, scope: str = "global") -> SenderView:
        return queries.sender(self._ctx, address, scope)

    def quarantine(
        self,
        *,
        state: str | None = None,
        sender: str | None = None,
        limit: int | None = None,
        states: Collection[str] | None = None,
        recipient: str | None = None,
        offset: int = 0,
    ) -> list[HeldMessage]:
        """Copies in the quarantine view, oldest first: of one `state` or any of `states`,
        from `sender`, for `recipient`; `limit` rows after skipping `offset`."""
        return queries.quarantine(
            self._ctx, state, sender, limit, states=states, recipient=recipient, offset=offset
        )

    def held_message(self, message_id: str) -> HeldMessage:
        return queries.held_message(self._ctx, message_id)

    def original(self, message_id: str) -> bytes:
        """The original bytes of a quarantined copy (NotFound once purged)."""
        return queries.original(self._ctx, message_id)

    def history(self, subject: str) -> list[HistoryEntry]:
        """Every recorded event about an address (its senders, their held mail) or a message id."""
        return queries.history(self._ctx, subject)

    def state_at(self, at: datetime, subject: str | None = None) -> StateAt:
        """Senders and message copies as they stood at `at` (aware), replayed from the log."""
        return queries.state_at(self._ctx, at, subject)

    def explain(self, message_id: str) -> str:
        """One readable paragraph on a message copy, from the log."""
        return queries.explain(self._ctx, message_id)

    def close(self) -> None:
        self.views.close()
        super().close()
