"""Next-hop delivery against real sockets on loopback and real temporary Maildirs.
Covers stamping, per-recipient SMTP/LMTP outcomes, 8-bit/SMTPUTF8, exactly-once Maildir, URLs."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sourceauth.adapters.smtp.delivery import (
    NextHop,
    NextHopError,
    Outcome,
    RecipientResult,
    deliver,
    delivery_result,
    parse_next_hop,
    send_message,
    stamp,
)
from sourceauth.adapters.smtp.outbound import NextHopDelivery
from sourceauth.adapters.storage.blobs import FileBlobStore
from sourceauth.adapters.storage.dbblobs import DatabaseBlobStore
from sourceauth.engine.api import DeliveryJob, DeliveryResult
from tests.support.ports import free_port
from tests.support.smtp_sink import Sink

pytestmark = pytest.mark.timeout(60)

SID = "01HZXSOURCEAUTH0001"
RAW = (
    b"Received: from client.example.test (client [192.0.2.1])\r\n"
    b"\tby mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@remote.test>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@remote.test>\r\n"
    b"\r\n"
    b"First line.\r\n"
    b".a line that starts with a dot\r\n"
    b"..and two dots\r\n"
    b"last line without trailing spaces\r\n"
)


def header(sid: str = SID) -> bytes:
    return f"X-SourceAuth-Id: {sid}\r\n".encode()


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def hop(s: Sink) -> NextHop:
    return parse_next_hop(s.url)


def all_delivered(result: DeliveryResult) -> bool:
    return bool(result.delivered) and not result.temporary and not result.rejected


def refusals(result: DeliveryResult) -> dict[str, tuple[int, str]]:
    """recipient -> (code, text) of each recipient not delivered, read from the diagnostic."""
    out: dict[str, tuple[int, str]] = {}
    for part in filter(None, result.diagnostic.split("; ")):
        recipient, _, reply = part.partition(": ")
        code, _, text = reply.partition(" ")
        out[recipient] = (int(code), text)
    return out


# --------------------------------------------------------------------------------------------
# stamp()


def test_stamp_prepends_header_and_keeps_the_rest_byte_for_byte() -> None:
    assert stamp(RAW, SID) == header() + RAW


def test_stamp_removes_forged_headers_including_folded_and_odd_case() -> None:
    raw = (
        b"From: a@remote.test\r\n"
        b"X-SourceAuth-Id: forged-1\r\n"
        b"Subject: s\r\n"
        b"x-sourceauth-id :\r\n  forged-2\r\n"
        b"\r\n"
        b"X-SourceAuth-Id: in the body stays\r\n"
    )
    expected = (
        header()
        + b"From: a@remote.test\r\nSubject: s\r\n\r\nX-SourceAuth-Id: in the body stays\r\n"
    )
    assert stamp(raw, SID) == expected


def test_stamp_keeps_an_existing_header_with_the_same_value_and_is_idempotent() -> None:
    once = stamp(RAW, SID)
    assert stamp(once, SID) == once
    raw = (
        b"From: a@x\r\nX-SourceAuth-Id:  " + SID.encode() + b"\r\nX-SourceAuth-Id: bad\r\n\r\nb\r\n"
    )
    assert stamp(raw, SID) == b"From: a@x\r\nX-SourceAuth-Id:  " + SID.encode() + b"\r\n\r\nb\r\n"


def test_stamp_uses_the_message_line_ending_for_lf_only_messages() -> None:
    raw = b"From: a@x\nSubject: s\n\nbody\n"
    assert stamp(raw, SID) == f"X-SourceAuth-Id: {SID}\n".encode() + raw


@pytest.mark.parametrize("bad", ["", "has space", "a.b", "a/b", "x\r\nBcc: evil@x", "é", "a:b"])
def test_invalid_sourceauth_id_is_a_programming_error(bad: str) -> None:
    with pytest.raises(ValueError):
        stamp(RAW, bad)


# --------------------------------------------------------------------------------------------
# SMTP


def test_smtp_delivery_carries_sourceauth_id_and_exact_original_bytes(sink: Sink) -> None:
    result = deliver(
        hop(sink),
        mail_from="alice@remote.test",
        recipients=["bob@example.test", "carol@example.test"],
        raw=RAW,
        sourceauth_id=SID,
        timeout=5,
    )
    assert all_delivered(result)
    assert result.delivered == ("bob@example.test", "carol@example.test")
    assert result.diagnostic == "" and result.next_hop == str(hop(sink))
    (msg,) = sink.wait_for(1, timeout=5)
    assert msg.data == header() + RAW
    assert msg.mail_from == "alice@remote.test"
    assert msg.rcpt_tos == ["bob@example.test", "carol@example.test"]
    assert msg.peer.startswith("127.0.0.1:")


def test_forged_sourceauth_id_header_is_removed_on_delivery(sink: Sink) -> None:
    forged = b"X-SourceAuth-Id: forged-by-sender\r\n" + RAW
    deliver(
        hop(sink),
        mail_from="a@remote.test",
        recipients=["b@example.test"],
        raw=forged,
        sourceauth_id=SID,
        timeout=5,
    )
    (msg,) = sink.wait_for(1, timeout=5)
    assert msg.data == header() + RAW
    assert b"forged-by-sender" not in msg.data


def test_per_recipient_550_is_permanent_for_that_recipient_only() -> None:
    def rcpt(address: str) -> str:
        return "550 5.1.1 User unknown" if address.startswith("ghost") else "250 OK"

    with Sink(rcpt_reply=rcpt) as s:
        result = deliver(
            hop(s),
            mail_from="a@remote.test",
            recipients=["bob@example.test", "ghost@example.test", "carol@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        (msg,) = s.wait_for(1, timeout=5)
    assert result.delivered == ("bob@example.test", "carol@example.test")
    assert result.rejected == ("ghost@example.test",)
    assert result.temporary == ()  # nothing left to retry
    ((ghost, (code, text)),) = refusals(result).items()
    assert (ghost, code) == ("ghost@example.test", 550)
    assert "User unknown" in text
    assert msg.rcpt_tos == ["bob@example.test", "carol@example.test"]


def test_rcpt_451_is_temporary_and_the_delivery_needs_a_retry() -> None:
    def rcpt(address: str) -> str:
        return "451 4.3.0 try later" if address.startswith("busy") else "250 OK"

    with Sink(rcpt_reply=rcpt) as s:
        result = deliver(
            hop(s),
            mail_from="a@remote.test",
            recipients=["bob@example.test", "busy@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        s.wait_for(1, timeout=5)
    assert result.temporary == ("busy@example.test",)
    assert result.delivered == ("bob@example.test",)
    assert refusals(result)["busy@example.test"][0] == 451


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [("451 4.3.0 try later", "temporary"), ("554 5.7.1 content rejected", "rejected")],
)
def test_data_reply_applies_to_every_accepted_recipient(reply: str, outcome: str) -> None:
    with Sink(data_reply=reply) as s:
        result = deliver(
            hop(s),
            mail_from="a@remote.test",
            recipients=["b@example.test", "c@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        assert s.messages == []
    assert getattr(result, outcome) == ("b@example.test", "c@example.test")
    assert {code for code, _ in refusals(result).values()} == {int(reply[:3])}


def test_mail_from_rejection_fails_every_recipient() -> None:
    with Sink(mail_reply=lambda a: "553 5.7.1 sender refused") as s:
        result = deliver(
            hop(s),
            mail_from="a@remote.test",
            recipients=["b@example.test", "c@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
    assert result.rejected == ("b@example.test", "c@example.test")
    replies = refusals(result).values()
    assert len(replies) == 2 and all(c == 553 and t.startswith("MAIL:") for c, t in replies)


def test_connection_refused_is_temporary_quickly() -> None:
    port = free_port()  # bound then released: nothing listens there
    started = time.monotonic()
    result = deliver(
        parse_next_hop(f"smtp://127.0.0.1:{port}"),
        mail_from="a@remote.test",
        recipients=["b@example.test", "c@example.test"],
        raw=RAW,
        sourceauth_id=SID,
        timeout=60,
    )
    assert time.monotonic() - started < 30  # answered by the refusal, not by the timeout
    assert result.temporary == ("b@example.test", "c@example.test")
    replies = refusals(result)
    assert [code for code, _ in replies.values()] == [451, 451]
    assert "refused" in replies["b@example.test"][1].lower()


def test_silent_server_times_out_as_temporary() -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never greets
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = deliver(
            parse_next_hop(f"smtp://127.0.0.1:{port}"),
            mail_from="a@remote.test",
            recipients=["b@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=0.5,
        )
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 30  # it waited for the timeout, and then gave up
    assert result.temporary == ("b@example.test",)


def test_disconnect_after_greeting_is_temporary() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"220 rude.example.test ESMTP\r\n")
                conn.settimeout(5)
                conn.recv(1024)  # EHLO, then hang up

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        result = deliver(
            parse_next_hop(f"smtp://127.0.0.1:{port}"),
            mail_from="a@remote.test",
            recipients=["b@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        thread.join(5)
    assert result.temporary == ("b@example.test",)
    assert refusals(result)["b@example.test"][0] == 451


def test_greeting_554_is_permanent() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"554 5.3.2 no service here\r\n")
                conn.settimeout(2)
                try:
                    conn.recv(1024)
                except OSError:
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        result = deliver(
            parse_next_hop(f"smtp://127.0.0.1:{port}"),
            mail_from="a@remote.test",
            recipients=["b@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        thread.join(5)
    assert result.rejected == ("b@example.test",)
    assert refusals(result)["b@example.test"][0] == 554


def test_lmtp_per_recipient_replies() -> None:
    replies = {
        "full@example.test": "452 4.2.2 mailbox full",
        "gone@example.test": "550 5.2.1 mailbox disabled",
    }
    with Sink(lmtp=True, lmtp_reply=lambda a: replies.get(a, "250 2.0.0 saved")) as s:
        result = deliver(
            hop(s),
            mail_from="a@remote.test",
            recipients=["bob@example.test", "full@example.test", "gone@example.test", "c@x.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        (msg,) = s.wait_for(1, timeout=5)
    assert result.delivered == ("bob@example.test", "c@x.test")
    assert result.temporary == ("full@example.test",)
    assert result.rejected == ("gone@example.test",)
    assert refusals(result) == {
        "full@example.test": (452, "4.2.2 mailbox full"),
        "gone@example.test": (550, "5.2.1 mailbox disabled"),
    }
    assert msg.rcpt_tos == ["bob@example.test", "c@x.test"]
    assert msg.data == header() + RAW


def test_lmtp_mixes_rcpt_and_data_replies() -> None:
    with Sink(
        lmtp=True,
        rcpt_reply=lambda a: "550 5.1.1 no" if a.startswith("x") else "250 OK",
        lmtp_reply=lambda a: "451 4.3.0 later" if a.startswith("b") else "250 ok",
    ) as s:
        result = deliver(
            hop(s),
            mail_from="a@remote.test",
            recipients=["a@e.test", "x@e.test", "b@e.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
    assert (result.delivered, result.rejected, result.temporary) == (
        ("a@e.test",),
        ("x@e.test",),
        ("b@e.test",),
    )
    codes = {r: code for r, (code, _) in refusals(result).items()}
    assert codes == {"x@e.test": 550, "b@e.test": 451}


def test_null_sender_is_sent_as_empty_reverse_path(sink: Sink) -> None:
    for null in ("", "<>"):
        result = deliver(
            hop(sink),
            mail_from=null,
            recipients=["b@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        assert all_delivered(result)
    msgs = sink.wait_for(2, timeout=5)
    assert [m.mail_from for m in msgs] == ["", ""]


def test_8bit_body_without_body_8bitmime_arrives_byte_identical(sink: Sink) -> None:
    # the original came in without BODY=8BITMIME; every byte survives, except that a bare LF
    # becomes CRLF (SMTP smuggling: docs/security.md)
    raw = (
        b"From: =?utf-8?q?J=C3=B6rg?= <j@remote.test>\r\nSubject: gr\xc3\xbc\xc3\x9fe\r\n"
        b"Content-Type: text/plain; charset=latin-1\r\n\r\n"
        b"caf\xe9 \xff\xfe\x80\r\n\xe4\xf6\xfc line with bare LF\ninside\r\n"
        b".\xe9 dot first\r\n" + bytes(range(0x80, 0x100)) + b"\r\n"
    )
    result = deliver(
        hop(sink),
        mail_from="j@remote.test",
        recipients=["b@example.test"],
        raw=raw,
        sourceauth_id=SID,
        timeout=5,
    )
    assert all_delivered(result)
    (msg,) = sink.wait_for(1, timeout=5)
    assert msg.data == header() + raw.replace(b"bare LF\ninside", b"bare LF\r\ninside")
    assert "SMTPUTF8" not in msg.mail_options  # 8-bit content alone does not need SMTPUTF8


def test_ascii_message_uses_no_mail_parameters(sink: Sink) -> None:
    deliver(
        hop(sink),
        mail_from="a@remote.test",
        recipients=["b@example.test"],
        raw=RAW,
        sourceauth_id=SID,
        timeout=5,
    )
    (msg,) = sink.wait_for(1, timeout=5)
    assert msg.mail_options == []


def test_smtputf8_recipient_uses_the_smtputf8_option(sink: Sink) -> None:
    recipient = "jörg@exämple.test"
    result = deliver(
        hop(sink),
        mail_from="a@remote.test",
        recipients=[recipient],
        raw=RAW,
        sourceauth_id=SID,
        timeout=5,
    )
    assert all_delivered(result)
    (msg,) = sink.wait_for(1, timeout=5)
    assert msg.rcpt_tos == [recipient]
    assert "SMTPUTF8" in msg.mail_options


def test_recipient_with_line_break_is_refused_without_injection(sink: Sink) -> None:
    result = deliver(
        hop(sink),
        mail_from="a@remote.test",
        recipients=["b@example.test", "x@example.test>\r\nRCPT TO:<evil@example.test"],
        raw=RAW,
        sourceauth_id=SID,
        timeout=5,
    )
    assert len(result.delivered) == 1 and len(result.rejected) == 1
    (msg,) = sink.wait_for(1, timeout=5)
    assert msg.rcpt_tos == ["b@example.test"]


def test_ipv6_loopback_next_hop() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with Sink(host="::1") as s:
        assert s.url.startswith("smtp://[::1]:")
        result = deliver(
            parse_next_hop(s.url),
            mail_from="a@remote.test",
            recipients=["b@example.test"],
            raw=RAW,
            sourceauth_id=SID,
            timeout=5,
        )
        (msg,) = s.wait_for(1, timeout=5)
    assert all_delivered(result)
    assert msg.data == header() + RAW


def test_no_recipients_is_a_programming_error(sink: Sink) -> None:
    with pytest.raises(ValueError):
        deliver(hop(sink), mail_from="a@x", recipients=[], raw=RAW, sourceauth_id=SID)


# --------------------------------------------------------------------------------------------
# Maildir


def maildir_files(root: Path, mailbox: str, sub: str) -> list[Path]:
    return sorted((root / mailbox / sub).iterdir())


def test_maildir_delivery_writes_one_file_per_recipient_in_new(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    nh = parse_next_hop("maildir:./mail", base_dir=tmp_path)
    assert nh.path == str(root)
    result = deliver(
        nh,
        mail_from="alice@remote.test",
        recipients=["bob@example.test", "Carol@Example.Test"],
        raw=RAW,
        sourceauth_id=SID,
    )
    assert all_delivered(result)
    for mailbox, rcpt in (
        ("bob@example.test", b"bob@example.test"),
        ("carol@example.test", b"Carol@Example.Test"),
    ):
        (new,) = maildir_files(root, mailbox, "new")
        assert new.name == f"{SID}.{socket.gethostname()}"
        assert maildir_files(root, mailbox, "tmp") == []
        assert maildir_files(root, mailbox, "cur") == []
        content = new.read_bytes()
        assert content == (
            b"Return-Path: <alice@remote.test>\r\nDelivered-To: " + rcpt + b"\r\n" + header() + RAW
        )
        assert (new.stat().st_mode & 0o777) == 0o600
        assert ((root / mailbox).stat().st_mode & 0o777) == 0o700


def test_maildir_second_delivery_with_same_id_writes_nothing_new(tmp_path: Path) -> None:
    nh = parse_next_hop(f"maildir:{tmp_path / 'mail'}")
    rcpts = ["bob@example.test", "carol@example.test"]
    first = deliver(nh, mail_from="a@remote.test", recipients=rcpts, raw=RAW, sourceauth_id=SID)
    again = deliver(nh, mail_from="a@remote.test", recipients=rcpts, raw=RAW, sourceauth_id=SID)
    assert first.delivered == again.delivered == tuple(rcpts)
    assert all_delivered(first) and all_delivered(again)
    for rcpt in rcpts:
        assert len(maildir_files(tmp_path / "mail", rcpt, "new")) == 1
    other = deliver(
        nh, mail_from="a@remote.test", recipients=rcpts[:1], raw=RAW, sourceauth_id=SID + "2"
    )
    assert all_delivered(other)
    assert len(maildir_files(tmp_path / "mail", rcpts[0], "new")) == 2


def test_maildir_exactly_once_also_after_the_copy_moved_to_cur_with_flags(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    nh = parse_next_hop(f"maildir:{root}")
    deliver(
        nh, mail_from="a@remote.test", recipients=["bob@example.test"], raw=RAW, sourceauth_id=SID
    )
    (new,) = maildir_files(root, "bob@example.test", "new")
    moved = root / "bob@example.test" / "cur" / (new.name + ":2,RS")
    new.rename(moved)
    again = deliver(
        nh, mail_from="a@remote.test", recipients=["bob@example.test"], raw=RAW, sourceauth_id=SID
    )
    assert all_delivered(again)
    assert maildir_files(root, "bob@example.test", "new") == []
    assert maildir_files(root, "bob@example.test", "cur") == [moved]


def test_maildir_same_mailbox_twice_in_one_delivery_is_written_once(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    result = deliver(
        parse_next_hop(f"maildir:{root}"),
        mail_from="a@remote.test",
        recipients=["bob@example.test", "BOB@example.test"],
        raw=RAW,
        sourceauth_id=SID,
    )
    assert all_delivered(result)
    assert len(maildir_files(root, "bob@example.test", "new")) == 1


def test_maildir_disk_error_is_temporary(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"a regular file where a directory should be")
    nh = parse_next_hop(f"maildir:{blocker / 'mail'}")
    result = deliver(
        nh, mail_from="a@remote.test", recipients=["b@example.test"], raw=RAW, sourceauth_id=SID
    )
    assert result.temporary == ("b@example.test",)
    ((code, text),) = refusals(result).values()
    assert code == 451 and text.startswith("4.3.0")


def test_maildir_unwritable_mailbox_is_temporary_for_that_recipient_only(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    (root / "broken@example.test").write_bytes(b"")  # mailbox path taken by a file
    result = deliver(
        parse_next_hop(f"maildir:{root}"),
        mail_from="a@remote.test",
        recipients=["ok@example.test", "broken@example.test"],
        raw=RAW,
        sourceauth_id=SID,
    )
    assert result.delivered == ("ok@example.test",)
    assert result.temporary == ("broken@example.test",)


@pytest.mark.parametrize(
    ("recipient", "mailbox"),
    [
        ("../../etc@example.test", "%2E.%2F..%2Fetc@example.test"),
        (".hidden@example.test", "%2Ehidden@example.test"),
        ("a/b@example.test", "a%2Fb@example.test"),
        ("jörg@exämple.test", "jörg@exämple.test"),
        ("postmaster", "postmaster"),
    ],
)
def test_maildir_mailbox_names_are_sanitised(tmp_path: Path, recipient: str, mailbox: str) -> None:
    root = tmp_path / "mail"
    result = deliver(
        parse_next_hop(f"maildir:{root}"),
        mail_from="a@remote.test",
        recipients=[recipient],
        raw=RAW,
        sourceauth_id=SID,
    )
    assert all_delivered(result)
    assert sorted(p.name for p in root.iterdir()) == [mailbox]
    assert len(maildir_files(root, mailbox, "new")) == 1
    assert sorted(os.listdir(tmp_path)) == ["mail"]


# --------------------------------------------------------------------------------------------
# parse_next_hop


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://127.0.0.1:10031", NextHop("smtp", "127.0.0.1", 10031, "")),
        ("smtp://[::1]:25", NextHop("smtp", "::1", 25, "")),
        ("smtp://[::1]", NextHop("smtp", "::1", 25, "")),
        ("smtp://mx.example.test", NextHop("smtp", "mx.example.test", 25, "")),
        ("SMTP://127.0.0.1:2525/", NextHop("smtp", "127.0.0.1", 2525, "")),
        ("  smtp://localhost:25  ", NextHop("smtp", "localhost", 25, "")),
        ("lmtp://127.0.0.1:2424", NextHop("lmtp", "127.0.0.1", 2424, "")),
        ("lmtp://localhost", NextHop("lmtp", "localhost", 24, "")),
        ("maildir:/abs/path", NextHop("maildir", "", 0, "/abs/path")),
        ("maildir:/abs/./x/../path/", NextHop("maildir", "", 0, "/abs/path")),
        ("maildir:./var/mail", NextHop("maildir", "", 0, "/base/var/mail")),
        ("maildir:var/mail", NextHop("maildir", "", 0, "/base/var/mail")),
    ],
)
def test_parse_next_hop_accepts(url: str, expected: NextHop) -> None:
    parsed = parse_next_hop(url, base_dir="/base")
    assert parsed == expected
    assert parse_next_hop(str(parsed)) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:25",
        "http://127.0.0.1:25",
        "smtp:",
        "smtp:127.0.0.1:25",
        "smtp://",
        "smtp://:25",
        "smtp://127.0.0.1:",
        "smtp://127.0.0.1:0",
        "smtp://127.0.0.1:70000",
        "smtp://127.0.0.1:abc",
        "smtp://::1:25",
        "smtp://[not-v6]:25",
        "smtp://bad_host:25",
        "smtp://user:pw@127.0.0.1:25",
        "smtp://127.0.0.1:25/path",
        "smtp://127.0.0.1:25?x=1",
        "lmtp:/var/run/lmtp.sock",
        "maildir:",
        "maildir://host/path",
        "smtp://127.0.0.1:25\r\nX",
    ],
)
def test_parse_next_hop_rejects(url: str) -> None:
    with pytest.raises(NextHopError) as info:
        parse_next_hop(url)
    assert repr(url) in str(info.value)


# --------------------------------------------------------------------------------------------
# send_message (challenges)

CHALLENGE = (
    b"From: confirm@example.test\r\nTo: alice@remote.test\r\nSubject: please confirm\r\n"
    b"Message-ID: <challenge-1@example.test>\r\nAuto-Submitted: auto-replied\r\n\r\nReply.\r\n"
)


def test_send_message_through_a_sink_sends_the_bytes_unchanged(sink: Sink) -> None:
    result = send_message(
        hop(sink),
        mail_from="bounces+TOK123@example.test",
        recipient="alice@remote.test",
        raw=CHALLENGE,
        timeout=5,
    )
    assert result == RecipientResult("alice@remote.test", Outcome.DELIVERED, 250, "OK")
    (msg,) = sink.wait_for(1, timeout=5)
    assert msg.data == CHALLENGE
    assert msg.mail_from == "bounces+TOK123@example.test"
    assert msg.rcpt_tos == ["alice@remote.test"]


def test_send_message_550_from_the_relay_is_permanent() -> None:
    with Sink(rcpt_reply=lambda a: "550 5.1.1 User unknown") as s:
        result = send_message(
            hop(s),
            mail_from="bounces+T@example.test",
            recipient="ghost@remote.test",
            raw=CHALLENGE,
            timeout=5,
        )
    assert (result.outcome, result.code) == (Outcome.PERMANENT, 550)


def test_send_message_maildir_outbox_is_exactly_once_by_message_id(tmp_path: Path) -> None:
    outbox = parse_next_hop("maildir:./outbox", base_dir=tmp_path)
    for _ in range(2):
        result = send_message(
            outbox, mail_from="bounces+T@example.test", recipient="alice@remote.test", raw=CHALLENGE
        )
        assert result.outcome is Outcome.DELIVERED
    (new,) = maildir_files(tmp_path / "outbox", "alice@remote.test", "new")
    assert new.read_bytes().endswith(b"\r\n" + CHALLENGE)
    assert new.read_bytes().startswith(b"Return-Path: <bounces+T@example.test>\r\n")
    other = CHALLENGE.replace(b"challenge-1@", b"challenge-2@")
    send_message(
        outbox, mail_from="bounces+T@example.test", recipient="alice@remote.test", raw=other
    )
    assert len(maildir_files(tmp_path / "outbox", "alice@remote.test", "new")) == 2


# --------------------------------------------------------------------------------------------
# DeliveryResult and the sink itself


def test_delivery_result_sorts_recipients_by_outcome_and_reports_the_refusals() -> None:
    nh = parse_next_hop("smtp://relay.example.test")
    replies = [
        RecipientResult("a@x.test", Outcome.DELIVERED, 250, "2.0.0 ok"),
        RecipientResult("b@x.test", Outcome.TEMPORARY, 451, "4.3.0 later"),
        RecipientResult("c@x.test", Outcome.PERMANENT, 550, "5.1.1 unknown"),
        RecipientResult("d@x.test", Outcome.DELIVERED, 250, "2.0.0 ok"),
    ]
    assert delivery_result(nh, replies) == DeliveryResult(
        delivered=("a@x.test", "d@x.test"),
        temporary=("b@x.test",),
        rejected=("c@x.test",),
        diagnostic="b@x.test: 451 4.3.0 later; c@x.test: 550 5.1.1 unknown",
        next_hop="smtp://relay.example.test:25",
    )


def test_delivery_result_diagnostic_is_capped() -> None:
    nh = parse_next_hop("smtp://relay.example.test")
    refused = [
        RecipientResult(f"r{i}@x.test", Outcome.PERMANENT, 550, "5.1.1 " + "x" * 80)
        for i in range(20)
    ]
    assert len(delivery_result(nh, refused).diagnostic) == 500


def test_sink_wait_for_times_out_with_what_arrived(sink: Sink) -> None:
    deliver(
        hop(sink),
        mail_from="a@remote.test",
        recipients=["b@example.test"],
        raw=RAW,
        sourceauth_id=SID,
        timeout=5,
    )
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of 2"):
        sink.wait_for(2, timeout=0.3)
    assert time.monotonic() - started < 30  # gave up at its deadline, did not hang


def test_fsync_sink_writes_each_message_and_keep_false_only_counts(tmp_path: Path) -> None:
    with Sink(fsync_dir=str(tmp_path), keep=False) as s:
        for i in range(3):
            deliver(
                hop(s),
                mail_from="a@remote.test",
                recipients=["b@example.test"],
                raw=RAW,
                sourceauth_id=f"{SID}{i}",
                timeout=5,
            )
        assert s.wait_for(3, timeout=5) == []
        assert s.count == 3
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3
    assert files[0].read_bytes() == header(f"{SID}0") + RAW


# --------------------------------------------------------------------------------------------
# NextHopDelivery: the engine's delivery port over the blob store port


def _job(receipt_id: str, sha256: str) -> DeliveryJob:
    return DeliveryJob(
        message_id="0123456789abcdef0123456789abcdef",
        receipt_id=receipt_id,
        sha256=sha256,
        mail_from="a@remote.test",
        recipients=("bob@example.test",),
    )


def test_next_hop_delivery_reads_the_original_and_delivers_it(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    ref = blobs.put(uuid.uuid4().hex, RAW)
    transport = NextHopDelivery(parse_next_hop(f"maildir:{tmp_path / 'mail'}"), blobs, "mx.test")
    result = transport.deliver(_job(ref.key, ref.sha256))
    assert result.delivered == ("bob@example.test",)
    (new,) = maildir_files(tmp_path / "mail", "bob@example.test", "new")
    assert new.read_bytes().endswith(RAW)


def test_next_hop_delivery_keeps_a_copy_whose_original_is_missing_or_corrupt_for_a_retry(
    tmp_path: Path,
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    ref = blobs.put(uuid.uuid4().hex, RAW)
    transport = NextHopDelivery(parse_next_hop(f"maildir:{tmp_path / 'mail'}"), blobs, "mx.test")
    corrupt = transport.deliver(_job(ref.key, hashlib.sha256(b"other").hexdigest()))
    missing = transport.deliver(_job(uuid.uuid4().hex, ref.sha256))
    for result in (corrupt, missing):
        assert result.temporary == ("bob@example.test",) and not result.rejected
        assert result.diagnostic.startswith("original unreadable")
    assert not (tmp_path / "mail").exists()


def test_next_hop_delivery_retries_when_the_blob_store_is_unavailable(tmp_path: Path) -> None:
    blobs = DatabaseBlobStore(tmp_path / "sourceauth.db")
    blobs.close()  # every read now fails with a storage error
    transport = NextHopDelivery(parse_next_hop(f"maildir:{tmp_path / 'mail'}"), blobs, "mx.test")
    result = transport.deliver(_job(uuid.uuid4().hex, hashlib.sha256(RAW).hexdigest()))
    assert result.temporary == ("bob@example.test",) and not result.rejected
    assert result.diagnostic.startswith("original unavailable")
