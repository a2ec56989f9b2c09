"""Header fields as the inbound adapter reads them for the engine: bounded, never raising."""

from __future__ import annotations

from sourceauth.adapters.smtp.inbound import HEADER_LINE_LIMIT, parse_headers


def test_header_parsing_reads_a_bounded_number_of_lines() -> None:
    # 60,000 tiny fields took half a second of the commit thread; now at most 2,000 are read.
    raw = b"Subject: first\r\n" + b"X: y\r\n" * 60_000 + b"\r\nbody\r\n"
    headers = parse_headers(raw)
    assert headers[0] == ("Subject", "first")
    assert len(headers) == HEADER_LINE_LIMIT


def test_an_ordinary_header_section_is_read_whole() -> None:
    raw = b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nX-A: 1\r\n folded\r\n\r\nbody\r\n"
    assert parse_headers(raw) == (("Subject", "grüße"), ("X-A", "1 folded"))
