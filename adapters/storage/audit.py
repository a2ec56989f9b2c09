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
from itertools import zip_longest
from typing import Any, TextIO
from uuid import UUID

from eventsourcing.persistence import Notification

from sourceauth.adapters.progress import ProgressFactory, quiet
from sourceauth.adapters.storage.chain import GENESIS, Seal, keyed, link, unpack
from sourceauth.adapters.storage.views import Dialect, SqlViews, ViewSnapshot, log_pages
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.audit import Fault, LogSummary, check_events
from sourceauth.engine.errors import InvalidInput, NotFound
from sourceauth.engine.projections import TABLES

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
    app: SourceAuth, seal: Seal | None = None, progress: ProgressFactory = quiet
) -> tuple[Fault | None, str]:
    """The first fault in the chain, the log or its views, and a one-line summary.

    Three passes, each streamed (memory does not grow with the log): the log against its
    chain and the state machines; a fresh rebuild of the views into a temporary SQLite file;
    the live views against it, row by row in key order."""
    summary = LogSummary()
    faults: list[Fault] = []
    chain = ChainCheck(app)
    if seal is not None:
        chain.watch.add(seal.position)
    total = app.recorder.max_notification_id() or 0
    with progress("checking the chain", total) as bar:
        fault = check_events(_events(app, faults, chain, bar), summary)
    if faults:
        return faults[0], ""
    fault = fault or chain.finish(seal)
    if fault is None:
        fault = compare_views(app, progress)
    if fault is not None:
        return fault, ""
    sealed = f"; the sealed head at {seal.position} matches" if seal else ""
    return None, (
        f"{summary.events} events, {summary.senders} senders, {summary.messages} messages, "
        f"{summary.rules} rules; "
        f"hash chain intact to position {chain.last}{sealed}; every transition legal; "
        "views equal a fresh rebuild"
    )


def compare_views(app: SourceAuth, progress: ProgressFactory = quiet) -> Fault | None:
    """The live views against a fresh rebuild from the log, both at the same log position,
    streamed in key order: the first differing row of the first differing view, or None."""
    with app.exclusive():
        app.catch_up()
    live_views: SqlViews = app.views  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/rebuild.db"

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # A scratch file, deleted after: no journal, no fsync (on a busy disk, the
            # fsyncs of a durable file were 9/10 of this pass's time).
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            return conn

        fresh = SqlViews(connect, Dialect(), app.recorder, app.mapper, live_views.sealer)
        try:
            # The long replay first, up to where the live views stand now; then, in one read
            # snapshot of the live views (held only while comparing), the few events they
            # took since: both sides at the same position even while other nodes write.
            until = live_views.position()
            with progress("rebuilding the views", until) as bar:
                fresh.catch_up(lambda _id, _version: bar.advance(), stop=until)
            with live_views.snapshot() as live:
                fresh.catch_up(stop=live.position())
                with fresh.snapshot() as rebuilt:
                    return _first_difference(live, rebuilt, progress)
        finally:
            fresh.close()


def _first_difference(
    live: ViewSnapshot, rebuilt: ViewSnapshot, progress: ProgressFactory
) -> Fault | None:
    for table in TABLES:
        with progress(f"comparing {table}", None, unit="rows") as bar:
            row = 0
            mine = theirs = None
            for mine, theirs in zip_longest(live.rows(table), rebuilt.rows(table)):
                if mine is None or theirs is None or _row(mine) != _row(theirs):
                    break
                row += 1
                bar.advance()
            else:
                continue
        extra = (
            "a row only in the live view"
            if theirs is None
            else ("a row missing from the live view" if mine is None else "the rows differ")
        )
        return Fault(
            0,
            "",
            0,
            f"view {table} differs from a fresh rebuild at row {row} ({extra}); "
            "run 'sourceauth projections rebuild'",
        )
    return None


def _row(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_norm(v) for v in values)


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
    progress: ProgressFactory = quiet,
) -> int:
    """Write every event (recorded from `since`, before `until`) as one JSON line, a page of
    the log at a time: memory stays flat whatever the log's length."""
    with progress("exporting", app.recorder.max_notification_id() or 0) as bar:
        return _export(app, out, since, until, bar)


def _export(
    app: SourceAuth,
    out: TextIO,
    since: datetime | None,
    until: datetime | None,
    progress: Progress,
) -> int:
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
