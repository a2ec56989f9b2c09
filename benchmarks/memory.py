"""Memory against whitelist size: the RSS of a fresh process holding an engine over a log of
N authorized senders, after receiving 10k messages from random ones of them, against the same
process over an empty log (where the same 10k messages come from strangers, and are held).

Each figure is read from /proc/self/status inside its own subprocess:
`python -m benchmarks.memory build DIR N` writes the log, `... measure DIR N MESSAGES` reports.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.result import BenchResult

INSERT_BATCH = 20_000
KEYRING = "keyring"


def sender_address(i: int) -> str:
    return f"sender{i}@d{i % 5000}.example.net"


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in kB."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in wanted:
                out[name] = int(value.split()[0])
    return out


def _open(directory: Path, synchronous: str = "FULL") -> Any:
    from benchmarks.engine import open_bench_engine
    from sourceauth.engine import tokens

    # The same keyring in both processes, so the sender ids the builder wrote are found again.
    keyring = tokens.parse_keyring((directory / KEYRING).read_text())
    return open_bench_engine(directory / "engine", synchronous=synchronous, keyring=keyring)


def authorized(app: Any, address: str, stamp: datetime, *, actor: str, reason: str) -> Any:
    """The Sender.FirstAuthorized event an operator's `senders allow` records."""
    from sourceauth.engine.sender import Sender

    sender = Sender.first_verdict(
        app.sender_id(address),
        trigger="authorize",
        address=address,
        scope="global",
        timestamp=stamp,
        actor=actor,
        reason=reason,
    )
    return sender.collect_events()[0]


def build(directory: Path, senders: int) -> dict[str, Any]:
    """Write `senders` Sender.FirstAuthorized (authorized by the operator) events, INSERT_BATCH per
    transaction straight through the recorder, then bring the views up to date."""
    from benchmarks.engine import quiet_production_logging
    from sourceauth.engine import tokens

    quiet_production_logging()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KEYRING).write_text(tokens.render_keyring(tokens.generate_keyring()))
    app = _open(directory, synchronous="NORMAL")
    t0 = time.perf_counter()
    try:
        stamp = datetime.now(UTC)
        stored = []
        for i in range(senders):
            address = sender_address(i)
            event = authorized(app, address, stamp, actor="benchmark", reason="bulk import")
            stored.append(app.mapper.to_stored_event(event))
            if len(stored) == INSERT_BATCH:
                app.recorder.insert_events(stored)
                stored = []
        if stored:
            app.recorder.insert_events(stored)
        appended = time.perf_counter() - t0
        app.views.catch_up()
        return {"append_seconds": appended, "views_seconds": time.perf_counter() - t0 - appended}
    finally:
        app.close()


def measure(directory: Path, senders: int, messages: int) -> dict[str, Any]:
    """Open the engine (default FULL), receive `messages` messages from random senders of the
    first `senders` (authorized ones when the log holds them), report this process's memory."""
    from benchmarks.engine import BATCH, make_incoming, quiet_production_logging
    from sourceauth.engine.api import Decision

    quiet_production_logging()
    before_open = status()
    app = _open(directory)
    try:
        opened = status()
        rng = random.Random(7)
        mail = [make_incoming(sender_address(rng.randrange(senders)), i) for i in range(messages)]
        decisions: dict[str, int] = {}
        t0 = time.perf_counter()
        for i in range(0, len(mail), BATCH):
            for receipt in app.receive_many(mail[i : i + BATCH]):
                decision = receipt.decisions[0].decision
                decisions[decision.value] = decisions.get(decision.value, 0) + 1
        seconds = time.perf_counter() - t0
        del mail
        after = status()
        assert sum(decisions.values()) == messages
        known = decisions.get(Decision.DELIVER.value, 0)
        return {
            "before_open": before_open,
            "opened": opened,
            "after": after,
            "decisions": decisions,
            "delivered": known,
            "seconds": seconds,
        }
    finally:
        app.close()


def _child(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory {args[0]} failed: {done.stderr.strip()[-1500:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(scale: float = 1.0) -> list[BenchResult]:
    quick = scale < 1
    senders = 100_000 if quick else int(1_000_000 * scale)
    messages = 2_000 if quick else 10_000
    with tempfile.TemporaryDirectory(prefix="sa-bench-memory-") as tmp:
        full, empty = Path(tmp) / "full", Path(tmp) / "empty"
        built = _child("build", str(full), str(senders))
        _child("build", str(empty), "0")
        loaded = _child("measure", str(full), str(senders), str(messages))
        bare = _child("measure", str(empty), str(senders), str(messages))
        db_mb = (full / "engine" / "sourceauth.db").stat().st_size / 2**20
    grown_mb = (loaded["after"]["VmRSS"] - bare["after"]["VmRSS"]) / 1024
    anon_mb = (loaded["after"]["RssAnon"] - bare["after"]["RssAnon"]) / 1024
    return [
        BenchResult(
            name=f"memory.rss[{senders // 1000}k senders]",
            value=grown_mb,
            unit="MB over empty",
            baseline_name="same process, empty log",
            baseline_value=bare["after"]["VmRSS"] / 1024,
            ratio=loaded["after"]["VmRSS"] / bare["after"]["VmRSS"],
            target="<= +100 MB",
            passed=grown_mb <= 100,
            details={
                "senders": senders,
                "messages": messages,
                "rss_mb": round(loaded["after"]["VmRSS"] / 1024, 1),
                "rss_empty_mb": round(bare["after"]["VmRSS"] / 1024, 1),
                "rss_anon_delta_mb": round(anon_mb, 1),
                "rss_file_mb": round(loaded["after"]["RssFile"] / 1024, 1),
                "rss_file_empty_mb": round(bare["after"]["RssFile"] / 1024, 1),
                "rss_after_open_mb": round(loaded["opened"]["VmRSS"] / 1024, 1),
                "rss_after_open_empty_mb": round(bare["opened"]["VmRSS"] / 1024, 1),
                "hwm_mb": round(loaded["after"]["VmHWM"] / 1024, 1),
                "hwm_empty_mb": round(bare["after"]["VmHWM"] / 1024, 1),
                "delivered": loaded["delivered"],
                "empty_log_decisions": json.dumps(bare["decisions"]),
                "db_mb": round(db_mb, 1),
                "build_append_seconds": round(built["append_seconds"], 1),
                "build_views_seconds": round(built["views_seconds"], 1),
                "receive_seconds": round(loaded["seconds"], 2),
            },
        )
    ]


def main(argv: list[str]) -> None:
    command, directory = argv[0], Path(argv[1])
    if command == "build":
        out = build(directory, int(argv[2]))
    elif command == "measure":
        out = measure(directory, int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
