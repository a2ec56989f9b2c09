"""The e2e harness itself: Postfix's topology works, with a no-op fake filter.

These prove the plumbing that sourceauth's end-to-end tests rely on:
public port -> filter -> reinjection -> Maildir; a challenge's DSN comes back
to the filter (not to a mailbox); ok.test reaches the capture server.
"""

from __future__ import annotations

import time
from email.message import Message
from typing import cast

import pytest

from tests.e2e.conftest import (
    CaptureHandler,
    PostfixHarness,
    Received,
    ReinjectingFilter,
)

pytestmark = pytest.mark.postfix


@pytest.fixture(autouse=True)
def _clean(postfix: PostfixHarness) -> None:
    postfix.reset()


def _has_mail(postfix: PostfixHarness, address: str, marker: bytes) -> bytes | None:
    return next((m for m in postfix.maildir_messages(address) if marker in m), None)


def test_public_port_goes_through_filter_to_maildir(
    postfix: PostfixHarness, fake_filter: ReinjectingFilter
) -> None:
    t0 = time.monotonic()
    marker = f"harness-inbound-{time.time_ns()}"
    raw = postfix.make_message("someone@ok.test", "alice@example.test", marker)
    refused = postfix.send("someone@ok.test", ["alice@example.test"], raw)
    assert refused == {}

    seen = fake_filter.wait_for(lambda r: marker.encode() in r.content, timeout=20)
    assert seen.mail_from == "someone@ok.test"
    assert seen.rcpt_tos == ["alice@example.test"]

    delivered = postfix.wait_until(
        lambda: _has_mail(postfix, "alice@example.test", marker.encode()),
        timeout=20,
        message="the message in alice's Maildir",
    )
    msg = postfix.parse(delivered)
    assert msg["Subject"] == marker
    assert msg["Delivered-To"] == "alice@example.test"
    # Two smtpd hops: 10025 (public) then 10031 (reinjection).
    assert len(msg.get_all("Received") or []) >= 2
    assert postfix.maildir_messages("bob@example.test") == []
    print(f"\ninbound through filter to Maildir: {time.monotonic() - t0:.2f}s")


def test_challenge_dsn_returns_to_filter_not_to_a_mailbox(
    postfix: PostfixHarness, fake_filter: ReinjectingFilter
) -> None:
    t0 = time.monotonic()
    marker = f"harness-challenge-{time.time_ns()}"
    raw = postfix.make_message(
        "confirm+tok123@example.test",
        "someone@remote.test",
        marker,
        extra_headers={"Auto-Submitted": "auto-replied"},
    )
    # A challenge leaves through the reinjection port with a VERP return path.
    refused = postfix.send(
        "bounces+tok123@example.test", ["someone@remote.test"], raw, port=postfix.reinject_port
    )
    assert refused == {}

    def is_dsn(r: Received) -> bool:
        return r.rcpt_tos == ["bounces+tok123@example.test"]

    dsn = fake_filter.wait_for(is_dsn, timeout=30)
    assert dsn.mail_from == "<>"  # Postfix's DSNs use the null sender
    msg = dsn.message
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    status = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    # [per-message fields, one block per recipient]
    blocks = cast(list[Message], status.get_payload())
    per_rcpt = blocks[1]
    assert per_rcpt["Final-Recipient"].endswith("someone@remote.test")
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert "550 5.1.1" in per_rcpt["Diagnostic-Code"]
    assert marker.encode() in dsn.content  # the returned original is attached

    # Give Postfix time to deliver anything stray, then check no user got it.
    postfix.flush_queue()
    postfix.wait_until(lambda: not postfix.queue_ids(), timeout=10, message="an empty queue")
    for user in ("alice", "bob", "carol", "confirm", "bounces"):
        for m in postfix.maildir_messages(f"{user}@example.test"):
            assert marker.encode() not in m, f"DSN landed in {user}'s Maildir"
    print(f"\nchallenge -> 550 -> DSN at filter: {time.monotonic() - t0:.2f}s")


def test_reinjected_mail_for_ok_test_reaches_capture_server(
    postfix: PostfixHarness, capture_server: CaptureHandler
) -> None:
    t0 = time.monotonic()
    marker = f"harness-outbound-{time.time_ns()}"
    raw = postfix.make_message("confirm+tok9@example.test", "sender@ok.test", marker)
    refused = postfix.send(
        "bounces+tok9@example.test", ["sender@ok.test"], raw, port=postfix.reinject_port
    )
    assert refused == {}
    got = capture_server.wait_for(lambda r: marker.encode() in r.content, timeout=20)
    assert got.mail_from == "bounces+tok9@example.test"
    assert got.rcpt_tos == ["sender@ok.test"]
    assert got.message["Subject"] == marker
    print(f"\nreinjection to ok.test capture: {time.monotonic() - t0:.2f}s")


def test_fail_test_is_refused_permanently_without_network(
    postfix: PostfixHarness, fake_filter: ReinjectingFilter
) -> None:
    marker = f"harness-fail-{time.time_ns()}"
    raw = postfix.make_message("confirm+tokF@example.test", "x@fail.test", marker)
    postfix.send("bounces+tokF@example.test", ["x@fail.test"], raw, port=postfix.reinject_port)
    dsn = fake_filter.wait_for(lambda r: r.rcpt_tos == ["bounces+tokF@example.test"], timeout=30)
    assert dsn.message.get_content_type() == "multipart/report"
    assert b"simulated permanent failure" in dsn.content


def test_log_and_queue_helpers(postfix: PostfixHarness, fake_filter: ReinjectingFilter) -> None:
    offset = postfix.log_offset()
    marker = f"harness-log-{time.time_ns()}"
    postfix.send(
        "x@ok.test", ["bob@example.test"], postfix.make_message("x@ok.test", "bob", marker)
    )
    postfix.wait_until(
        lambda: _has_mail(postfix, "bob@example.test", marker.encode()),
        timeout=20,
        message="bob's copy",
    )

    def sent_log() -> str | None:
        text = postfix.log_since(offset)
        return text if "status=sent" in text else None

    log = postfix.wait_until(
        sent_log,
        timeout=10,
        message="status=sent in the log",
    )
    assert "relay=127.0.0.1[127.0.0.1]:10030" in log  # went through the filter
    assert "postfix/virtual" in log
    postfix.flush_queue()
    with pytest.raises(AssertionError, match="timed out"):
        postfix.wait_until(lambda: False, timeout=0.2, interval=0.05)


def test_public_port_adds_no_headers_but_received(
    postfix: PostfixHarness, fake_filter: ReinjectingFilter
) -> None:
    """Loopback clients count as remote (local_header_rewrite_clients empty):
    Postfix adds no Message-ID/Date/From; bare LF is normalized to CRLF."""
    marker = f"harness-bare-{time.time_ns()}"
    raw = f"Subject: {marker}\r\n\r\nline one\nline two\r\n".encode()
    postfix.send("x@ok.test", ["carol@example.test"], raw)
    seen = fake_filter.wait_for(lambda r: marker.encode() in r.content, timeout=20)
    head = seen.content.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Received: from ")
    for name in (b"Message-Id:", b"Message-ID:", b"Date:", b"From:"):
        assert name not in head
    assert seen.content.endswith(b"\r\n\r\nline one\r\nline two\r\n")
