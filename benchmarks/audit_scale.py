"""The auditor's commands at scale: `audit verify` and `audit export` over a log of N events, each
run as the real command (`sourceauth … --config`) in a process of its own, timed (wall, CPU)
with its peak RSS taken from the kernel (`os.wait4`'s ru_maxrss for that one child).

    python -m benchmarks.audit_scale --events 1000000            # build, then measure
    python -m benchmarks.audit_scale --events 100000 --progress-cost
    python -m benchmarks.audit_scale --dir /tmp/log1m --reuse    # measure a log built before

The log's first 20,000 events are built through the engine's real use cases
(benchmarks/rebuild.py's `build_log`: operator authorizations, mail from known senders,
strangers challenged, 60 % confirmed, held mail released and delivered, every 25 rounds a week
passes and maintenance expires and purges); the rest, for speed, is written straight through
the recorder (`bulk_fill`: authorized correspondents and their mail, accepted and delivered).
Every event is chained and every transition is one `specs/` allows. The directory is an
ordinary data directory with a `sourceauth.toml`: every `sourceauth` command works on it.

`--progress-cost` also runs each command with stderr on a pseudo-terminal (the progress bars
drawn) and on a pipe (quiet), interleaved, best of `--rounds`, and prints the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pty
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.engine import PROTECTED, open_bench_engine, quiet_production_logging
from benchmarks.memory import authorized
from benchmarks.rebuild import _Clock, _NextHop, _Relay, build_log

CONFIG = "sourceauth.toml"
REALISTIC = 20_000  # events written through the use cases; the rest in bulk (see bulk_fill)
BULK_BATCH = 10_000
MAIL_PER_SENDER = 4


def build(directory: Path, events: int) -> dict[str, Any]:
    """A data directory under `directory` whose log holds at least `events` events."""
    from sourceauth.engine import tokens

    quiet_production_logging()
    directory.mkdir(parents=True, exist_ok=True)
    keyring = tokens.generate_keyring()
    secret = directory / "secret"
    secret.write_text(tokens.render_keyring(keyring), encoding="ascii")
    secret.chmod(0o600)
    (directory / CONFIG).write_text(
        f'[server]\ndata_dir = "{directory}"\nhostname = "mx.{PROTECTED}"\n'
        f'[policy]\nprotected = ["{PROTECTED}"]\n'
        f'[challenge]\nconfirm_address = "confirm@{PROTECTED}"\n'
        f'bounce_address = "bounces@{PROTECTED}"\n'
        '[logging]\nlevel = "warning"\n',
        encoding="utf-8",
    )
    clock = _Clock()
    app = open_bench_engine(
        directory,
        synchronous="NORMAL",  # building is not what is measured
        keyring=keyring,
        challenges=_Relay(),
        deliveries=_NextHop(),
        clock=clock,
    )
    t0 = time.perf_counter()
    try:
        build_log(app, clock, min(events, REALISTIC), random.Random(20261201))
        realistic = app.recorder.max_notification_id() or 0
        bulk_fill(app, clock, events)
        app.views.catch_up()
        total = app.recorder.max_notification_id() or 0
    finally:
        app.close()
    return {
        "events": total,
        "through_use_cases": realistic,
        "bulk": total - realistic,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }


def bulk_fill(app: Any, clock: _Clock, events: int) -> None:
    """Past the first REALISTIC events, the same kind of traffic written straight through the
    recorder (chained like any write), BULK_BATCH events per transaction: a correspondent
    authorized by the operator, then MAIL_PER_SENDER messages from it, each accepted and
    delivered by the next hop. Every transition is one specs/ allows."""
    from sourceauth.engine.message import Message

    n = 0
    stored: list[Any] = []
    while (app.recorder.max_notification_id() or 0) + len(stored) < events:
        n += 1
        clock.now += 1.0
        stamp = datetime.fromtimestamp(clock.now, tz=UTC)
        address = f"bulk{n}@partner{n % 500}.example.net"
        sid = app.sender_id(address)
        pending = [authorized(app, address, stamp, actor="operator", reason="known correspondent")]
        for i in range(MAIL_PER_SENDER):
            key = uuid.uuid4().hex
            msg = Message._create(
                Message.Accepted,
                id=uuid.uuid4(),
                timestamp=stamp,
                receipt_id=key,
                size=2048,
                sha256=hashlib.sha256(key.encode()).hexdigest(),
                sender=address,
                sender_id=sid.hex,
                recipients=[f"alice@{PROTECTED}"],
                subject=f"bulk message {n}.{i}",
                message_id_header=f"<{key}@partner.example.net>",
                actor="engine",
                reason="sender_authorized",
                expires_at=0.0,
            )
            msg.record_delivered(
                timestamp=stamp + timedelta(seconds=2),
                delivered=[f"alice@{PROTECTED}"],
                rejected=[],
                next_hop="bench",
                diagnostic="250 2.0.0 OK",
            )
            pending.extend(msg.collect_events())
        stored.extend(app.mapper.to_stored_event(e) for e in pending)
        if len(stored) >= BULK_BATCH:
            app.recorder.insert_events(stored)
            stored = []
    if stored:
        app.recorder.insert_events(stored)


def _command(directory: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sourceauth.adapters.cli",
        *args,
        "--config",
        str(directory / CONFIG),
    ]


def measure(argv: list[str], *, terminal: bool = False) -> dict[str, Any]:
    """Run one command to its end; its wall and CPU seconds, peak RSS, exit status, the tail of
    its stdout and how many bytes it wrote to stderr. `terminal`: stderr is a pseudo-terminal
    (drained by a thread, as a terminal would read it) instead of a pipe."""
    master = slave = -1
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm-256color"}
    if terminal:
        master, slave = pty.openpty()
    started = time.perf_counter()
    child = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave if terminal else subprocess.PIPE,
        env=env,
    )
    seen = bytearray()

    def drain(fd: int) -> None:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the terminal's last writer is gone
                    return
                if not chunk:
                    return
                seen.extend(chunk)
            elif child.poll() is not None:
                return

    reader = threading.Thread(target=drain, args=(master if terminal else child.stderr.fileno(),))  # type: ignore[union-attr]
    reader.start()
    out = child.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if terminal:
        os.close(slave)
    reader.join()
    if terminal:
        os.close(master)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kB
        "exit": child.returncode,
        "stdout_tail": out[-300:].decode("utf-8", "replace").strip(),
        "stdout_lines": out.count(b"\n"),
        "stderr_bytes": len(seen),
        "stderr": seen.decode("utf-8", "replace"),
    }


def commands(directory: Path, out: Path) -> dict[str, list[str]]:
    return {
        "verify": _command(directory, "audit", "verify"),
        "export": _command(directory, "audit", "export", "-o", str(out)),
        "rebuild": _command(directory, "projections", "rebuild"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit_scale")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="keep the log here (default: tmp)")
    parser.add_argument("--reuse", action="store_true", help="measure the log already in --dir")
    parser.add_argument("--progress-cost", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sa-audit-scale-") as tmp:
        directory = args.dir or Path(tmp) / "log"
        report: dict[str, Any] = {"load": os.getloadavg(), "cpus": os.cpu_count()}
        if args.reuse:
            report["built"] = "reused"
        else:
            report["built"] = build(directory, args.events)
            print(f"built: {report['built']}", flush=True)
        exported = Path(tmp) / "export.jsonl"
        runs = commands(directory, exported)
        for name in ("verify", "export"):
            found = measure(runs[name])
            found.pop("stderr")
            report[name] = found
            print(f"{name}: {json.dumps(found)}", flush=True)
        report["export"]["lines"] = sum(1 for _ in exported.open("rb"))
        if args.progress_cost:
            report["progress_cost"] = progress_cost(runs, args.rounds)
        report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


def progress_cost(runs: dict[str, list[str]], rounds: int) -> dict[str, Any]:
    """Each command with its bars drawn on a pseudo-terminal and quiet on a pipe, interleaved;
    best wall time of `rounds` each, and the ratio drawn / quiet."""
    figures: dict[str, Any] = {}
    for name in ("verify", "export", "rebuild"):
        walls: dict[str, list[float]] = {"terminal": [], "pipe": []}
        cpus: dict[str, list[float]] = {"terminal": [], "pipe": []}
        drawn = 0
        for _ in range(rounds):
            for where in ("pipe", "terminal"):
                found = measure(runs[name], terminal=where == "terminal")
                assert found["exit"] == 0, found
                walls[where].append(found["wall_s"])
                cpus[where].append(found["cpu_s"])
                if where == "terminal":
                    drawn = max(drawn, found["stderr_bytes"])
        figures[name] = {
            "terminal_wall_s": min(walls["terminal"]),
            "pipe_wall_s": min(walls["pipe"]),
            "wall_ratio": round(min(walls["terminal"]) / min(walls["pipe"]), 3),
            "terminal_cpu_s": min(cpus["terminal"]),
            "pipe_cpu_s": min(cpus["pipe"]),
            "cpu_ratio": round(min(cpus["terminal"]) / min(cpus["pipe"]), 3),
            "terminal_bytes_drawn": drawn,
        }
        print(f"progress cost {name}: {json.dumps(figures[name])}", flush=True)
    return figures


if __name__ == "__main__":
    main()
