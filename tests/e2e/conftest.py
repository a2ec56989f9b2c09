"""Fixtures and helpers for end-to-end tests through a real Postfix.

Postfix is installed and configured by ``sudo bash .ci/postfix-setup.sh``
(topology in docs/postfix.md):

  127.0.0.1:10025  public smtpd -> content_filter scan:[127.0.0.1]:10030 (the filter)
  127.0.0.1:10031  reinjection smtpd (no filter): released mail, challenges
  127.0.0.1:10027  submission stand-in -> content_filter scan:[127.0.0.1]:10033
                   (sourceauth's [correspondents] listener): mail users send out
  127.0.0.1:10040  smtp-sink: every RCPT to *@remote.test refused 550 5.1.1
  127.0.0.1:10041  ``capture_server`` fixture: receives mail for *@ok.test
  *@fail.test      Postfix error transport: permanent failure, no network
  bounces@example.test (and bounces+TOKEN@) -> always routed to the filter
  alice, bob, carol, confirm, bounces @example.test: Maildirs under
  /var/mail/vhosts/example.test/<local>/{new,cur}

Use the ``postfix`` fixture (session scope) in every e2e test: it skips
locally when Postfix is not set up and fails under CI=true.  Helpers are
plain functions (importable: ``from tests.e2e.conftest import send``) and are
also reachable as methods of the object the ``postfix`` fixture returns.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.support.waiting import wait_until

HOST = "127.0.0.1"
PUBLIC_PORT = 10025
FILTER_PORT = 10030
REINJECT_PORT = 10031
SUBMIT_PORT = 10027
CORRESPONDENTS_PORT = 10033
SINK_PORT = 10040
CAPTURE_PORT = 10041
DOMAIN = "example.test"
MAILBOXES = ("alice", "bob", "carol", "confirm", "bounces")
VHOSTS = Path("/var/mail/vhosts")
MAILLOG = Path("/var/log/postfix.log")
EXPECTED_CONTENT_FILTER = f"scan:[{HOST}]:{FILTER_PORT}"
SETUP_HINT = "run sudo bash .ci/postfix-setup.sh"

# --------------------------------------------------------------------------- helpers


def _port_open(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def postfix_problem() -> str | None:
    """Why Postfix is not usable for the e2e tests, or None when it is."""
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    if not Path(postconf).exists():
        return "postconf not found: Postfix is not installed"
    try:
        got = _run(postconf, "-h", "content_filter").stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"postconf failed: {exc}"
    if got != EXPECTED_CONTENT_FILTER:
        return f"content_filter is {got!r}, expected {EXPECTED_CONTENT_FILTER!r}"
    for port, what in (
        (PUBLIC_PORT, "public smtpd"),
        (REINJECT_PORT, "reinjection smtpd"),
        (SUBMIT_PORT, "submission stand-in smtpd"),
        (SINK_PORT, "smtp-sink for remote.test"),
    ):
        if not _port_open(port):
            return f"nothing accepts on {HOST}:{port} ({what})"
    if not os.access(VHOSTS / DOMAIN, os.R_OK | os.X_OK):
        return f"cannot read {VHOSTS / DOMAIN} (run the tests as root)"
    return None


def send(
    mail_from: str,
    rcpts: str | list[str] | tuple[str, ...],
    raw_bytes: bytes,
    port: int = PUBLIC_PORT,
    *,
    timeout: float = 30,
    mail_options: tuple[str, ...] = (),
    rcpt_options: tuple[str, ...] = (),
) -> dict[str, tuple[int, bytes]]:
    """Submit ``raw_bytes`` as-is over SMTP to 127.0.0.1:``port``.

    Returns smtplib's dict of refused recipients (empty when all accepted);
    raises smtplib.SMTPException when every recipient or the data is refused.
    ``mail_from`` may be "" for the null sender.
    """
    if isinstance(rcpts, str):
        rcpts = [rcpts]
    with smtplib.SMTP(HOST, port, timeout=timeout) as smtp:
        smtp.ehlo("e2e-client.test")
        return smtp.sendmail(
            mail_from, list(rcpts), raw_bytes, list(mail_options), list(rcpt_options)
        )


def make_message(
    mail_from: str,
    to: str,
    subject: str,
    body: str = "hello\n",
    *,
    message_id: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    """A small RFC 5322 message as bytes with CRLF line endings."""
    lines = [
        f"From: {mail_from}",
        f"To: {to}",
        f"Subject: {subject}",
        "Date: Sat, 28 Nov 2026 12:00:00 +0000",
        f"Message-ID: {message_id or f'<{time.time_ns()}.{os.getpid()}@e2e.test>'}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    lines += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    head = "\r\n".join(lines)
    return (head + "\r\n\r\n" + body.replace("\r\n", "\n").replace("\n", "\r\n")).encode()


def _maildir(address: str) -> Path:
    local, _, domain = address.partition("@")
    local = local.split("+", 1)[0]  # recipient_delimiter = +
    return VHOSTS / (domain or DOMAIN) / local


def maildir_messages(address: str) -> list[bytes]:
    """Raw bytes of every message in the Maildir of ``address`` (new/ and cur/),
    oldest first. ``bob+x@example.test`` reads bob's Maildir. Missing -> []."""
    base = _maildir(address)
    files: list[Path] = []
    for sub in ("new", "cur"):
        d = base / sub
        if d.is_dir():
            files += [p for p in d.iterdir() if p.is_file()]
    files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
    out = []
    for p in files:
        try:
            out.append(p.read_bytes())
        except FileNotFoundError:  # moved new/ -> cur/ meanwhile
            continue
    return out


def clear_mailboxes() -> None:
    """Delete every message in every example.test Maildir (keeps the folders)."""
    root = VHOSTS / DOMAIN
    if not root.is_dir():
        return
    for box in root.iterdir():
        for sub in ("new", "cur", "tmp"):
            d = box / sub
            if d.is_dir():
                for p in d.iterdir():
                    if p.is_file():
                        p.unlink(missing_ok=True)


def postfix_log_offset() -> int:
    """Current size of /var/log/postfix.log: pass it to postfix_log_since()."""
    try:
        return MAILLOG.stat().st_size
    except FileNotFoundError:
        return 0


def postfix_log_since(offset: int) -> str:
    """Text appended to /var/log/postfix.log since ``offset`` (a byte offset)."""
    try:
        with MAILLOG.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def flush_queue() -> None:
    """Ask Postfix to retry all deferred mail now (postqueue -f)."""
    _run("postqueue", "-f")


def queue_ids() -> list[str]:
    """Queue ids of every message still in Postfix's queue (postqueue -j)."""
    import json

    out = _run("postqueue", "-j").stdout
    return [json.loads(line)["queue_id"] for line in out.splitlines() if line.strip()]


def clear_queue() -> None:
    """Delete every message from Postfix's queue (postsuper -d ALL)."""
    _run("postsuper", "-d", "ALL")


def parse(raw: bytes) -> Message:
    """Parse raw bytes into an email.message.EmailMessage (modern policy)."""
    return message_from_bytes(raw, policy=default_policy)


# ------------------------------------------------------------------ SMTP test servers


@dataclass
class Received:
    """One SMTP transaction as a test server saw it."""

    mail_from: str  # "<>" for the null sender (aiosmtpd's convention)
    rcpt_tos: list[str]
    content: bytes  # raw DATA, unchanged
    mail_options: list[str] = field(default_factory=list)
    peer: Any = None

    @property
    def message(self) -> Message:
        return parse(self.content)


class _Recorder:
    """aiosmtpd handler base: records every transaction, thread-safe reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Received] = []

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _record(self, envelope: Any, session: Any) -> Received:
        item = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            content=bytes(envelope.original_content or envelope.content),
            mail_options=list(envelope.mail_options),
            peer=session.peer,
        )
        with self._lock:
            self._items.append(item)
        return item

    def wait_for(
        self, predicate: Callable[[Received], bool] = lambda r: True, timeout: float = 30.0
    ) -> Received:
        """First received transaction matching ``predicate`` (waits, bounded)."""

        def find() -> Received | None:
            return next((m for m in self.messages if predicate(m)), None)

        found = wait_until(find, timeout=timeout, message="a matching SMTP transaction")
        assert found is not None
        return found


class CaptureHandler(_Recorder):
    """Stores every message; answers 250."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._record(envelope, session)
        return "250 2.0.0 captured"


class ReinjectingFilter(_Recorder):
    """A stand-in for sourceauth: records, then re-injects unchanged to
    127.0.0.1:10031 and answers 250 only after the reinjection succeeded.

    Mail for the bounce address (bounces[+TOKEN]@example.test) is consumed,
    not re-injected, as the real filter does: Postfix routes that address to
    the filter whatever port it entered by, so re-injecting it would loop."""

    def __init__(self, reinject_port: int = REINJECT_PORT) -> None:
        super().__init__()
        self.reinject_port = reinject_port
        self.reinjected: list[Received] = []

    @staticmethod
    def is_bounce_address(addr: str) -> bool:
        local, _, domain = addr.lower().rpartition("@")
        return domain == DOMAIN and local.split("+", 1)[0] == "bounces"

    def _reinject(self, item: Received, rcpts: list[str]) -> None:
        sender = "" if item.mail_from == "<>" else item.mail_from
        with smtplib.SMTP(HOST, self.reinject_port, timeout=30) as smtp:
            smtp.sendmail(sender, rcpts, item.content)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        item = self._record(envelope, session)
        rcpts = [r for r in item.rcpt_tos if not self.is_bounce_address(r)]
        if not rcpts:
            return "250 2.0.0 consumed"
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._reinject, item, rcpts)
        except (OSError, smtplib.SMTPException) as exc:
            return f"451 4.3.0 reinjection failed: {exc!s:.100}"
        with self._lock:
            self.reinjected.append(item)
        return "250 2.0.0 reinjected"


def _start(handler: Any, port: int) -> Controller:
    if _port_open(port):
        raise RuntimeError(
            f"{HOST}:{port} is already in use (a filter or capture server left running?)"
        )
    controller = Controller(
        handler,
        hostname=HOST,
        port=port,
        enable_SMTPUTF8=True,
        decode_data=False,
        server_hostname="e2e-test-server.test",
        ready_timeout=10,
    )
    controller.start()
    return controller


# --------------------------------------------------------------------------- fixtures


class PostfixHarness:
    """What the ``postfix`` fixture returns: the helpers as methods."""

    host = HOST
    public_port = PUBLIC_PORT
    filter_port = FILTER_PORT
    reinject_port = REINJECT_PORT
    submit_port = SUBMIT_PORT
    capture_port = CAPTURE_PORT
    domain = DOMAIN
    mailboxes = MAILBOXES

    send = staticmethod(send)
    make_message = staticmethod(make_message)
    maildir_messages = staticmethod(maildir_messages)
    clear_mailboxes = staticmethod(clear_mailboxes)
    wait_until = staticmethod(wait_until)
    log_offset = staticmethod(postfix_log_offset)
    log_since = staticmethod(postfix_log_since)
    postfix_log_offset = staticmethod(postfix_log_offset)
    postfix_log_since = staticmethod(postfix_log_since)
    flush_queue = staticmethod(flush_queue)
    queue_ids = staticmethod(queue_ids)
    clear_queue = staticmethod(clear_queue)
    parse = staticmethod(parse)

    def reset(self) -> None:
        """Empty the queue and every Maildir: a clean start for one test."""
        clear_queue()
        clear_mailboxes()


@pytest.fixture(scope="session")
def postfix() -> PostfixHarness:
    """Postfix set up by .ci/postfix-setup.sh, or skip (fail under CI=true)."""
    problem = postfix_problem()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                f"Postfix not set up ({problem}): CI must {SETUP_HINT} before pytest",
                pytrace=False,
            )
        pytest.skip(f"Postfix not set up: {SETUP_HINT} ({problem})")
    return PostfixHarness()


@pytest.fixture
def capture_server(postfix: PostfixHarness) -> Iterator[CaptureHandler]:
    """An SMTP server on 127.0.0.1:10041 storing what Postfix sends to *@ok.test.

    ``capture_server.messages`` -> list[Received]; ``.wait_for(pred, timeout)``."""
    handler = CaptureHandler()
    controller = _start(handler, CAPTURE_PORT)
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def fake_filter(postfix: PostfixHarness) -> Iterator[ReinjectingFilter]:
    """For the harness's own tests only: a no-op filter on 127.0.0.1:10030 that
    re-injects each message unchanged to 10031 (consumes bounce-address mail)."""
    handler = ReinjectingFilter()
    controller = _start(handler, FILTER_PORT)
    try:
        yield handler
    finally:
        controller.stop()
