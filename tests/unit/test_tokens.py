"""Specification of challenge tokens, keyed aggregate ids and the keyring file format."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sourceauth.engine.tokens import (
    TOKEN_LENGTH,
    Keyring,
    TokenClaims,
    TokenError,
    TokenExpired,
    TokenForged,
    TokenMalformed,
    TokenUnknownKey,
    aggregate_id,
    generate_keyring,
    mint,
    new_challenge_id,
    parse,
    parse_keyring,
    parse_thread_id,
    render_keyring,
    thread_id,
    verify,
    verify_thread_id,
)

SENDER = "alice@example.test"
SCOPE = "global"
NOW = 1_700_000_000
EXPIRES_AT = NOW + 7 * 86400
CHALLENGE_ID = bytes(range(10))
KEY_1 = b"k1" * 16
KEY_2 = b"k2" * 16
ID_KEY = b"id" * 16
KEYRING = Keyring(token_keys={1: KEY_1}, active_kid=1, id_key=ID_KEY)
BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def _mint(
    keyring: Keyring = KEYRING,
    *,
    challenge_id: bytes = CHALLENGE_ID,
    sender: str = SENDER,
    scope: str = SCOPE,
    expires_at: int = EXPIRES_AT,
) -> str:
    return mint(
        keyring, challenge_id=challenge_id, sender=sender, scope=scope, expires_at=expires_at
    )


def _verify(
    token: str,
    keyring: Keyring = KEYRING,
    *,
    sender: str = SENDER,
    scope: str = SCOPE,
    now: int = NOW,
) -> TokenClaims:
    return verify(keyring, token, sender=sender, scope=scope, now=now)


# Tokens


def test_minted_token_verifies_and_returns_its_claims() -> None:
    claims = _verify(_mint())
    assert claims == TokenClaims(kid=1, challenge_id=CHALLENGE_ID, expires_at=EXPIRES_AT // 60 * 60)


def test_parse_returns_the_claims_without_a_key() -> None:
    assert parse(_mint()) == _verify(_mint())


def test_expiry_is_truncated_to_the_whole_minute() -> None:
    claims = parse(_mint(expires_at=NOW + 119))
    assert claims.expires_at == (NOW + 119) // 60 * 60


def test_token_is_lower_case_base32_and_at_most_48_characters() -> None:
    token = _mint()
    assert len(token) == TOKEN_LENGTH <= 48
    assert re.fullmatch("[a-z2-7]+", token)


def test_upper_cased_token_verifies() -> None:
    assert _verify(_mint().upper()).challenge_id == CHALLENGE_ID


def test_mixed_case_token_verifies() -> None:
    token = _mint()
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(token))
    assert _verify(mixed).challenge_id == CHALLENGE_ID


def test_token_for_other_sender_is_refused_as_forged() -> None:
    with pytest.raises(TokenForged):
        _verify(_mint(), sender="mallory@example.test")


def test_token_for_other_scope_is_refused_as_forged() -> None:
    with pytest.raises(TokenForged):
        _verify(_mint(), scope="bob@example.test")


def test_token_with_other_challenge_id_is_refused_as_forged() -> None:
    genuine = _mint()
    other = _mint(challenge_id=bytes(10))
    # Graft the other challenge id onto the genuine MAC: chars 0..23 hold kid, id and expiry.
    spliced = other[:24] + genuine[24:]
    with pytest.raises(TokenForged):
        _verify(spliced)


def test_sender_and_scope_cannot_be_shifted_into_each_other() -> None:
    token = _mint(sender="a@b", scope="c")
    with pytest.raises(TokenForged):
        _verify(token, sender="a@bc", scope="")


def test_expired_token_is_refused_as_expired() -> None:
    token = _mint()
    with pytest.raises(TokenExpired):
        _verify(token, now=EXPIRES_AT // 60 * 60)
    assert _verify(token, now=EXPIRES_AT // 60 * 60 - 1)


def test_forged_and_expired_token_is_refused_as_forged() -> None:
    with pytest.raises(TokenForged):
        _verify(_mint(), sender="mallory@example.test", now=EXPIRES_AT + 86400)


def test_token_with_unknown_key_id_is_refused() -> None:
    other = Keyring(token_keys={7: KEY_1}, active_kid=7, id_key=ID_KEY)
    with pytest.raises(TokenUnknownKey):
        _verify(_mint(other))


def test_token_minted_with_old_key_still_verifies_after_rotation() -> None:
    old_token = _mint()
    rotated = Keyring(token_keys={1: KEY_1, 2: KEY_2}, active_kid=2, id_key=ID_KEY)
    new_token = _mint(rotated)
    assert parse(new_token).kid == 2
    assert _verify(old_token, rotated).kid == 1
    assert _verify(new_token, rotated).kid == 2


def test_token_of_retired_key_is_refused() -> None:
    old_token = _mint()
    retired = Keyring(token_keys={2: KEY_2}, active_kid=2, id_key=ID_KEY)
    with pytest.raises(TokenUnknownKey):
        _verify(old_token, retired)


def test_same_kid_with_another_secret_is_refused_as_forged() -> None:
    other = Keyring(token_keys={1: KEY_2}, active_kid=1, id_key=ID_KEY)
    with pytest.raises(TokenForged):
        _verify(_mint(), other)


def test_new_challenge_ids_are_ten_random_bytes() -> None:
    ids = {new_challenge_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(challenge_id) == 10 for challenge_id in ids)


@pytest.mark.parametrize("challenge_id", [b"", bytes(9), bytes(11)])
def test_mint_refuses_a_challenge_id_of_the_wrong_length(challenge_id: bytes) -> None:
    with pytest.raises(ValueError):
        _mint(challenge_id=challenge_id)


@pytest.mark.parametrize("expires_at", [-60, 2**32 * 60])
def test_mint_refuses_an_expiry_out_of_range(expires_at: int) -> None:
    with pytest.raises(ValueError):
        _mint(expires_at=expires_at)


_ALTERED_KEYRING = Keyring(token_keys={0: KEY_2, 1: KEY_1, 3: KEY_2}, active_kid=1, id_key=ID_KEY)


@given(
    position=st.integers(0, TOKEN_LENGTH - 1),
    replacement=st.characters(codec="utf-8"),
)
def test_every_single_character_change_is_refused(position: int, replacement: str) -> None:
    token = _mint(_ALTERED_KEYRING)
    if replacement.lower() == token[position]:
        return
    altered = token[:position] + replacement + token[position + 1 :]
    with pytest.raises(TokenError):
        _verify(altered, _ALTERED_KEYRING)


def test_every_base32_character_change_is_refused_as_forged_or_unknown_key() -> None:
    token = _mint(_ALTERED_KEYRING)
    for position, original in enumerate(token):
        for replacement in BASE32_ALPHABET.replace(original, ""):
            altered = token[:position] + replacement + token[position + 1 :]
            with pytest.raises((TokenForged, TokenUnknownKey)):
                _verify(altered, _ALTERED_KEYRING)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "a" * (TOKEN_LENGTH - 1),
        "a" * (TOKEN_LENGTH + 1),
        "a" * (TOKEN_LENGTH - 2) + "==",
        "a" * (TOKEN_LENGTH - 1) + "1",
        "a" * (TOKEN_LENGTH - 1) + "8",
        "a" * (TOKEN_LENGTH - 1) + "ß",
        " " + "a" * (TOKEN_LENGTH - 1),
        "a" * TOKEN_LENGTH + "\n",
    ],
)
def test_malformed_string_is_refused_as_malformed(text: str) -> None:
    with pytest.raises(TokenMalformed):
        parse(text)
    with pytest.raises(TokenMalformed):
        _verify(text)


@given(st.text() | st.text(alphabet=BASE32_ALPHABET + "=1890ABC", min_size=38, max_size=42))
def test_arbitrary_text_only_ever_raises_token_malformed(text: str) -> None:
    try:
        parse(text)
    except TokenMalformed:
        return
    assert len(text) == TOKEN_LENGTH


@given(st.text())
def test_verify_of_arbitrary_text_only_raises_token_errors(text: str) -> None:
    with pytest.raises(TokenError):
        _verify(text)


def test_token_errors_carry_a_short_human_message() -> None:
    for error_type in (TokenMalformed, TokenUnknownKey, TokenForged, TokenExpired):
        assert issubclass(error_type, TokenError)
    with pytest.raises(TokenForged) as raised:
        _verify(_mint(), sender="mallory@example.test")
    assert 0 < len(str(raised.value)) < 80


# Keyring


@pytest.mark.parametrize(
    ("token_keys", "active_kid", "id_key"),
    [
        pytest.param({}, 1, ID_KEY, id="no-token-keys"),
        pytest.param({1: KEY_1}, 2, ID_KEY, id="active-kid-missing"),
        pytest.param({1: b"short"}, 1, ID_KEY, id="short-token-key"),
        pytest.param({1: KEY_1}, 1, b"short", id="short-id-key"),
        pytest.param({256: KEY_1}, 256, ID_KEY, id="kid-over-255"),
        pytest.param({-1: KEY_1}, -1, ID_KEY, id="negative-kid"),
        pytest.param({1: "k" * 32}, 1, ID_KEY, id="str-key"),
    ],
)
def test_invalid_keyring_is_refused_with_value_error(
    token_keys: dict[int, bytes], active_kid: int, id_key: bytes
) -> None:
    with pytest.raises(ValueError):
        Keyring(token_keys=token_keys, active_kid=active_kid, id_key=id_key)


def test_keyring_repr_shows_no_key_material() -> None:
    text = repr(KEYRING) + str(KEYRING)
    assert KEY_1.hex() not in text and "k1k1" not in text and "idid" not in text


def test_keyring_does_not_change_when_the_callers_dict_does() -> None:
    keys = {1: KEY_1}
    keyring = Keyring(token_keys=keys, active_kid=1, id_key=ID_KEY)
    keys[2] = KEY_2
    assert list(keyring.token_keys) == [1]


def test_generated_keyring_has_random_32_byte_keys_with_kid_1() -> None:
    first, second = generate_keyring(), generate_keyring()
    assert first.active_kid == 1 and list(first.token_keys) == [1]
    assert len(first.token_keys[1]) == 32 and len(first.id_key) == 32
    assert first.token_keys[1] != second.token_keys[1] and first.id_key != second.id_key
    assert first.token_keys[1] != first.id_key


def test_rendered_keyring_parses_back_to_the_same_keyring() -> None:
    keyring = Keyring(token_keys={1: KEY_1, 2: KEY_2, 9: KEY_1}, active_kid=2, id_key=ID_KEY)
    assert parse_keyring(render_keyring(keyring)) == keyring
    generated = generate_keyring()
    assert parse_keyring(render_keyring(generated)) == generated


def test_keyring_file_ignores_comments_and_blank_lines() -> None:
    text = f"""
# sourceauth keys

id {ID_KEY.hex()}   # the id key never rotates
1 {KEY_1.hex()}
  2 {KEY_2.hex().upper()}
"""
    keyring = parse_keyring(text)
    assert keyring == Keyring(token_keys={1: KEY_1, 2: KEY_2}, active_kid=2, id_key=ID_KEY)


def test_keyring_file_active_line_overrides_the_highest_kid() -> None:
    text = f"id {ID_KEY.hex()}\nactive 1\n1 {KEY_1.hex()}\n2 {KEY_2.hex()}\n"
    assert parse_keyring(text).active_kid == 1


_GOOD_ID = f"id {ID_KEY.hex()}"
_GOOD_KEY = f"1 {KEY_1.hex()}"
_SECRET_HEX = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75e"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(f"{_GOOD_ID}\n{_GOOD_KEY}\n{_GOOD_ID}\n", 3, id="second-id"),
        pytest.param(f"{_GOOD_ID}\n\n1 {_SECRET_HEX}zz\n", 3, id="bad-hex"),
        pytest.param(f"{_GOOD_ID}\n1 {_SECRET_HEX}5\n", 2, id="odd-hex"),
        pytest.param(f"{_GOOD_ID}\n1 {_SECRET_HEX[:20]}\n", 2, id="short-key"),
        pytest.param(f"id {_SECRET_HEX[:20]}\n{_GOOD_KEY}\n", 1, id="short-id-key"),
        pytest.param(f"{_GOOD_ID}\n{_GOOD_KEY}\n1 {_SECRET_HEX}\n", 3, id="duplicate-kid"),
        pytest.param(f"{_GOOD_ID}\n256 {_SECRET_HEX}\n", 2, id="kid-over-255"),
        pytest.param(f"{_GOOD_ID}\nx1 {_SECRET_HEX}\n", 2, id="kid-not-a-number"),
        pytest.param(f"{_GOOD_ID}\n1 {_SECRET_HEX} {_SECRET_HEX}\n", 2, id="extra-field"),
        pytest.param(f"{_GOOD_ID}\n{_SECRET_HEX}\n", 2, id="missing-kid"),
        pytest.param(f"{_GOOD_ID}\n{_GOOD_KEY}\nactive 5\n", 3, id="active-without-key"),
        pytest.param(f"{_GOOD_ID}\n{_GOOD_KEY}\nactive 1\nactive 1\n", 4, id="second-active"),
        pytest.param(f"{_GOOD_ID}\n{_GOOD_KEY}\nactive {_SECRET_HEX}\n", 3, id="active-hex"),
    ],
)
def test_keyring_file_error_names_the_line_and_never_the_key(text: str, line: int) -> None:
    with pytest.raises(ValueError) as raised:
        parse_keyring(text)
    message = str(raised.value)
    assert f"line {line}:" in message
    assert _SECRET_HEX[:16] not in message.lower()
    assert ID_KEY.hex()[:16] not in message.lower()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(f"{_GOOD_KEY}\n", id="no-id"),
        pytest.param(f"{_GOOD_ID}\n", id="no-token-key"),
    ],
)
def test_keyring_file_missing_lines_are_refused(text: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_keyring(text)
    assert KEY_1.hex()[:16] not in str(raised.value)


# Aggregate ids


def test_aggregate_id_is_deterministic() -> None:
    assert aggregate_id(KEYRING, "sender", SCOPE, SENDER) == aggregate_id(
        KEYRING, "sender", SCOPE, SENDER
    )
    assert isinstance(aggregate_id(KEYRING, "sender", SCOPE, SENDER), uuid.UUID)


@given(st.lists(st.text().filter(lambda t: "\0" not in t), min_size=1, max_size=3))
def test_aggregate_id_is_the_keyed_hmac_sha256_of_its_nul_joined_parts(parts: list[str]) -> None:
    """Stored ids depend on this formula: a faster HMAC must give the same ids."""
    import hashlib
    import hmac

    message = "\0".join(("sender", *parts)).encode("utf-8", "surrogatepass")
    digest = hmac.new(KEYRING.id_key, message, hashlib.sha256).digest()
    assert aggregate_id(KEYRING, "sender", *parts) == uuid.UUID(bytes=digest[:16], version=4)


def test_aggregate_id_refuses_nul_in_its_kind_or_parts() -> None:
    for kind, parts in (("sen\0der", ("a",)), ("sender", ("a\0", "b")), ("sender", ("a", "\0"))):
        with pytest.raises(ValueError, match="NUL"):
            aggregate_id(KEYRING, kind, *parts)


def test_aggregate_id_differs_per_id_key() -> None:
    other = Keyring(token_keys={1: KEY_1}, active_kid=1, id_key=KEY_2)
    assert aggregate_id(KEYRING, "sender", SCOPE, SENDER) != aggregate_id(
        other, "sender", SCOPE, SENDER
    )


def test_aggregate_id_ignores_token_key_rotation() -> None:
    rotated = Keyring(token_keys={1: KEY_1, 2: KEY_2}, active_kid=2, id_key=ID_KEY)
    assert aggregate_id(rotated, "sender", SENDER) == aggregate_id(KEYRING, "sender", SENDER)


def test_aggregate_id_differs_per_kind_and_part() -> None:
    ids = {
        aggregate_id(KEYRING, "sender", SCOPE, SENDER),
        aggregate_id(KEYRING, "domain", SCOPE, SENDER),
        aggregate_id(KEYRING, "sender", "bob@example.test", SENDER),
        aggregate_id(KEYRING, "sender", SCOPE, "bob@example.test"),
        aggregate_id(KEYRING, "sender", SCOPE + SENDER),
        aggregate_id(KEYRING, "sender", SENDER, SCOPE),
    }
    assert len(ids) == 6


def test_aggregate_id_cannot_be_guessed_with_uuid5() -> None:
    derived = aggregate_id(KEYRING, "sender", SENDER)
    for namespace in (uuid.NAMESPACE_DNS, uuid.NAMESPACE_URL, uuid.NAMESPACE_OID):
        assert derived != uuid.uuid5(namespace, SENDER)
        assert derived != uuid.uuid5(namespace, f"sender\0{SENDER}")


@pytest.mark.parametrize("parts", [(), ("a\0b",)])
def test_aggregate_id_refuses_ambiguous_input(parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        aggregate_id(KEYRING, "sender", *parts)


# --- the challenge's Message-ID (a tokenless reply threads onto it) ---------------------------


def _thread(keyring: Keyring = KEYRING, **changes: object) -> str:
    args: dict[str, object] = {
        "challenge_id": CHALLENGE_ID,
        "sender": SENDER,
        "scope": SCOPE,
        "kid": 1,
    }
    args.update(changes)
    return thread_id(keyring, **args)  # type: ignore[arg-type]


def test_thread_id_names_its_challenge_and_verifies() -> None:
    msgid = f"<{_thread()}@mx.example.test>"
    assert parse_thread_id(msgid) == (CHALLENGE_ID, 1)
    verify_thread_id(KEYRING, msgid, challenge_id=CHALLENGE_ID, sender=SENDER, scope=SCOPE, kid=1)


def test_thread_id_tag_is_128_bits_and_keyed() -> None:
    tag = _thread().rsplit(".", 1)[1]
    assert len(tag) == 26 and set(tag) <= set(BASE32_ALPHABET)  # 26 x 5 bits >= 128
    other = Keyring(token_keys={1: KEY_2}, active_kid=1, id_key=ID_KEY)
    assert _thread(other) != _thread()


@pytest.mark.parametrize(
    "changes",
    [{"sender": "mallory@example.test"}, {"scope": "bob@example.test"}],
)
def test_thread_id_of_another_sender_or_scope_is_refused_as_forged(
    changes: dict[str, str],
) -> None:
    msgid = _thread(**changes) + "@mx.example.test"
    with pytest.raises(TokenForged):
        verify_thread_id(
            KEYRING, msgid, challenge_id=CHALLENGE_ID, sender=SENDER, scope=SCOPE, kid=1
        )


def test_thread_id_of_a_retired_key_is_refused() -> None:
    msgid = _thread() + "@mx.example.test"
    rotated = Keyring(token_keys={2: KEY_2}, active_kid=2, id_key=ID_KEY)
    with pytest.raises(TokenUnknownKey):
        verify_thread_id(
            rotated, msgid, challenge_id=CHALLENGE_ID, sender=SENDER, scope=SCOPE, kid=1
        )


@given(st.text(max_size=200))
def test_arbitrary_message_ids_never_raise_when_parsed(text: str) -> None:
    found = parse_thread_id(text)
    assert found is None or len(found[0]) == 10
