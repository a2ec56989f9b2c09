"""Rules as use cases: add, remove and list them; and the compiled RuleBook that routing
consults, refreshed when the rules view changes (at once for a change made here; within
RULES_TTL seconds of the views catching up for one made by another process or node)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from sourceauth.engine import tokens
from sourceauth.engine.addresses import AddressError, normalize_address, split_extension
from sourceauth.engine.errors import InvalidInput, NotFound
from sourceauth.engine.rules import (
    ACTIVE,
    GLOBAL,
    Pattern,
    Rule,
    RuleBook,
    RuleView,
    check_action,
    parse_pattern,
)
from sourceauth.engine.service.context import Context, Unit, ts

if TYPE_CHECKING:
    from collections.abc import Sequence

RULES_TTL = 2.0  # seconds a compiled RuleBook is used before the view is asked for changes


def book(ctx: Context) -> RuleBook:
    """The active rules, compiled; compiled again when the rules view changed (cheap
    otherwise: one monotonic clock read per call, one small query per RULES_TTL). The view
    is read as it stands, never caught up here: the receive path must not replay a large
    backlog (an import by another process) under the lock; whoever keeps the views current
    (the dispatchers of `serve`, every command) brings new rules in."""
    cache = ctx.rule_cache
    now = time.monotonic()
    if now - cache.checked < RULES_TTL:
        return cache.book
    version = ctx.views.rules_version()
    if version != cache.version:
        cache.book = RuleBook(ctx.views.rules())
        cache.version = version
    cache.checked = now
    return cache.book


def forget_compiled(ctx: Context) -> None:
    """Compile again at the next message (this process changed a rule)."""
    ctx.rule_cache.checked = float("-inf")


def scope_of(scope: str, delimiter: str = "+") -> str:
    """ "global", or the mailbox a scope names (normalized, its extension removed: rules and
    routing both name a mailbox by its base address)."""
    if scope == GLOBAL:
        return scope
    try:
        base, _ = split_extension(normalize_address(scope), delimiter)
    except AddressError as exc:
        raise InvalidInput(f"bad scope {scope!r}: {exc}") from exc
    return base


def rule_id(ctx: Context, action: str, pattern: Pattern, scope: str) -> UUID:
    """One rule per (action, pattern, scope): declaring it again finds the same aggregate."""
    return tokens.aggregate_id(ctx.keyring, "rule", scope, action, pattern.text)


@dataclass(frozen=True)
class Declared:
    """A rule to declare: validated, normalized."""

    action: str
    pattern: Pattern
    scope: str


def declared(action: str, pattern: str, scope: str) -> Declared:
    """Validate one rule (InvalidInput names what is wrong)."""
    scope = scope_of(scope)
    check_action(action, scope)
    return Declared(action, parse_pattern(pattern), scope)


def add_many(
    ctx: Context, rules: Sequence[Declared], actor: str, reason: str
) -> tuple[list[RuleView], int]:
    """Declare rules in one transaction; an already active one records nothing. Returns the
    rules as they stand and how many were added (or added again)."""

    def work(unit: Unit) -> tuple[list[UUID], int]:
        now = ts(ctx.clock())
        ids: list[UUID] = []
        added = 0
        seen: set[UUID] = set()
        for item in rules:
            rid = rule_id(ctx, item.action, item.pattern, item.scope)
            ids.append(rid)
            if rid in seen:
                continue
            seen.add(rid)
            current = _load(ctx, rid)
            if current is None:
                current = Rule.declare(
                    rid,
                    action=item.action,
                    pattern=item.pattern,
                    scope=item.scope,
                    timestamp=now,
                    actor=actor,
                    reason=reason,
                )
            elif current.state == ACTIVE:
                continue
            else:
                current.add_again(timestamp=now, actor=actor, reason=reason)
            unit.rules.append(current)
            added += 1
            unit.note(
                "rule_added",
                rule_id=rid.hex,
                action=item.action,
                pattern=item.pattern.text,
                scope=item.scope,
                actor=actor,
                reason=reason,
            )
        return ids, added

    ids, added = ctx.run("add_rules", work)
    forget_compiled(ctx)
    views = {v.rule_id: v for v in list_rules(ctx, include_removed=True)}
    return [views[rid.hex] for rid in ids if rid.hex in views], added


def remove(ctx: Context, rule_id_hex: str, actor: str, reason: str) -> RuleView:
    try:
        rid = UUID(rule_id_hex)
    except ValueError as exc:
        raise InvalidInput(f"bad rule id {rule_id_hex!r}") from exc

    def work(unit: Unit) -> None:
        current = _load(ctx, rid)
        if current is None:
            raise NotFound(f"no rule {rid.hex}")
        if current.state != ACTIVE:
            raise InvalidInput(f"rule {rid.hex} was removed already")
        current.remove(timestamp=ts(ctx.clock()), actor=actor, reason=reason)
        unit.rules.append(current)
        unit.note("rule_removed", rule_id=rid.hex, actor=actor, reason=reason)

    ctx.run("remove_rule", work)
    forget_compiled(ctx)
    for view in list_rules(ctx, include_removed=True):
        if view.rule_id == rid.hex:
            return view
    raise NotFound(f"no rule {rid.hex}")  # pragma: no cover - the view has caught up


def list_rules(ctx: Context, *, include_removed: bool = False) -> list[RuleView]:
    with ctx.lock:
        ctx.catch_up()
        rows = ctx.views.rules()
    return rows if include_removed else [r for r in rows if r.state == ACTIVE]


def _load(ctx: Context, rid: UUID) -> Rule | None:
    try:
        found: object = ctx.app.repository.get(rid)
    except AggregateNotFoundError:
        return None
    if not isinstance(found, Rule):
        raise InvalidInput(f"{rid.hex} is not a rule")
    return found
