"""A real filter on loopback for integration tests: `sourceauth serve` in a background thread,
with real aiosmtpd sinks standing in for the challenge relay and the next hop.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from sourceauth.adapters.config import Config, load_config
from sourceauth.adapters.runtime import Filter
from tests.support.ports import free_port
from tests.support.smtp_sink import Received, Sink


def write_config(
    tmp: Path,
    *,
    relay: str,
    next_hop: str,
    extra: str = "",
    port: int | None = None,
    server: str = "",
) -> Path:
    path = tmp / "sourceauth.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port or free_port()}"
hostname = "mx.example.test"
data_dir = "{tmp / "var"}"
{server}
[policy]
protected = ["example.test"]
{extra}

[challenge]
relay = "{relay}"
confirm_address = "confirm@example.test"
bounce_address = "bounces@example.test"
retry_initial = "1s"
retry_max = "2s"

[delivery]
next_hop = "{next_hop}"
retry_initial = "1s"
retry_max = "2s"

[logging]
format = "console"
level = "warning"
""",
        encoding="utf-8",
    )
    return path


class RunningFilter:
    """`Filter` on its own event loop thread; stop() is graceful."""

    def __init__(
        self, cfg: Config, workers: str = "thread", clock: Callable[[], float] | None = None
    ) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-filter", daemon=True
        )
        self.thread.start()
        self.filter = (
            Filter(cfg, workers=workers)
            if clock is None
            else Filter(cfg, workers=workers, clock=clock)
        )
        asyncio.run_coroutine_threadsafe(self.filter.start(), self.loop).result(timeout=30)

    @property
    def app(self) -> Any:
        return self.filter.app

    @property
    def port(self) -> int:
        return self.filter.port

    def stop(self, timeout: float = 60) -> None:
        asyncio.run_coroutine_threadsafe(self.filter.stop(), self.loop).result(timeout=timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def send(self, mail_from: str, rcpts: list[str], raw: bytes) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            return client.sendmail(mail_from, rcpts, raw)

    def send_smtputf8(self, mail_from: str, rcpt: str, raw: bytes) -> None:
        """One message with MAIL FROM ... SMTPUTF8 (a non-ASCII envelope), each step 250."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo()
            assert client.mail(mail_from, ["SMTPUTF8"])[0] == 250
            assert client.rcpt(rcpt)[0] == 250
            assert client.data(raw)[0] == 250

    def sendmail_reply(self, mail_from: str, rcpts: list[str], raw: bytes) -> tuple[int, bytes]:
        """Send and return the DATA reply (code, text) instead of raising on refusal."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo()
            code, text = client.mail(mail_from)
            if code != 250:
                return code, text
            for r in rcpts:
                code, text = client.rcpt(r)
                if code not in (250, 251):
                    return code, text
            return client.data(raw)


def message(
    sender: str,
    to: str,
    subject: str = "hello",
    body: str = "Hi there,\r\nthis is a message body.\r\n",
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> bytes:
    lines = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Message-ID: {message_id or f'<{time.time_ns()}@client.test>'}",
        "Date: Sat, 28 Nov 2026 10:00:00 +0000",
    ]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def dsn(bounce_to: str, failed: str) -> bytes:
    """A delivery status notification (RFC 3464) to `bounce_to`: `failed` does not exist."""
    domain = failed.rsplit("@", 1)[-1]
    return (
        f"From: MAILER-DAEMON@{domain}\r\n"
        f"To: {bounce_to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.{domain}\r\n\r\n"
        f"Final-Recipient: rfc822; {failed}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
        "\r\n--B--\r\n"
    ).encode()


def parsed(received: Received) -> Message:
    return message_from_bytes(received.data)


def token_of(challenge: Received) -> str:
    reply_to = parsed(challenge)["Reply-To"]
    local = reply_to.strip("<>").split("@")[0]
    return local.split("+", 1)[1]


@contextmanager
def filter_with_sinks(
    tmp: Path,
    *,
    relay_reply: Callable[[str], str] | None = None,
    extra: str = "",
    server: str = "",
    clock: Callable[[], float] | None = None,
) -> Iterator[tuple[RunningFilter, Sink, Sink]]:
    with Sink(rcpt_reply=relay_reply) as relay, Sink() as next_hop:
        cfg = load_config(
            write_config(
                tmp,
                relay=f"smtp://127.0.0.1:{relay.port}",
                next_hop=f"smtp://127.0.0.1:{next_hop.port}",
                extra=extra,
                server=server,
            )
        )
        running = RunningFilter(cfg, clock=clock)
        try:
            yield running, relay, next_hop
        finally:
            running.stop()
