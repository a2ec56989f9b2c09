"""The worker process stops within seconds of its SMTP process's kill -9 even in the middle of
a long delivery batch, and nothing it held is lost (issue 7, docs/security.md "Crash safety").

`sourceauth serve` runs as a subprocess; the next hop answers each MAIL after MAIL_DELAY
seconds, so the worker's batch of COPIES copies over four sessions takes about
COPIES / 4 * MAIL_DELAY seconds. The SMTP process is killed while the worker is in that
batch. Before, the worker sent the whole batch before it looked at its stop flag; now each
session ends after its current transaction, the copies not tried stay queued with their
leases released, and an orphaned worker exits after `runtime.ORPHAN_GRACE` seconds whatever
it waits for. After a restart every copy reaches the next hop, once.
"""

from __future__ import annotations

import time
from email import message_from_bytes
from pathlib import Path

import pytest

from sourceauth.adapters.runtime import ORPHAN_GRACE
from tests.integration.smtp_harness import free_port
from tests.integration.test_crash_safety import (
    FRIENDS,
    Server,
    authorize,
    raw_message,
    try_send,
    write_config,
)
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

COPIES = 40
MAIL_DELAY = 3.0  # seconds: the whole batch would take ~30 s
# How long the server's processes may outlive the kill: the transaction each session is in,
# the orphan grace, and time to exit on a loaded machine; far below the batch's ~30 s.
OUTLIVES_AT_MOST = MAIL_DELAY + ORPHAN_GRACE + 7.0


def attempts_at(sink: Sink) -> set[str]:
    return {str(message_from_bytes(m.data)["X-Test-Attempt"]) for m in list(sink.messages)}


def test_worker_mid_batch_stops_within_seconds_of_its_parents_kill_9_and_loses_nothing(
    tmp_path: Path,
) -> None:
    with Sink() as relay, Sink(mail_delay=MAIL_DELAY) as next_hop:
        port = free_port()
        config = write_config(tmp_path, port, relay, next_hop)
        authorize(config, FRIENDS)
        server = Server(config, port, tmp_path / "serve.log")
        server.start()
        receipts = []
        try:
            for n in range(COPIES):
                rcpts = ("bob@example.test",)
                raw = raw_message(FRIENDS[0], rcpts, f"batch.{n}", f"copy {n}")
                receipt = try_send(port, FRIENDS[0], rcpts, raw)
                assert receipt is not None, server.tail()
                receipts.append(receipt)
            # the worker is in its batch once the first copies arrive
            wait_until(lambda: next_hop.messages, timeout=60, message="the first delivery")
            started = time.monotonic()
            server.kill()  # the SMTP process alone; returns when no process of it is left
            outlived = time.monotonic() - started
            arrived_before = len(next_hop.messages)
            assert server.hung_workers == 0, "\n".join(server.hang_dumps)
            assert outlived < OUTLIVES_AT_MOST, (
                f"the worker outlived its parent by {outlived:.1f}s: {server.tail()}"
            )
            assert arrived_before < COPIES, "the batch ended before the kill: no test"

            next_hop.mail_delay = 0.0
            server.start()
            wait_until(
                lambda: len(attempts_at(next_hop)) >= COPIES,
                timeout=120,
                message="every copy at the next hop after the restart",
            )
        finally:
            if server.running():
                assert server.stop() == 0, server.tail()
        ids = [message_from_bytes(m.data)["X-SourceAuth-Id"] for m in next_hop.messages]
    attempts = attempts_at(next_hop)
    assert attempts == {f"batch.{n}" for n in range(COPIES)}
    assert len(set(ids)) == COPIES, f"{len(set(ids))} distinct copies of {COPIES}"
    print(
        f"outlived its parent by {outlived:.1f}s (bound {OUTLIVES_AT_MOST:.0f}s, the batch "
        f"~{COPIES / 4 * MAIL_DELAY:.0f}s); {arrived_before} of {COPIES} copies had arrived; "
        f"after the restart all {COPIES} arrived, {len(ids) - COPIES} twice with the same id"
    )
