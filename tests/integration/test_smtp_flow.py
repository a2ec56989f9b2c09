"""The whole flow over real loopback sockets: the filter (aiosmtpd) in front, real SMTP sinks
standing in for the challenge relay and the next hop, a real SQLite file and blob directory.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.integration.smtp_harness import (
    dsn,
    filter_with_sinks,
    message,
    parsed,
    token_of,
)
from tests.support.waiting import wait_outbound_idle, wait_until

PROTECTED = "bob@example.test"
STRANGER = "alice@remote.test"


def _bodies(sink: object) -> list[bytes]:
    return [m.data for m in sink.messages]  # type: ignore[attr-defined]


def test_unknown_sender_is_held_and_gets_exactly_one_challenge(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        raw = message(
            STRANGER,
            PROTECTED,
            subject="Quarterly numbers",
            body="SECRET-BODY-MARKER\r\n",
            message_id="<orig-1@remote.test>",
        )
        flt.send(STRANGER, [PROTECTED], raw)
        challenge = relay.wait_for(1, timeout=15)[0]
        wait_outbound_idle(flt.app)
        assert len(relay.messages) == 1
        assert next_hop.messages == []
        msg = parsed(challenge)
        token = token_of(challenge)
        assert challenge.rcpt_tos == [STRANGER]
        assert challenge.mail_from == f"bounces+{token}@example.test"
        assert msg["Reply-To"].strip("<>") == f"confirm+{token}@example.test"
        assert msg["Auto-Submitted"] == "auto-replied"
        assert msg["In-Reply-To"] == "<orig-1@remote.test>"
        assert "Quarterly numbers" in msg["Subject"]
        assert b"SECRET-BODY-MARKER" not in challenge.data
        held = flt.app.quarantine()
        assert [(h.sender, h.state) for h in held] == [(STRANGER, "challenged")]


def test_second_message_from_pending_sender_is_held_without_a_second_challenge(
    tmp_path: Path,
) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED, subject="one"))
        relay.wait_for(1)
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED, subject="two"))
        wait_until(lambda: len(flt.app.quarantine()) == 2, message="two held messages")
        wait_outbound_idle(flt.app)
        assert len(relay.messages) == 1
        assert next_hop.messages == []


def test_reply_from_the_sender_releases_all_held_mail_and_authorizes_it(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        for subject in ("one", "two", "three"):
            flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED, subject=subject))
        token = token_of(relay.wait_for(1)[0])
        reply = message(STRANGER, f"confirm+{token}@example.test", subject="Re: Please confirm")
        flt.send(STRANGER, [f"confirm+{token}@example.test"], reply)
        delivered = next_hop.wait_for(3, timeout=20)
        subjects = sorted(parsed(m)["Subject"] for m in delivered)
        assert subjects == ["one", "three", "two"]
        assert all(m.rcpt_tos == [PROTECTED] for m in delivered)
        assert all(parsed(m)["X-SourceAuth-Id"] for m in delivered)
        states = {s.address: s.state for s in flt.app.whitelist()}
        assert states == {STRANGER: "authorized"}
        # the confirmation reply itself is never delivered to anyone
        wait_outbound_idle(flt.app)
        assert len(next_hop.messages) == 3
        # and from now on the sender's mail goes straight through
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED, subject="four"))
        assert parsed(next_hop.wait_for(4)[3])["Subject"] == "four"
        assert len(relay.messages) == 1


@pytest.mark.parametrize("tamper", ["forged", "altered", "other_sender"])
def test_reply_with_a_bad_token_releases_nothing(tmp_path: Path, tamper: str) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED))
        token = token_of(relay.wait_for(1)[0])
        replier = STRANGER
        if tamper == "forged":
            token = "a" * len(token)
        elif tamper == "altered":
            token = token[:-1] + ("b" if token[-1] != "b" else "c")
        else:
            replier = "mallory@evil.test"
        rcpt = f"confirm+{token}@example.test"
        flt.send(replier, [rcpt], message(replier, rcpt))  # 250 only once its decision is recorded
        wait_outbound_idle(flt.app)
        assert next_hop.messages == []
        assert {s.address: s.state for s in flt.app.whitelist()} == {STRANGER: "challenged"}
        held = [
            h for h in flt.app.quarantine(sender=STRANGER) if not h.reason.startswith("confirm_")
        ]
        assert [h.state for h in held] == ["challenged"]
        refusals = [h for h in flt.app.quarantine(state="discarded")]
        assert len(refusals) == 1 and refusals[0].reason.startswith("confirm_refused")


def test_relay_refusing_the_challenge_expires_the_sender_and_maintain_deletes_held_mail(
    tmp_path: Path,
) -> None:
    def refuse(address: str) -> str:
        return "550 5.1.1 User unknown"

    with filter_with_sinks(tmp_path, relay_reply=refuse) as (flt, relay, next_hop):
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED))
        wait_until(
            lambda: {s.address: s.state for s in flt.app.whitelist()} == {STRANGER: "expired"},
            message="the sender expired by the relay's 5xx",
        )
        held = flt.app.quarantine(sender=STRANGER)
        assert [h.state for h in held] == ["expired"]
        receipt = held[0].receipt_id
        assert flt.app.blobs.exists(receipt)
        report = flt.app.maintain()
        assert report.purged == 1
        assert [h.state for h in flt.app.quarantine(sender=STRANGER)] == ["purged"]
        assert not flt.app.blobs.exists(receipt)
        # nothing was sent to anybody: no bounce to the sender, nothing to the local user
        assert relay.messages == [] and next_hop.messages == []


def test_dsn_for_the_challenge_expires_the_sender_and_is_never_delivered(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED))
        challenge = relay.wait_for(1)[0]
        bounce_rcpt = challenge.mail_from
        flt.send("", [bounce_rcpt], dsn(bounce_rcpt, STRANGER))
        wait_until(
            lambda: {s.address: s.state for s in flt.app.whitelist()} == {STRANGER: "expired"},
            message="the sender expired by the DSN",
        )
        assert flt.app.maintain().purged == 1
        history = flt.app.history(STRANGER)
        failed = [h for h in history if h.event == "Sender.ChallengeFailed"]
        assert failed and "5.1.1" in failed[0].fields["diagnostic"]
        wait_outbound_idle(flt.app)
        assert next_hop.messages == [] and len(relay.messages) == 1


def test_mixed_recipients_unprotected_now_protected_after_confirmation_without_duplicates(
    tmp_path: Path,
) -> None:
    other = "carol@elsewhere.test"
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.send(STRANGER, [PROTECTED, other], message(STRANGER, f"{PROTECTED}, {other}"))
        first = next_hop.wait_for(1)[0]
        assert first.rcpt_tos == [other]
        token = token_of(relay.wait_for(1)[0])
        flt.send(STRANGER, [f"confirm+{token}@example.test"], message(STRANGER, "confirm"))
        second = next_hop.wait_for(2)[1]
        assert second.rcpt_tos == [PROTECTED]
        wait_outbound_idle(flt.app)
        assert len(next_hop.messages) == 2
        ids = {parsed(m)["X-SourceAuth-Id"] for m in next_hop.messages}
        assert len(ids) == 2


@pytest.mark.parametrize(
    ("mail_from", "headers"),
    [
        ("", {}),
        (STRANGER, {"Auto-Submitted": "auto-replied"}),
        (STRANGER, {"List-Id": "<news.remote.test>"}),
        (STRANGER, {"Precedence": "bulk"}),
        ("MAILER-DAEMON@remote.test", {}),
    ],
    ids=["null_sender", "auto_submitted", "mailing_list", "bulk", "mailer_daemon"],
)
def test_automated_and_bulk_mail_is_never_challenged(
    tmp_path: Path, mail_from: str, headers: dict[str, str]
) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        flt.send(
            mail_from,
            [PROTECTED],
            message(mail_from or "nobody@remote.test", PROTECTED, headers=headers),
        )
        wait_until(lambda: flt.app.quarantine(), message="the message in the quarantine")
        wait_outbound_idle(flt.app)
        assert relay.messages == []
        held = flt.app.quarantine()
        assert held[0].state == "held" and held[0].reason.startswith("never_challenge:")


def test_bad_input_gets_clear_replies_and_loses_nothing(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        with smtplib.SMTP("127.0.0.1", flt.port, timeout=10) as c:
            c.ehlo()
            code, text = c.mail("not an address")
            assert code == 501 and b"sender" in text.lower()
            c.rset()
            assert c.mail(STRANGER)[0] == 250
            code, text = c.rcpt("bad@@example.test")
            assert code == 501
        # 8-bit headers, malformed MIME and bare LF are accepted and held, never crash the filter
        ugly = (
            b"From: \xff\xfe <alice@remote.test>\r\nSubject: caf\xe9 \xe2\x98\x95\r\n"
            b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\nbroken\nbare lf line\r\n"
        )
        flt.send(STRANGER, [PROTECTED], ugly)
        held = wait_until(lambda: flt.app.quarantine(), message="the message in the quarantine")
        assert held[0].state == "challenged"
        # a too-large message is refused before anything is accepted
        code, _ = flt.sendmail_reply(
            STRANGER, [PROTECTED], b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 26_100
        )
        assert code == 552


def test_too_many_recipients_are_refused_with_452(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path, extra="") as (flt, relay, next_hop):
        with smtplib.SMTP("127.0.0.1", flt.port, timeout=10) as c:
            c.ehlo()
            c.mail(STRANGER)
            codes = [c.rcpt(f"user{i}@example.test")[0] for i in range(101)]
        assert codes[:100] == [250] * 100 and codes[100] == 452


def test_graceful_stop_records_everything_accepted(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path) as (flt, relay, next_hop):
        for i in range(20):
            flt.send(
                f"sender{i}@remote.test", [PROTECTED], message(f"sender{i}@remote.test", PROTECTED)
            )
        app = flt.app
        accepted = 20
    # after the graceful stop, reopen the same data directory and count what was recorded
    from sourceauth.adapters.config import load_config
    from sourceauth.adapters.runtime import build_engine

    again = build_engine(load_config(tmp_path / "sourceauth.toml"), transports=False)
    try:
        assert len(again.quarantine()) == accepted
    finally:
        again.close()
    assert app is not again


def test_full_quarantine_answers_452_for_that_recipient_only(tmp_path: Path) -> None:
    with filter_with_sinks(tmp_path, extra="") as (flt, relay, next_hop):
        flt.app.settings = type(flt.app.settings)(
            **{**vars(flt.app.settings), "held_per_recipient": 2}
        )
        for i in range(2):
            flt.send(f"s{i}@remote.test", [PROTECTED], message(f"s{i}@remote.test", PROTECTED))
        wait_until(lambda: len(flt.app.quarantine()) == 2, message="two held messages")

        def rcpt_replies() -> tuple[tuple[int, bytes], int] | None:
            with smtplib.SMTP("127.0.0.1", flt.port, timeout=10) as c:
                c.ehlo()
                c.mail("s9@remote.test")
                refused = c.rcpt(PROTECTED)
                other = c.rcpt("carol@other.test")[0]
            return (refused, other) if refused[0] == 452 else None

        # the filter re-reads the held counts on a half-second timer
        (code, text), other = wait_until(rcpt_replies, timeout=5, message="a 452 for the full box")
        assert code == 452 and b"full" in text and other == 250
        # an authorized sender still gets through
        flt.app.authorize("friend@remote.test")
        flt.send("friend@remote.test", [PROTECTED], message("friend@remote.test", PROTECTED))
        assert next_hop.wait_for(1)[0].rcpt_tos == [PROTECTED]


@pytest.mark.parametrize(
    ("blobs", "store"), [("files", "FileBlobStore"), ("database", "DatabaseBlobStore")]
)
def test_group_commit_stages_originals_in_either_blob_store_and_delivers_them_unchanged(
    tmp_path: Path, blobs: str, store: str
) -> None:
    storage = f'\n[storage]\nblobs = "{blobs}"\n'
    with filter_with_sinks(tmp_path, extra=storage) as (flt, relay, next_hop):
        assert type(flt.app.blobs).__name__ == store
        unprotected = "carol@elsewhere.test"
        raws = [message(STRANGER, unprotected, subject=f"n{i}") for i in range(3)]
        for raw in raws:
            flt.send(STRANGER, [unprotected], raw)
        delivered = next_hop.wait_for(3, timeout=20)
        for raw in raws:
            (copy,) = [m.data for m in delivered if m.data.endswith(raw)]
            assert copy.startswith(b"X-SourceAuth-Id: ")
            assert copy.count(b"\r\n") == raw.count(b"\r\n") + 1  # the stamp, nothing else
        assert relay.messages == []
