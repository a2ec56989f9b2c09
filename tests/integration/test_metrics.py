"""`[metrics] listen`: Prometheus text scraped over loopback while real SMTP clients send mail;
once the filter is idle, every figure equals what the scenario did."""

from __future__ import annotations

import smtplib
import sqlite3
import threading
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sourceauth.adapters.config import load_config
from tests.integration.smtp_harness import RunningFilter, free_port, message, write_config
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_outbound_idle, wait_until

BOB = "bob@example.test"
CLIENTS = 4
PER_CLIENT = 30
STRANGERS = 8  # per client: each is challenged once, the rest of its mail is held


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def metrics_filter(tmp_path: Path, relay: Sink, next_hop: Sink, port: int) -> RunningFilter:
    """A filter as `serve` runs it (workers in their own process), /metrics on `port`."""
    config = write_config(
        tmp_path,
        relay=f"smtp://127.0.0.1:{relay.port}",
        next_hop=f"smtp://127.0.0.1:{next_hop.port}",
        extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
    )
    return RunningFilter(load_config(config), workers="process")


def test_metrics_scraped_during_smtp_load_match_what_happened(tmp_path: Path) -> None:
    port = free_port()
    with Sink() as relay, Sink() as next_hop:
        flt = metrics_filter(tmp_path, relay, next_hop, port)
        try:
            protected = [0] * CLIENTS

            def load(client_no: int) -> None:
                with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
                    for i in range(PER_CLIENT):
                        sender = f"c{client_no}s{i % STRANGERS}@remote.test"
                        rcpt = BOB if i % 3 else f"u{i}@other.test"
                        client.sendmail(sender, [rcpt], message(sender, rcpt, f"m{i}"))
                        protected[client_no] += rcpt == BOB

            threads = [threading.Thread(target=load, args=(n,)) for n in range(CLIENTS)]
            for t in threads:
                t.start()
            scrapes_during_load = 0
            while any(t.is_alive() for t in threads) and scrapes_during_load < 200:
                during = scrape(port)
                assert value(during, "sourceauth_store_up") == 1
                scrapes_during_load += 1
            for t in threads:
                t.join(timeout=60)
            assert scrapes_during_load >= 1

            total = CLIENTS * PER_CLIENT
            held, challenged = sum(protected), CLIENTS * STRANGERS
            wait_until(lambda: len(relay.messages) == challenged, message="every challenge sent")
            wait_until(lambda: len(next_hop.messages) == total - held, message="every delivery")
            wait_outbound_idle(flt.app)
            # Gauges are read from the views, which the worker process keeps caught up.
            wait_until(
                lambda: value(scrape(port), "sourceauth_pending_challenges") == challenged,
                message="the pending-challenge gauge",
            )
            after = scrape(port)
            committer = flt.filter.committer
        finally:
            flt.stop()

    assert value(after, "sourceauth_messages_total", decision="deliver") == total - held
    assert value(after, "sourceauth_messages_total", decision="challenge") == held
    assert value(after, "sourceauth_messages_total", decision="hold") == 0
    assert value(after, "sourceauth_held_messages") == held
    assert value(after, "sourceauth_pending_challenges") == challenged
    assert value(after, "sourceauth_delivery_queue_depth") == 0
    assert value(after, "sourceauth_delivery_queue_oldest_timestamp_seconds") == 0
    # Counted in the worker process, read in the SMTP process.
    assert value(after, "sourceauth_challenges_total", outcome="sent") == challenged
    assert value(after, "sourceauth_challenges_total", outcome="failed") == 0
    assert value(after, "sourceauth_deliveries_total", outcome="delivered") == total - held
    assert value(after, "sourceauth_smtp_reply_seconds_count") == total
    assert value(after, "sourceauth_group_commit_batch_size_sum") == total
    assert value(after, "sourceauth_group_commit_batch_size_count") == committer.batches
    assert value(after, "sourceauth_smtp_reply_seconds_bucket", le="+Inf") == total


def test_no_metrics_endpoint_unless_configured(tmp_path: Path) -> None:
    config = write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
    flt = RunningFilter(load_config(config))
    try:
        assert flt.filter.metrics is None
    finally:
        flt.stop()


def test_an_unreadable_original_is_counted_and_its_copy_stays_queued(tmp_path: Path) -> None:
    port, friend = free_port(), "friend@remote.test"
    with Sink() as relay, Sink(data_reply="451 4.3.0 not now") as next_hop:
        flt = metrics_filter(tmp_path, relay, next_hop, port)
        try:
            flt.app.authorize(friend, actor="test", reason="a known sender")
            flt.send(friend, [BOB], message(friend, BOB, "lost original"))
            # the first attempt reads the original and is deferred by the next hop
            wait_until(
                lambda: value(scrape(port), "sourceauth_deliveries_total", outcome="deferred") >= 1,
                message="a deferred delivery",
            )
            with sqlite3.connect(tmp_path / "var" / "sourceauth.db") as db:
                assert db.execute("DELETE FROM sa_blob_data").rowcount == 1
            wait_until(
                lambda: value(scrape(port), "sourceauth_originals_unreadable_total") >= 2,
                message="retried attempts counted as unreadable",
            )
            after = scrape(port)
        finally:
            flt.stop()
    assert value(after, "sourceauth_delivery_queue_depth") == 1  # never failed for this
    assert value(after, "sourceauth_deliveries_total", outcome="failed") == 0
    assert value(after, "sourceauth_deliveries_total", outcome="delivered") == 0
