"""What `sourceauth status` reports: held mail, pending challenges, the delivery queue and the
age of its oldest entry, failures in the last hour, the last maintenance run, store size, version.

Each maintenance run (the timer in `serve`, or `sourceauth maintain`) records its outcome in
<data_dir>/maintenance.json, which status reads back.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sourceauth.adapters.config import Config
from sourceauth.adapters.durable import replace_file
from sourceauth.adapters.storage.figures import (
    failures_since,
    queue_figures,
    reader,
    store_size,
)
from sourceauth.adapters.storage.wiring import Storage
from sourceauth.engine.api import MaintenanceReport
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.logs import get_logger

log = get_logger(__name__)

MAINTENANCE_RECORD = "maintenance.json"
HOUR = 3600.0


def version() -> str:
    try:
        return metadata.version("sourceauth")
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC).isoformat()


def maintenance_record_path(cfg: Config) -> Path:
    return cfg.server.data_dir / MAINTENANCE_RECORD


def run_maintenance(app: SourceAuth, cfg: Config, *, dispatch: bool = True) -> MaintenanceReport:
    """One maintenance pass, its outcome recorded for `status` (also when it raised)."""
    started = time.time()
    try:
        report = app.maintain(dispatch=dispatch)
    except Exception as exc:
        _record(cfg, started, result="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    _record(cfg, started, result="ok", report=report.as_dict())
    return report


def _record(cfg: Config, started: float, **outcome: Any) -> None:
    finished = time.time()
    record = {
        "started": started,
        "finished": finished,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "result": outcome.pop("result"),
        "report": outcome.pop("report", None),
        "error": outcome.pop("error", None),
    }
    try:
        replace_file(maintenance_record_path(cfg), json.dumps(record).encode())
    except OSError as exc:  # the pass itself is done and recorded in the log
        log.warning("maintenance_record_failed", error=str(exc))


def last_maintenance(cfg: Config) -> dict[str, Any] | None:
    """The last recorded maintenance run, as status shows it; None if none was recorded."""
    try:
        record = json.loads(maintenance_record_path(cfg).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"result": "unreadable", "error": str(exc)}
    return {
        "started": _iso(record.get("started")),
        "finished": _iso(record.get("finished")),
        "duration_seconds": round(record["finished"] - record["started"], 3),
        "result": record.get("result"),
        "host": record.get("host"),
        "report": record.get("report"),
        "error": record.get("error"),
    }


def status_report(cfg: Config, storage: Storage, app: SourceAuth, now: float) -> dict[str, Any]:
    """Every figure of `sourceauth status`, JSON-ready. The views are caught up first."""
    app.catch_up()
    conn = reader(storage)()
    try:
        figures = queue_figures(conn)
        size = store_size(storage, conn)
    finally:
        conn.close()
    return {
        "version": version(),
        "config": str(cfg.file) if cfg.file else None,
        "store": {
            "url": str(cfg.storage.url),
            "size_bytes": size,
            "events": app.recorder.max_notification_id() or 0,
        },
        "held": figures.held,
        "pending_challenges": figures.pending_challenges,
        "delivery_queue": {
            "depth": figures.delivery_queue,
            "oldest": _iso(figures.oldest_queued_at),
            "oldest_age_seconds": _rounded(figures.oldest_age(now)),
        },
        "failures_last_hour": failures_since(app.recorder, app.mapper, now - HOUR),
        "last_maintenance": last_maintenance(cfg),
        "at": _iso(now),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def render(report: dict[str, Any]) -> list[str]:
    """The report as aligned lines for a person."""
    queue, failures, store = (
        report["delivery_queue"],
        report["failures_last_hour"],
        report["store"],
    )
    age = queue["oldest_age_seconds"]
    lines = [
        ("version", report["version"]),
        ("config", report["config"] or "(built-in defaults)"),
        ("store", f"{store['url']} ({store['size_bytes']} bytes, {store['events']} events)"),
        ("held", report["held"]),
        ("pending challenges", report["pending_challenges"]),
        (
            "delivery queue",
            f"{queue['depth']}"
            + ("" if age is None else f" (oldest {age:.0f}s, {queue['oldest']})"),
        ),
        (
            "failures last hour",
            f"{failures['challenges']} challenges, {failures['deliveries']} deliveries",
        ),
    ]
    last = report["last_maintenance"]
    if last is None:
        lines.append(("last maintenance", "never"))
    else:
        detail = last.get("error") or " ".join(
            f"{k}={v}" for k, v in (last.get("report") or {}).items() if v
        )
        lines.append(
            ("last maintenance", f"{last.get('finished')} {last.get('result')} {detail}".rstrip())
        )
    width = max(len(k) for k, _ in lines)
    return [f"{k:>{width}}: {v}" for k, v in lines]
