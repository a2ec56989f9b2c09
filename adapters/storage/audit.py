"""Auditor tools over the stored log: verify (decode, legal transitions, views equal a fresh
rebuild) and export (one JSON object per event).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import Any, TextIO
from uuid import UUID

from sourceauth.adapters.storage.views import Dialect, SqlViews, log_pages
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.audit import Fault, LogSummary, check_events

PAGE = 5000


def _events(app: SourceAuth, faults: list[Fault]) -> Iterator[tuple[int, Any]]:
    for page in log_pages(app.recorder, PAGE):
        for n in page:
            try:
                event = app.mapper.to_domain_event(n)
            except Exception as exc:
                oid = (
                    n.originator_id.hex
                    if isinstance(n.originator_id, UUID)
                    else str(n.originator_id)
                )
                faults.append(Fault(n.id, oid, n.originator_version, f"cannot decode: {exc}"))
                return
            yield n.id, event


def verify(app: SourceAuth) -> tuple[Fault | None, str]:
    """The first fault in the log or its views, and a one-line summary."""
    summary = LogSummary()
    decode_faults: list[Fault] = []
    fault = check_events(_events(app, decode_faults), summary)
    if decode_faults:
        return decode_faults[0], ""
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
    return None, (
        f"{summary.events} events, {summary.senders} senders, {summary.messages} messages; "
        f"every transition legal; views equal a fresh rebuild"
    )


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


def export_events(app: SourceAuth, out: TextIO) -> int:
    count = 0
    faults: list[Fault] = []
    for position, event in _events(app, faults):
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
