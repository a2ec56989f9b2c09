"""The mission end to end through a real Postfix: `sourceauth serve` runs as a separate
process behind Postfix's content_filter; challenges leave through Postfix's reinjection
port; a remote refuses them and Postfix's own DSN comes back to the filter; an answered
challenge releases the held mail into the Postfix-delivered Maildir.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import build_engine
from tests.e2e.conftest import CaptureHandler, PostfixHarness
from tests.support.waiting import outbound_idle

pytestmark = pytest.mark.postfix

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_timings() -> Iterator[None]:
    """After the module: print the end-to-end timings measured (run with -s to see them)."""
    yield
    for name, seconds in TIMINGS.items():
        print(f"\ne2e timing: {name}: {seconds:.2f}s", end="")


def _config(tmp: Path) -> Path:
    path = tmp / "sourceauth.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:10030"
hostname = "mx.example.test"
data_dir = "{tmp / "var"}"

[policy]
protected = ["alice@example.test", "bob@example.test"]

[challenge]
relay = "smtp://127.0.0.1:10031"
confirm_address = "confirm@example.test"
bounce_address = "bounces@example.test"
retry_initial = "1s"
retry_max = "2s"

[delivery]
next_hop = "smtp://127.0.0.1:10031"
retry_initial = "1s"
retry_max = "2s"

[correspondents]
listen = "127.0.0.1:10033"

[logging]
format = "json"
level = "info"
""",
        encoding="utf-8",
    )
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sourceauth.adapters.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def serving(postfix: PostfixHarness, config: Path, *ports: int) -> Iterator[Path]:
    """`sourceauth serve --config CONFIG` as its own process once every port accepts; stopped
    with SIGTERM, and it must exit 0. Its output goes to serve.log beside the config."""
    postfix.reset()
    output = config.parent / "serve.log"
    log = output.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sourceauth.adapters.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        postfix.wait_until(
            lambda: all(_listening(port) for port in ports),
            timeout=30,
            message=f"sourceauth serve on {ports}",
        )
        postfix.flush_queue()
        yield config
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
        assert code == 0, output.read_text()[-3000:]


@pytest.fixture
def sourceauth(postfix: PostfixHarness, tmp_path: Path) -> Iterator[Path]:
    """`sourceauth serve` as its own process on 127.0.0.1:10030."""
    with serving(postfix, _config(tmp_path), 10030) as config:
        yield config


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _settled(postfix: PostfixHarness, config: Path) -> None:
    """Wait until nothing is on its way: Postfix's queue is empty, the filter has sent all it
    queued (it records a send only after Postfix took it), and Postfix's queue is still empty."""
    app = build_engine(load_config(config), transports=False)
    try:
        postfix.wait_until(
            lambda: not postfix.queue_ids() and outbound_idle(app) and not postfix.queue_ids(),
            timeout=60,
            message="the filter's queues and Postfix's queue to drain",
        )
    finally:
        app.close()


def _senders(config: Path) -> dict[str, str]:
    out = _cli(config, "senders", "list", "--json")
    assert out.returncode == 0, out.stderr
    return {row["address"]: row["state"] for row in json.loads(out.stdout)}


def _quarantine(config: Path) -> list[dict[str, object]]:
    out = _cli(config, "quarantine", "list", "--all", "--json")  # ended copies too
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def test_refused_challenge_bounces_back_to_the_filter_and_maintain_deletes_the_original(
    postfix: PostfixHarness, sourceauth: Path
) -> None:
    t0 = time.monotonic()
    sender = (
        "mallory@remote.test"  # remote.test refuses every RCPT: the challenge cannot be delivered
    )
    raw = postfix.make_message(
        sender, "alice@example.test", "held then deleted", body="BODY-MARKER\n"
    )
    assert postfix.send(sender, ["alice@example.test"], raw) == {}

    postfix.wait_until(
        lambda: _senders(sourceauth).get(sender) == "expired",
        timeout=60,
        message="Postfix's DSN for the challenge reached the filter",
    )
    TIMINGS["refused challenge -> DSN -> sender expired"] = time.monotonic() - t0
    held = [r for r in _quarantine(sourceauth) if r["sender"] == sender]
    assert [r["state"] for r in held] == ["expired"]

    t1 = time.monotonic()
    out = _cli(sourceauth, "maintain", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["purged"] == 1
    TIMINGS["maintain (purge)"] = time.monotonic() - t1
    held = [r for r in _quarantine(sourceauth) if r["sender"] == sender]
    assert [r["state"] for r in held] == ["purged"]
    history = _cli(sourceauth, "audit", "history", sender, "--json")
    events = [e["event"] for e in json.loads(history.stdout)]
    assert "Sender.ChallengeFailed" in events and "Message.Purged" in events
    # Postfix passed the original client on with XFORWARD (without it: Postfix's own name).
    created = next(
        e for e in json.loads(history.stdout) if e["aggregate"] == "message" and e["version"] == 1
    )
    assert created["fields"]["client_helo"] == "e2e-client.test"
    assert created["fields"]["client_address"] == "127.0.0.1"

    # No bounce and no held mail reached any user; the DSN reached no mailbox either.
    _settled(postfix, sourceauth)
    for box in postfix.mailboxes:
        assert postfix.maildir_messages(box) == [], f"unexpected mail in {box}"
    verify = _cli(sourceauth, "audit", "verify")
    assert verify.returncode == 0, verify.stderr


def test_answered_challenge_releases_held_mail_into_the_maildir(
    postfix: PostfixHarness, sourceauth: Path, capture_server: CaptureHandler
) -> None:
    t0 = time.monotonic()
    sender = "carol@ok.test"
    for n in (1, 2):
        raw = postfix.make_message(sender, "alice@example.test", f"held message {n}")
        assert postfix.send(sender, ["alice@example.test"], raw) == {}
    challenge = capture_server.wait_for(lambda r: r.rcpt_tos == [sender], timeout=60)
    TIMINGS["message in -> challenge at the sender's MX"] = time.monotonic() - t0
    msg = challenge.message
    assert msg["Auto-Submitted"] == "auto-replied"
    reply_to = msg["Reply-To"].strip().strip("<>")
    assert reply_to.startswith("confirm+") and reply_to.endswith("@example.test")
    assert challenge.mail_from.startswith("bounces+")
    _settled(postfix, sourceauth)
    assert len([m for m in capture_server.messages if m.rcpt_tos == [sender]]) == 1
    assert postfix.maildir_messages("alice@example.test") == []

    t1 = time.monotonic()
    reply = postfix.make_message(sender, reply_to, f"Re: {msg['Subject']}", body="yes, it was me\n")
    assert postfix.send(sender, [reply_to], reply) == {}
    delivered = postfix.wait_until(
        lambda: (
            len(postfix.maildir_messages("alice@example.test")) >= 2
            and postfix.maildir_messages("alice@example.test")
        ),
        timeout=60,
        message="both held messages in alice's Maildir",
    )
    TIMINGS["reply in -> held mail in the Maildir"] = time.monotonic() - t1
    subjects = sorted(postfix.parse(m)["Subject"] for m in delivered)
    assert subjects == ["held message 1", "held message 2"]
    assert all(postfix.parse(m)["X-SourceAuth-Id"] for m in delivered)
    assert _senders(sourceauth)[sender] == "authorized"
    # the reply itself reached nobody
    _settled(postfix, sourceauth)
    assert len(postfix.maildir_messages("alice@example.test")) == 2
    assert postfix.maildir_messages("confirm@example.test") == []


def test_unprotected_recipient_gets_its_copy_at_once(
    postfix: PostfixHarness, sourceauth: Path, capture_server: CaptureHandler
) -> None:
    t0 = time.monotonic()
    sender = "dave@ok.test"
    raw = postfix.make_message(sender, "alice@example.test, carol@example.test", "mixed recipients")
    assert postfix.send(sender, ["alice@example.test", "carol@example.test"], raw) == {}
    postfix.wait_until(
        lambda: postfix.maildir_messages("carol@example.test"),
        timeout=60,
        message="carol's copy delivered at once",
    )
    TIMINGS["unprotected copy delivered"] = time.monotonic() - t0
    capture_server.wait_for(lambda r: r.rcpt_tos == [sender], timeout=60)
    assert postfix.maildir_messages("alice@example.test") == []
    assert len(postfix.maildir_messages("carol@example.test")) == 1


def test_threaded_reply_to_the_bare_confirm_address_releases_held_mail(
    postfix: PostfixHarness, sourceauth: Path, capture_server: CaptureHandler
) -> None:
    sender = "frank@ok.test"
    raw = postfix.make_message(sender, "bob@example.test", "held for a threaded reply")
    assert postfix.send(sender, ["bob@example.test"], raw) == {}
    challenge = capture_server.wait_for(lambda r: r.rcpt_tos == [sender], timeout=60).message
    # a client that drops the token: the bare confirm address, threaded on the challenge
    reply = postfix.make_message(
        sender,
        "confirm@example.test",
        f"Re: {challenge['Subject']}",
        extra_headers={"In-Reply-To": challenge["Message-ID"]},
    )
    assert postfix.send(sender, ["confirm@example.test"], reply) == {}
    delivered = postfix.wait_until(
        lambda: postfix.maildir_messages("bob@example.test"),
        timeout=60,
        message="the held message in bob's Maildir",
    )
    assert [postfix.parse(m)["Subject"] for m in delivered] == ["held for a threaded reply"]
    assert _senders(sourceauth)[sender] == "authorized"
    _settled(postfix, sourceauth)
    assert postfix.maildir_messages("confirm@example.test") == []


def test_mail_sent_through_submission_is_relayed_and_its_answer_is_not_challenged(
    postfix: PostfixHarness, sourceauth: Path, capture_server: CaptureHandler
) -> None:
    friend = "erin@ok.test"
    out = postfix.make_message("alice@example.test", friend, "are you free on Friday?")
    assert postfix.send("alice@example.test", [friend], out, port=postfix.submit_port) == {}
    relayed = capture_server.wait_for(lambda r: r.rcpt_tos == [friend], timeout=60)
    assert relayed.mail_from == "alice@example.test"
    assert relayed.message["Subject"] == "are you free on Friday?"
    assert relayed.message["X-SourceAuth-Id"]
    assert _senders(sourceauth)[friend] == "authorized"
    answer = postfix.make_message(friend, "alice@example.test", "Re: are you free on Friday?")
    assert postfix.send(friend, ["alice@example.test"], answer) == {}
    delivered = postfix.wait_until(
        lambda: postfix.maildir_messages("alice@example.test"),
        timeout=60,
        message="erin's answer in alice's Maildir, unchallenged",
    )
    assert [postfix.parse(m)["Subject"] for m in delivered] == ["Re: are you free on Friday?"]
    _settled(postfix, sourceauth)
    assert [m.rcpt_tos for m in capture_server.messages] == [[friend]]  # no challenge to erin
    history = _cli(sourceauth, "audit", "history", friend, "--json")
    verdicts = [e for e in json.loads(history.stdout) if e["aggregate"] == "sender"]
    assert [(e["actor"], e["reason"]) for e in verdicts] == [
        ("alice@example.test", "correspondent of alice@example.test")
    ]
