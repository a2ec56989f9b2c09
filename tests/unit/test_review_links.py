"""Signed review links (engine/tokens.py): they name one recipient until they expire, and any
change to them, another key, or the passing of time makes them open nothing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sourceauth.engine.tokens import (
    Keyring,
    TokenExpired,
    TokenForged,
    TokenMalformed,
    TokenUnknownKey,
    derived_key,
    sign_review_link,
    verify_review_link,
)

KEYRING = Keyring(token_keys={1: b"k1" * 16}, active_kid=1, id_key=b"id" * 16)
NOW = 1_700_000_000


def test_a_review_link_names_its_recipient_until_it_expires() -> None:
    link = sign_review_link(KEYRING, "bob@example.test", NOW + 60)
    assert verify_review_link(KEYRING, link, now=NOW) == "bob@example.test"
    with pytest.raises(TokenExpired):
        verify_review_link(KEYRING, link, now=NOW + 60)


def test_a_review_link_is_url_safe() -> None:
    link = sign_review_link(KEYRING, "bücher+x/y?z@example.test", NOW + 60)
    assert set(link) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def test_another_recipient_or_expiry_under_the_same_mac_is_forged() -> None:
    bob = sign_review_link(KEYRING, "bob@example.test", NOW + 60)
    erin = sign_review_link(KEYRING, "erin@example.test", NOW + 60)
    kid, expires, _, mac = bob.split(".")
    with pytest.raises(TokenForged):
        verify_review_link(KEYRING, f"{kid}.{expires}.{erin.split('.')[2]}.{mac}", now=NOW)
    with pytest.raises(TokenForged):
        verify_review_link(
            KEYRING, f"{kid}.{int(expires) + 3600}.{bob.split('.')[2]}.{mac}", now=NOW
        )


def test_a_link_signed_with_a_retired_or_other_key_opens_nothing() -> None:
    other = Keyring(token_keys={1: b"zz" * 16}, active_kid=1, id_key=b"id" * 16)
    with pytest.raises(TokenForged):
        verify_review_link(KEYRING, sign_review_link(other, "bob@example.test", NOW + 60), now=NOW)
    rotated = Keyring(token_keys={2: b"k2" * 16}, active_kid=2, id_key=b"id" * 16)
    with pytest.raises(TokenUnknownKey):
        verify_review_link(
            rotated, sign_review_link(KEYRING, "bob@example.test", NOW + 60), now=NOW
        )


@pytest.mark.parametrize("text", ["", "x", "1.2.3", "a.b.c.d", "1.2.3.4.5", "1." + "9" * 3000])
def test_malformed_links_are_refused(text: str) -> None:
    with pytest.raises(TokenMalformed):
        verify_review_link(KEYRING, text, now=NOW)


@given(st.text(min_size=1, max_size=80), st.integers(min_value=0, max_value=200))
def test_any_single_character_change_is_refused(recipient: str, position: int) -> None:
    link = sign_review_link(KEYRING, recipient, NOW + 60)
    i = position % len(link)
    changed = link[:i] + ("A" if link[i] != "A" else "B") + link[i + 1 :]
    with pytest.raises((TokenForged, TokenMalformed, TokenUnknownKey)):
        verify_review_link(KEYRING, changed, now=NOW)


def test_derived_keys_differ_by_purpose_and_from_the_token_key() -> None:
    review, csrf = derived_key(KEYRING, "review link"), derived_key(KEYRING, "web csrf")
    assert review != csrf and KEYRING.token_keys[1] not in (review, csrf)
