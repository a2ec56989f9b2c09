"""Released mail to an SMTP next hop: the delivery worker's rounds against a no-op aiosmtpd
sink on loopback, two ways in the same run, interleaved, best of each kept:

(a) one connection per copy (`[delivery] connections = 1`, `batch = 1`: how every copy went
    before issue 13), (b) the defaults: 4 kept-open sessions, up to 100 transactions each.

Copies come from a pre-authorized sender to two protected recipients (one transaction each,
both recipients), recorded as the inbound side records them; `dispatch_deliveries` is called
until the queue is empty, and the sink must have every copy exactly once.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.result import BenchResult

SENDER = "known@partner.example.net"
RCPTS = ("alice@example.test", "bob@example.test")

CONFIG = """\
[server]
listen = "127.0.0.1:2525"
hostname = "mx.example.test"
data_dir = "{var}"

[policy]
protected = ["example.test"]

[challenge]
relay = "maildir:{var}/outbox"
confirm_address = "confirm@example.test"
bounce_address = "bounces@example.test"

[delivery]
next_hop = "{next_hop}"
connections = {connections}
batch = {batch}

[logging]
format = "json"
level = "info"
"""


def _message(n: int) -> bytes:
    body = b"The quick brown fox jumps over the lazy dog, again and again.\r\n" * 28
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPTS[0]}>, <{RCPTS[1]}>\r\nSubject: copy {n}\r\n"
        f"Message-ID: <{n}.{uuid.uuid4().hex}@bench>\r\n\r\n"
    ).encode()
    return head + body


def one_way(root: Path, url: str, count: int, connections: int, batch: int) -> dict[str, Any]:
    from sourceauth.adapters.config import load_config
    from sourceauth.adapters.runtime import build_engine
    from sourceauth.adapters.smtp.outbound import NextHopDelivery
    from sourceauth.engine.api import Incoming

    var = root / f"c{connections}b{batch}-{uuid.uuid4().hex[:6]}"
    var.mkdir()
    path = var / "sourceauth.toml"
    path.write_text(CONFIG.format(var=var, next_hop=url, connections=connections, batch=batch))
    app = build_engine(load_config(path))
    try:
        app.authorize(SENDER, actor="benchmark", reason="known correspondent")
        assert app.blobs is not None
        for start in range(0, count, 200):
            raws = [_message(n) for n in range(start, min(count, start + 200))]
            staged = app.blobs.stage([(uuid.uuid4().hex, raw) for raw in raws])
            app.receive_many(
                [Incoming(mail_from=SENDER, recipients=RCPTS, blob=b) for b in staged.blobs],
                attachments=staged.with_events,
            )
        delivered = rounds = 0
        t0 = time.perf_counter()
        while delivered < count and rounds < 100:
            done, deferred, failed = app.dispatch_deliveries()
            assert deferred == failed == 0, (deferred, failed)
            delivered += done
            rounds += 1
        seconds = time.perf_counter() - t0
    finally:
        transport = app.delivery_transport
        if isinstance(transport, NextHopDelivery):
            transport.close()
        app.close()
    return {"delivered": delivered, "seconds": seconds, "rounds": rounds}


def run(scale: float = 1.0) -> list[BenchResult]:
    from benchmarks.engine import quiet_production_logging
    from tests.support.smtp_sink import Sink

    quiet_production_logging()
    count = 200 if scale < 1 else int(1000 * scale)
    rounds = 1 if scale < 1 else 3
    single: list[dict[str, Any]] = []
    batched: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sa-bench-delivery-") as tmp, Sink(keep=False) as sink:
        root = Path(tmp)
        for _ in range(rounds):
            before = sink.count
            single.append(one_way(root, sink.url, count, 1, 1))
            batched.append(one_way(root, sink.url, count, 4, 100))
            assert sink.count - before == 2 * count, (sink.count - before, count)

    def rate(r: dict[str, Any]) -> float:
        return float(r["delivered"]) / float(r["seconds"])

    best_single, best_batched = max(single, key=rate), max(batched, key=rate)
    ratio = rate(best_batched) / rate(best_single)
    return [
        BenchResult(
            name="delivery.batched/one_per_copy",
            value=rate(best_batched),
            unit="copies/s",
            baseline_name="one SMTP connection per copy (connections=1, batch=1)",
            baseline_value=rate(best_single),
            ratio=ratio,
            target="",
            passed=True,
            details={
                "copies": count,
                "recipients_per_copy": len(RCPTS),
                "rounds": rounds,
                "batched": "[delivery] connections = 4, batch = 100 (the defaults)",
                "runs_copies_per_s": "one_per_copy="
                + "/".join(f"{rate(r):.0f}" for r in single)
                + "; batched="
                + "/".join(f"{rate(r):.0f}" for r in batched),
                "dispatch_rounds_batched": best_batched["rounds"],
            },
        )
    ]
