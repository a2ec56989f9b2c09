"""Bulk verdicts for `senders import`: many senders authorized or blocked per transaction,
skipping those already in that state (re-importing a list records nothing new)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from sourceauth.engine.addresses import AddressError, normalize_address
from sourceauth.engine.errors import InvalidInput
from sourceauth.engine.service import operator
from sourceauth.engine.service import rules as rulebook
from sourceauth.engine.service.context import Context, Unit
from sourceauth.engine.statemachine import SENDER

IMPORT_BATCH = 2000  # senders per transaction
VERDICTS = {"authorized": "authorize", "blocked": "block"}

Progress = Callable[[int], None]  # called with the senders handled so far


@dataclass(frozen=True)
class ImportResult:
    senders: int  # verdicts recorded now
    rules: int  # rules added now
    unchanged: int  # senders and rules already as the file says


def import_senders(
    ctx: Context,
    addresses: Sequence[str],
    rules: Sequence[rulebook.Declared],
    *,
    state: str,
    scope: str,
    actor: str,
    reason: str,
    progress: Progress | None = None,
) -> ImportResult:
    """Record `state` for every address (normalized) in `scope`, IMPORT_BATCH per
    transaction, then declare the rules. Addresses already in that state are skipped."""
    trigger = VERDICTS.get(state)
    if trigger is None:
        raise InvalidInput(f"--as must be one of {', '.join(VERDICTS)}, not {state!r}")
    scope = rulebook.scope_of(scope)
    target = SENDER.dest(trigger)
    try:
        unique = list(dict.fromkeys(normalize_address(a) for a in addresses))
    except AddressError as exc:
        raise InvalidInput(f"bad address to import: {exc}") from exc
    recorded = unchanged = 0
    for start in range(0, len(unique), IMPORT_BATCH):
        batch = unique[start : start + IMPORT_BATCH]
        ids = {addr: ctx.sender_id(addr, scope) for addr in batch}
        with ctx.lock:
            ctx.catch_up()
            states = ctx.views.sender_states([sid.hex for sid in ids.values()])
        todo = [a for a in batch if states.get(ids[a].hex) != target]
        unchanged += len(batch) - len(todo)

        if todo:
            new = {ids[a] for a in todo if ids[a].hex not in states}
            _record(ctx, todo, new, trigger, scope, actor, reason)
        recorded += len(todo)
        if progress is not None:
            progress(start + len(batch))
    added = 0
    if rules:
        _, added = rulebook.add_many(ctx, rules, actor, reason)
    unchanged += len(set(rules)) - added
    return ImportResult(recorded, added, unchanged)


def _record(
    ctx: Context,
    addresses: list[str],
    new: set[UUID],
    trigger: str,
    scope: str,
    actor: str,
    reason: str,
) -> None:
    """One transaction of verdicts; `new`: the senders the views know nothing of (created
    without a read; a sender another writer created meanwhile fails the commit, and the
    unit is redone on fresh state)."""

    tries = 0

    def work(unit: Unit) -> None:
        nonlocal tries
        tries += 1
        if tries == 1:
            unit.absent = set(new)
        else:  # a redo after a conflict: the views have caught up since
            known = ctx.views.known_senders([sid.hex for sid in new])
            unit.absent = {sid for sid in new if sid.hex not in known}
        for addr in addresses:
            operator.verdict(ctx, unit, trigger, addr, scope, actor, reason)

    ctx.run("import_senders", work)
