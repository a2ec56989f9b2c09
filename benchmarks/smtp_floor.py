"""The floor of the `smtp` benchmark: the least work any filter under sourceauth's contract
does per message, on the same SMTP server (aiosmtpd) as the benchmark's no-op sink.

Every message is durable before its 250 (rows inserted by a group commit into a SQLite file,
WAL, `synchronous = FULL`, one commit for all the messages waiting, as `serve` commits) and
every message is then written once into a Maildir (the same `deliver_maildir_batch` that
`serve`'s worker uses: each file fsync'd, in batches, fsyncs in parallel) and its delivery
recorded durably. No decision, no event log, no projection, no challenge text, no log line:
what sourceauth does beyond this is what it costs over the floor, and the floor's own ratio
to the no-op sink is the best ratio an aiosmtpd-based filter can reach on the same machine.

Run as `python -m benchmarks.smtp_floor HOST PORT DIRECTORY [store]` (the `smtp` benchmark
starts it as a process of its own and measures its CPU time as it measures `serve`'s). With
`store`, nothing is delivered: only the group commit before each 250 (the floor of a filter
that put off every delivery until the load is over). It prints `floor_ready` once it listens
and stops on SIGTERM after draining what it accepted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from sourceauth.adapters.smtp.delivery import MAILDIR_CHUNK, MaildirCopy, deliver_maildir_batch

_Item = tuple[str, list[str], bytes, "asyncio.Future[None]"]


class Floor:
    """aiosmtpd handler + group-commit thread + delivery thread."""

    def __init__(
        self, directory: Path, loop: asyncio.AbstractEventLoop, deliver: bool = True
    ) -> None:
        self.loop = loop
        self.deliver = deliver
        self.maildir = str(directory / "mail")
        path = directory / "floor.db"
        self.db = _connect(path)  # the commit thread's
        self.db.execute(
            "CREATE TABLE mail (id INTEGER PRIMARY KEY, mail_from TEXT, rcpts TEXT, raw BLOB,"
            " key TEXT, delivered INTEGER NOT NULL DEFAULT 0)"
        )
        self.delivery_db = _connect(path)  # the delivery thread's
        self.cond = threading.Condition()
        self.accepted: list[_Item] = []
        self.to_deliver: list[tuple[int, str, list[str], bytes, str]] = []
        self.stopping = False
        self.commits_done = False
        self.threads = [
            threading.Thread(target=self._commit_loop, name="floor-commit", daemon=True),
            threading.Thread(target=self._deliver_loop, name="floor-deliver", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        done: asyncio.Future[None] = self.loop.create_future()
        raw = envelope.original_content or b""
        with self.cond:
            self.accepted.append((envelope.mail_from or "", list(envelope.rcpt_tos), raw, done))
            self.cond.notify_all()
        try:
            await done
        except sqlite3.Error:
            return "451 4.3.0 not stored, try again later"
        return "250 2.0.0 OK: queued"

    def _commit_loop(self) -> None:
        while True:
            with self.cond:
                while not self.accepted and not self.stopping:
                    self.cond.wait()
                if not self.accepted:
                    return
                batch, self.accepted = self.accepted, []
            rows = [(m, ",".join(r), raw, uuid.uuid4().hex) for m, r, raw, _ in batch]
            futures = [item[3] for item in batch]
            try:
                self.db.execute("BEGIN IMMEDIATE")
                first = self.db.execute("SELECT coalesce(max(id), 0) + 1 FROM mail").fetchone()[0]
                self.db.executemany(
                    "INSERT INTO mail (mail_from, rcpts, raw, key) VALUES (?,?,?,?)", rows
                )
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:  # no 250 for what is not durable
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                self.loop.call_soon_threadsafe(_settle, futures, exc)
                continue
            self.loop.call_soon_threadsafe(_settle, futures, None)
            if not self.deliver:
                continue
            with self.cond:
                self.to_deliver.extend(
                    (first + i, row[0], item[1], row[2], row[3])
                    for i, (item, row) in enumerate(zip(batch, rows, strict=True))
                )
                self.cond.notify_all()

    def _deliver_loop(self) -> None:
        while True:
            with self.cond:
                while not self.to_deliver and not self.commits_done:
                    self.cond.wait()
                if not self.to_deliver:
                    return
                chunk, self.to_deliver = (
                    self.to_deliver[:MAILDIR_CHUNK],
                    self.to_deliver[MAILDIR_CHUNK:],
                )
            copies = [
                MaildirCopy(m, r, raw, key, maybe_written=False) for _, m, r, raw, key in chunk
            ]
            results = deliver_maildir_batch(self.maildir, copies)
            done = [(row[0],) for row, result in zip(chunk, results, strict=True) if _ok(result)]
            self.delivery_db.execute("BEGIN IMMEDIATE")
            self.delivery_db.executemany("UPDATE mail SET delivered = 1 WHERE id = ?", done)
            self.delivery_db.execute("COMMIT")

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.threads[0].join()
        with self.cond:
            self.commits_done = True
            self.cond.notify_all()
        self.threads[1].join()
        self.db.close()
        self.delivery_db.close()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    return db


def _ok(results: Sequence[Any]) -> bool:
    return all(r.code == 250 for r in results)


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


async def _serve(host: str, port: int, directory: Path, deliver: bool) -> None:
    loop = asyncio.get_running_loop()
    floor = Floor(directory, loop, deliver)
    server = await loop.create_server(
        lambda: SMTP(floor, decode_data=False, enable_SMTPUTF8=True, hostname="floor.test"),
        host,
        port,
        reuse_address=True,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("floor_ready", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    await asyncio.to_thread(floor.stop)


def main(argv: Sequence[str]) -> int:
    host, port, directory = argv[0], int(argv[1]), Path(argv[2])
    directory.mkdir(parents=True, exist_ok=True)
    os.umask(0o077)
    asyncio.run(_serve(host, port, directory, deliver=argv[3:] != ["store"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
