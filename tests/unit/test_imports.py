"""The list formats `senders import` reads (adapters/imports.py), on the sample files of
docs/examples/ and on single lines: every good line becomes an address or a rule pattern,
every bad one a numbered BadLine, and reading goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sourceauth.adapters.imports import (
    RECIPIENT,
    SENDER,
    Address,
    BadLine,
    PatternLine,
    read_list,
    write_plain,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def entries(name: str, fmt: str) -> list[object]:
    return list(read_list((EXAMPLES / name).read_text(encoding="utf-8"), fmt))


def bad_lines(found: list[object]) -> list[int]:
    return [e.line for e in found if isinstance(e, BadLine)]


def test_plain_sample_reads_addresses_patterns_and_names_its_bad_lines() -> None:
    found = entries("plain-whitelist.txt", "plain")
    assert [e for e in found if isinstance(e, Address)] == [
        Address(2, "alice@partner.example"),
        Address(3, "bob.smith@partner.example"),
    ]
    assert [e.pattern for e in found if isinstance(e, PatternLine)] == [
        "*@supplier.example",
        "*@customer.example",
        "news-??@letters.example",
        r"re:[a-z]+\.[a-z]+@staff\.example",
    ]
    assert bad_lines(found) == [8, 9]
    assert "repeat inside a repeat" in next(
        e.reason for e in found if isinstance(e, BadLine) and e.line == 9
    )


def test_tmda_sample_follows_tmda_list_syntax() -> None:
    found = entries("tmda-whitelist", "tmda")
    assert Address(4, "dave@friends.example") in found  # lower-cased, " #" comment cut
    # user@=domain: the domain itself and every subdomain
    assert Address(7, "jobs@recruiter.example") in found
    assert PatternLine(7, SENDER, "jobs@*.recruiter.example") in found
    assert PatternLine(6, SENDER, "*-announce@lists.example") in found
    assert bad_lines(found) == [8, 9, 10]


def test_tmda_ignores_a_second_word() -> None:
    assert list(read_list("carol@friends.example 1735689600\n", "tmda")) == [
        Address(1, "carol@friends.example")
    ]


def test_ask_sample_turns_regexes_into_addresses_domains_or_search_rules() -> None:
    found = entries("ask-whitelist.txt", "ask")
    assert Address(2, "erin@colleagues.example") in found
    assert Address(3, "frank@colleagues.example") in found  # ^…$ with escaped dots
    assert PatternLine(4, SENDER, "*@vendor.example") in found  # from @vendor\.example
    assert Address(5, "grace@club.example") in found  # a bare line is a from line
    assert PatternLine(6, SENDER, r"re:(?:[a-z]+@branch[0-9]+\.example)") in found
    assert PatternLine(7, RECIPIENT, "team-list@example.test") in found
    assert bad_lines(found) == [8, 9, 10, 11]  # subject, header, bad regex, empty from


def test_an_unanchored_ask_regex_keeps_its_search_meaning() -> None:
    (entry,) = read_list("from sales[0-9]\n", "ask")
    assert entry == PatternLine(1, SENDER, "re:.*(?:sales[0-9]).*")


def test_postconfirm_sample_reads_addresses_and_anchored_regexes() -> None:
    found = entries("postconfirm-whitelist", "postconfirm")
    assert [e for e in found if isinstance(e, Address)] == [
        Address(1, "heidi@standards.example"),
        Address(2, "ivan@standards.example"),
        Address(2, "judy@drafts.example"),
    ]
    assert PatternLine(4, SENDER, r"re:.*@iesg\.example") in found
    assert bad_lines(found) == [5]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("tmda-blacklist", "tmda"),
        ("ask-ignore.txt", "ask"),
        ("postconfirm-blackregex", "postconfirm"),
    ],
)
def test_every_blocking_sample_reads_without_a_bad_line(name: str, fmt: str) -> None:
    found = entries(name, fmt)
    assert found and bad_lines(found) == []


def test_the_plain_export_reads_back_to_the_same_entries() -> None:
    lines = list(write_plain(["a@x.example"], ["*@y.example", "re:b.*@z\\.example"], "head"))
    back = list(read_list("\n".join(lines), "plain"))
    assert back == [
        Address(2, "a@x.example"),
        PatternLine(3, SENDER, "*@y.example"),
        PatternLine(4, SENDER, "re:b.*@z\\.example"),
    ]


def test_tmda_at_equals_covers_the_domain_and_its_subdomains() -> None:
    assert list(read_list("*@=Partner.example\n", "tmda")) == [
        PatternLine(1, SENDER, "*@partner.example"),
        PatternLine(1, SENDER, "*@*.partner.example"),
    ]
