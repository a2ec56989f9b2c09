"""Encryption at rest (`[storage] encryption_key_file` or SOURCEAUTH_ENCRYPTION_KEY): one
AES-GCM key for the events' state (eventsourcing's cipher, through CIPHER_TOPIC and
CIPHER_KEY) and for message originals (EncryptedBlobStore, around any blob store: the SQLite
or PostgreSQL table, or the files).

An original is stored as MAGIC, a 12-byte nonce, then AES-GCM's ciphertext and tag, with its
key (the receipt id) as associated data: an original moved under another key does not
decrypt. The nonce is synthetic, an HMAC of the key id and the plaintext's SHA-256 under the
key, so writing the same original again writes the same bytes (the stores' idempotent puts
keep working), and two different originals never share a nonce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sourceauth.adapters.storage.blobs import blob_ref
from sourceauth.engine.api import Blob
from sourceauth.engine.ports import BlobCorrupt, BlobStore, StagedBlobs

ENV_KEY = "SOURCEAUTH_ENCRYPTION_KEY"
CIPHER_TOPIC = "eventsourcing.cryptography:AESCipher"
MAGIC = b"SAE1"
NONCE = 12
KEY_SIZES = (16, 24, 32)
CHECK_LABEL = b"sourceauth encryption key check v1"
NOT_ENCRYPTED = "none"  # the store's record when no key was given at its first start


class EncryptionKeyError(ValueError):
    """The key cannot be used (missing file, loose permissions, not base64, wrong size)."""


def parse_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionKeyError(
            f"{where}: not base64 (make one with: head -c 32 /dev/urandom | base64)"
        ) from None
    if len(key) not in KEY_SIZES:
        raise EncryptionKeyError(
            f"{where}: an AES key is 16, 24 or 32 bytes, this one is {len(key)}"
        )
    return key


def load_key(path: Path | None, environ: Mapping[str, str]) -> bytes | None:
    """The key from `path` (owner-only permissions required) or else from the environment;
    None when neither gives one."""
    if path is None:
        text = environ.get(ENV_KEY, "")
        return parse_key(text, ENV_KEY) if text.strip() else None
    where = f"[storage] encryption_key_file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise EncryptionKeyError(f"{where}: cannot read it ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise EncryptionKeyError(
                f"{where}: readable by others (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
            )
        with os.fdopen(fd, "r", encoding="ascii", errors="replace", closefd=False) as fh:
            text = fh.read(4096)
    finally:
        os.close(fd)
    return parse_key(text, where)


def key_mark(key: bytes | None) -> str:
    """What the store records to recognise the key (an HMAC of a fixed label: never the key)."""
    if key is None:
        return NOT_ENCRYPTED
    return hmac.new(key, CHECK_LABEL, hashlib.sha256).hexdigest()[:32]


def cipher_env(key: bytes | None) -> dict[str, str]:
    """eventsourcing's settings: its AES-GCM cipher on every event's state, or none (set
    empty, so a stray CIPHER_KEY in the environment cannot switch it on)."""
    if key is None:
        return {"CIPHER_TOPIC": "", "CIPHER_KEY": ""}
    return {"CIPHER_TOPIC": CIPHER_TOPIC, "CIPHER_KEY": base64.b64encode(key).decode()}


class BlobCipher:
    """AES-GCM for originals, with the receipt id as associated data."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._nonce_key = hmac.new(key, b"sourceauth blob nonce v1", hashlib.sha256).digest()

    def encrypt(self, blob_key: str, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        nonce = hmac.new(self._nonce_key, blob_key.encode() + digest, hashlib.sha256).digest()
        nonce = nonce[:NONCE]
        return MAGIC + nonce + self._aead.encrypt(nonce, data, blob_key.encode())

    def decrypt(self, blob_key: str, stored: bytes) -> bytes:
        if not stored.startswith(MAGIC):
            raise BlobCorrupt(f"blob {blob_key} is not encrypted with a sourceauth key")
        nonce = stored[len(MAGIC) : len(MAGIC) + NONCE]
        try:
            return self._aead.decrypt(nonce, stored[len(MAGIC) + NONCE :], blob_key.encode())
        except InvalidTag:
            raise BlobCorrupt(f"blob {blob_key} does not decrypt with this key") from None


class EncryptedBlobStore:
    """A blob store whose bytes at rest are encrypted: the refs, sizes and SHA-256 the engine
    records are those of the plaintext original."""

    def __init__(self, inner: BlobStore, key: bytes) -> None:
        self.inner = inner
        self.cipher = BlobCipher(key)

    def _sealed(self, items: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return [(k, self.cipher.encrypt(k, d)) for k, d in items]

    def stage(self, items: Sequence[tuple[str, bytes]]) -> StagedBlobs:
        staged = self.inner.stage(self._sealed(items))
        return StagedBlobs(tuple(blob_ref(k, d) for k, d in items), staged.with_events)

    def put(self, key: str, data: bytes) -> Blob:
        return self.put_many([(key, data)])[0]

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[Blob]:
        self.inner.put_many(self._sealed(items))  # type: ignore[attr-defined]
        return [blob_ref(k, d) for k, d in items]

    def get(self, key: str, *, verify_sha256: str | None = None) -> bytes:
        data = self.cipher.decrypt(key, self.inner.get(key))
        if verify_sha256 is not None and hashlib.sha256(data).hexdigest() != verify_sha256.lower():
            raise BlobCorrupt(f"blob {key} does not match its recorded SHA-256")
        return data

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self.get(key))

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def delete_many(self, keys: Sequence[str]) -> int:
        return self.inner.delete_many(keys)

    def keys(self) -> Iterator[str]:
        return self.inner.keys()  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # close(), cleanup_temp(), root, ...


def derive_key(key: bytes, label: str) -> bytes:
    """A 32-byte subkey of the encryption key for one purpose (HKDF-SHA256, `label` as info):
    the views' sealing (viewcrypt.py) never uses the key of the events and originals itself."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), 32, salt=None, info=label.encode()).derive(key)
