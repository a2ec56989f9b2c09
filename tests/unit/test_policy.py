"""Specification of engine.policy: what is never challenged, the auth gate, rate limits."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sourceauth.engine.policy import (
    DEFAULT_SPAM_HEADERS,
    AuthGate,
    ChallengeRateLimiter,
    Classification,
    Exemption,
    Headers,
    Limits,
    check_auth_gate,
    check_authorized_sender,
    classify,
    is_automated,
    is_protected,
)

HUMAN = "alice@example.org"
PLAIN: Headers = [
    ("From", "Alice <alice@example.org>"),
    ("To", "bob@example.test"),
    ("Subject", "lunch?"),
    ("Content-Type", "text/plain; charset=utf-8"),
]


def exemption_of(mail_from: str, *extra: tuple[str, str]) -> Exemption | None:
    found = classify(mail_from, [*PLAIN, *extra])
    return found.exemption if found else None


# --- classify: each class and its negatives ----------------------------------------------


def test_ordinary_message_from_a_person_is_challengeable() -> None:
    assert classify(HUMAN, PLAIN) is None


@pytest.mark.parametrize("mail_from", ["", "<>", "< >", "  ", " <> "])
def test_null_sender_is_never_challenged(mail_from: str) -> None:
    assert classify(mail_from, PLAIN) == Classification(Exemption.NULL_SENDER, "MAIL FROM:<>")


@pytest.mark.parametrize(
    "mail_from",
    [
        "MAILER-DAEMON@mx.example.org",
        "<mailer-daemon@mx.example.org>",
        "Postmaster@example.org",
        "postmaster+tag@example.org",
        "MAILER-DAEMON",
    ],
)
def test_mailer_daemon_and_postmaster_senders_are_never_challenged(mail_from: str) -> None:
    assert exemption_of(mail_from) is Exemption.MAILER_DAEMON


@pytest.mark.parametrize(
    "from_header",
    [
        "Mail Delivery System <MAILER-DAEMON@mx.example.org>",
        "MAILER-DAEMON@mx.example.org (Mail Delivery System)",
        '"Postmaster" <postmaster@example.org>',
    ],
)
def test_from_header_mailer_daemon_is_never_challenged(from_header: str) -> None:
    found = classify(HUMAN, [("From", from_header)])
    assert found is not None
    assert found.exemption is Exemption.MAILER_DAEMON
    assert found.detail.startswith("From: ")


@pytest.mark.parametrize(
    "mail_from", ["mailer-daemon-fan@example.org", "postmasters@example.org", "daemon@x.org"]
)
def test_senders_resembling_mailer_daemon_are_challengeable(mail_from: str) -> None:
    assert exemption_of(mail_from) is None


@pytest.mark.parametrize(
    "value",
    [
        "auto-replied",
        "auto-generated",
        "auto-notified",
        "Auto-Replied; owner-email=bob@example.org",
        "yes",
        "",
        '"auto-replied"',
    ],
)
def test_auto_submitted_other_than_no_is_never_challenged(value: str) -> None:
    assert exemption_of(HUMAN, ("Auto-Submitted", value)) is Exemption.AUTO_SUBMITTED


@pytest.mark.parametrize("value", ["no", "NO", "  no  ", "no (typed by a person)", "No; x=y"])
def test_auto_submitted_no_is_challengeable(value: str) -> None:
    assert exemption_of(HUMAN, ("Auto-Submitted", value)) is None


def test_auto_submitted_detail_names_header_and_value() -> None:
    found = classify(HUMAN, [("Auto-Submitted", "auto-replied")])
    assert found == Classification(Exemption.AUTO_SUBMITTED, "Auto-Submitted: auto-replied")


@pytest.mark.parametrize(
    "name",
    [
        "List-Id",
        "List-Unsubscribe",
        "List-Post",
        "List-Help",
        "List-Subscribe",
        "List-Owner",
        "List-Archive",
        "Mailing-List",
        "X-Mailing-List",
    ],
)
def test_mailing_list_headers_are_never_challenged(name: str) -> None:
    assert exemption_of(HUMAN, (name, "<golf.lists.example.org>")) is Exemption.MAILING_LIST


@pytest.mark.parametrize(
    "mail_from",
    [
        "golf-request@lists.example.org",
        "owner-golf@lists.example.org",
        "golf-owner@lists.example.org",
        "golf-bounces+alice=example.test@lists.example.org",
    ],
)
def test_list_manager_envelope_senders_are_never_challenged(mail_from: str) -> None:
    assert exemption_of(mail_from) is Exemption.MAILING_LIST


@pytest.mark.parametrize("mail_from", ["requester@example.org", "owner@example.org"])
def test_senders_resembling_list_managers_are_challengeable(mail_from: str) -> None:
    assert exemption_of(mail_from) is None


@pytest.mark.parametrize("value", ["bulk", "list", "junk", "BULK", " Junk ", "bulk (newsletter)"])
def test_precedence_bulk_list_junk_is_never_challenged(value: str) -> None:
    assert exemption_of(HUMAN, ("Precedence", value)) is Exemption.BULK


def test_precedence_junk_is_never_challenged() -> None:
    assert classify(HUMAN, [("Precedence", "junk")]) == Classification(
        Exemption.BULK, "Precedence: junk"
    )


@pytest.mark.parametrize("value", ["first-class", "normal", "bulky", "special-delivery"])
def test_other_precedence_values_are_challengeable(value: str) -> None:
    assert exemption_of(HUMAN, ("Precedence", value)) is None


@pytest.mark.parametrize(
    "header", [("Precedence", "auto_reply"), ("X-Autoresponder", "yes"), ("X-Autoreply", "")]
)
def test_auto_replies_are_never_challenged(header: tuple[str, str]) -> None:
    assert exemption_of(HUMAN, header) is Exemption.AUTO_SUBMITTED


def test_x_auto_response_suppress_does_not_exempt() -> None:
    # Exchange puts it on ordinary mail from people; exempting would lose them.
    assert exemption_of(HUMAN, ("X-Auto-Response-Suppress", "All")) is None


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/report; report-type=delivery-status; boundary=x",
        "multipart/report; report-type=disposition-notification",
        "multipart/report; report-type=feedback-report",
        "Multipart/Report; boundary=x",
        "multipart / report",
        "multipart/report (a bounce)",
        "message/delivery-status",
        "message/disposition-notification",
    ],
)
def test_delivery_and_other_reports_are_never_challenged(content_type: str) -> None:
    headers = [("From", "x@example.org"), ("Content-Type", content_type)]
    found = classify(HUMAN, headers)
    assert found is not None and found.exemption is Exemption.DSN


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "multipart/mixed; boundary=x", "multipart/reported", 'text/plain; x="a;b"'],
)
def test_ordinary_content_types_are_challengeable(content_type: str) -> None:
    assert classify(HUMAN, [("Content-Type", content_type)]) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Spam-Flag", "YES"),
        ("X-Spam-Flag", "yes"),
        ("X-Spam-Status", "Yes, score=7.2 required=5.0 tests=BAYES_99"),
        ("x-spam-status", "YES,score=12"),
    ],
)
def test_upstream_spam_flag_is_never_challenged(name: str, value: str) -> None:
    assert exemption_of(HUMAN, (name, value)) is Exemption.SPAM


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Spam-Flag", "NO"),
        ("X-Spam-Status", "No, score=1.0 required=5.0"),
        ("X-Spam-Status", "Yesterday"),
        ("X-Spam", "Yes"),
    ],
)
def test_spam_headers_saying_no_are_challengeable(name: str, value: str) -> None:
    assert exemption_of(HUMAN, (name, value)) is None


def test_configured_spam_headers_replace_the_defaults() -> None:
    rspamd = (("X-Spam", "Yes"),)
    flagged = [("X-Spam", "Yes")]
    assert classify(HUMAN, flagged, spam_headers=rspamd) == Classification(
        Exemption.SPAM, "X-Spam: Yes"
    )
    assert classify(HUMAN, [("X-Spam-Flag", "YES")], spam_headers=rspamd) is None


def test_empty_spam_prefix_matches_mere_presence() -> None:
    tests = (("X-Quarantine-Me", ""),)
    found = classify(HUMAN, [("x-quarantine-me", "anything")], spam_headers=tests)
    assert found is not None and found.exemption is Exemption.SPAM


def test_default_spam_headers_are_spamassassin_flags() -> None:
    assert DEFAULT_SPAM_HEADERS == (("X-Spam-Flag", "YES"), ("X-Spam-Status", "Yes"))


@pytest.mark.parametrize(
    ("name", "value", "exemption"),
    [
        ("AUTO-SUBMITTED", "AUTO-REPLIED", Exemption.AUTO_SUBMITTED),
        ("list-id", "<x>", Exemption.MAILING_LIST),
        ("PRECEDENCE", "BULK", Exemption.BULK),
        ("content-TYPE", "MULTIPART/REPORT", Exemption.DSN),
        ("x-SPAM-flag", "Yes", Exemption.SPAM),
        (" Precedence ", "list", Exemption.BULK),
    ],
)
def test_header_names_and_values_compare_case_insensitively(
    name: str, value: str, exemption: Exemption
) -> None:
    assert exemption_of(HUMAN, (name, value)) is exemption


@pytest.mark.parametrize(
    ("mail_from", "headers", "first"),
    [
        ("<>", [("From", "MAILER-DAEMON@x.org"), ("List-Id", "<x>")], Exemption.NULL_SENDER),
        ("postmaster@x.org", [("Auto-Submitted", "auto-replied")], Exemption.MAILER_DAEMON),
        (
            HUMAN,
            [("List-Id", "<x>"), ("Auto-Submitted", "auto-generated")],
            Exemption.AUTO_SUBMITTED,
        ),
        (HUMAN, [("Precedence", "bulk"), ("List-Id", "<x>")], Exemption.MAILING_LIST),
        (HUMAN, [("Content-Type", "multipart/report"), ("Precedence", "junk")], Exemption.BULK),
        (HUMAN, [("X-Spam-Flag", "YES"), ("Content-Type", "multipart/report")], Exemption.DSN),
    ],
)
def test_first_matching_class_in_design_order_wins(
    mail_from: str, headers: Headers, first: Exemption
) -> None:
    found = classify(mail_from, headers)
    assert found is not None and found.exemption is first


def test_any_of_several_headers_of_one_name_counts() -> None:
    headers = [("Auto-Submitted", "no"), ("Auto-Submitted", "auto-generated")]
    assert exemption_of(HUMAN, *headers) is Exemption.AUTO_SUBMITTED


def test_detail_quotes_hostile_header_text_short_and_printable() -> None:
    found = classify(HUMAN, [("Auto-Submitted", "yes\r\nX-Evil: 1" + "a" * 500)])
    assert found is not None
    assert found.detail.startswith("Auto-Submitted: yes??X-Evil: 1")
    assert found.detail.isprintable()
    assert len(found.detail) < 130


@pytest.mark.parametrize("mail_from", ["not an address", "<@>", "a@", "<<x@y>>", "\x00@\x01"])
def test_unparseable_envelope_sender_is_still_classified_by_headers(mail_from: str) -> None:
    assert exemption_of(mail_from) is None
    assert exemption_of(mail_from, ("List-Id", "<x>")) is Exemption.MAILING_LIST


# --- is_automated: replies to a confirm address --------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "headers", "exemption"),
    [
        ("<>", [], Exemption.NULL_SENDER),
        ("MAILER-DAEMON@mx.example.org", [], Exemption.MAILER_DAEMON),
        (HUMAN, [("Auto-Submitted", "auto-replied")], Exemption.AUTO_SUBMITTED),
        (HUMAN, [("X-Autoreply", "yes")], Exemption.AUTO_SUBMITTED),
        (HUMAN, [("x-autorespond", "")], Exemption.AUTO_SUBMITTED),
        (HUMAN, [("X-Autoresponder", "vacation")], Exemption.AUTO_SUBMITTED),
        (HUMAN, [("Precedence", "auto_reply")], Exemption.AUTO_SUBMITTED),
        (HUMAN, [("Precedence", "Auto_Reply (vacation)")], Exemption.AUTO_SUBMITTED),
        (HUMAN, [("Content-Type", "multipart/report; report-type=x")], Exemption.DSN),
        (HUMAN, [("Precedence", "bulk")], Exemption.BULK),
        (HUMAN, [("Precedence", "list")], Exemption.BULK),
        (HUMAN, [("Precedence", "junk")], Exemption.BULK),
        (HUMAN, [("List-Id", "<x>")], Exemption.MAILING_LIST),
    ],
)
def test_automated_replies_must_never_confirm(
    mail_from: str, headers: Headers, exemption: Exemption
) -> None:
    found = is_automated(mail_from, headers)
    assert found is not None and found.exemption is exemption


def test_plain_reply_from_a_person_is_not_automated() -> None:
    reply = [*PLAIN, ("In-Reply-To", "<c1@example.test>"), ("Auto-Submitted", "no")]
    assert is_automated(HUMAN, reply) is None


def test_upstream_spam_flag_does_not_make_a_reply_automated() -> None:
    assert is_automated(HUMAN, [*PLAIN, ("X-Spam-Flag", "YES")]) is None


def test_x_autoreply_header_names_the_header_in_detail() -> None:
    assert is_automated(HUMAN, [("X-AUTOREPLY", "yes")]) == Classification(
        Exemption.AUTO_SUBMITTED, "X-Autoreply: yes"
    )


# --- property: hostile headers never raise -------------------------------------------------

header_names = st.one_of(
    st.sampled_from(
        [
            "Auto-Submitted",
            "Precedence",
            "Content-Type",
            "List-Id",
            "From",
            "X-Spam-Flag",
            "X-Spam-Status",
            "X-Autoreply",
            "Authentication-Results",
        ]
    ),
    st.text(max_size=20),
)
structural = st.text(alphabet='()";=\\@. <>,/abcnoyespfdkimx\t\r\n\x00é', max_size=80)
header_values = st.one_of(st.text(max_size=200), structural)
hostile_headers = st.lists(st.tuples(header_names, header_values), max_size=8)


@given(st.one_of(st.text(max_size=60), structural), hostile_headers)
def test_classify_and_is_automated_never_raise_on_arbitrary_headers(
    mail_from: str, headers: list[tuple[str, str]]
) -> None:
    for found in (classify(mail_from, headers), is_automated(mail_from, headers)):
        assert found is None or (isinstance(found.exemption, Exemption) and found.detail)


# --- authentication gate -------------------------------------------------------------------

GATE = AuthGate(enabled=True, trusted_authserv_ids=("mx.trusted.test",))


def gate_says(value: str | list[str], domain: str = "example.org", gate: AuthGate = GATE) -> bool:
    values = [value] if isinstance(value, str) else value
    passed, _ = check_auth_gate(gate, domain, [("Authentication-Results", v) for v in values])
    return passed


def forged(value: str, domain: str = "example.org", gate: AuthGate = GATE) -> str | None:
    return check_authorized_sender(gate, domain, [("Authentication-Results", value)])


@pytest.mark.parametrize(
    "value",
    [
        "mx.trusted.test; spf=fail smtp.mailfrom=example.org; dkim=fail header.d=example.org",
        "mx.trusted.test; spf=softfail smtp.mailfrom=example.org",
        "mx.trusted.test; dkim=fail header.d=example.org",
        "mx.trusted.test; dmarc=fail header.from=example.org",
    ],
)
def test_authorized_sender_whose_domain_fails_at_a_trusted_server_looks_forged(
    value: str,
) -> None:
    reason = forged(value)
    assert reason is not None
    assert reason.startswith("no spf=pass or aligned dkim=pass for example.org and a failure")


@pytest.mark.parametrize(
    "value",
    [
        "mx.trusted.test; spf=fail smtp.mailfrom=example.org; dkim=pass header.d=example.org",
        "mx.trusted.test; spf=pass smtp.mailfrom=example.org; dkim=fail header.d=example.org",
        "mx.trusted.test; spf=none smtp.mailfrom=example.org; dkim=none",
        "mx.trusted.test; spf=neutral smtp.mailfrom=example.org",
        "mx.trusted.test; spf=fail smtp.mailfrom=example.net",
        "mx.trusted.test; dkim=fail header.d=unrelated.test",
        "mx.forger.test; spf=fail smtp.mailfrom=example.org",
    ],
)
def test_authorized_sender_without_evidence_of_forgery_is_not_suspect(value: str) -> None:
    assert forged(value) is None


def test_authorized_sender_is_never_suspect_with_the_gate_off() -> None:
    value = "mx.trusted.test; spf=fail smtp.mailfrom=example.org"
    assert forged(value, gate=AuthGate(trusted_authserv_ids=("mx.trusted.test",))) is None


def test_gate_is_off_by_default_and_then_passes_everything() -> None:
    assert AuthGate().enabled is False
    assert check_auth_gate(AuthGate(), "example.org", []) == (True, "auth gate disabled")


def test_spf_pass_for_the_sender_domain_opens_the_gate() -> None:
    headers = [("Authentication-Results", "mx.trusted.test; spf=pass smtp.mailfrom=example.org")]
    assert check_auth_gate(GATE, "example.org", headers) == (
        True,
        "spf=pass smtp.mailfrom=example.org by mx.trusted.test",
    )


def test_spf_pass_with_a_full_mailfrom_address_opens_the_gate() -> None:
    assert gate_says("mx.trusted.test; spf=pass smtp.mailfrom=user@example.org")


def test_spf_pass_for_another_domain_does_not_open_the_gate() -> None:
    assert not gate_says("mx.trusted.test; spf=pass smtp.mailfrom=user@example.net")
    assert not gate_says("mx.trusted.test; spf=pass smtp.mailfrom=user@sub.example.org")


def test_spf_pass_without_smtp_mailfrom_does_not_open_the_gate() -> None:
    assert not gate_says("mx.trusted.test; spf=pass smtp.helo=example.org")


@pytest.mark.parametrize(
    "result", ["none", "fail", "softfail", "neutral", "temperror", "permerror", "policy"]
)
def test_spf_results_other_than_pass_do_not_open_the_gate(result: str) -> None:
    assert not gate_says(f"mx.trusted.test; spf={result} smtp.mailfrom=example.org")


@pytest.mark.parametrize("result", ["none", "fail", "neutral", "temperror", "permerror"])
def test_dkim_results_other_than_pass_do_not_open_the_gate(result: str) -> None:
    assert not gate_says(f"mx.trusted.test; dkim={result} header.d=example.org")


def test_dkim_pass_with_header_d_equal_to_sender_domain_opens_the_gate() -> None:
    headers = [("Authentication-Results", "mx.trusted.test; dkim=pass header.d=example.org")]
    assert check_auth_gate(GATE, "example.org", headers) == (
        True,
        "dkim=pass header.d=example.org by mx.trusted.test",
    )


def test_dkim_pass_with_header_i_in_a_subdomain_is_aligned() -> None:
    assert gate_says("mx.trusted.test; dkim=pass header.i=@sub.example.org header.s=s1")


def test_dkim_pass_from_a_parent_domain_is_aligned_with_a_child_sender() -> None:
    assert gate_says("mx.trusted.test; dkim=pass header.d=example.org", domain="mail.example.org")


@pytest.mark.parametrize(
    ("signer", "sender"),
    [
        ("b.example.org", "a.example.org"),
        ("evil.co.uk", "victim.co.uk"),
        ("org", "example.org"),
        ("example.net", "example.org"),
        ("notexample.org", "example.org"),
    ],
)
def test_dkim_pass_from_an_unaligned_domain_does_not_open_the_gate(
    signer: str, sender: str
) -> None:
    assert not gate_says(f"mx.trusted.test; dkim=pass header.d={signer}", domain=sender)


def test_dkim_pass_from_untrusted_authserv_id_does_not_open_the_gate() -> None:
    headers = [("Authentication-Results", "mx.forger.test; dkim=pass header.d=example.org")]
    assert check_auth_gate(GATE, "example.org", headers) == (
        False,
        "no Authentication-Results from a trusted authserv-id",
    )


def test_header_without_an_authserv_id_does_not_open_the_gate() -> None:
    microsoft_shaped = (
        "spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=example.org; "
        "dkim=pass (signature was verified) header.d=example.org;dmarc=pass action=none"
    )
    trust_spf = AuthGate(enabled=True, trusted_authserv_ids=("spf",))
    assert not gate_says(microsoft_shaped, gate=trust_spf)


def test_real_world_gmail_shaped_header_with_comments_opens_the_gate() -> None:
    gmail = (
        "mx.google.com;\t dkim=pass header.i=@example.org header.s=20230601 header.b=Ab+/x9==;"
        "\t spf=pass (google.com: domain of alice@example.org designates 192.0.2.1 as "
        "permitted sender) smtp.mailfrom=alice@example.org;\t dmarc=pass (p=NONE sp=NONE "
        "dis=NONE) header.from=example.org"
    )
    google = AuthGate(enabled=True, trusted_authserv_ids=("mx.google.com",), require="spf")
    assert check_auth_gate(google, "example.org", [("Authentication-Results", gmail)]) == (
        True,
        "spf=pass smtp.mailfrom=alice@example.org by mx.google.com",
    )


def test_any_trusted_header_among_several_may_open_the_gate() -> None:
    assert gate_says(
        [
            "mx.forger.test; spf=pass smtp.mailfrom=example.org",
            "mx.trusted.test; spf=softfail smtp.mailfrom=example.org",
            "mx.trusted.test; dkim=fail header.d=example.org; dkim=pass header.d=example.org",
        ]
    )


def test_authserv_id_methods_and_results_compare_case_insensitively() -> None:
    assert gate_says("MX.Trusted.Test; SPF=Pass smtp.MailFrom=User@EXAMPLE.ORG")
    assert gate_says("mx.trusted.test; DKIM=PASS Header.D=Example.Org", domain="EXAMPLE.org.")


def test_authserv_id_may_carry_a_version_and_methods_a_version() -> None:
    assert gate_says("mx.trusted.test 1; dkim/1=pass header.d=example.org")


def test_quoted_values_and_cfws_around_equals_are_understood() -> None:
    assert gate_says('mx.trusted.test; spf = pass smtp.mailfrom="user@example.org"')
    assert gate_says('"mx.trusted.test"; dkim=pass reason="good; really" header.d=example.org')


def test_comments_cannot_smuggle_a_pass() -> None:
    assert not gate_says(
        "mx.trusted.test; spf=fail (spf=pass; smtp.mailfrom=example.org (nested)) "
        "smtp.mailfrom=example.org"
    )
    assert not gate_says("mx.forger.test (mx.trusted.test); spf=pass smtp.mailfrom=example.org")


def test_no_result_header_does_not_open_the_gate() -> None:
    headers = [("Authentication-Results", "mx.trusted.test; none")]
    assert check_auth_gate(GATE, "example.org", headers) == (
        False,
        "no spf=pass or aligned dkim=pass for example.org (seen: nothing)",
    )


def test_failure_reason_lists_the_results_seen() -> None:
    headers = [
        (
            "Authentication-Results",
            "mx.trusted.test; spf=softfail smtp.mailfrom=example.org; "
            "dkim=pass header.d=other.test",
        )
    ]
    passed, reason = check_auth_gate(GATE, "example.org", headers)
    assert not passed
    assert reason == (
        "no spf=pass or aligned dkim=pass for example.org "
        "(seen: spf=softfail smtp.mailfrom=example.org; dkim=pass header.d=other.test)"
    )


def test_require_spf_ignores_a_dkim_pass() -> None:
    gate = AuthGate(enabled=True, trusted_authserv_ids=("mx.trusted.test",), require="spf")
    assert not gate_says("mx.trusted.test; dkim=pass header.d=example.org", gate=gate)
    assert gate_says("mx.trusted.test; spf=pass smtp.mailfrom=example.org", gate=gate)


def test_require_dkim_ignores_an_spf_pass() -> None:
    gate = AuthGate(enabled=True, trusted_authserv_ids=("mx.trusted.test",), require="dkim")
    assert not gate_says("mx.trusted.test; spf=pass smtp.mailfrom=example.org", gate=gate)
    assert gate_says("mx.trusted.test; dkim=pass header.d=example.org", gate=gate)


def test_internationalized_sender_domain_matches_its_punycode() -> None:
    assert gate_says(
        "mx.trusted.test; spf=pass smtp.mailfrom=xn--bcher-kva.example", "bücher.example"
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        ";;;",
        "mx.trusted.test",
        "mx.trusted.test; spf",
        "mx.trusted.test; =pass smtp.mailfrom=example.org",
        "mx.trusted.test; spf=pass smtp.mailfrom=",
        "mx.trusted.test; spf=pass smtp.mailfrom=@",
        "mx.trusted.test; spf=pass smtp.mailfrom=example..org",
        "mx.trusted.test; dkim=pass header.d=.example.org",
        "mx.trusted.test; dkim=pass header.d=[192.0.2.1]",
        "(unclosed mx.trusted.test; spf=pass smtp.mailfrom=example.org",
        '"mx.trusted.test; spf=pass smtp.mailfrom=example.org',
        "mx.trusted.test; spf=pass; smtp.mailfrom=example.org",
    ],
)
def test_malformed_headers_never_open_the_gate(value: str) -> None:
    assert not gate_says(value)


def test_oversized_authentication_results_is_ignored_not_truncated() -> None:
    padding = "; dkim=fail header.d=x.test header.b=" + "A" * 20_000
    assert not gate_says(f"mx.trusted.test{padding}; spf=pass smtp.mailfrom=example.org")


def test_megabyte_header_values_are_judged_in_bounded_time() -> None:
    huge = "(" * 1000 + "x" * 1_000_000
    headers = [(name, huge) for name in ("From", "Auto-Submitted", "Content-Type", "Precedence")]
    headers.append(("Authentication-Results", "mx.trusted.test; " + huge))
    started = time.perf_counter()
    found = classify(HUMAN, headers)
    passed, _ = check_auth_gate(GATE, "example.org", headers)
    assert found is not None and found.exemption is Exemption.AUTO_SUBMITTED
    assert not passed
    assert time.perf_counter() - started < 10.0  # linear: milliseconds; quadratic: minutes


def test_gate_with_no_usable_sender_domain_does_not_pass() -> None:
    headers = [("Authentication-Results", "mx.trusted.test; spf=pass smtp.mailfrom=example.org")]
    assert check_auth_gate(GATE, "", headers) == (False, "no sender domain to authenticate")


@given(st.text(max_size=40), hostile_headers)
def test_check_auth_gate_never_raises_on_arbitrary_headers(
    domain: str, headers: list[tuple[str, str]]
) -> None:
    passed, reason = check_auth_gate(GATE, domain, headers)
    assert isinstance(passed, bool) and reason


@given(st.lists(structural, max_size=4))
def test_auth_gate_never_passes_without_a_trusted_header(values: list[str]) -> None:
    untrusted = AuthGate(enabled=True, trusted_authserv_ids=("nobody.invalid",))
    headers = [("Authentication-Results", f"mx.trusted.test; {value}") for value in values]
    assert check_auth_gate(untrusted, "example.org", headers)[0] is False


# --- rate limits ---------------------------------------------------------------------------

HOUR = 3600.0


def test_first_challenge_may_be_sent() -> None:
    assert ChallengeRateLimiter(Limits()).check("example.org", 0.0) is None


def test_default_limits_match_the_operator_contract() -> None:
    assert Limits() == Limits(
        challenges_per_domain_per_hour=100, challenges_per_hour=1000, max_resends=2
    )


def test_per_domain_cap_holds_further_challenges_to_that_domain_only() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=3))
    for second in range(3):
        assert limiter.check("example.org", float(second)) is None
        limiter.record("example.org", float(second))
    assert limiter.check("example.org", 10.0) == (
        "challenges_per_domain_per_hour limit 3 reached for example.org"
    )
    assert limiter.check("EXAMPLE.org.", 10.0) is not None
    assert limiter.check("example.net", 10.0) is None


def test_server_wide_cap_holds_challenges_to_every_domain() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_hour=5))
    for index in range(5):
        limiter.record(f"d{index}.example", float(index))
    assert limiter.check("fresh.example", 10.0) == "challenges_per_hour limit 5 reached"


def test_server_wide_reason_comes_first_when_both_caps_are_reached() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=2, challenges_per_hour=2))
    limiter.record("example.org", 0.0)
    limiter.record("example.org", 0.0)
    assert limiter.check("example.org", 1.0) == "challenges_per_hour limit 2 reached"


def test_zero_cap_allows_no_challenge() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=0))
    assert limiter.check("example.org", 0.0) is not None


def test_counts_free_up_once_the_hour_has_passed() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=1))
    limiter.record("example.org", 30.0)
    assert limiter.check("example.org", 30.0 + HOUR - 1) is not None
    assert limiter.check("example.org", 30.0 + HOUR) is not None  # counts at least an hour
    assert limiter.check("example.org", 30.0 + HOUR + 60) is None  # and under 61 minutes
    assert limiter.domain_count == 0 and limiter.bucket_count == 0


@given(st.lists(st.floats(min_value=0, max_value=5 * HOUR), min_size=1, max_size=200))
def test_no_sliding_hour_ever_holds_more_than_the_cap(times: list[float]) -> None:
    cap = 7
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=cap))
    sent: list[float] = []
    for now in sorted(times):
        if limiter.check("example.org", now) is None:
            limiter.record("example.org", now)
            sent.append(now)
    for start in sent:
        assert sum(1 for t in sent if start <= t < start + HOUR) <= cap


def test_a_challenge_recorded_with_an_earlier_time_still_counts() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=1))
    limiter.check("other.example", 2 * HOUR)
    limiter.record("example.org", 0.0)  # a clock stepped back counts as the latest time seen
    assert limiter.check("example.org", 2 * HOUR + 10) is not None


def test_seed_restores_counts_after_restart() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=2, challenges_per_hour=4))
    now = 10 * HOUR
    limiter.seed([("example.org", now - 100), ("Example.ORG", now - 50), ("x.example", now - 10)])
    assert limiter.check("example.org", now) == (
        "challenges_per_domain_per_hour limit 2 reached for example.org"
    )
    limiter.record("y.example", now)
    assert limiter.check("y.example", now) == "challenges_per_hour limit 4 reached"


def test_seed_drops_events_older_than_the_window_and_counts_future_ones_as_now() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=1))
    now = 10 * HOUR
    limiter.seed([("old.example", now - 2 * HOUR), ("future.example", now + 365 * 24 * HOUR)])
    assert limiter.check("old.example", now) is None
    assert limiter.check("future.example", now) is not None
    assert limiter.check("future.example", now + HOUR + 60) is None


def test_seed_after_activity_is_applied_at_once() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=1))
    limiter.check("example.org", HOUR)
    limiter.seed([("example.org", HOUR - 5)])
    assert limiter.check("example.org", HOUR) is not None


def test_seed_rejects_a_time_that_is_not_finite() -> None:
    limiter = ChallengeRateLimiter(Limits())
    with pytest.raises(ValueError, match="finite"):
        limiter.seed([("example.org", float("nan"))])
    with pytest.raises(ValueError, match="finite"):
        limiter.check("example.org", float("inf"))


def test_many_challenges_to_one_domain_in_one_minute_use_one_entry() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_domain_per_hour=10**6))
    for index in range(1000):
        limiter.record("example.org", 120.0 + index * 0.01)
    assert limiter.bucket_count == 1 and limiter.domain_count == 1


def test_memory_stays_bounded_over_many_domains_and_hours() -> None:
    limiter = ChallengeRateLimiter(Limits(challenges_per_hour=10**9))
    per_minute = 20
    largest = 0
    for minute in range(48 * 60):
        for index in range(per_minute):
            domain = f"d{minute}-{index}.example"
            now = minute * 60.0 + index
            limiter.check(domain, now)
            limiter.record(domain, now)
        largest = max(largest, limiter.bucket_count)
    # 57,600 domains seen; only those of the last 61 minutes are kept.
    assert largest <= 61 * per_minute
    assert limiter.domain_count <= 61 * per_minute
    limiter.check("quiet.example", 48 * HOUR + 2 * HOUR)
    assert limiter.bucket_count == 0 and limiter.domain_count == 0


# --- protected recipients ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipient", "protected"),
    [
        ("bob@example.test", True),
        ("Bob+lists@Example.Test", True),
        ("carol@sub.example.test", True),
        ("dave@other.test", False),
        ("erin@example.testing", False),
    ],
)
def test_protected_recipients_are_matched_by_domain_address_or_subdomain(
    recipient: str, protected: bool
) -> None:
    patterns = ["example.test", ".example.test"]
    assert is_protected(recipient, patterns) is protected


def test_single_protected_address_covers_its_extensions_with_the_configured_delimiter() -> None:
    assert is_protected("bob-news@example.net", ["bob@example.net"], delimiter="-")
    assert not is_protected("bobby@example.net", ["bob@example.net"], delimiter="-")
