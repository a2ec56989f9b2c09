"""Encryption at rest (`[storage] encryption_key_file` or SOURCEAUTH_ENCRYPTION_KEY): a key
set of AES-GCM keys for the events' state (KeySetCipher, through eventsourcing's CIPHER_TOPIC
and CIPHER_KEY) and for message originals (EncryptedBlobStore, around any blob store: the
SQLite or PostgreSQL table, or the files).

The key file holds one base64 key per line, the current one first (new writes use it); the
others only decrypt what was written under them. Each key has a short id (8 hex digits, an
HMAC of a fixed label under the key: the same key has the same id on every node), and every
ciphertext starts with a magic and the id of its key, so reads pick the key without trying:

  event state: EVENT_MAGIC | key id (4) | nonce (12) | AES-GCM(state, aad=EVENT_MAGIC|key id)
  original:    BLOB_MAGIC  | key id (4) | nonce (12) | AES-GCM(original, aad=receipt id)

Ciphertexts from before key ids existed (eventsourcing's AESCipher layout for events, the
LEGACY_BLOB_MAGIC layout for originals) carry no id: they are tried with each key in turn,
the tag telling which one fits. An original's nonce is synthetic, an HMAC of the receipt id
and the plaintext's SHA-256 under the key, so writing the same original again under the same
key writes the same bytes (the stores' idempotent puts keep working), and two different
originals never share a nonce.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.persistence import Cipher
from eventsourcing.utils import Environment

from sourceauth.adapters.storage.blobs import blob_ref
from sourceauth.engine.api import Blob
from sourceauth.engine.ports import BlobCorrupt, BlobNotFound, BlobStore, StagedBlobs

ENV_KEY = "SOURCEAUTH_ENCRYPTION_KEY"
CIPHER_TOPIC = "sourceauth.adapters.storage.encryption:KeySetCipher"
LEGACY_BLOB_MAGIC = b"SAE1"  # an original from before key ids: MAGIC | nonce | ciphertext
BLOB_MAGIC = b"SAE2"
EVENT_MAGIC = b"SAK\x01"
KEY_ID_BYTES = 4
NONCE = 12
TAG = 16
KEY_SIZES = (16, 24, 32)
MAX_KEYS = 64
CHECK_LABEL = b"sourceauth encryption key check v1"
ID_LABEL = b"sourceauth encryption key id v1"
NOT_ENCRYPTED = "none"  # the store's record when no key was given at its first start


class EncryptionKeyError(ValueError):
    """The key cannot be used (missing file, loose permissions, not base64, wrong size)."""


class UnknownEncryptionKey(ValueError):
    """A ciphertext names a key id that is not in this node's key set (or no key fits it)."""


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


def key_id(secret: bytes) -> str:
    """A key's short id: 8 hex digits, the same for the same key everywhere (never the key)."""
    return hmac.new(secret, ID_LABEL, hashlib.sha256).hexdigest()[: 2 * KEY_ID_BYTES]


def key_mark(key: bytes | None) -> str:
    """What the store records to recognise a key (an HMAC of a fixed label: never the key)."""
    if key is None:
        return NOT_ENCRYPTED
    return hmac.new(key, CHECK_LABEL, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Key:
    """One AES key with its id and mark (the secret is left out of repr)."""

    secret: bytes = field(repr=False)
    id: str = field(init=False)
    mark: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", key_id(self.secret))
        object.__setattr__(self, "mark", key_mark(self.secret))

    @property
    def raw_id(self) -> bytes:
        return bytes.fromhex(self.id)


@dataclass(frozen=True)
class KeySet:
    """The keys this node holds, the current one (for every new write) first."""

    keys: tuple[Key, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise EncryptionKeyError("an encryption key set needs at least one key")
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise EncryptionKeyError("the same encryption key is listed twice")

    @classmethod
    def of(cls, *secrets: bytes) -> KeySet:
        return cls(tuple(Key(s) for s in secrets))

    @classmethod
    def parse(cls, text: str, where: str) -> KeySet:
        """One base64 key per line (or separated by commas), current first; blank lines and
        lines starting with # are ignored."""
        lines = [
            (n, line.strip())
            for n, line in enumerate(text.replace(",", "\n").splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")
        ]
        items = [
            parse_key(line, f"{where} (key {i}, line {n})" if len(lines) > 1 else where)
            for i, (n, line) in enumerate(lines, start=1)
        ]
        if not items:
            raise EncryptionKeyError(f"{where}: no key in it")
        if len(items) > MAX_KEYS:
            raise EncryptionKeyError(f"{where}: {len(items)} keys, at most {MAX_KEYS}")
        try:
            return cls.of(*items)
        except EncryptionKeyError as exc:
            raise EncryptionKeyError(f"{where}: {exc}") from None

    @property
    def current(self) -> Key:
        """The key every new write uses."""
        return self.keys[0]

    @property
    def by_id(self) -> Mapping[str, Key]:
        return {k.id: k for k in self.keys}

    def by_mark(self, mark: str) -> Key | None:
        return next((k for k in self.keys if k.mark == mark), None)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k.id for k in self.keys)

    def serialise(self) -> str:
        """The set as eventsourcing's CIPHER_KEY setting (base64 keys, comma-separated)."""
        return ",".join(base64.b64encode(k.secret).decode() for k in self.keys)


def load_keys(path: Path | None, environ: Mapping[str, str]) -> KeySet | None:
    """The key set from `path` (owner-only permissions required) or else from the
    environment; None when neither gives one."""
    if path is None:
        text = environ.get(ENV_KEY, "")
        return KeySet.parse(text, ENV_KEY) if text.strip() else None
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
            text = fh.read(65536)
    finally:
        os.close(fd)
    return KeySet.parse(text, where)


def cipher_env(keys: KeySet | None) -> dict[str, str]:
    """eventsourcing's settings: KeySetCipher on every event's state, or none (set empty, so
    a stray CIPHER_KEY in the environment cannot switch it on)."""
    if keys is None:
        return {"CIPHER_TOPIC": "", "CIPHER_KEY": ""}
    return {"CIPHER_TOPIC": CIPHER_TOPIC, "CIPHER_KEY": keys.serialise()}


def event_key_id(state: bytes) -> str | None:
    """The id of the key an event's stored state is under; None: from before key ids."""
    if state[: len(EVENT_MAGIC)] == EVENT_MAGIC and len(state) >= len(EVENT_MAGIC) + KEY_ID_BYTES:
        return state[len(EVENT_MAGIC) : len(EVENT_MAGIC) + KEY_ID_BYTES].hex()
    return None


def blob_key_id(stored: bytes) -> str | None:
    """The id of the key an original at rest is under; None: from before key ids."""
    if stored[: len(BLOB_MAGIC)] == BLOB_MAGIC and len(stored) >= len(BLOB_MAGIC) + KEY_ID_BYTES:
        return stored[len(BLOB_MAGIC) : len(BLOB_MAGIC) + KEY_ID_BYTES].hex()
    return None


class KeySetCipher(Cipher):
    """eventsourcing's cipher over a key set: AES-GCM under the current key, its id in front;
    a state from before key ids (eventsourcing's AESCipher: nonce | tag | ciphertext) is
    tried with each key."""

    def __init__(self, environment: Environment) -> None:
        text = environment.get("CIPHER_KEY")
        if not text:
            raise OSError("'CIPHER_KEY' not in env")
        self.keys = KeySet.parse(text, "CIPHER_KEY")
        self._aead = {k.id: AESGCM(k.secret) for k in self.keys.keys}
        self._head = EVENT_MAGIC + self.keys.current.raw_id
        self._current = self._aead[self.keys.current.id]

    def encrypt(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return self._head + nonce + self._current.encrypt(nonce, plaintext, self._head)

    def decrypt(self, ciphertext: bytes) -> bytes:
        kid = event_key_id(ciphertext)
        if kid is not None:
            aead = self._aead.get(kid)
            start = len(EVENT_MAGIC) + KEY_ID_BYTES
            if aead is not None:
                try:
                    return aead.decrypt(
                        ciphertext[start : start + NONCE],
                        ciphertext[start + NONCE :],
                        ciphertext[:start],
                    )
                except InvalidTag:
                    pass  # (a legacy state may start with the magic by chance: try below)
        nonce, tag, body = ciphertext[:NONCE], ciphertext[NONCE : NONCE + TAG], ciphertext[28:]
        for aead in reversed(self._aead.values()):  # the oldest key first: likeliest here
            try:
                return aead.decrypt(nonce, body + tag, None)
            except InvalidTag:
                continue
        if kid is not None and kid not in self._aead:
            raise UnknownEncryptionKey(
                f"an event is encrypted with key {kid}, which is not in this node's key set "
                f"({', '.join(self.keys.ids)}): add it to [storage] encryption_key_file"
            )
        raise UnknownEncryptionKey("an event's state does not decrypt with any key in the set")


class BlobCipher:
    """AES-GCM for originals under a key set, with the receipt id as associated data."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys
        self._aead = {k.id: AESGCM(k.secret) for k in keys.keys}
        self._nonce_keys = {
            k.id: hmac.new(k.secret, b"sourceauth blob nonce v1", hashlib.sha256).digest()
            for k in keys.keys
        }

    def encrypt(self, blob_key: str, data: bytes) -> bytes:
        kid = self.keys.current.id
        digest = hashlib.sha256(data).digest()
        nonce = hmac.new(self._nonce_keys[kid], blob_key.encode() + digest, hashlib.sha256)
        iv = nonce.digest()[:NONCE]
        head = BLOB_MAGIC + self.keys.current.raw_id
        return head + iv + self._aead[kid].encrypt(iv, data, blob_key.encode())

    def decrypt(self, blob_key: str, stored: bytes) -> bytes:
        kid = blob_key_id(stored)
        if kid is not None:
            aead = self._aead.get(kid)
            if aead is None:
                raise BlobCorrupt(
                    f"blob {blob_key} is encrypted with key {kid}, which is not in this node's "
                    f"key set ({', '.join(self.keys.ids)}): add it to [storage] "
                    "encryption_key_file"
                )
            start = len(BLOB_MAGIC) + KEY_ID_BYTES
            candidates = [aead]
        elif stored.startswith(LEGACY_BLOB_MAGIC):
            start = len(LEGACY_BLOB_MAGIC)
            candidates = list(reversed(self._aead.values()))
        else:
            raise BlobCorrupt(f"blob {blob_key} is not encrypted with a sourceauth key")
        nonce, body = stored[start : start + NONCE], stored[start + NONCE :]
        for aead in candidates:
            try:
                return aead.decrypt(nonce, body, blob_key.encode())
            except InvalidTag:
                continue
        raise BlobCorrupt(f"blob {blob_key} does not decrypt with this key set") from None

    def is_current(self, stored: bytes) -> bool:
        return blob_key_id(stored) == self.keys.current.id


class EncryptedBlobStore:
    """A blob store whose bytes at rest are encrypted: the refs, sizes and SHA-256 the engine
    records are those of the plaintext original."""

    def __init__(self, inner: BlobStore, keys: KeySet) -> None:
        self.inner = inner
        self.cipher = BlobCipher(keys)

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

    def rekey(self, keys: Sequence[str]) -> int:
        """Re-encrypt these originals under the current key (those under another key or from
        before key ids), each replaced only if unchanged meanwhile; how many were rewritten.
        Atomic per store call: an interrupted call leaves each original old or new, both
        readable."""
        items = []
        for key in keys:
            try:
                stored = self.inner.get(key)
            except BlobNotFound:
                continue  # (purged meanwhile)
            if not self.cipher.is_current(stored):
                fresh = self.cipher.encrypt(key, self.cipher.decrypt(key, stored))
                items.append((key, stored, fresh))
        if not items:
            return 0
        return int(self.inner.replace_many(items))  # type: ignore[attr-defined]

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
