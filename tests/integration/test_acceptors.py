"""`[server] processes` (issue 13): `sourceauth serve` with two SMTP acceptor processes on one
port (SO_REUSEPORT), each with its own group commit on one SQLite file. Many concurrent
clients: every 250 is a message in the store, counted once; SIGTERM stops every process."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import build_engine
from tests.integration.smtp_harness import free_port, write_config
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
KNOWN = "friend@partner.example.net"
CLIENTS = 12
PER_CLIENT = 10


def config(tmp: Path, port: int, relay: Sink, next_hop: Sink) -> Path:
    path = write_config(
        tmp,
        relay=relay.url,
        next_hop=next_hop.url,
        port=port,
        server="processes = 2\n",
        extra="[limits]\nchallenges_per_domain_per_hour = 100000\nchallenges_per_hour = 100000\n",
    )
    text = path.read_text().replace(
        'format = "console"\nlevel = "warning"',
        f'format = "json"\nlevel = "info"\nfile = "{tmp / "serve.log"}"',
    )
    path.write_text(text)
    return path


def log_events(path: Path, event: str) -> list[dict[str, object]]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [
        e
        for e in (json.loads(line) for line in lines if line.startswith("{"))
        if e.get("event") == event
    ]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(64).startswith(b"220")
    except OSError:
        return False


def client(port: int, n: int, accepted: list[str], failed: list[str]) -> None:
    for i in range(PER_CLIENT):
        sender = KNOWN if i % 2 == 0 else f"stranger{n}-{i}@d{n}.example.org"
        raw = (
            f"From: <{sender}>\r\nTo: <user{n}@example.test>\r\nSubject: c{n} m{i}\r\n"
            f"Message-ID: <c{n}.m{i}@load.test>\r\n\r\nbody {n} {i}\r\n"
        ).encode()
        try:  # a connection per message: the kernel spreads them over both acceptors
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                smtp.sendmail(sender, [f"user{n}@example.test"], raw)
            accepted.append(f"c{n}.m{i}")
        except (smtplib.SMTPException, OSError) as exc:
            failed.append(f"c{n}.m{i}: {exc}")


def test_two_acceptors_take_concurrent_clients_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with Sink() as relay, Sink() as next_hop:
        path = config(tmp_path, port, relay, next_hop)
        cfg = load_config(path)
        app = build_engine(cfg)
        app.authorize(KNOWN, actor="test", reason="known correspondent")
        app.close()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sourceauth.adapters.cli", "serve", "--config", str(path)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "stderr").open("wb"),
        )
        try:
            wait_until(lambda: greets(port), timeout=60, message="serve to greet")
            wait_until(lambda: log_events(log, "acceptor_started"), timeout=60, message="acceptor")
            (child,) = [int(str(e["pid"])) for e in log_events(log, "acceptor_started")]
            assert child != proc.pid and alive(child)

            accepted: list[str] = []
            failed: list[str] = []
            threads = [
                threading.Thread(target=client, args=(port, n, accepted, failed))
                for n in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert failed == []
            assert len(accepted) == CLIENTS * PER_CLIENT
            # the known sender's mail reaches the next hop through the one worker process
            next_hop.wait_for(CLIENTS * PER_CLIENT // 2, timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        assert code == 0, (tmp_path / "stderr").read_text()[-3000:]
        assert not alive(child)
        assert [e["pid"] for e in log_events(log, "acceptor_stopped")] == [child]
        assert len(log_events(log, "filter_stopped")) == 1

        # every 250 is one message in the store, counted once
        app = build_engine(load_config(path))
        try:
            created = [
                n
                for n in app.recorder.select_notifications(start=1, limit=10**6)
                if n.originator_version == 1 and ":Message." in n.topic
            ]
            assert len(created) == len(accepted)
            subjects = {f"c{n}.m{i}" for n in range(CLIENTS) for i in range(PER_CLIENT)}
            assert set(accepted) == subjects
            delivered_ids = [
                m.data.split(b"Message-ID: <", 1)[1].split(b">")[0] for m in next_hop.messages
            ]
            assert len(delivered_ids) == len(set(delivered_ids)) == CLIENTS * PER_CLIENT // 2
        finally:
            app.close()
