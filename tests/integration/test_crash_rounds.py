"""Twenty seeded kill -9 rounds under load (issue 7; DESIGN.md §9 "crash safety").

`sourceauth serve` runs as a subprocess on one SQLite file while client threads send mail and
a confirmer answers challenges (the load of test_crash_safety.py). Each round kills the server
with SIGKILL at a point drawn from `random.Random(round_seed)`:

- `accepted`: once the clients have been told 250 for N more messages, plus a short delay;
- `delay`: a random time after the server greets;
- `recovery`: a random time after the process starts, before or just after it greets (so
  during start-up recovery, with clients knocking);

and kills either every process of the server at once (a machine crash) or the SMTP process
alone (the kernel then sends its worker process SIGTERM: it finishes its sends and stops);
either way the round waits until no process of the server is left. A process of the server
still there 30 s after the kill fails the test, with a stack dump of it (py-spy when
installed, and faulthandler's, which the server's child processes write to its log on
SIGUSR1).

With the server gone, each round ends with its checks: every receipt id a client was told 250
is in the log, its copies cover exactly the recipients it was sent to and each is delivered,
held, queued for delivery, or ended by a recorded event with a reason; `audit verify` (the
function the command runs, in this process) finds no fault. The last check runs the command. After the last round the server is restarted, the load stops, the server is
stopped gracefully and `maintain` runs; then every copy must be settled, or queued under the
lease of a worker the test killed (sent once that lease lapses, 300 s later),
every copy recorded delivered has reached the next hop, and no sender got two challenges.

Each round prints its seed. Rerun chosen rounds with SOURCEAUTH_CRASH_SEEDS=<seed>,<seed>;
SOURCEAUTH_CRASH_BASE_SEED moves the whole schedule.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import build_engine
from sourceauth.adapters.storage.audit import export_events, verify
from tests.integration.smtp_harness import free_port
from tests.integration.test_crash_safety import (
    FRIENDS,
    QUEUED,
    SETTLED,
    Load,
    Server,
    assert_delivered_copies_arrived,
    assert_nothing_lost,
    assert_one_challenge_per_sender,
    assert_queued_copies_are_leased,
    authorize,
    wind_down,
    write_config,
)
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.crash, pytest.mark.timeout(420)]

ROUNDS = 20
BASE_SEED = int(os.environ.get("SOURCEAUTH_CRASH_BASE_SEED", "20261201"))
SEEDS = [
    int(s) for s in os.environ.get("SOURCEAUTH_CRASH_SEEDS", "").split(",") if s.strip()
] or [BASE_SEED + n for n in range(ROUNDS)]


@dataclass(frozen=True)
class KillPoint:
    """Where one round kills the server, all drawn from the round's seed."""

    mode: str  # "accepted" | "delay" | "recovery"
    count: int  # accepted: this many more 250s first
    delay: float  # seconds: after those 250s, after the greeting, or after the process start
    group: bool  # every process of the server (a machine crash), else the SMTP process alone

    @classmethod
    def draw(cls, seed: int) -> KillPoint:
        rng = random.Random(seed)
        mode = rng.choices(["accepted", "delay", "recovery"], weights=[6, 3, 2])[0]
        group = rng.random() < 0.5
        if mode == "accepted":
            return cls(mode, rng.randint(1, 25), rng.uniform(0.0, 0.1), group)
        if mode == "delay":
            return cls(mode, 0, rng.uniform(0.05, 1.5), group)
        return cls(mode, 0, rng.uniform(0.2, 2.0), group)


def kill_round(server: Server, load: Load, point: KillPoint) -> bool:
    """Start the server, kill it at `point`; True when it had greeted before it died."""
    if point.mode == "recovery":
        server.spawn()
        time.sleep(point.delay)
        greeted = server.greets_now()
        server.kill(group=point.group)
        return greeted
    server.start()
    if point.mode == "accepted":
        target = load.accepted_count() + point.count
        wait_until(
            lambda: load.accepted_count() >= target,
            timeout=60,
            interval=0.005,
            message=f"{point.count} more accepted messages",
        )
    time.sleep(point.delay)
    server.kill(group=point.group)
    return True


def read_and_verify(config: Path) -> tuple[list[dict[str, Any]], str]:
    """The whole log and `audit verify`'s verdict, in this process (what the CLI commands run,
    without an interpreter start per round); the server is dead, nothing writes meanwhile."""
    app = build_engine(load_config(config), transports=False)
    try:
        out = io.StringIO()
        export_events(app, out)
        fault, summary = verify(app)
    finally:
        app.close()
    assert fault is None, f"audit verify: {fault}"
    return [json.loads(line) for line in out.getvalue().splitlines()], summary


def test_twenty_seeded_kill_9_rounds_under_load_lose_nothing_and_keep_the_log_sound(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    with Sink() as relay, Sink() as next_hop:
        port = free_port()
        config = write_config(tmp_path, port, relay, next_hop)
        authorize(config, FRIENDS)
        server = Server(config, port, tmp_path / "serve.log")
        load = Load(port, relay, BASE_SEED, max_messages=10**9)
        threads = load.start()
        rounds: list[str] = []
        try:
            for n, seed in enumerate(SEEDS):
                point = KillPoint.draw(seed)
                print(
                    f"round {n} seed {seed} (rerun: SOURCEAUTH_CRASH_SEEDS={seed}) kill {point}",
                    flush=True,
                )
                before = load.accepted_count()
                greeted = kill_round(server, load, point)
                with load.lock:
                    accepted = list(load.accepted)
                events, sound = read_and_verify(config)
                copies = assert_nothing_lost(accepted, events, SETTLED | QUEUED)
                rounds.append(
                    f"round {n} seed {seed}: {point.mode} greeted={greeted}, "
                    f"{len(accepted) - before} taken this round, {len(accepted)} in all, "
                    f"copies {dict(Counter(c['state'] for c in copies.values()))}; {sound}"
                )
                print(rounds[-1], flush=True)
            server.start()
        finally:
            _, events, verified = wind_down(load, threads, server, config, tmp_path)
        relay_messages = list(relay.messages)
        hop_messages = list(next_hop.messages)

    assert len(rounds) == len(SEEDS)
    copies = assert_nothing_lost(load.accepted, events, SETTLED | QUEUED)
    leased = assert_queued_copies_are_leased(config, copies)
    redelivered = assert_delivered_copies_arrived(copies, hop_messages)
    tokens = assert_one_challenge_per_sender(events, relay_messages)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert server.hung_workers == 0, "\n".join(server.hang_dumps)
    print(
        f"{len(SEEDS)} rounds, {server.starts} server starts, {server.hung_workers} worker "
        f"processes hung after their parent's kill -9 (longest life after it "
        f"{max(server.orphan_lifetimes, default=0):.1f}s), {leased} copies held back by a killed "
        f"worker's lease; accepted {len(load.accepted)} "
        f"in {load.attempts} attempts; copies "
        f"{dict(Counter(c['state'] for c in copies.values()))}; challenges: {len(tokens)} "
        f"senders, {len(relay_messages)} sent; next hop: {len(hop_messages)} arrivals, "
        f"{redelivered} redelivered with the same X-SourceAuth-Id; "
        f"{verified.stdout.strip()}; took {time.monotonic() - started:.1f}s"
    )
