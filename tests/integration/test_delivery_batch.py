"""Batched next-hop delivery (issue 13): due copies handed on over a few kept-open SMTP
sessions, several recipients per transaction and several transactions per session, each copy
recorded exactly once; a session lost mid-way leaves the copies not yet tried queued."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import build_engine
from sourceauth.adapters.smtp.outbound import NextHopDelivery
from sourceauth.engine.api import Incoming
from sourceauth.engine.application import SourceAuth
from sourceauth.engine.audit import DELIVERED
from sourceauth.engine.message import QUEUED
from tests.integration.smtp_harness import message, write_config
from tests.support.smtp_sink import Received, Sink

SENDER = "friend@partner.example.net"
RCPTS = ("alice@example.test", "bob@example.test")


def engine(tmp: Path, next_hop: str, *, connections: int, batch: int) -> SourceAuth:
    delivery = f"\n[delivery]\nconnections = {connections}\nbatch = {batch}\n"
    path = write_config(tmp, relay="maildir:" + str(tmp / "outbox"), next_hop=next_hop)
    text = path.read_text().replace("\n[delivery]\n", delivery, 1)
    path.write_text(text)
    app = build_engine(load_config(path))
    app.authorize(SENDER, actor="test", reason="known correspondent")
    return app


def queue(app: SourceAuth, count: int) -> list[str]:
    """count messages from the authorized sender to both recipients, recorded as the
    inbound side records them (blob with the events); the ids of the queued copies."""
    assert app.blobs is not None
    raws = [
        message(SENDER, ", ".join(RCPTS), subject=f"m{n}", message_id=f"<{n}.{uuid.uuid4()}@t>")
        for n in range(count)
    ]
    staged = app.blobs.stage([(uuid.uuid4().hex, raw) for raw in raws])
    receipts = app.receive_many(
        [Incoming(mail_from=SENDER, recipients=RCPTS, blob=blob) for blob in staged.blobs],
        attachments=staged.with_events,
    )
    ids = {str(d.message_id) for r in receipts for d in r.decisions if d.decision == "deliver"}
    assert len(ids) == count, receipts  # one copy per message, for both recipients
    return sorted(uuid.UUID(i).hex for i in ids)


def sourceauth_ids(received: list[Received]) -> Counter[str]:
    out: Counter[str] = Counter()
    for m in received:
        head = m.data.split(b"\r\n", 1)[0]
        assert head.startswith(b"X-SourceAuth-Id: "), head
        out[head.split(b": ", 1)[1].decode()] += 1
    return out


def state(app: SourceAuth, message_id: str) -> str:
    """The copy's aggregate state, read from the event log."""
    aggregate: Any = app.repository.get(uuid.UUID(message_id))
    return str(aggregate.state)


def connections_used(received: list[Received]) -> int:
    return len({m.peer for m in received})


def test_copies_go_over_at_most_k_kept_open_sessions_each_exactly_once(tmp_path: Path) -> None:
    with Sink() as sink:
        app = engine(tmp_path, sink.url, connections=3, batch=100)
        try:
            assert isinstance(app.delivery_transport, NextHopDelivery)
            ids = queue(app, 40)
            assert app.dispatch_deliveries() == (40, 0, 0)
            got = sink.wait_for(40)
            assert sourceauth_ids(got) == Counter(dict.fromkeys(ids, 1))
            # both recipients in one transaction per copy
            assert all(sorted(m.rcpt_tos) == sorted(RCPTS) for m in got)
            assert 1 <= connections_used(got) <= 3
            # every outcome recorded once: nothing left due, a second round sends nothing
            assert app.dispatch_deliveries() == (0, 0, 0)
            assert all(state(app, i) == DELIVERED for i in ids)
            # the sessions stay open for the next round, and are reused by it
            more = queue(app, 6)
            assert app.dispatch_deliveries() == (6, 0, 0)
            got = sink.wait_for(46)
            assert sourceauth_ids(got) == Counter(dict.fromkeys(ids + more, 1))
            assert connections_used(got) <= 3
        finally:
            assert isinstance(app.delivery_transport, NextHopDelivery)
            app.delivery_transport.close()
            app.close()


def test_batch_bounds_the_transactions_of_one_session(tmp_path: Path) -> None:
    with Sink() as sink:
        app = engine(tmp_path, sink.url, connections=1, batch=5)
        try:
            ids = queue(app, 12)
            assert app.dispatch_deliveries() == (12, 0, 0)
            got = sink.wait_for(12)
            assert sourceauth_ids(got) == Counter(dict.fromkeys(ids, 1))
            assert connections_used(got) == 3  # 5 + 5 + 2
        finally:
            app.close()


def test_a_session_lost_mid_batch_leaves_the_rest_queued_and_retried(tmp_path: Path) -> None:
    # the 4th DATA loses its connection before the reply: that copy is temporary (retried
    # after its backoff); copies 5..10 were not tried and stay queued, untouched
    with Sink(cut_at_data=(4,)) as sink:
        app = engine(tmp_path, sink.url, connections=1, batch=100)
        try:
            ids = queue(app, 10)
            assert app.dispatch_deliveries() == (3, 1, 0)
            assert sink.count == 3
            states = Counter(state(app, i) for i in ids)
            assert states == Counter({DELIVERED: 3, QUEUED: 7})
            # the untried ones are due at once, over a new session
            assert app.dispatch_deliveries() == (6, 0, 0)
            assert sink.count == 9
            # the one that was in flight comes back after its backoff (retry_initial 1 s)
            deadline = time.monotonic() + 10
            while sink.count < 10 and time.monotonic() < deadline:
                time.sleep(0.3)
                app.dispatch_deliveries()
            got = sink.wait_for(10)
            assert sourceauth_ids(got) == Counter(dict.fromkeys(ids, 1))
            assert all(state(app, i) == DELIVERED for i in ids)
            assert app.dispatch_deliveries() == (0, 0, 0)
        finally:
            app.close()


def test_an_unreachable_next_hop_defers_every_copy_of_the_round(tmp_path: Path) -> None:
    with Sink() as sink:
        url = sink.url
    app = engine(tmp_path, url, connections=2, batch=100)  # nothing listens there now
    try:
        ids = queue(app, 7)
        assert app.dispatch_deliveries() == (0, 7, 0)
        assert all(state(app, i) == QUEUED for i in ids)
    finally:
        app.close()
