"""Specification of bounce parsing: real Postfix DSNs, non-standard bounces, and hostile input.

Fixtures live in tests/fixtures/dsn/ (the four postfix-dsn*.eml were captured from a real Postfix).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sourceauth.adapters.smtp import dsn
from sourceauth.adapters.smtp.dsn import BounceReport, extract_original_headers, parse_bounce

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "dsn"
STATUS_5XX = re.compile(r"5\.\d{1,3}\.\d{1,3}\Z")
ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.eml"))


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def dsn_message(*recipient_blocks: str, per_message: str = "Reporting-MTA: dns; mx.test") -> bytes:
    blocks = "\n\n".join(recipient_blocks)
    return crlf(
        "From: MAILER-DAEMON@mx.test\n"
        "To: bounces+TOK@example.test\n"
        "Subject: Delivery report\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n'
        "\n"
        "--B\n"
        "Content-Type: text/plain\n"
        "\n"
        "Report.\n"
        "\n"
        "--B\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        f"{per_message}\n"
        "\n"
        f"{blocks}\n"
        "\n"
        "--B--\n"
    )


# --- the real Postfix DSNs -----------------------------------------------------------------------

POSTFIX_CASES = [
    (
        "postfix-dsn.eml",
        "nobody@remote.test",
        "550 5.1.1 Recipient address rejected: User unknown",
        "",
    ),
    (
        "postfix-dsn-errortransport.eml",
        "someone@fail.test",
        "simulated permanent failure",
        "",
    ),
    (
        "postfix-dsn-unknownuser.eml",
        "nosuchuser@example.test",
        'unknown user: "nosuchuser@example.test"',
        "",
    ),
    (
        "postfix-dsn-ret-hdrs-envid.eml",
        "nobody@remote.test",
        "550 5.1.1 Recipient address rejected: User unknown",
        "TOKenv",
    ),
]


@pytest.mark.parametrize(("name", "recipient", "remote_text", "envid"), POSTFIX_CASES)
def test_real_postfix_dsn_is_a_permanent_failure_with_its_details(
    name: str, recipient: str, remote_text: str, envid: str
) -> None:
    report = parse_bounce(fixture(name))
    assert report.failed is True
    assert report.action == "failed"
    assert report.format == "rfc3464"
    assert STATUS_5XX.match(report.status)
    assert report.status == "5.1.1"
    assert remote_text in report.diagnostic
    assert report.final_recipient == recipient
    assert report.original_envelope_id == envid
    assert report.reporting_mta == "mx.example.test"


def test_diagnostic_drops_the_diagnostic_type_prefix() -> None:
    report = parse_bounce(fixture("postfix-dsn.eml"))
    assert report.diagnostic == "550 5.1.1 Recipient address rejected: User unknown"


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("postfix-dsn.eml", "TOK456"),
        ("postfix-dsn-errortransport.eml", "TOK789"),
        ("postfix-dsn-unknownuser.eml", "TOKabc"),
        ("postfix-dsn-ret-hdrs-envid.eml", "TOKenv"),
    ],
)
def test_original_headers_come_from_the_returned_message_or_headers_part(
    name: str, token: str
) -> None:
    headers = extract_original_headers(fixture(name))
    names = [field.lower() for field, _ in headers]
    assert "from" in names and "subject" in names and "message-id" in names
    assert dict((k.lower(), v) for k, v in headers)["from"] == f"bounces+{token}@example.test"


def test_original_headers_are_unfolded() -> None:
    headers = extract_original_headers(fixture("postfix-dsn-ret-hdrs-envid.eml"))
    received = next(v for k, v in headers if k == "Received")
    assert "\n" not in received and "\r" not in received
    assert received.startswith("from filter.example.test") and "32AE8160024" in received


def test_original_headers_are_empty_without_a_returned_message() -> None:
    assert extract_original_headers(fixture("qmail-bounce.eml")) == []
    assert extract_original_headers(b"") == []
    assert extract_original_headers(b"\xff\xfe garbage \x00") == []


# --- reports that are not failures --------------------------------------------------------------


def test_delayed_dsn_is_not_a_failure() -> None:
    report = parse_bounce(fixture("postfix-delayed.eml"))
    assert report.failed is False
    assert report.action == "delayed"
    assert report.status == "4.4.1"
    assert report.format == "rfc3464"
    assert report.original_envelope_id == "TOKdel"
    assert report.diagnostic == "connect to remote.test[192.0.2.7]:25: Connection timed out"


def test_mdn_disposition_notification_is_not_a_failure() -> None:
    report = parse_bounce(fixture("mdn-displayed.eml"))
    assert report.failed is False
    assert report.action == "unknown"
    assert report.format == "none"
    assert "displayed" in report.diagnostic


def test_successful_delivery_report_is_not_a_failure() -> None:
    report = parse_bounce(
        dsn_message("Final-Recipient: rfc822; ok@remote.test\nAction: delivered\nStatus: 2.0.0")
    )
    assert (report.failed, report.action, report.status) == (False, "delivered", "2.0.0")


def test_delayed_and_delivered_recipients_together_are_not_a_failure() -> None:
    report = parse_bounce(
        dsn_message(
            "Final-Recipient: rfc822; a@remote.test\nAction: delivered\nStatus: 2.0.0",
            "Final-Recipient: rfc822; b@remote.test\nAction: delayed\nStatus: 4.4.7",
        )
    )
    assert report.failed is False
    assert report.action == "delivered"


def test_exim_delay_warning_is_not_a_failure() -> None:
    raw = crlf(
        "From: Mail Delivery System <Mailer-Daemon@mail.exim.test>\n"
        "To: bounces+TOK@example.test\n"
        "Subject: Warning: message 1tXyZa-000123-AB delayed 24 hours\n"
        "X-Failed-Recipients: slow@exim.test\n"
        "\n"
        "This message was created automatically by mail delivery software.\n"
        "A message that you sent has not yet been delivered to one or more of its\n"
        "recipients after more than 24 hours on the queue on mail.exim.test.\n"
        "\n"
        "  slow@exim.test\n"
        "    Delay reason: SMTP error from remote mail server after RCPT TO:\n"
        "    451 4.3.0 try again later\n"
        "\n"
        "No action is required on your part. Delivery attempts will continue.\n"
    ).replace(b"X-Failed-Recipients: slow@exim.test\r\n", b"")
    report = parse_bounce(raw)
    assert report.failed is False


def test_ordinary_mail_is_not_a_bounce() -> None:
    raw = crlf("From: a@b.test\nTo: confirm+TOK@example.test\nSubject: Re: hello\n\nThanks!\n")
    assert parse_bounce(raw) == dsn._NONE


# --- recipient choice and inference --------------------------------------------------------------


def test_one_failed_recipient_among_several_fails_the_report_and_is_the_one_reported() -> None:
    report = parse_bounce(
        dsn_message(
            "Final-Recipient: rfc822; ok@remote.test\nAction: delivered\nStatus: 2.0.0",
            "Final-Recipient: rfc822; slow@remote.test\nAction: delayed\nStatus: 4.4.1",
            "Final-Recipient: rfc822;<bad@remote.test>\nAction: failed (bad)\n"
            "Status: 5.2.2 (full)\nDiagnostic-Code: smtp; 552 5.2.2 mailbox full",
        )
    )
    assert report.failed is True
    assert report.action == "failed"
    assert report.status == "5.2.2"
    assert report.final_recipient == "bad@remote.test"
    assert report.diagnostic == "552 5.2.2 mailbox full"
    assert report.reporting_mta == "mx.test"


def test_missing_action_is_inferred_from_a_5xx_status() -> None:
    report = parse_bounce(dsn_message("Final-Recipient: rfc822; x@remote.test\nStatus: 5.7.1"))
    assert (report.failed, report.action, report.status) == (True, "failed", "5.7.1")


def test_missing_diagnostic_code_falls_back_to_the_human_text() -> None:
    raw = fixture("postfix-dsn.eml").replace(
        b"Diagnostic-Code: smtp; 550 5.1.1 Recipient address rejected: User unknown\r\n", b""
    )
    report = parse_bounce(raw)
    assert report.failed is True
    assert "550 5.1.1 Recipient address rejected: User unknown" in report.diagnostic
    assert report.diagnostic.startswith("<nobody@remote.test>")


def test_original_recipient_is_used_when_final_recipient_is_missing() -> None:
    report = parse_bounce(
        dsn_message("Original-Recipient: rfc822;orig@remote.test\nAction: failed\nStatus: 5.1.1")
    )
    assert report.final_recipient == "orig@remote.test"


def test_global_delivery_status_part_is_read_too() -> None:
    raw = dsn_message(
        "Final-Recipient: utf-8; jörg@remote.test\nAction: failed\nStatus: 5.1.1"
    ).replace(b"message/delivery-status", b"message/global-delivery-status")
    report = parse_bounce(raw)
    assert (report.failed, report.final_recipient, report.format) == (
        True,
        "jörg@remote.test",
        "rfc3464",
    )


def test_delivery_status_without_recipient_fields_falls_back_to_other_detectors() -> None:
    raw = dsn_message("X-Nothing: here").replace(b"Subject: Delivery report", b"Subject: hi")
    assert parse_bounce(raw).format == "none"


# --- non-standard bounces ------------------------------------------------------------------------


def test_qmail_bounce_is_a_failure_via_flufl() -> None:
    report = parse_bounce(fixture("qmail-bounce.eml"))
    assert (report.failed, report.action, report.format) == (True, "failed", "flufl")
    assert report.final_recipient == "ghost@qmail.test"
    assert report.status == "5.1.1"
    assert "no mailbox here" in report.diagnostic


def test_exim_bounce_is_a_failure_via_flufl() -> None:
    report = parse_bounce(fixture("exim-bounce.eml"))
    assert (report.failed, report.format, report.final_recipient) == (
        True,
        "flufl",
        "nosuch@exim.test",
    )
    assert report.status == "5.1.1"
    assert "User unknown" in report.diagnostic


def test_flufl_failure_without_status_code_reports_5_0_0() -> None:
    raw = fixture("qmail-bounce.eml").replace(b" (#5.1.1)", b"")
    report = parse_bounce(raw)
    assert (report.failed, report.format, report.status) == (True, "flufl", "5.0.0")


def test_qmail_bounce_without_from_header_still_recognised() -> None:
    # flufl.bounce's Yale detector raises IndexError on such a message and stops the scan.
    raw = re.sub(rb"^From: [^\r]*\r\n", b"", fixture("qmail-bounce.eml"), flags=re.M)
    report = parse_bounce(raw)
    assert (report.failed, report.format) == (True, "flufl")


def test_failure_notice_with_5xx_code_is_a_failure_via_heuristic() -> None:
    report = parse_bounce(fixture("heuristic-failure-notice.eml"))
    assert (report.failed, report.action, report.format) == (True, "failed", "heuristic")
    assert report.status == "5.1.1"
    assert "does not exist" in report.diagnostic


def test_heuristic_reads_an_rfc2047_encoded_subject() -> None:
    raw = fixture("heuristic-failure-notice.eml").replace(
        b"Subject: Delivery Status Notification (Failure)",
        b"Subject: =?utf-8?q?Undeliverable=3A_hello?=",
    )
    assert parse_bounce(raw).format == "heuristic"


def test_failure_subject_without_5xx_code_is_not_a_failure() -> None:
    raw = crlf("From: postmaster@odd.test\nSubject: failure notice\n\nSomething went wrong.\n")
    assert parse_bounce(raw).failed is False


def test_flufl_raising_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(msg: object) -> frozenset[bytes]:
        raise IndexError("list index out of range")

    monkeypatch.setattr(dsn, "scan_message", explode)
    assert parse_bounce(fixture("qmail-bounce.eml")).format == "heuristic"
    assert parse_bounce(fixture("exim-bounce.eml")).format == "heuristic"
    assert parse_bounce(fixture("postfix-dsn.eml")).format == "rfc3464"


# --- malformed and hostile input -----------------------------------------------------------------


def test_multipart_without_boundary_does_not_raise_and_is_read_as_text() -> None:
    report = parse_bounce(fixture("malformed-no-boundary.eml"))
    assert (report.failed, report.status, report.format) == (True, "5.1.1", "heuristic")


def test_truncated_dsn_keeps_what_arrived() -> None:
    report = parse_bounce(fixture("truncated-dsn.eml"))
    assert (report.failed, report.format) == (True, "rfc3464")
    assert report.final_recipient == "cut@remote.test"
    assert report.original_envelope_id == "TOKtrunc"


def test_8bit_bytes_in_dsn_fields_do_not_break_parsing() -> None:
    raw = fixture("postfix-dsn.eml").replace(
        b"User unknown\r\n\r\n--257CE", b"Benutzer \xfcnbekannt \xe2\x80\x94 \xff\r\n\r\n--257CE"
    )
    raw = raw.replace(b"Subject: Undelivered", b"Subject: \xe4\xf6 Undelivered")
    report = parse_bounce(raw)
    assert report.failed is True
    assert report.diagnostic == (
        "550 5.1.1 Recipient address rejected: Benutzer \ufffdnbekannt \u2014 \ufffd"
    )
    report.diagnostic.encode("utf-8")  # no lone surrogates leak out


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x01\x02",
        b"\r\n\r\n\r\n",
        b"Content-Type: multipart/report; boundary=\r\n\r\n--\r\n--\r\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n"
        b"--x\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"!!!notbase64\r\n--x--\r\n",
        b"Content-Type: text/plain; charset=no-such-charset\r\nSubject: failure notice\r\n\r\n"
        b"550 5.1.1 gone\r\n",
        b"Content-Type: text/plain; charset=base64\r\nSubject: failure notice\r\n\r\n550 5.1.1\r\n",
        b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 5000,
    ],
    ids=[
        "empty",
        "binary",
        "blank-lines",
        "empty-boundary",
        "bad-base64-status",
        "unknown-charset",
        "non-text-codec-charset",
        "bare-status-part",
        "deep-nesting",
    ],
)
def test_odd_input_never_raises(raw: bytes) -> None:
    report = parse_bounce(raw)
    assert isinstance(report, BounceReport)
    assert isinstance(extract_original_headers(raw), list)


@pytest.mark.timeout(60)
def test_a_10_mb_header_line_is_handled_in_bounded_time() -> None:
    huge = b"X-Huge: " + b"A" * (10 * 1024 * 1024) + b"\r\n"
    for raw in (
        huge + fixture("postfix-dsn.eml"),
        b"Subject: failure notice " + b"x " * (5 * 1024 * 1024) + b"\r\n\r\n550 5.1.1 gone\r\n",
        fixture("postfix-dsn.eml").replace(
            b"Diagnostic-Code: smtp; ", b"Diagnostic-Code: smtp; " + b"Z" * (10 * 1024 * 1024)
        ),
    ):
        started = time.perf_counter()
        report = parse_bounce(raw)
        extract_original_headers(raw)
        assert time.perf_counter() - started < 20
        assert len(report.diagnostic) <= 500
        assert len(report.final_recipient) <= 500
    assert parse_bounce(huge + fixture("postfix-dsn.eml")).failed is True


@pytest.mark.timeout(60)
def test_large_bounces_are_read_in_bounded_time() -> None:
    ten_mb_text = b"lorem ipsum dolor sit amet\r\n" * 400_000
    cases = [
        (b"From: x@y.test\r\nSubject: failure notice\r\n\r\n" + ten_mb_text, False),
        (fixture("exim-bounce.eml") + ten_mb_text, True),
        (fixture("postfix-dsn.eml").replace(b"Reply to confirm", ten_mb_text), True),
    ]
    for raw, failed in cases:
        started = time.perf_counter()
        assert parse_bounce(raw).failed is failed
        assert time.perf_counter() - started < 10


def assert_well_formed(report: BounceReport) -> None:
    assert report.action in {"failed", "delayed", "delivered", "relayed", "expanded", "unknown"}
    assert report.format in {"rfc3464", "flufl", "heuristic", "none"}
    assert report.failed == (report.action == "failed")
    assert len(report.diagnostic) <= 500
    for value in (
        report.diagnostic,
        report.final_recipient,
        report.original_envelope_id,
        report.reporting_mta,
        report.status,
    ):
        assert "\n" not in value and "\r" not in value
        value.encode("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert_well_formed(parse_bounce(raw))
    assert isinstance(extract_original_headers(raw), list)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ALL_FIXTURES),
    cut=st.integers(min_value=0, max_value=4000),
    flips=st.lists(st.tuples(st.integers(0, 3999), st.integers(0, 255)), max_size=20),
)
def test_truncated_or_corrupted_fixtures_never_raise(
    name: str, cut: int, flips: list[tuple[int, int]]
) -> None:
    raw = bytearray(fixture(name)[:cut])
    for position, value in flips:
        if position < len(raw):
            raw[position] = value
    assert_well_formed(parse_bounce(bytes(raw)))
    assert isinstance(extract_original_headers(bytes(raw)), list)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_fixture_report_is_well_formed(name: str) -> None:
    assert_well_formed(parse_bounce(fixture(name)))


# --- plain-text bounces from ordinary senders (issue 7) ----------------------------------------

PLAIN = Path(__file__).resolve().parent.parent / "fixtures" / "plain_bounces"


@pytest.mark.parametrize(
    ("name", "failed"),
    [
        ("groupwise.eml", "archive.desk@county.test"),
        ("delivery-failure-notification.eml", "m.keller@harbourbank.test"),
        ("non-remis.eml", "c.durand@societe.test"),
    ],
)
def test_plain_text_bounces_are_read_as_bounces(name: str, failed: str) -> None:
    found = dsn.plain_bounce((PLAIN / name).read_bytes())
    assert found == f"flufl.bounce: permanent failure for {failed}"


def _groupwise_personal_mail(returned: bool) -> bytes:
    """Ordinary mail from a GroupWise client: multipart/mixed, an attachment, a signature."""
    attached = (
        b"Content-Type: message/rfc822\r\n\r\nFrom: x@county.test\r\nSubject: hi\r\n\r\nhi\r\n"
        if returned
        else b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"
    )
    return (
        b"From: Jane Roe <jane.roe@county.test>\r\nTo: bob@example.test\r\n"
        b"Subject: the delivery failed, the parcel is back\r\n"
        b"X-Mailer: Novell GroupWise Internet Agent 18.4.1\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nHi Bob,\r\nfigures attached.\r\n\r\n"
        b"Jane Roe\r\njane.roe@county.test\r\n--b\r\n" + attached + b"--b--\r\n"
    )


def test_ordinary_mail_from_a_groupwise_client_is_not_a_bounce() -> None:
    # flufl.bounce's GroupWise detector alone takes it for one (the signature's address).
    from email import message_from_bytes

    from flufl.bounce import all_failures

    raw = _groupwise_personal_mail(returned=False)
    assert all_failures(message_from_bytes(raw))[1]
    assert dsn.plain_bounce(raw) == ""


def test_a_groupwise_notice_must_return_a_message_and_say_it_was_not_delivered() -> None:
    returned = _groupwise_personal_mail(returned=True)
    assert dsn.plain_bounce(returned).startswith("flufl.bounce: permanent failure for")
    quiet = returned.replace(b"the delivery failed, the parcel is back", b"figures")
    assert dsn.plain_bounce(quiet) == ""


def test_plain_bounce_scan_is_bounded_on_a_huge_message() -> None:
    raw = (PLAIN / "non-remis.eml").read_bytes() + b"padding line of an ordinary body\r\n" * 400_000
    started = time.perf_counter()
    assert dsn.plain_bounce(raw).startswith("flufl.bounce: permanent failure for")
    assert time.perf_counter() - started < 5.0  # 14 MB; the scan reads at most 128 KiB of it


@given(st.binary(max_size=2048))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_plain_bounce_never_raises(raw: bytes) -> None:
    assert isinstance(dsn.plain_bounce(raw), str)
