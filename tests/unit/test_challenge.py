"""Specification of the challenge message: headers, encoding, templates, and injection safety.

The message is parsed back with the standard library, as a receiving MUA would.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import inspect
import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sourceauth.adapters.smtp.challenge import (
    DEFAULT_BODY_TEMPLATE,
    DEFAULT_SUBJECT_TEMPLATE,
    REMOVED,
    SUBJECT_MAX,
    ChallengeContent,
    compose_challenge,
    defang,
    normalize_message_id,
    verp_address,
)

NOW = datetime(2026, 11, 28, 20, 6, 47, tzinfo=UTC)
EXPIRES = datetime(2026, 12, 5, 20, 6, 47, tzinfo=UTC)
BASE_HEADERS = [
    "Date",
    "From",
    "To",
    "Reply-To",
    "Subject",
    "Message-ID",
    "Auto-Submitted",
    "X-Auto-Response-Suppress",
    "X-SourceAuth-Challenge",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
]
THREAD_HEADERS = ["In-Reply-To", "References"]


def content(**changes: Any) -> ChallengeContent:
    base = ChallengeContent(
        challenge_from="confirm@example.test",
        reply_to="confirm+TOK123@example.test",
        to="alice@remote.test",
        original_subject="Lunch on Friday?",
        original_date="Sat, 28 Nov 2026 20:00:00 +0000",
        original_message_id="<abc.123@remote.test>",
        protected_recipient="bob@example.test",
        token="TOK123",
        hostname="mx.example.test",
        expires_at=EXPIRES,
        challenge_id="0a1b2c3d",
    )
    return dataclasses.replace(base, **changes)


def compose(c: ChallengeContent | None = None, **kwargs: Any) -> bytes:
    return compose_challenge(c or content(), now=NOW, **kwargs)


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def decoded(value: str) -> str:
    return str(make_header(decode_header(value)))


def body_text(msg: Message) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode("utf-8")


def expected_headers(original_message_id: str) -> list[str]:
    if normalize_message_id(original_message_id):
        return BASE_HEADERS[:6] + THREAD_HEADERS + BASE_HEADERS[6:]
    return BASE_HEADERS


# --- headers -------------------------------------------------------------------------------------


def test_all_headers_present_once_in_order() -> None:
    msg = parse(compose())
    assert msg.keys() == expected_headers("<abc.123@remote.test>")
    assert not msg.defects


def test_header_values() -> None:
    msg = parse(compose())
    assert msg["From"] == "Mail Source Authentication <confirm@example.test>"
    assert msg["To"] == "alice@remote.test"
    assert msg["Reply-To"] == "confirm+TOK123@example.test"
    assert msg["Subject"] == "Please confirm your message: Lunch on Friday?"
    assert msg["Message-ID"] == "<challenge.0a1b2c3d@mx.example.test>"
    assert msg["In-Reply-To"] == "<abc.123@remote.test>"
    assert msg["References"] == "<abc.123@remote.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["X-SourceAuth-Challenge"] == "0a1b2c3d"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert parsedate_to_datetime(msg["Date"]) == NOW


def test_reply_to_carries_the_token() -> None:
    msg = parse(compose())
    assert getaddresses([msg["Reply-To"]]) == [("", "confirm+TOK123@example.test")]
    assert "TOK123" in msg["Reply-To"]


def test_reply_to_without_the_token_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="token"):
        compose(content(reply_to="confirm@example.test"))


def test_no_precedence_header_per_rfc_3834() -> None:
    assert parse(compose())["Precedence"] is None


def test_display_name_is_configurable_and_encoded_when_non_ascii() -> None:
    msg = parse(compose(display_name="Sécurité du courrier"))
    name, address = getaddresses([decoded(msg["From"])])[0]
    assert (name, address) == ("Sécurité du courrier", "confirm@example.test")
    assert msg["From"].isascii()


def test_display_name_with_specials_is_quoted() -> None:
    msg = parse(compose(display_name='Mail "Auth", Inc.'))
    assert getaddresses([msg["From"]]) == [('Mail "Auth", Inc.', "confirm@example.test")]


def test_message_id_is_stable_for_the_same_challenge_id() -> None:
    first = parse(compose_challenge(content(), now=NOW))
    second = parse(compose_challenge(content(), now=NOW + timedelta(hours=3)))
    assert first["Message-ID"] == second["Message-ID"] == "<challenge.0a1b2c3d@mx.example.test>"
    assert first["Date"] != second["Date"]
    other = parse(compose(content(challenge_id="ffee")))
    assert other["Message-ID"] == "<challenge.ffee@mx.example.test>"


def test_message_id_is_the_engines_thread_id_when_given() -> None:
    thread = "challenge.0a1b2c3d.1.abcdefghijklmnopqrstuvwxyz"
    msg = parse(compose(content(thread_id=thread)))
    assert msg["Message-ID"] == f"<{thread}@mx.example.test>"


@pytest.mark.parametrize("thread", ["a b", "x@y", "<z>", "q" * 129])
def test_thread_id_that_could_break_the_header_is_refused(thread: str) -> None:
    with pytest.raises(ValueError, match="thread_id"):
        compose(content(thread_id=thread))


def test_same_input_and_time_give_identical_bytes() -> None:
    assert compose() == compose()


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        ("<abc.123@remote.test>", "<abc.123@remote.test>"),
        ("abc.123@remote.test", "<abc.123@remote.test>"),
        ("  < abc.123@remote.test >  ", "<abc.123@remote.test>"),
    ],
)
def test_in_reply_to_and_references_are_the_normalised_original_id(
    original: str, expected: str
) -> None:
    msg = parse(compose(content(original_message_id=original)))
    assert msg["In-Reply-To"] == msg["References"] == expected


@pytest.mark.parametrize(
    "original", ["", "   ", "<>", "no-at-sign", "<a b@c>", "a@b>x", "<ü@b>", "x" * 1000 + "@b"]
)
def test_threading_headers_are_omitted_for_empty_or_invalid_original_id(original: str) -> None:
    msg = parse(compose(content(original_message_id=original)))
    assert msg.keys() == BASE_HEADERS


def test_date_honours_an_aware_now_in_another_zone() -> None:
    tz = timezone(timedelta(hours=2))
    msg = parse(compose_challenge(content(), now=NOW.astimezone(tz)))
    assert msg["Date"].endswith("+0000")
    assert parsedate_to_datetime(msg["Date"]) == NOW


def test_date_defaults_to_the_current_time() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    msg = parse(compose_challenge(content()))
    assert before <= parsedate_to_datetime(msg["Date"]) <= datetime.now(UTC)


# --- subject -------------------------------------------------------------------------------------


def test_non_ascii_subject_is_rfc2047_encoded_and_round_trips() -> None:
    raw = compose(content(original_subject="Grüße aus Köln — 会议 🎉"))
    header_section = raw.split(b"\r\n\r\n", 1)[0]
    assert header_section.isascii()
    msg = parse(raw)
    assert "=?utf-8?" in msg["Subject"]
    assert decoded(msg["Subject"]) == "Please confirm your message: Grüße aus Köln — 会议 🎉"


def test_ascii_subject_that_looks_encoded_is_encoded_so_it_reads_literally() -> None:
    msg = parse(compose(content(original_subject="=?utf-8?q?fake?= word")))
    assert decoded(msg["Subject"]) == "Please confirm your message: =?utf-8?q?fake?= word"


def test_long_subject_is_truncated_to_60_characters_and_folded() -> None:
    original = "ä" * 50 + "b" * 150
    raw = compose(content(original_subject=original))
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    subject = decoded(parse(raw)["Subject"])
    assert SUBJECT_MAX == 60
    assert subject == "Please confirm your message: " + "ä" * 50 + "b" * 10


@pytest.mark.parametrize(
    "word",
    [
        "https://evil.test/login",
        "hxxp://x",
        "www.evil.test",
        "evil.test",
        "EVIL.COM/pay",
        "victim@bank.test",
        "mailto:x",
        "javascript:alert(1)",
        "evil\uff0etest",
        "evil\u3002test",
        "\uff45\uff56\uff49\uff4c\uff0e\uff43\uff4f\uff4d",  # fullwidth evil.com
        "пример.рф",
    ],
)
def test_links_and_addresses_in_the_subject_are_removed(word: str) -> None:
    raw = compose(content(original_subject=f"Re: invoice {word} now"), body_template="$subject")
    msg = parse(raw)
    assert decoded(msg["Subject"]) == f"Please confirm your message: Re: invoice {REMOVED} now"
    assert body_text(msg).strip() == f"Re: invoice {REMOVED} now"


@pytest.mark.parametrize("text", ["Re: lunch at 12:30?", "v1.2 e.g. U.S.A. notes", "Fwd: 50%"])
def test_ordinary_subject_words_are_kept(text: str) -> None:
    assert defang(text) == text


def test_empty_subject_reads_no_subject() -> None:
    msg = parse(compose(content(original_subject="")))
    assert msg["Subject"] == "Please confirm your message: (no subject)"


def test_control_characters_in_subject_are_removed() -> None:
    msg = parse(compose(content(original_subject="a\r\nBcc: x@y\x00\x1b[31m\tb\u2028c")))
    assert decoded(msg["Subject"]) == f"Please confirm your message: a Bcc: {REMOVED} [31m b c"
    assert msg["Bcc"] is None


@pytest.mark.timeout(30)
def test_huge_inputs_are_cut_not_choked_on() -> None:
    huge = "x\r\n" * 3_000_000
    msg = parse(
        compose(
            content(
                original_subject=huge,
                original_date=huge,
                original_message_id=huge,
                protected_recipient=huge,
            ),
            display_name=huge,
        )
    )
    assert decoded(msg["Subject"]) == "Please confirm your message: " + " ".join(["x"] * 30)
    assert msg.keys() == BASE_HEADERS
    with pytest.raises(ValueError, match="to"):
        compose(content(to=huge + "@x.test"))


# --- body and templates --------------------------------------------------------------------------


def test_default_body_names_recipient_subject_date_expiry_and_reply_address() -> None:
    text = body_text(parse(compose()))
    assert "bob@example.test" in text
    assert '"Lunch on Friday?"' in text
    assert "Sat, 28 Nov 2026 20:00:00 +0000" in text
    assert "Sat, 05 Dec 2026 20:06:47 +0000" in text
    assert "confirm+TOK123@example.test" in text
    assert "alice@remote.test" in text
    assert "$" not in text


def test_ascii_body_is_7bit_with_crlf_line_endings() -> None:
    raw = compose()
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"\r\n")


def test_non_ascii_body_is_quoted_printable_utf8() -> None:
    raw = compose(content(original_subject="Grüße"))
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert raw.isascii()
    assert '"Grüße"' in body_text(msg)
    assert all(len(line) <= 78 for line in raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n"))


def test_templates_substitute_every_placeholder() -> None:
    msg = parse(
        compose(
            subject_template="[$sender] $subject",
            body_template=(
                "s=$subject\nd=$date\nr=$recipient\ne=$expires\nf=$sender\na=$reply_address\n"
                "t=$token\n"
            ),
        )
    )
    assert msg["Subject"] == "[alice@remote.test] Lunch on Friday?"
    assert body_text(msg).split("\r\n") == [
        "s=Lunch on Friday?",
        "d=Sat, 28 Nov 2026 20:00:00 +0000",
        "r=bob@example.test",
        "e=Sat, 05 Dec 2026 20:06:47 +0000",
        "f=alice@remote.test",
        "a=confirm+TOK123@example.test",
        "t=TOK123",
        "",
    ]


def test_unknown_placeholders_are_left_as_written() -> None:
    msg = parse(compose(subject_template="$nope ${subject} $", body_template="$unknown $$ $\n"))
    assert msg["Subject"] == "$nope Lunch on Friday? $"
    assert body_text(msg) == "$unknown $ $\r\n"


def test_defaults_are_the_documented_templates() -> None:
    assert DEFAULT_SUBJECT_TEMPLATE == "Please confirm your message: $subject"
    for placeholder in ("$recipient", "$subject", "$date", "$expires"):
        assert placeholder in DEFAULT_BODY_TEMPLATE


def test_missing_date_and_recipient_have_readable_stand_ins() -> None:
    text = body_text(parse(compose(content(original_date="", protected_recipient=""))))
    assert "(date unknown)" in text and "(unknown recipient)" in text


def test_naive_expiry_is_taken_as_utc() -> None:
    text = body_text(parse(compose(content(expires_at=EXPIRES.replace(tzinfo=None)))))
    assert "Sat, 05 Dec 2026 20:06:47 +0000" in text


def test_there_is_no_way_to_pass_the_original_body() -> None:
    fields = {f.name for f in dataclasses.fields(ChallengeContent)}
    assert not any("body" in name or "content" in name for name in fields)
    assert [p for p in inspect.signature(compose_challenge).parameters if "body" in p] == [
        "body_template"
    ]
    msg = parse(compose())
    assert not msg.is_multipart()


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("<alice@remote.test>", "alice@remote.test"),
        ('"a b"@remote.test', '"a b"@remote.test'),
        ("a,b@remote.test", '"a,b"@remote.test'),
        ("a@b@remote.test", '"a@b"@remote.test'),
        ("jörg@bücher.test", "jörg@bücher.test"),
        ("user@[192.0.2.1]", "user@[192.0.2.1]"),
        ("user@remote.test>, evil@x", '"user@remote.test>, evil"@x'),
    ],
)
def test_to_is_exactly_one_address_non_ascii_kept_as_utf8(sender: str, expected: str) -> None:
    msg = email.message_from_bytes(compose(content(to=sender)), policy=email.policy.default)
    assert str(msg["To"]) == expected
    assert len(msg["To"].addresses) == 1


@pytest.mark.parametrize("field", ["to", "reply_to", "challenge_from"])
def test_empty_address_is_a_caller_bug(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        compose(content(**{field: " \r\n "}))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"challenge_id": ""}, "challenge_id"),
        ({"challenge_id": "ab/cd"}, "challenge_id"),
        ({"challenge_id": "a" * 129}, "challenge_id"),
        ({"hostname": ""}, "hostname"),
        ({"hostname": "mx example"}, "hostname"),
        ({"hostname": "mx.example.test>\r\nBcc: x"}, "hostname"),
        ({"to": "a" * 600 + "@x.test"}, "to"),
    ],
)
def test_invalid_ids_hostnames_and_addresses_raise_value_error(
    changes: dict[str, str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        compose(content(**changes))


@pytest.mark.parametrize(
    ("base", "token", "delimiter", "expected"),
    [
        ("bounces@example.test", "abc", "+", "bounces+abc@example.test"),
        ("confirm@example.test", "TOK456", "+", "confirm+TOK456@example.test"),
        ("bounces@example.test", "abc", "-", "bounces-abc@example.test"),
        ("odd@local@example.test", "abc", "+", "odd@local+abc@example.test"),
        ("bounces", "abc", "+", "bounces+abc"),
    ],
)
def test_verp_address_puts_the_token_after_the_local_part(
    base: str, token: str, delimiter: str, expected: str
) -> None:
    assert verp_address(base, token, delimiter) == expected


# --- injection (property-based) ------------------------------------------------------------------

NASTY = st.sampled_from(
    [
        "\r\nBcc: evil@attacker.test",
        "\nX-Injected: 1",
        "\r",
        "\r\n\r\nbody smuggled",
        "\u2028X-Sep: 1",
        "\x85X-Nel: 1",
        "\x00",
        "=?utf-8?q?=0D=0ABcc:_x?=",
        '"',
        "<>",
        ",",
        "\\",
    ]
)
TEXT = st.lists(st.one_of(st.text(max_size=40), NASTY), max_size=6).map("".join)
LOCAL = st.lists(st.one_of(st.text(min_size=1, max_size=10), NASTY), min_size=1, max_size=4).map(
    "".join
)


@settings(max_examples=400, deadline=None)
@given(
    subject=TEXT,
    date=TEXT,
    message_id=TEXT,
    recipient=TEXT,
    sender_local=LOCAL,
    display_name=TEXT,
)
def test_no_input_can_add_or_break_a_header(
    subject: str,
    date: str,
    message_id: str,
    recipient: str,
    sender_local: str,
    display_name: str,
) -> None:
    c = content(
        original_subject=subject,
        original_date=date,
        original_message_id=message_id,
        protected_recipient=recipient,
        to=sender_local + "@remote.test",
    )
    try:
        raw = compose(c, display_name=display_name)
    except ValueError as error:  # only a sender that sanitises to nothing may be refused
        assert "to:" in str(error)
        return
    header_section = raw.partition(b"\r\n\r\n")[0]
    lines = header_section.split(b"\r\n")
    assert all(re.match(rb"[A-Za-z-]+: |[ \t]", line) for line in lines)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg.keys() == expected_headers(message_id)
    assert not msg.defects
    assert len(getaddresses(msg.get_all("To", []))) == 1
    assert getaddresses([msg["Reply-To"]]) == [("", "confirm+TOK123@example.test")]
    for value in (decoded(msg["Subject"]), decoded(msg["From"])):
        assert not re.search(r"[\r\n\x00\u2028\x85]", value)
    assert msg["Message-ID"] == "<challenge.0a1b2c3d@mx.example.test>"
    assert "body smuggled" not in body_text(msg).split("\r\n")[0]


@settings(max_examples=200, deadline=None)
@given(subject=st.text(max_size=300))
def test_any_subject_round_trips_after_sanitising(subject: str) -> None:
    msg = parse(compose(content(original_subject=subject), subject_template="$subject"))
    kept = "".join(
        " " if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") else ch
        for ch in subject
    )
    expected = defang(" ".join(kept.split()))[:SUBJECT_MAX].strip()
    assert decoded(msg["Subject"]) == (expected or "(no subject)")


def test_with_the_web_on_the_body_carries_the_confirmation_link_else_reads_as_before() -> None:
    url = "https://mx.example.test/sourceauth/confirm/TOK123"
    with_link = body_text(parse(compose(content(confirm_url=url)))).replace("\r\n", "\n")
    without = body_text(parse(compose())).replace("\r\n", "\n")
    assert f"\n{url}\n" in with_link and "press its button" in with_link
    assert "http" not in without and "write anything in the reply.\n\nThis request" in without


def test_body_cleaning_drops_exactly_the_control_separator_and_surrogate_categories() -> None:
    import unicodedata

    from sourceauth.adapters.smtp.challenge import _UNWANTED_RE

    every = "".join(chr(c) for c in range(0x110000))
    expected = "".join(
        ch
        for ch in every
        if ch in "\r\n\t" or unicodedata.category(ch) not in ("Cc", "Cs", "Zl", "Zp")
    )
    assert _UNWANTED_RE.sub("", every) == expected


def test_single_line_folds_exactly_whitespace_and_the_breaking_categories() -> None:
    import unicodedata

    from sourceauth.adapters.smtp.challenge import _single_line

    def by_category(value: str) -> str:
        out: list[str] = []
        space = False
        for char in value:
            if char.isspace() or unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
                if not space:
                    out.append(" ")
                    space = True
                continue
            out.append(char)
            space = False
        return "".join(out).strip()

    every = "".join(f"a{chr(c)}{chr(c)}" for c in range(0x110000))
    assert _single_line(every) == by_category(every)
    assert _single_line(" \t x\r\n\u2028\x85y  ") == "x y"
