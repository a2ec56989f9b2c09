"""Several nodes on one PostgreSQL beside SQLite, in the same run (DESIGN.md §8, §9): messages
per second from a pre-authorized sender, 200 per group commit, through one SQLite engine, one
PostgreSQL node, and two PostgreSQL nodes (two processes, one schema) receiving at once.

The server is 127.0.0.1:5432, database `test` (SOURCEAUTH_BENCH_PG: a libpq conninfo to
point elsewhere); each run uses its own schema, dropped afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.engine import BATCH, FRIEND, batches, bench_settings, make_incoming
from benchmarks.result import BenchResult
from sourceauth.adapters.storage.wiring import Storage, open_engine
from sourceauth.engine import tokens

CONNINFO = os.environ.get(
    "SOURCEAUTH_BENCH_PG", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)


def _pg_storage(schema: str, blob_dir: Path) -> Storage:
    parts = dict(p.split("=", 1) for p in CONNINFO.split())
    return Storage(
        kind="postgresql",
        pg_host=parts.get("host", "127.0.0.1"),
        pg_port=int(parts.get("port", "5432")),
        pg_user=parts.get("user", "postgres"),
        pg_password=parts.get("password", ""),
        pg_dbname=parts.get("dbname", "test"),
        pg_schema=schema,
        blob_dir=blob_dir,
    )


def _receive(storage: Storage, keyring: tokens.Keyring, n: int, start: Any = None) -> float:
    """Open a node, warm it, then time `n` messages in group commits; wall seconds."""
    app = open_engine(settings=bench_settings(), keyring=keyring, storage=storage)
    try:
        app.authorize(FRIEND, actor="benchmark", reason="pre-authorized")
        app.receive_many([make_incoming(FRIEND, i) for i in range(BATCH)])
        load = [make_incoming(FRIEND, i) for i in range(n)]
        if start is not None:
            start.wait()
        began = time.perf_counter()
        for batch in batches(load):
            app.receive_many(batch)
        return time.perf_counter() - began
    finally:
        app.close()


def _node(storage: Storage, keyring: str, n: int, start: Any, out: Any) -> None:
    out.put(_receive(storage, tokens.parse_keyring(keyring), n, start))


def _two_nodes(storage: Storage, keyring: tokens.Keyring, n: int) -> float:
    """Two processes on one schema, released together; wall seconds of the slower."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_node, args=(storage, tokens.render_keyring(keyring), n // 2, start, out)
        )
        for _ in "ab"
    ]
    for p in procs:
        p.start()
    time.sleep(3.0)  # both opened and warmed (a benchmark, not a test)
    start.set()
    walls = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return max(walls)


def run(scale: float) -> list[BenchResult]:
    import psycopg

    n = max(2 * BATCH, int(20_000 * scale)) // (2 * BATCH) * (2 * BATCH)
    keyring = tokens.generate_keyring()
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sa-bench-nodes-") as tmp:
        sqlite = Storage(sqlite_path=Path(tmp) / "s" / "sourceauth.db", blob_dir=Path(tmp) / "b")
        rates["sqlite"] = n / _receive(sqlite, keyring, n)
        for label in ("pg_1_node", "pg_2_nodes"):
            schema = f"sa_bench_{uuid.uuid4().hex[:12]}"
            storage = _pg_storage(schema, Path(tmp) / "blobs")
            try:
                wall = (
                    _receive(storage, keyring, n)
                    if label == "pg_1_node"
                    else _two_nodes(storage, keyring, n)
                )
                rates[label] = n / wall
            finally:
                with psycopg.connect(CONNINFO, autocommit=True) as admin:
                    admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    details: dict[str, float | int | str] = {
        "messages": n,
        "batch": BATCH,
        "sqlite_msgs_per_s": round(rates["sqlite"]),
        "pg_1_node_msgs_per_s": round(rates["pg_1_node"]),
        "pg_2_nodes_msgs_per_s": round(rates["pg_2_nodes"]),
        "two_over_one_node": round(rates["pg_2_nodes"] / rates["pg_1_node"], 2),
    }
    pairs = (
        ("pg_2_nodes", "pg_1_node", "one PostgreSQL node, same run"),
        ("pg_1_node", "sqlite", "SQLite file (FULL), same run"),
    )
    return [
        BenchResult(
            name=f"nodes.{name}",
            value=rates[name],
            unit="msgs/s",
            baseline_name=against,
            baseline_value=rates[base],
            ratio=rates[name] / rates[base],
            details=details,
        )
        for name, base, against in pairs
    ]
