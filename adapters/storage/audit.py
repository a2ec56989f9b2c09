"""Auditor tools over the stored log: verify (the hash chain, decode, legal transitions,
views equal a fresh rebuild), seal, export (one JSON object per event) and id prefixes.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TextIO
from uuid import UUID

from eventsourcing.persistence import Notification

from sourceauth.adapters.storage.chain import GENESIS, Seal, keyed, link, unpack
from sourceauth.adapters.storage.views import Dialect, SqlViews, log_pages
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.audit import Fault, LogSummary, check_events
from sourceauth.engine.errors import InvalidInput, NotFound

PAGE = 5000
CHAIN_PAGE = 200  # chain rows read at once (one per transaction, up to thousands of links each)
MIN_PREFIX = 4  # hex digits an id prefix needs
_HEX = frozenset("0123456789abcdef")

Progress = Callable[[int], None]  # called with the events read so far


def _hex(originator_id: Any) -> str:
    return originator_id.hex if isinstance(originator_id, UUID) else str(originator_id)


class ChainCheck:
    """Walks the log and the chain's links side by side, position by position; the first
    event deleted, inserted, altered or moved is a Fault."""

    def __init__(self, app: SourceAuth) -> None:
        self.recorder: Any = app.recorder
        self.key: bytes | None = getattr(self.recorder, "chain_key", None)
        self.mac = keyed(self.key) if self.key is not None else None
        self._links = self._all_links()
        self._next = next(self._links, None)
        self.previous = GENESIS
        self.last = 0
        self.length = 0
        self.digests: dict[int, bytes] = {}  # at the positions a seal asks about
        self.watch: set[int] = set()

    def _all_links(self) -> Iterator[tuple[int, bytes]]:
        if self.key is None:
            return
        after = 0
        while True:
            page = self.recorder.chain_page(after, CHAIN_PAGE)
            for _, packed in page:
                yield from unpack(packed)
            if len(page) < CHAIN_PAGE:
                return
            after = page[-1][0]

    def feed(self, n: Notification) -> Fault | None:
        if self.key is None:
            return Fault(0, "", 0, "this store keeps no audit chain (opened without a keyring)")
        oid = _hex(n.originator_id)
        found = self._next
        if found is not None and found[0] < n.id:
            return Fault(
                found[0], "", 0, "an event was deleted: the chain has a link here, the log has none"
            )
        if found is None or found[0] > n.id:
            return Fault(
                n.id,
                oid,
                n.originator_version,
                "an event was inserted: no link of the chain covers it",
            )
        expected = link(
            self.mac, self.previous, n.id, n.originator_id, n.originator_version, n.topic, n.state
        )
        if not hmac.compare_digest(expected, found[1]):
            return Fault(
                n.id,
                oid,
                n.originator_version,
                "the event does not match its link of the chain: it was altered or moved, "
                "or the event before it was removed with its link",
            )
        if n.id in self.watch:
            self.digests[n.id] = found[1]
        self.previous, self.last = found[1], n.id
        self.length += 1
        self._next = next(self._links, None)
        return None

    def finish(self, seal: Seal | None) -> Fault | None:
        if self._next is not None:
            return Fault(
                self._next[0],
                "",
                0,
                "an event was deleted: the chain has a link here, the log has none",
            )
        if seal is None:
            return None
        if seal.position > self.last:
            return Fault(
                seal.position,
                "",
                0,
                f"the log ends at position {self.last}, before the sealed head: "
                "events were removed from its end",
            )
        got = self.digests.get(seal.position)
        if got is None or got.hex() != seal.digest.lower():
            return Fault(
                seal.position, "", 0, "the chain differs from the seal here: the log was rewritten"
            )
        return None


def _events(
    app: SourceAuth, faults: list[Fault], chain: ChainCheck | None, progress: Progress | None
) -> Iterator[tuple[int, Any]]:
    read = 0
    for page in log_pages(app.recorder, PAGE):
        for n in page:
            if chain is not None:
                fault = chain.feed(n)
                if fault is not None:
                    faults.append(fault)
                    return
            try:
                event = app.mapper.to_domain_event(n)
            except Exception as exc:
                faults.append(
                    Fault(
                        n.id, _hex(n.originator_id), n.originator_version, f"cannot decode: {exc}"
                    )
                )
                return
            yield n.id, event
        read += len(page)
        if progress is not None:
            progress(read)


def verify(
    app: SourceAuth, seal: Seal | None = None, progress: Progress | None = None
) -> tuple[Fault | None, str]:
    """The first fault in the chain, the log or its views, and a one-line summary."""
    summary = LogSummary()
    faults: list[Fault] = []
    chain = ChainCheck(app)
    if seal is not None:
        chain.watch.add(seal.position)
    fault = check_events(_events(app, faults, chain, progress), summary)
    if faults:
        return faults[0], ""
    fault = fault or chain.finish(seal)
    if fault is not None:
        return fault, ""
    with app.exclusive():
        app.catch_up()
        live = app.views.dump()  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/rebuild.db"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(path, isolation_level=None, check_same_thread=False)

        fresh = SqlViews(connect, Dialect(), app.recorder, app.mapper)
        try:
            fresh.catch_up()
            rebuilt = fresh.dump()
        finally:
            fresh.close()
    for table, rows in rebuilt.items():
        mine = [tuple(_norm(v) for v in r) for r in live.get(table, [])]
        theirs = [tuple(_norm(v) for v in r) for r in rows]
        if mine != theirs:
            diff = next(
                (i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
                min(len(mine), len(theirs)),
            )
            return (
                Fault(
                    0,
                    "",
                    0,
                    f"view {table} differs from a fresh rebuild at row {diff} "
                    f"({len(mine)} live rows, {len(theirs)} rebuilt); "
                    "run 'sourceauth projections rebuild'",
                ),
                "",
            )
    sealed = f"; the sealed head at {seal.position} matches" if seal else ""
    return None, (
        f"{summary.events} events, {summary.senders} senders, {summary.messages} messages; "
        f"hash chain intact to position {chain.last}{sealed}; every transition legal; "
        "views equal a fresh rebuild"
    )


def seal(app: SourceAuth) -> Seal:
    """The chain's head now (position 0 and zero digest on an empty log)."""
    head = app.recorder.chain_head()  # type: ignore[attr-defined]
    if head is None:
        return Seal(0, GENESIS.hex())
    return Seal(head[0], head[1].hex())


def read_seal(text: str) -> Seal:
    """A seal as `audit seal` printed it; InvalidInput if it is not one."""
    try:
        raw = json.loads(text)
        found = Seal(int(raw["position"]), str(raw["digest"]))
        bytes.fromhex(found.digest)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"not a seal printed by 'sourceauth audit seal': {exc}") from exc
    if found.position < 0 or len(found.digest) != 64:
        raise InvalidInput("not a seal printed by 'sourceauth audit seal'")
    return found


def resolve_id(app: SourceAuth, text: str) -> str:
    """An aggregate id as 32 hex digits, from the id itself, a dashed UUID, or a unique prefix
    of at least 4 hex digits; text that is no id at all (an address) comes back unchanged."""
    digits = text.strip().lower().replace("-", "")
    if not digits or not set(digits) <= _HEX:
        return text
    if len(digits) == 32:
        return digits
    if len(digits) > 32:
        raise InvalidInput(f"an id has 32 hex digits, {text!r} has more")
    if len(digits) < MIN_PREFIX:
        raise InvalidInput(f"id prefix {text!r} is too short: give at least {MIN_PREFIX} digits")
    pad = 32 - len(digits)
    found: list[str] = app.recorder.ids_between(  # type: ignore[attr-defined]
        digits + "0" * pad, digits + "f" * pad, 11
    )
    if not found:
        raise NotFound(f"no id starts with {digits}")
    if len(found) > 1:
        more = ", …" if len(found) > 10 else ""
        raise InvalidInput(
            f"id prefix {digits} is ambiguous: {', '.join(found[:10])}{more}; give more digits"
        )
    return found[0]


def _norm(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, UUID):
        return value.hex
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def export_events(
    app: SourceAuth,
    out: TextIO,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
) -> int:
    """Write every event (recorded from `since`, before `until`) as one JSON line, a page of
    the log at a time: memory stays flat whatever the log's length."""
    count = 0
    faults: list[Fault] = []
    for position, event in _events(app, faults, None, progress):
        if (since is not None and event.timestamp < since) or (
            until is not None and event.timestamp >= until
        ):
            continue
        fields = {
            k: _jsonable(v)
            for k, v in vars(event).items()
            if k not in ("originator_id", "originator_version", "timestamp")
        }
        out.write(
            json.dumps(
                {
                    "position": position,
                    "aggregate_id": event.originator_id.hex,
                    "version": event.originator_version,
                    "event": type(event).__qualname__,
                    "timestamp": event.timestamp.isoformat(),
                    "fields": fields,
                },
                ensure_ascii=False,
            )
            + "\n"
        )
        count += 1
    if faults:
        raise RuntimeError(str(faults[0]))
    return count
