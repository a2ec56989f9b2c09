"""Specification of the plain-bounce pre-filter (adapters/smtp/bounce_cues.py): it may let
ordinary mail through to flufl.bounce's detectors, but never keeps from them a message in
which any detector finds a failure.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from email.message import Message
from pathlib import Path

import pytest
from flufl.bounce import all_failures
from flufl.bounce._scan import _DETECTORS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sourceauth.adapters.smtp import bounce_cues, dsn

PLAIN = Path(__file__).resolve().parent.parent / "fixtures" / "plain_bounces"
DSN = Path(__file__).resolve().parent.parent / "fixtures" / "dsn"


def parsed(raw: bytes) -> Message:
    """The message as plain_bounce gives it to the detectors."""
    return dsn.prepared_for_detectors(raw)


def detectors_find_a_failure(msg: Message) -> bool:
    try:
        temporary, permanent = all_failures(msg)
    except Exception:
        return False  # plain_bounce's answer when a detector raises
    return bool(temporary or permanent)


def ordinary(body: bytes = b"", headers: bytes = b"") -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return (
        b"From: <new-1@d1.example.org>\r\nTo: <user1@protected.example>\r\n"
        b"Subject: load test message 1\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n" + headers + b"\r\n" + (body or line * 30)
    )


def test_every_detector_of_flufl_bounce_is_known() -> None:
    # A flufl.bounce with a new detector: the pre-filter would pass everything; add its cue.
    assert {d.__name__ for d in _DETECTORS} <= bounce_cues.KNOWN_DETECTORS
    assert bounce_cues._ALL_KNOWN


def test_every_start_phrase_has_a_literal_key() -> None:
    assert "" not in bounce_cues.PHRASE_KEYS
    assert all(len(key) >= 8 for key in bounce_cues.PHRASE_KEYS)
    assert "" not in bounce_cues._ANCHORS
    covered = {i for phrases in bounce_cues._ANCHORS.values() for i in phrases}
    assert covered == set(range(len(bounce_cues._PHRASES)))
    for anchor, phrases in bounce_cues._ANCHORS.items():
        assert all(anchor in bounce_cues._PHRASES[i][0] for i in phrases)


@pytest.mark.parametrize(
    ("pattern", "key"),
    [
        (r"Del(i|e)very to the following recipients (failed|was aborted)", "very to the following recipients "),
        (r"^Your message\s*$", "your message"),
        (r"This is the machine generated message from mail service.", "this is the machine generated message from mail service"),
        (r"Unable to deliver message to the following address\(es\)\.", "unable to deliver message to the following address(es)."),
        (r"colou?r of the message", "r of the message"),
        (r"a|b", ""),
    ],
)  # fmt: skip
def test_the_literal_key_is_in_every_match(pattern: str, key: str) -> None:
    assert bounce_cues.literal_key(re.compile(pattern, re.IGNORECASE)) == key


def test_ordinary_mail_is_ruled_out() -> None:
    assert not bounce_cues.may_be_bounce(parsed(ordinary()))
    said = b"My mail to Tom bounced; the delivery failed twice, your message came back.\r\n"
    assert not bounce_cues.may_be_bounce(parsed(ordinary(said)))


@pytest.mark.parametrize("name", sorted(p.name for p in PLAIN.glob("*.eml")))
def test_plain_bounces_pass_the_pre_filter(name: str) -> None:
    assert bounce_cues.may_be_bounce(parsed((PLAIN / name).read_bytes()))


@pytest.mark.parametrize("name", sorted(p.name for p in DSN.glob("*.eml")))
def test_no_report_the_detectors_read_is_kept_from_them(name: str) -> None:
    msg = parsed((DSN / name).read_bytes())
    if detectors_find_a_failure(msg):
        assert bounce_cues.may_be_bounce(msg)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (b"X-Failed-Recipients: a@b.test\r\n", b""),  # Exim
        (b"X-Mailer: <SMTP32 v8.0>\r\n", b"User mailbox a@b.test: unknown\r\n"),  # SMTP32
        (b"", b"Hi. This is the qmail-send program at b.test.\r\n\r\n<a@b.test>:\r\nno\r\n"),
        (b"", b"We tried, a.person@b.test, and failed.\r\n"),  # LLNL's line
        (b"", b"Your mail did not reach the following recipient(s):\r\n  a@b.test on 1 Jan\r\n"),
    ],
)
def test_each_kind_of_cue_passes(headers: bytes, body: bytes) -> None:
    msg = parsed(ordinary(body, headers))
    assert detectors_find_a_failure(msg)
    assert bounce_cues.may_be_bounce(msg)


def test_a_from_hidden_in_comments_still_counts() -> None:
    raw = ordinary(b"Message from yahoo.com.\r\n\r\n<a@b.test>:\r\nno such user\r\n")
    raw = raw.replace(b"From: <new-1@d1.example.org>", b"From: mailer(x)-dae(y)mon@yahoo.com")
    msg = parsed(raw)
    assert detectors_find_a_failure(msg)
    assert bounce_cues.may_be_bounce(msg)


def test_letters_re_matches_for_ascii_ones_are_folded() -> None:
    # Python's case-insensitive match takes the dotless i for "i" (and the long s for "s").
    phrase = "Delivery to the following recipient fa\u0131led"
    body = phrase + "\n\n   a@b.test\n"
    raw = ordinary(body.encode("utf-8"))
    raw = raw.replace(b"charset=us-ascii", b"charset=utf-8")
    msg = parsed(raw)
    assert detectors_find_a_failure(msg)
    assert bounce_cues.may_be_bounce(msg)


def test_the_ascii_twins_are_all_of_them() -> None:
    # Every character re's IGNORECASE takes for an ASCII letter, beyond str.lower()'s own.
    if sys.maxunicode < 0x10FFFF:  # pragma: no cover
        pytest.skip("narrow build")
    letters = re.compile("[a-z]", re.IGNORECASE)
    twins = {
        chr(c)
        for c in range(0x80, 0x3000)
        if letters.fullmatch(chr(c)) and not chr(c).lower().isascii()
    }
    twins |= {chr(c) for c in (0x212A, 0x212B) if letters.fullmatch(chr(c))}
    folded = {c for c in twins if c.translate(bounce_cues._ASCII_TWINS).lower().isascii()}
    assert folded == twins


WORDS = sorted(
    {key for key in bounce_cues.PHRASE_KEYS}
    | {"<a@b.test>:", "a@b.test", ",", "original message follows", "---", "Error Detail"}
    | {"transcript of session follows", "the following addresses had permanent fatal errors"}
    | {"This Message was undeliverable due to the following reason:", "rcpt to: <c@d.test>"}
)
SENDERS = [
    "Jane Roe <jane@example.test>",
    "MAILER-DAEMON@yahoo.com",
    "mailer-daemon@sina.com",
    "Mailer-Daemon@cs.yale.edu",
    "someone@aol.com",
    "postmaster@example.test",
]
TYPES = [
    "text/plain",
    'multipart/mixed; boundary="b"',
    'multipart/report; report-type=delivery-status; boundary="b"',
]


def _case(text: str, flips: list[bool]) -> str:
    return "".join(
        c.upper() if f else c for c, f in zip(text, flips + [False] * len(text), strict=False)
    )


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    lines = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["", " ", "  ", "\t"]),
                st.lists(st.sampled_from(WORDS), min_size=0, max_size=3),
                st.lists(st.booleans(), max_size=8),
            ),
            max_size=12,
        )
    )
    body = "\r\n".join(pad + _case(" ".join(words), flips) for pad, words, flips in lines)
    ctype = draw(st.sampled_from(TYPES))
    sender = draw(st.sampled_from(SENDERS))
    head = f"From: {sender}\r\nSubject: x\r\nMIME-Version: 1.0\r\nContent-Type: {ctype}\r\n"
    if draw(st.booleans()):
        head += "X-Mailer: " + draw(st.sampled_from(["Novell GroupWise", "<SMTP32 v8>", "mutt"]))
        head += "\r\n"
    if ctype.startswith("multipart"):
        description = draw(st.sampled_from(["notification", "text"]))
        first = draw(st.sampled_from(["text/plain", "message/delivery-status"]))
        body = (
            f"--b\r\nContent-Type: {first}\r\nContent-Description: {description}\r\n\r\n"
            f"{body}\r\n--b\r\nContent-Type: text/plain\r\n\r\n{body}\r\n--b--\r\n"
        )
    return (head + "\r\n" + body + "\r\n").encode("utf-8")


@given(messages())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_whatever_a_detector_finds_passes_the_pre_filter(raw: bytes) -> None:
    logging.disable(logging.CRITICAL)
    try:
        msg = parsed(raw)
        if detectors_find_a_failure(msg):
            assert bounce_cues.may_be_bounce(msg)
    finally:
        logging.disable(logging.NOTSET)


@given(st.binary(max_size=2048))
@settings(max_examples=100, deadline=None)
def test_the_pre_filter_never_raises(raw: bytes) -> None:
    assert isinstance(bounce_cues.may_be_bounce(parsed(raw)), bool)


def test_the_pre_filter_is_cheap_for_ordinary_mail() -> None:
    msg = parsed(ordinary())
    rounds = 200
    started = time.process_time()
    for _ in range(rounds):
        bounce_cues.may_be_bounce(msg)
    per_message = (time.process_time() - started) / rounds
    assert per_message < 0.002  # ~40 us on an idle machine; the detectors take ~1.7 ms
