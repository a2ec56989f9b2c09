"""Specification of address normalization, extensions and whitelist pattern matching."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sourceauth.engine.addresses import (
    AddressError,
    domain_of,
    is_null_sender,
    matches,
    normalize_address,
    normalize_pattern,
    split_extension,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice@example.test", "alice@example.test"),
        ("<alice@example.test>", "alice@example.test"),
        ("  <alice@example.test>\t", "alice@example.test"),
        (" alice@example.test ", "alice@example.test"),
        ("Alice@Example.TEST", "alice@example.test"),
        ("Bob+Confirm@x.test", "bob+confirm@x.test"),
        ("a@b", "a@b"),
        ("o'brien.x_y=z@mail-1.example.test", "o'brien.x_y=z@mail-1.example.test"),
        ("user@Bücher.DE", "user@xn--bcher-kva.de"),
        ("user@xn--bcher-kva.de", "user@xn--bcher-kva.de"),
        ("Jörg@example.test", "jörg@example.test"),
        ("Jo\u0308rg@example.test", "jörg@example.test"),  # NFD: the same sender as NFC
        ("\u212aelly@example.test", "kelly@example.test"),  # Kelvin sign: canonically K
        ("用户@例子.测试", "用户@xn--fsqu00a.xn--0zwm56d"),
        ("a@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.test", "a@example.test"),  # fullwidth
        # UTS 46 (nontransitional), through the idna package: case, width and compatibility
        # forms map to one A-label.
        ("a@MÜLLER.Example", "a@xn--mller-kva.example"),
        ("a@Mu\u0308ller.example", "a@xn--mller-kva.example"),  # NFD
        ("a@\uff4d\u00fc\uff4c\uff4c\uff45\uff52.example", "a@xn--mller-kva.example"),
        ("a@bücher\u3002de", "a@xn--bcher-kva.de"),  # ideographic full stop
        ("a@bücher\uff0ede", "a@xn--bcher-kva.de"),  # full-width full stop
        ("a@\u212aöln.example", "a@xn--kln-sna.example"),  # Kelvin sign: "k", as UTS 46 maps it
        ("a@straße.de", "a@xn--strae-oqa.de"),  # nontransitional: ß kept (IDNA 2003: ss)
        ("a@\u2460.test", "a@1.test"),  # circled digit one: a compatibility form of 1
        ("a@foo_bar.bücher.de", "a@foo_bar.xn--bcher-kva.de"),  # "_" next to an IDN label
        ("a@\u2603.test", "a@xn--n3h.test"),  # UTS 46 valid, IDNA 2008 refuses: encoded
        # Everything RFC 5321/6531 (and Postfix) accepts, in one canonical spelling.
        ('"System Administrator"@example.com', '"system administrator"@example.com'),
        ('<"System Administrator"@example.com>', '"system administrator"@example.com'),
        ('"ab"@example.test', "ab@example.test"),
        ('"A.b+c"@example.test', "a.b+c@example.test"),
        ('"a\\ b"@example.test', '"a b"@example.test'),
        ('"a\\"b"@example.test', '"a\\"b"@example.test'),
        ('"a\\\\b"@example.test', '"a\\\\b"@example.test'),
        ('"a@b"@example.test', '"a@b"@example.test'),
        ('"a<b>"@example.test', '"a<b>"@example.test'),
        ('""@example.test', '""@example.test'),
        ('"jörg m"@example.test', '"jörg m"@example.test'),
        ("a@[127.0.0.1]", "a@[127.0.0.1]"),
        ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
        ("a@[IPv6:2001:DB8:0:0::1]", "a@[ipv6:2001:db8::1]"),
        ("a@[x-tag:some-thing]", "a@[x-tag:some-thing]"),
        ("a@foo_bar.test", "a@foo_bar.test"),
        ("a@_dmarc.Example.test", "a@_dmarc.example.test"),
        ("<@relay.test:a@example.test>", "a@example.test"),
        ("<@r1.test,@r2.test:Bob@example.test>", "bob@example.test"),
        ("a" * 65 + "@example.test", "a" * 65 + "@example.test"),
        ("bounce-md_30850198.5f8d6f80.v1-" + "b" * 40 + "@mandrillapp.com", None),
    ],
)
def test_normalize_address_returns_lower_case_local_at_ascii_domain(
    raw: str, expected: str | None
) -> None:
    assert normalize_address(raw) == (raw if expected is None else expected)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("<>", id="null-sender"),
        pytest.param("< >", id="null-sender-with-space"),
        pytest.param("alice", id="no-at"),
        pytest.param("<alice>", id="no-at-in-brackets"),
        pytest.param("@example.test", id="empty-local"),
        pytest.param("alice@", id="empty-domain"),
        pytest.param("ali ce@example.test", id="space"),
        pytest.param("alice@exa mple.test", id="space-in-domain"),
        pytest.param("alice\r\n@example.test", id="crlf"),
        pytest.param("alice@example.test\r\nRCPT TO:<x@y>", id="smtp-injection"),
        pytest.param("ali\x00ce@example.test", id="nul"),
        pytest.param("ali\x7fce@example.test", id="del"),
        pytest.param("ali\x85ce@example.test", id="c1-control"),
        pytest.param("a@" + ".".join(["b" * 60] * 5), id="over-254"),
        pytest.param("a@" + "b" * 64 + ".test", id="label-over-63"),
        pytest.param("a@example..test", id="empty-label"),
        pytest.param("a@.example.test", id="leading-dot"),
        pytest.param("a@example.test.", id="trailing-dot"),
        pytest.param("a@-example.test", id="leading-hyphen"),
        pytest.param("a@example-.test", id="trailing-hyphen"),
        pytest.param("<a@example.test", id="unclosed-bracket"),
        pytest.param("a@example.test>", id="unopened-bracket"),
        pytest.param("<<a@example.test>>", id="double-brackets"),
        pytest.param("Alice <a@example.test>", id="display-name"),
        pytest.param("a@b@example.test", id="two-ats"),
        pytest.param("a@" + "x" * 2000, id="huge"),
        pytest.param("a" * 250 + "@example.test", id="local-makes-it-over-254"),
        pytest.param('"a b@example.test', id="unterminated-quote"),
        pytest.param('"a"b@example.test', id="text-after-quoted-local"),
        pytest.param('"a"', id="quoted-without-domain"),
        pytest.param('"a\x00b"@example.test', id="nul-in-quotes"),
        pytest.param('"a\tb"@example.test', id="tab-in-quotes"),
        pytest.param('"a\r\nb"@example.test', id="crlf-in-quotes"),
        pytest.param('"a\\"@example.test', id="quote-escaped-away"),
        pytest.param("a@[300.1.1.1]", id="literal-not-ipv4"),
        pytest.param("a@[192.0.2.1", id="literal-unterminated"),
        pytest.param("a@[IPv6:zz::1]", id="literal-not-ipv6"),
        pytest.param("a@[]", id="literal-empty"),
        pytest.param("a@[tag:]", id="literal-tag-without-content"),
        pytest.param("a@[1.2.3.4]x", id="text-after-literal"),
        pytest.param("<@relay.test a@example.test>", id="source-route-without-colon"),
        pytest.param("<@:a@example.test>", id="source-route-empty-hop"),
        pytest.param("a@exa mple_.test", id="space-with-underscore"),
        pytest.param("a@b\u00fccher\u0000.de", id="nul-in-idn"),
        pytest.param("a@b\u00fc\ufffe.de", id="noncharacter-in-idn"),  # UTS 46 disallowed
        pytest.param("a@" + "\u00fc" * 60 + ".de", id="idn-label-over-63-once-encoded"),
    ],
)
def test_unusable_address_is_rejected_with_address_error(raw: str) -> None:
    with pytest.raises(AddressError) as raised:
        normalize_address(raw)
    assert str(raised.value)


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)


def test_longest_allowed_address_is_accepted() -> None:
    address = "a" * 64 + "@" + ".".join(["b" * 63, "c" * 63, "d" * 61])
    assert len(address) == 254
    assert normalize_address(address) == address


@pytest.mark.parametrize("raw", ["", "<>", "< >", "  <>  ", " "])
def test_null_sender_forms_are_recognized(raw: str) -> None:
    assert is_null_sender(raw)


@pytest.mark.parametrize("raw", ["a@b", "<a@b>", "<", ">", "<<>>", "MAILER-DAEMON"])
def test_non_null_senders_are_not_null(raw: str) -> None:
    assert not is_null_sender(raw)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("confirm+abc@x.test", ("confirm@x.test", "abc")),
        (normalize_address("confirm+ABC@x.test"), ("confirm@x.test", "abc")),
        ("a@x", ("a@x", None)),
        ("a+b+c@x", ("a@x", "b+c")),
        ("a+@x", ("a@x", "")),
        ("+a@x", ("+a@x", None)),
        ('"a+b c"@x', ('"a+b c"@x', None)),
    ],
)
def test_split_extension_splits_at_first_delimiter(
    address: str, expected: tuple[str, str | None]
) -> None:
    assert split_extension(address) == expected


def test_split_extension_honours_another_delimiter() -> None:
    assert split_extension("bounces-tok+en@x.test", "-") == ("bounces@x.test", "tok+en")
    assert split_extension("a+b@x.test", "-") == ("a+b@x.test", None)


def test_split_extension_of_text_without_at_is_an_address_error() -> None:
    with pytest.raises(AddressError):
        split_extension("alice")


def test_domain_of_is_the_part_after_the_last_at() -> None:
    assert domain_of("alice@example.test") == "example.test"
    with pytest.raises(AddressError):
        domain_of("alice")


@pytest.mark.parametrize(
    ("address", "patterns"),
    [
        ("alice@example.test", ["alice@example.test"]),
        ("Alice@EXAMPLE.test", ["alice@example.test"]),
        ("alice@example.test", ["<ALICE@Example.Test>"]),
        ("alice+x@example.test", ["alice@example.test"]),
        ("alice+x@example.test", ["alice+x@example.test"]),
        ("alice@example.test", ["example.test"]),
        ("alice@example.test", ["EXAMPLE.TEST"]),
        ("alice@sub.example.test", [".example.test"]),
        ("alice@a.b.example.test", [".example.test"]),
        ("alice@bücher.de", ["BÜCHER.de"]),
        ("alice@example.test", ["nobody@else.test", "example.test"]),
    ],
)
def test_address_matches_pattern(address: str, patterns: list[str]) -> None:
    assert matches(address, patterns)


@pytest.mark.parametrize(
    ("address", "patterns"),
    [
        ("alice@example.test", []),
        ("bob@example.test", ["alice@example.test"]),
        ("alice@sub.example.test", ["example.test"]),
        ("alice@example.test", [".example.test"]),
        ("alice@badexample.test", [".example.test"]),
        ("alice@badexample.test", ["example.test"]),
        ("alice@example.test", ["alice+x@example.test"]),
        ("alice@example.test.evil", ["example.test"]),
        ("alice-x@example.test", ["alice@example.test"]),
    ],
)
def test_address_does_not_match_pattern(address: str, patterns: list[str]) -> None:
    assert not matches(address, patterns)


def test_matches_honours_another_delimiter() -> None:
    assert matches("alice-x@example.test", ["alice@example.test"], delimiter="-")
    assert not matches("alice+x@example.test", ["alice@example.test"], delimiter="-")


def test_invalid_pattern_is_an_address_error() -> None:
    with pytest.raises(AddressError):
        matches("alice@example.test", ["-bad-.test"])
    with pytest.raises(AddressError):
        normalize_pattern("@example.test")


def test_normalize_pattern_keeps_the_subdomain_dot() -> None:
    assert normalize_pattern(" .Example.TEST ") == ".example.test"
    assert normalize_pattern("Example.TEST") == "example.test"
    assert normalize_pattern("<Alice@Example.TEST>") == "alice@example.test"


_local_chars = st.sampled_from("abcXYZ019.+-_=!'éÖß用İ\"() <>@[]\\,;:\x00\r\n\t")
_label = st.text(st.sampled_from("abzAZ09-_éü例.。"), min_size=0, max_size=8)
_address_like = st.builds(
    lambda brackets, local, labels, pad: (
        f"{pad}{'<' if brackets else ''}{local}@{'.'.join(labels)}{'>' if brackets else ''}{pad}"
    ),
    st.booleans(),
    st.text(_local_chars, max_size=12),
    st.lists(_label, min_size=1, max_size=4),
    st.sampled_from(["", " ", "\t"]),
)

_plausible_address = st.builds(
    lambda local, labels: f"{local}@{'.'.join(labels)}",
    st.text(st.sampled_from("abcXYZ019.+-_=!'éÖß用İ"), min_size=1, max_size=12),
    st.lists(
        st.text(st.sampled_from("abzAZ09éü例"), min_size=1, max_size=8), min_size=1, max_size=4
    ),
)


@given(st.one_of(st.text(), _address_like, _plausible_address))
@example("İ@example.test")
@example("\ufb00@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.test")  # fullwidth
def test_normalize_is_idempotent_and_only_raises_address_error(raw: str) -> None:
    try:
        normalized = normalize_address(raw)
    except AddressError:
        return
    assert normalize_address(normalized) == normalized
    assert normalized == normalized.strip()
    assert domain_of(normalized).isascii()
    assert len(normalized.encode("utf-8")) <= 254
