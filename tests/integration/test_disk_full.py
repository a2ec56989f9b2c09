"""A full disk (issue 7): `sourceauth serve`'s data directory on a 4 MiB tmpfs filled to the
last byte, so every write the filter tries fails with a real ENOSPC. Mail is answered 4xx,
never 250 and lost; the server is then killed with SIGKILL while the disk is still full (a
crash in the middle of failed commits); once space is back it restarts and takes mail again.
In the end every message answered 250 is in the log with its copies delivered, held or ended
by a recorded event with a reason, every copy recorded delivered reached the next hop, and
`audit verify` passes.
"""

from __future__ import annotations

import contextlib
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import build_engine
from tests.integration.test_abuse_smtp import serve_config
from tests.integration.test_crash_safety import (
    QUEUED_AS,
    SETTLED,
    Accepted,
    Server,
    assert_delivered_copies_arrived,
    assert_nothing_lost,
    cli,
    raw_message,
    read_log,
)
from tests.support.smtp_sink import Sink

FRIEND = "friend@known.test"
# a stranger to a protected mailbox (held, challenged), a friend (delivered), and a stranger
# to a protected and an unprotected mailbox (one copy delivered, one held)
MAIL = [
    ("alice@remote.test", ("bob@example.test",)),
    (FRIEND, ("bob@example.test",)),
    ("carl@remote.test", ("bob@example.test", "dave@other.test")),
]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def send(port: int, n: int) -> tuple[int, bytes, Accepted | None]:
    """One message of MAIL's mix; the receipt when answered 250."""
    sender, rcpts = MAIL[n % len(MAIL)]
    attempt = f"disk-{n}"
    raw = raw_message(sender, rcpts, attempt, f"message {n}")
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, text = client.data(raw)
    if code != 250:
        return code, text, None
    found = QUEUED_AS.search(text)
    assert found, text
    return code, text, Accepted(found.group(1).decode(), attempt, sender, rcpts, "disk")


@pytest.mark.timeout(240)
def test_a_full_disk_defers_mail_and_loses_nothing_once_space_is_back(
    tmp_path: Path, small_disk: Path
) -> None:
    with Sink() as relay, Sink() as next_hop:
        config, port = serve_config(tmp_path, relay, next_hop)
        config.write_text(
            config.read_text().replace(
                f'data_dir = "{tmp_path / "var"}"', f'data_dir = "{small_disk}"'
            )
        )
        app = build_engine(load_config(config), transports=False)
        try:
            app.authorize(FRIEND, actor="operator", reason="known correspondent")
        finally:
            app.close()
        server = Server(config, port, tmp_path / "serve.log")
        server.start()
        accepted: list[Accepted] = []
        filler = small_disk / "filler"
        try:
            for n in range(6):
                code, text, receipt = send(port, n)
                assert code == 250 and receipt, text
                accepted.append(receipt)
            with filler.open("wb") as out, contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            for n in range(100, 106):
                code, text, receipt = send(port, n)
                assert 400 <= code < 500 and receipt is None, (code, text)
            server.kill()  # SIGKILL in the middle of failing commits, the disk still full
            filler.unlink()
            server.start()
            for n in range(200, 206):
                code, text, receipt = send(port, n)
                assert code == 250 and receipt, text
                accepted.append(receipt)
            # every copy for the next hop has been delivered before the graceful stop
            wanted = sum(1 for a in accepted if a.mail_from == FRIEND) + sum(
                1 for a in accepted if "dave@other.test" in a.rcpts
            )
            next_hop.wait_for(wanted, timeout=60)
        finally:
            filler.unlink(missing_ok=True)
            assert server.stop() == 0, server.tail()
        maintained = cli(config, "maintain")
        assert maintained.returncode == 0, maintained.stderr
        verified = cli(config, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        events = read_log(config, tmp_path / "log.jsonl")
        copies = assert_nothing_lost(accepted, events, SETTLED)
        assert_delivered_copies_arrived(copies, list(next_hop.messages))
        recorded = {c["receipt_id"] for c in copies.values()}
        assert recorded == {a.receipt_id for a in accepted}, "a 4xx'd message was recorded"
