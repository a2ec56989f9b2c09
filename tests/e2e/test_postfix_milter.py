"""Milter mode end to end through a real Postfix: mail enters Postfix's milter-mode smtpd
(127.0.0.1:10026, `smtpd_milters = inet:127.0.0.1:10032`, no content_filter); `sourceauth
serve` decides at the end of each message and removes the held recipients; Postfix delivers
the rest itself. Challenges and released mail leave through the reinjection port, and
Postfix's DSN for a refused challenge still reaches the filter's SMTP listener (10030).
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import CaptureHandler, PostfixHarness
from tests.e2e.test_postfix_flow import (
    _cli,
    _config,
    _listening,
    _quarantine,
    _senders,
    _settled,
    serving,
)
from tests.support.milter import need_pymilter

pytestmark = pytest.mark.postfix

MILTER_SMTPD = 10026  # Postfix's smtpd with smtpd_milters (.ci/postfix-setup.sh)
MILTER = 10032  # sourceauth's [milter] listen

MILTER_UNIX_SMTPD = 10028  # the same, smtpd_milters = unix:MILTER_SOCKET
MILTER_SOCKET = Path("/run/sourceauth-milter.sock")


@pytest.fixture
def milter_mode(postfix: PostfixHarness, tmp_path: Path) -> Iterator[Path]:
    """`sourceauth serve` with its SMTP listener on 10030 and its milter on 10032."""
    need_pymilter()
    config = _config(tmp_path)
    with config.open("a", encoding="utf-8") as f:
        f.write(f'\n[milter]\nlisten = "127.0.0.1:{MILTER}"\n')
    with serving(postfix, config, 10030, MILTER):
        yield config


def _json_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("{")]


def _events(config: Path, address: str) -> list[dict[str, object]]:
    out = _cli(config, "audit", "history", address, "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def test_unprotected_copy_stays_with_postfix_and_the_held_copy_is_released_once(
    postfix: PostfixHarness, milter_mode: Path, capture_server: CaptureHandler
) -> None:
    sender = "dave@ok.test"
    offset = postfix.log_offset()
    raw = postfix.make_message(sender, "alice@example.test, carol@example.test", "mixed")
    # The envelope's case differs from the configuration's: the decision still finds it.
    refused = postfix.send(
        sender, ["Alice@Example.Test", "carol@example.test"], raw, port=MILTER_SMTPD
    )
    assert refused == {}

    # carol (unprotected): Postfix delivered its own queued copy, never through the filter.
    carol = postfix.wait_until(
        lambda: postfix.maildir_messages("carol@example.test"),
        timeout=60,
        message="carol's copy delivered by Postfix",
    )
    assert len(carol) == 1
    assert postfix.parse(carol[0])["Subject"] == "mixed"
    assert postfix.parse(carol[0])["X-SourceAuth-Id"] is None  # not re-injected by the filter
    log = postfix.log_since(offset)
    assert "postfix/milter/smtpd" in log
    assert "relay=127.0.0.1[127.0.0.1]:10030" not in log  # no content_filter on this path

    # alice (protected): held; the challenge left through Postfix to the sender's MX.
    challenge = capture_server.wait_for(lambda r: r.rcpt_tos == [sender], timeout=60)
    assert challenge.mail_from.startswith("bounces+")
    reply_to = challenge.message["Reply-To"].strip().strip("<>")
    assert reply_to.startswith("confirm+")
    _settled(postfix, milter_mode)
    assert postfix.maildir_messages("alice@example.test") == []
    held = [r for r in _quarantine(milter_mode) if r["sender"] == sender]
    assert [r["state"] for r in held] == ["challenged"]
    # carol's copy is recorded (accepted, then delivered by the MTA's own queue) and the
    # filter never sent it anywhere.
    (decided,) = [
        line
        for line in map(json.loads, _json_lines(milter_mode.parent / "serve.log"))
        if line.get("event") == "message_decided" and line["recipient"] == "carol@example.test"
    ]
    assert decided["decision"] == "deliver"
    steps = _events(milter_mode, decided["message_id"])
    assert [e["event"] for e in steps] == ["Message.Accepted", "Message.Delivered"]
    assert steps[1]["fields"]["next_hop"] == "mta-queue"  # type: ignore[index]

    # The reply enters through the milter too: consumed, and alice gets her copy once.
    reply = postfix.make_message(sender, reply_to, "Re: challenge", body="yes, it was me\n")
    assert postfix.send(sender, [reply_to], reply, port=MILTER_SMTPD) == {}
    postfix.wait_until(
        lambda: postfix.maildir_messages("alice@example.test"),
        timeout=60,
        message="the released copy in alice's Maildir",
    )
    _settled(postfix, milter_mode)
    alice = postfix.maildir_messages("alice@example.test")
    assert len(alice) == 1
    assert postfix.parse(alice[0])["Subject"] == "mixed"
    assert postfix.parse(alice[0])["X-SourceAuth-Id"]
    assert _senders(milter_mode)[sender] == "authorized"
    assert len(postfix.maildir_messages("carol@example.test")) == 1
    assert postfix.maildir_messages("confirm@example.test") == []
    assert "milter-discard" in postfix.log_since(offset)  # the reply: no recipient left

    # Now authorized: the next message to alice stays with Postfix, which delivers it.
    raw = postfix.make_message(sender, "alice@example.test", "after confirming")
    assert postfix.send(sender, ["alice@example.test"], raw, port=MILTER_SMTPD) == {}
    postfix.wait_until(
        lambda: len(postfix.maildir_messages("alice@example.test")) == 2,
        timeout=60,
        message="the authorized sender's next message delivered by Postfix",
    )
    _settled(postfix, milter_mode)
    assert len(postfix.maildir_messages("alice@example.test")) == 2
    assert _cli(milter_mode, "audit", "verify").returncode == 0


def test_refused_challenge_dsn_expires_the_sender(
    postfix: PostfixHarness, milter_mode: Path
) -> None:
    sender = "mallory@remote.test"  # remote.test refuses every RCPT: the challenge bounces
    raw = postfix.make_message(sender, "alice@example.test", "held then expired")
    assert postfix.send(sender, ["alice@example.test"], raw, port=MILTER_SMTPD) == {}
    postfix.wait_until(
        lambda: _senders(milter_mode).get(sender) == "expired",
        timeout=60,
        message="Postfix's DSN for the challenge reached the filter's SMTP listener",
    )
    held = [r for r in _quarantine(milter_mode) if r["sender"] == sender]
    assert [r["state"] for r in held] == ["expired"]
    events = [e["event"] for e in _events(milter_mode, sender)]
    assert "Sender.ChallengeFailed" in events
    created = next(
        e for e in _events(milter_mode, sender) if e["aggregate"] == "message" and e["version"] == 1
    )
    fields = created["fields"]
    assert isinstance(fields, dict)
    assert fields["client_helo"] == "e2e-client.test"  # from the milter's HELO callback
    assert fields["client_address"] == "127.0.0.1"
    _settled(postfix, milter_mode)
    for box in postfix.mailboxes:
        assert postfix.maildir_messages(box) == [], f"unexpected mail in {box}"


def test_filter_down_answers_tempfail_and_accepts_nothing(postfix: PostfixHarness) -> None:
    """milter_default_action = tempfail: with no milter listening, Postfix answers 4xx and
    keeps nothing; the client retries later."""
    postfix.reset()
    assert not _listening(MILTER), "something listens on the milter port"
    sender = "dave@ok.test"
    raw = postfix.make_message(sender, "carol@example.test", "while the filter is down")
    try:
        postfix.send(sender, ["carol@example.test"], raw, port=MILTER_SMTPD)
        codes = [250]
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
    except smtplib.SMTPResponseException as exc:
        codes = [exc.smtp_code]
    assert codes and all(400 <= code < 500 for code in codes), codes
    assert postfix.queue_ids() == []
    assert postfix.maildir_messages("carol@example.test") == []


def test_milter_on_a_unix_socket(
    postfix: PostfixHarness, tmp_path: Path, capture_server: CaptureHandler
) -> None:
    """`[milter] listen = "unix:/path"`: Postfix's smtpd on 10028 talks to it over a UNIX
    socket; the unprotected copy stays with Postfix, the protected one is held."""
    need_pymilter()
    config = _config(tmp_path)
    with config.open("a", encoding="utf-8") as f:
        f.write(f'\n[milter]\nlisten = "unix:{MILTER_SOCKET}"\n')
    with serving(postfix, config, 10030):
        postfix.wait_until(MILTER_SOCKET.exists, timeout=30, message="the milter's socket")
        sender = "erin@ok.test"
        raw = postfix.make_message(sender, "alice@example.test, carol@example.test", "unix")
        to = ["alice@example.test", "carol@example.test"]
        assert postfix.send(sender, to, raw, port=MILTER_UNIX_SMTPD) == {}
        postfix.wait_until(
            lambda: postfix.maildir_messages("carol@example.test"),
            timeout=60,
            message="carol's copy delivered by Postfix",
        )
        capture_server.wait_for(lambda r: r.rcpt_tos == [sender], timeout=60)
        _settled(postfix, config)
        assert postfix.maildir_messages("alice@example.test") == []
        assert len(postfix.maildir_messages("carol@example.test")) == 1
        held = [r for r in _quarantine(config) if r["sender"] == sender]
        assert [r["state"] for r in held] == ["challenged"]
    assert not MILTER_SOCKET.exists()  # removed when serve stopped
