"""Encryption key sets: the key file's format, key ids in every ciphertext, and ciphertexts from
before key ids (eventsourcing's AESCipher for events, the SAE1 layout for originals) still
decrypting under a key set that holds their key anywhere."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.cryptography import AESCipher
from eventsourcing.utils import Environment

from sourceauth.adapters.storage.encryption import (
    LEGACY_BLOB_MAGIC,
    BlobCipher,
    EncryptionKeyError,
    KeySet,
    KeySetCipher,
    UnknownEncryptionKey,
    blob_key_id,
    cipher_env,
    event_key_id,
)
from sourceauth.engine.ports import BlobCorrupt

K1, K2, K3 = (os.urandom(32) for _ in range(3))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def event_cipher(keys: KeySet) -> KeySetCipher:
    return KeySetCipher(Environment(env=cipher_env(keys)))


def test_the_key_file_lists_keys_current_first_with_comments() -> None:
    keys = KeySet.parse(f"# rotated 2026-12\n{b64(K2)}\n\n  {b64(K1)}  \n", "file")
    assert [k.secret for k in keys.keys] == [K2, K1]
    assert keys.current.secret == K2 and len(keys.current.id) == 8
    assert set(keys.by_id) == {keys.current.id, KeySet.of(K1).current.id}
    assert b64(K2) not in repr(keys) and str(K2) not in repr(keys)
    assert KeySet.parse(f"{b64(K2)},{b64(K1)}", "env").ids == keys.ids


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key in it"),
        ("# only a comment\n", "no key in it"),
        (f"{b64(K1)}\n{b64(K1)}\n", "the same encryption key is listed twice"),
        (f"{b64(K1)}\nnot-base64!\n", "file (key 2, line 2): not base64"),
        (b64(os.urandom(20)), "file: an AES key is 16, 24 or 32 bytes, this one is 20"),
    ],
)
def test_a_bad_key_file_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(EncryptionKeyError, match=re.escape(message)):
        KeySet.parse(text, "file")


def test_event_state_carries_its_key_id_and_decrypts_under_any_set_holding_that_key() -> None:
    old, new = event_cipher(KeySet.of(K1)), event_cipher(KeySet.of(K2, K1))
    sealed_old, sealed_new = old.encrypt(b"state one"), new.encrypt(b"state two")
    assert event_key_id(sealed_old) == KeySet.of(K1).current.id
    assert event_key_id(sealed_new) == KeySet.of(K2).current.id
    assert new.decrypt(sealed_old) == b"state one"
    assert event_cipher(KeySet.of(K1, K2)).decrypt(sealed_new) == b"state two"
    with pytest.raises(UnknownEncryptionKey, match="not in this node's key set"):
        old.decrypt(sealed_new)


def test_event_state_from_before_key_ids_decrypts_with_its_key_anywhere_in_the_set() -> None:
    legacy = AESCipher(Environment(env={"CIPHER_KEY": b64(K1)})).encrypt(b"legacy state")
    assert event_cipher(KeySet.of(K3, K2, K1)).decrypt(legacy) == b"legacy state"
    with pytest.raises(UnknownEncryptionKey, match="does not decrypt with any key"):
        event_cipher(KeySet.of(K2)).decrypt(legacy)


def legacy_blob(key: bytes, blob_key: str, data: bytes) -> bytes:
    """An original as the single-key version wrote it: SAE1 | nonce | AES-GCM."""
    nonce_key = hmac.new(key, b"sourceauth blob nonce v1", hashlib.sha256).digest()
    digest = hashlib.sha256(data).digest()
    nonce = hmac.new(nonce_key, blob_key.encode() + digest, hashlib.sha256).digest()[:12]
    return LEGACY_BLOB_MAGIC + nonce + AESGCM(key).encrypt(nonce, data, blob_key.encode())


def test_originals_carry_their_key_id_and_old_ones_still_decrypt() -> None:
    rotated = BlobCipher(KeySet.of(K2, K1))
    old = legacy_blob(K1, "r1", b"original one")
    assert blob_key_id(old) is None and not rotated.is_current(old)
    assert rotated.decrypt("r1", old) == b"original one"
    fresh = rotated.encrypt("r1", b"original one")
    assert blob_key_id(fresh) == KeySet.of(K2).current.id and rotated.is_current(fresh)
    assert fresh == rotated.encrypt("r1", b"original one")  # idempotent puts still hold
    assert rotated.decrypt("r1", fresh) == b"original one"
    with pytest.raises(BlobCorrupt, match="not in this node's key set"):
        BlobCipher(KeySet.of(K1)).decrypt("r1", fresh)
    with pytest.raises(BlobCorrupt, match="does not decrypt"):
        rotated.decrypt("r2", fresh)  # moved under another receipt id
