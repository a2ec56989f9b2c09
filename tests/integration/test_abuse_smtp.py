"""Attacks on the SMTP side (issue 7), each over real loopback sockets against a running filter:
a MIME bomb to the bounce address, RFC 5321 addresses refused, session floods, hostile bytes.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.smtp_harness import (
    filter_with_sinks,
    free_port,
    message,
    token_of,
    write_config,
)
from tests.integration.test_crash_safety import Server
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_outbound_idle, wait_until

PROTECTED = "bob@example.test"
STRANGER = "alice@remote.test"


def mime_bomb(parts: int) -> bytes:
    """A "bounce" with `parts` tiny MIME parts (36 bytes each): 300,000 make 10.8 MB."""
    head = (
        b"From: Mail Delivery System <MAILER-DAEMON@remote.test>\r\n"
        b"To: bounces@example.test\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    )
    return head + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * parts + b"--b--\r\n"


@pytest.mark.timeout(180)
def test_a_mime_bomb_to_the_bounce_address_does_not_stall_other_sessions(
    tmp_path: Path,
) -> None:
    bomb = mime_bomb(300_000)
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        attacker = smtplib.SMTP("127.0.0.1", flt.port, timeout=120)
        attacker.ehlo()
        assert attacker.mail("<>")[0] == 250
        assert attacker.rcpt("bounces@example.test")[0] == 250
        attacker.putcmd("data")
        assert attacker.getreply()[0] == 354
        attacker.send(bomb + b".\r\n")  # the whole bomb is in; its reply comes later
        bomb_codes: list[int] = []
        waiter = threading.Thread(target=lambda: bomb_codes.append(attacker.getreply()[0]))
        waiter.start()
        # Unrelated mail, one message after another, until the bomb has been answered.
        waits: list[float] = []
        with smtplib.SMTP("127.0.0.1", flt.port, timeout=120) as client:
            client.ehlo()
            while (len(waits) < 3 or waiter.is_alive()) and len(waits) < 500:
                assert client.mail(STRANGER)[0] == 250
                assert client.rcpt(PROTECTED)[0] == 250
                started = time.monotonic()
                code, _ = client.data(message(STRANGER, PROTECTED, subject="unrelated"))
                waits.append(time.monotonic() - started)
                assert code == 250
        waiter.join(timeout=120)
        attacker.quit()
        print(
            f"{len(waits)} unrelated messages beside a 300,000-part bounce: slowest 250 after "
            f"{max(waits) * 1000:.0f} ms, median {sorted(waits)[len(waits) // 2] * 1000:.0f} ms"
        )
        assert bomb_codes == [250]  # the bomb is taken too (a report that names no challenge)
        # Before: 9.5 s (the commit thread parsing every part); after, unloaded, under 0.7 s
        # (docs/security.md). The bound is loose for a loaded 2-core machine.
        assert max(waits) < 3.0
        wait_outbound_idle(flt.app)
        assert len(relay.messages) == 1  # the stranger's challenge; the bomb challenges no one


@pytest.mark.parametrize(
    ("sender", "normalized"),
    [
        ('"System Administrator"@example.com', '"system administrator"@example.com'),
        ("a@[127.0.0.1]", "a@[127.0.0.1]"),
        ("a@foo_bar.test", "a@foo_bar.test"),
        ("bounce-md_30850198.5f8d6f80.v1-" + "b" * 40 + "@mandrillapp.com", None),
    ],
)
def test_every_rfc5321_sender_postfix_passes_is_taken_and_challenged(
    tmp_path: Path, sender: str, normalized: str | None
) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
            client.ehlo()
            code, text = client.docmd("MAIL", f"FROM:<{sender}>")  # as Postfix sends it
            assert code == 250, text
            assert client.docmd("RCPT", f"TO:<{PROTECTED}>")[0] == 250
            assert client.data(message("someone@remote.test", PROTECTED))[0] == 250
        challenge = relay.wait_for(1, timeout=15)[0]
        assert challenge.rcpt_tos == [normalized or sender]
        assert [h.sender for h in flt.app.quarantine()] == [normalized or sender]


@pytest.mark.parametrize(
    "recipient", ['"Team Lead"@example.test', "postmaster@[127.0.0.1]", "a@foo_bar.test"]
)
def test_every_rfc5321_recipient_is_taken(tmp_path: Path, recipient: str) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
            client.ehlo()
            assert client.docmd("MAIL", f"FROM:<{STRANGER}>")[0] == 250
            code, text = client.docmd("RCPT", f"TO:<{recipient}>")
            assert code == 250, text
            assert client.data(message(STRANGER, recipient))[0] == 250
        if recipient.endswith("@example.test"):  # protected: held, the stranger challenged
            assert relay.wait_for(1, timeout=15)[0].rcpt_tos == [STRANGER]
            assert flt.app.quarantine()[0].recipients == ('"team lead"@example.test',)
        else:
            assert next_hop.wait_for(1, timeout=15)[0].rcpt_tos == [recipient.lower()]


def test_a_sender_outside_the_grammar_gets_a_syntax_reply_never_553(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
            client.ehlo()
            code, text = client.docmd("MAIL", 'FROM:<"unterminated@example.test>')
            assert code == 501 and b"5.1.7" in text
            code, text = client.docmd("MAIL", "FROM:<a@@example.test>")  # aiosmtpd's parser
            assert code == 501, text
            client.rset()
            assert client.docmd("MAIL", "FROM:<a@remote.test>")[0] == 250


def greeting(source: str, port: int) -> tuple[socket.socket, bytes]:
    """A raw connection from `source` (any 127/8 address is loopback) and its first reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        reply += chunk
    return sock, reply


def admitted(port: int) -> socket.socket | None:
    sock, reply = greeting("127.0.0.1", port)
    if reply.startswith(b"220 "):
        return sock
    sock.close()
    return None


def test_sessions_over_the_limits_are_told_421_and_the_mta_can_retry(tmp_path: Path) -> None:
    limits = "max_sessions = 3\nmax_sessions_per_client = 2\n"
    with filter_with_sinks(tmp_path, server=limits) as (flt, relay, next_hop):
        open_ = []
        for source in ("127.0.0.1", "127.0.0.1"):
            sock, reply = greeting(source, flt.port)
            open_.append(sock)
            assert reply.startswith(b"220 ")
        sock, reply = greeting("127.0.0.1", flt.port)
        assert reply.startswith(b"421 4.7.0") and b"your address" in reply
        assert sock.recv(64) == b""  # and closed
        sock.close()
        sock, reply = greeting("127.0.0.2", flt.port)  # another client still gets in
        assert reply.startswith(b"220 ")
        open_.append(sock)
        sock, reply = greeting("127.0.0.3", flt.port)
        assert reply.startswith(b"421 4.7.0 Too many sessions")
        sock.close()
        open_.pop(0).close()  # one session ends: a retry gets in
        open_.append(wait_until(lambda: admitted(flt.port), message="a free session slot"))
        for sock in open_:
            sock.close()
        # The limits count sessions, not messages: mail still flows once the flood is gone.
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED))
        relay.wait_for(1, timeout=15)


def test_bare_cr_and_bare_lf_never_reach_the_next_hop(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        raw = (
            b"From: alice@remote.test\r\nTo: dave@other.test\r\nSubject: smuggle\r\n\r\n"
            b"one\rtwo\r.\rMAIL FROM:<x@evil.test>\rRCPT TO:<victim@other.test>\r"
            b"three\nfour\n.\nfive\r\n"
        )
        with smtplib.SMTP("127.0.0.1", flt.port, timeout=30) as client:
            client.ehlo()
            client.mail(STRANGER)
            client.rcpt("dave@other.test")
            client.send(b"DATA\r\n")
            assert client.getreply()[0] == 354
            client.send(raw + b".\r\n")
            assert client.getreply()[0] == 250
        delivered = next_hop.wait_for(1, timeout=15)
        wait_outbound_idle(flt.app)
        assert len(next_hop.messages) == 1  # nothing smuggled through as a second message
        data = delivered[0].data
        assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
        assert b"one\r\ntwo\r\n" in data and b"three\r\nfour\r\n" in data


def serve_config(tmp_path: Path, relay: Sink, next_hop: Sink, server: str = "") -> tuple[Path, int]:
    port = free_port()
    path = write_config(tmp_path, relay=relay.url, next_hop=next_hop.url, port=port, server=server)
    text = path.read_text().replace('format = "console"', 'format = "json"')
    path.write_text(text.replace('level = "warning"', 'level = "info"'))
    return path, port


def test_confirm_and_bounce_tokens_never_reach_the_log(tmp_path: Path) -> None:
    with Sink() as relay, Sink() as next_hop:
        config, port = serve_config(tmp_path, relay, next_hop)
        server = Server(config, port, tmp_path / "serve.log")
        server.start()
        try:
            send = smtplib.SMTP("127.0.0.1", port, timeout=30)
            send.sendmail(STRANGER, [PROTECTED], message(STRANGER, PROTECTED))
            token = token_of(relay.wait_for(1, timeout=30)[0])
            reply = message(STRANGER, f"confirm+{token}@example.test", subject="Re: confirm")
            send.sendmail(STRANGER, [f"confirm+{token}@example.test"], reply)
            dsn = message("MAILER-DAEMON@remote.test", f"bounces+{token}@example.test")
            send.sendmail("", [f"bounces+{token}@example.test"], dsn)
            send.quit()
            next_hop.wait_for(1, timeout=30)  # the confirmation released the held message
        finally:
            assert server.stop() == 0, server.tail()
    text = (tmp_path / "serve.log").read_text()
    decided = [json.loads(line) for line in text.splitlines() if '"message_decided"' in line]
    assert {d["recipient"] for d in decided} >= {
        "confirm+[token]@example.test",
        "bounces+[token]@example.test",
    }
    assert token not in text and token.upper() not in text


@pytest.mark.timeout(180)
def test_descriptor_exhaustion_logs_a_few_lines_and_the_filter_recovers(tmp_path: Path) -> None:
    with Sink() as relay, Sink() as next_hop:
        config, port = serve_config(
            tmp_path,
            relay,
            next_hop,
            server="max_sessions = 5000\nmax_sessions_per_client = 5000\n",
        )
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sourceauth.adapters.cli", "serve", "--config", str(config)],
                stdout=out,
                stderr=out,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)),
            )
        held: list[socket.socket] = []
        try:
            wait_until(lambda: admitted_quietly(port, held), message="serve to greet")
            # Hold sessions until the server has no descriptor left, then keep knocking.
            for _ in range(400):
                try:
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            knocks = 0
            for _ in range(40):  # about 8 s of connection attempts while starved
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                        sock.settimeout(0.2)
                        with contextlib.suppress(OSError):
                            sock.recv(64)
                except OSError:
                    pass
                knocks += 1
            starved = log_path.stat().st_size
            for sock in held:
                sock.close()
            held.clear()
            recovered = wait_until(lambda: admitted_quietly(port, held), message="recovery")
            assert recovered
        finally:
            for sock in held:
                sock.close()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        text = log_path.read_text(errors="replace")
        print(f"log after {knocks} knocks on a starved server: {starved} bytes")
        assert code == 0, text[-3000:]
        assert '"descriptor_limit_low"' in text
        assert '"loop_error"' in text  # the accept() failures were seen...
        assert starved < 20_000, text[-3000:]  # ...and told in a few lines, not one per failure


def admitted_quietly(port: int, keep: list[socket.socket]) -> bool:
    try:
        sock = admitted(port)
    except OSError:
        return False
    if sock is None:
        return False
    keep.append(sock)
    return True
