"""Challenge tokens: mint and verify the HMAC token carried in a confirm address extension.

Also derives keyed aggregate ids, purpose keys and the audit chain key, signs review
links, and reads and writes the secret keyring text format.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

TOKEN_VERSION = 1
CHALLENGE_ID_BYTES = 10
MAC_BYTES = 10
MIN_KEY_BYTES = 16
GENERATED_KEY_BYTES = 32
# kid (1) | challenge id (10) | expiry minutes (4) | MAC (10) = 25 bytes = 40 base32 characters.
_HEADER = struct.Struct(f">B{CHALLENGE_ID_BYTES}sI")
_RAW_BYTES = _HEADER.size + MAC_BYTES
TOKEN_LENGTH = _RAW_BYTES * 8 // 5
_BASE32_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz234567ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MAX_MINUTES = 2**32 - 1
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_REVIEW_MAX = 2048  # characters of a review link token
THREAD_TAG_BYTES = 16  # 128 bits: the challenge's Message-ID is as hard to guess as a key
_THREAD_RE = re.compile(
    rf"challenge\.([0-9a-f]{{{CHALLENGE_ID_BYTES * 2}}})\.([0-9]{{1,3}})\.([a-z2-7]{{26}})\Z"
)


class TokenError(Exception):
    """A token that does not confirm anything; str(error) is a short human message."""


class TokenMalformed(TokenError):
    """The text is not a token at all."""


class TokenUnknownKey(TokenError):
    """The token names a key id that is not (or no longer) in the keyring."""


class TokenForged(TokenError):
    """The MAC does not match: altered token, or another sender, scope or challenge."""


class TokenExpired(TokenError):
    """A genuine token whose expiry time has passed."""


@dataclass(frozen=True)
class Keyring:
    """Token keys by key id (every one verifies, the active one mints) and the id key."""

    token_keys: Mapping[int, bytes]
    active_kid: int
    id_key: bytes

    def __post_init__(self) -> None:
        if not self.token_keys:
            raise ValueError("keyring has no token keys")
        for kid, secret in self.token_keys.items():
            if isinstance(kid, bool) or not isinstance(kid, int) or not 0 <= kid <= 255:
                raise ValueError(f"key id {kid!r} is not an integer from 0 to 255")
            _check_secret(secret, f"token key {kid}")
        _check_secret(self.id_key, "id key")
        if self.active_kid not in self.token_keys:
            raise ValueError(f"active key id {self.active_kid!r} is not among the token keys")
        # A read-only copy, so a caller mutating its dict cannot change a live keyring.
        object.__setattr__(self, "token_keys", MappingProxyType(dict(self.token_keys)))

    def __repr__(self) -> str:
        return f"Keyring(kids={sorted(self.token_keys)}, active_kid={self.active_kid})"


@dataclass(frozen=True)
class TokenClaims:
    """What a token says, before or after its MAC has been checked."""

    kid: int
    challenge_id: bytes
    expires_at: int


def new_challenge_id() -> bytes:
    """Return a fresh random challenge id."""
    return secrets.token_bytes(CHALLENGE_ID_BYTES)


def mint(keyring: Keyring, *, challenge_id: bytes, sender: str, scope: str, expires_at: int) -> str:
    """Return a token for this challenge, sender and scope, signed with the active key.

    expires_at (unix seconds) is truncated to the whole minute; sender must be normalized.
    """
    if len(challenge_id) != CHALLENGE_ID_BYTES:
        raise ValueError(f"challenge id must be {CHALLENGE_ID_BYTES} bytes")
    minutes = expires_at // 60
    if not 0 <= minutes <= _MAX_MINUTES:
        raise ValueError("expires_at is out of range")
    claims = TokenClaims(keyring.active_kid, bytes(challenge_id), minutes * 60)
    header = _HEADER.pack(claims.kid, claims.challenge_id, minutes)
    mac = _mac(keyring.token_keys[claims.kid], claims, sender, scope)
    return base64.b32encode(header + mac).decode("ascii").lower()


def parse(token: str) -> TokenClaims:
    """Decode a token's structure without checking its MAC; raise TokenMalformed if malformed."""
    return _decode(token)[0]


def verify(keyring: Keyring, token: str, *, sender: str, scope: str, now: int) -> TokenClaims:
    """Return the claims of a genuine, unexpired token for this sender and scope.

    Raises TokenMalformed, TokenUnknownKey, TokenForged or TokenExpired. The MAC is checked
    before the expiry so that a forger never learns whether a token would have expired.
    """
    claims, mac = _decode(token)
    key = keyring.token_keys.get(claims.kid)
    if key is None:
        raise TokenUnknownKey("token key is unknown or retired")
    if not hmac.compare_digest(mac, _mac(key, claims, sender, scope)):
        raise TokenForged("token does not match this sender and scope")
    if now >= claims.expires_at:
        raise TokenExpired("token has expired")
    return claims


def thread_id(keyring: Keyring, *, challenge_id: bytes, sender: str, scope: str, kid: int) -> str:
    """The local part of the challenge's Message-ID, "challenge.<id hex>.<kid>.<tag>": the tag
    is 128 bits of HMAC over the challenge, its sender and scope under a key derived from token
    key `kid` (KeyError when retired), so a reply threaded onto it proves it saw the challenge."""
    message = challenge_id + _length_prefixed(sender) + _length_prefixed(scope)
    mac = hmac.new(derived_key(keyring, "challenge message-id", kid), message, hashlib.sha256)
    tag = base64.b32encode(mac.digest()[:THREAD_TAG_BYTES]).decode("ascii").rstrip("=").lower()
    return f"challenge.{challenge_id.hex()}.{kid}.{tag}"


def parse_thread_id(message_id: str) -> tuple[bytes, int] | None:
    """(challenge id, kid) named by a Message-ID of the thread_id form ("<local@host>" or
    "local@host"), before its tag is checked; None for any other Message-ID."""
    local = message_id.strip().removeprefix("<").removesuffix(">").rpartition("@")[0]
    found = _THREAD_RE.match(local) if len(local) <= 80 else None
    if found is None:
        return None
    return bytes.fromhex(found.group(1)), int(found.group(2))


def verify_thread_id(
    keyring: Keyring, message_id: str, *, challenge_id: bytes, sender: str, scope: str, kid: int
) -> None:
    """Raise TokenUnknownKey or TokenForged unless `message_id` carries this challenge's tag."""
    if kid not in keyring.token_keys:
        raise TokenUnknownKey("challenge Message-ID key is unknown or retired")
    local = message_id.strip().removeprefix("<").removesuffix(">").rpartition("@")[0]
    expected = thread_id(keyring, challenge_id=challenge_id, sender=sender, scope=scope, kid=kid)
    if not hmac.compare_digest(local.encode("ascii", "replace"), expected.encode("ascii")):
        raise TokenForged("challenge Message-ID does not match this challenge")


def derived_key(keyring: Keyring, purpose: str, kid: int | None = None) -> bytes:
    """A key for one purpose (e.g. "review link"), derived from a token key (default: the
    active one), so no web secret needs a file of its own and rotation follows the keyring."""
    key = keyring.token_keys[keyring.active_kid if kid is None else kid]
    return hmac.new(key, b"sourceauth derived key\0" + purpose.encode(), hashlib.sha256).digest()


def sign_review_link(keyring: Keyring, recipient: str, expires_at: int) -> str:
    """A URL-safe token that opens `recipient`'s quarantine until expires_at (unix seconds)."""
    body = f"{keyring.active_kid}.{expires_at}.{_b64(recipient.encode('utf-8'))}"
    return f"{body}.{_b64(_review_mac(keyring, keyring.active_kid, body))}"


def verify_review_link(keyring: Keyring, link: str, *, now: int) -> str:
    """The recipient a genuine, unexpired review link names; raises TokenMalformed,
    TokenUnknownKey, TokenForged or TokenExpired (MAC checked before the expiry)."""
    parts = link.split(".") if isinstance(link, str) and len(link) <= _REVIEW_MAX else []
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts[:2]):
        raise TokenMalformed("not a review link")
    kid, expires_at = int(parts[0]), int(parts[1])
    if kid not in keyring.token_keys:
        raise TokenUnknownKey("link key is unknown or retired")
    expected = _b64(_review_mac(keyring, kid, ".".join(parts[:3])))
    if not hmac.compare_digest(parts[3].encode("ascii", "replace"), expected.encode("ascii")):
        raise TokenForged("link signature does not match")
    if now >= expires_at:
        raise TokenExpired("link has expired")
    try:
        return base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4)).decode("utf-8")
    except ValueError:
        raise TokenMalformed("not a review link") from None


def _review_mac(keyring: Keyring, kid: int, body: str) -> bytes:
    key = derived_key(keyring, "review link", kid)
    return hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def audit_chain_key(keyring: Keyring) -> bytes:
    """The key of the log's hash chain, derived from the id key: stable across token key
    rotation and shared by every node of one keyring, never stored in the database."""
    return hmac.new(keyring.id_key, b"sourceauth audit chain v1", hashlib.sha256).digest()


class Mac:
    """HMAC-SHA256 (RFC 2104) under one key, with the padded key hashed once: each digest
    copies the two keyed SHA-256 states (the hmac module's copy() costs more than hashing)."""

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        block = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


@functools.lru_cache(maxsize=8)  # one id key per keyring: its keyed states hashed once
def _id_mac(id_key: bytes) -> Mac:
    return Mac(id_key)


def aggregate_id(keyring: Keyring, kind: str, *parts: str) -> uuid.UUID:
    """Derive a stable id, e.g. aggregate_id(keyring, "sender", scope, address).

    Keyed with the id key so that nobody can compute an id from an address (as with uuid5).
    kind and parts must not contain NUL and there must be at least one part, which keeps
    the NUL-joined input unambiguous.
    """
    if not parts:
        raise ValueError("aggregate_id needs at least one part")
    joined = "\0".join((kind, *parts))
    if joined.count("\0") != len(parts):  # one NUL between each two: none inside
        raise ValueError("aggregate_id kind and parts must not contain NUL")
    digest = _id_mac(keyring.id_key).digest(joined.encode("utf-8", "surrogatepass"))
    return uuid.UUID(bytes=digest[:16], version=4)


FINGERPRINT_LABEL = b"sourceauth keyring fingerprint v1"


def fingerprints(keyring: Keyring) -> dict[str, str]:
    """What identifies this keyring without revealing it: an HMAC of a fixed label under the
    id key, and under each token key by key id. Nodes that share a store must agree on every
    name they both have; a new key id (rotation) adds a name."""

    def mark(key: bytes) -> str:
        return hmac.new(key, FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:32]

    found = {"id key": mark(keyring.id_key)}
    found.update({f"token key {kid}": mark(key) for kid, key in sorted(keyring.token_keys.items())})
    return found


def parse_keyring(text: str) -> Keyring:
    """Read the keyring secret-file format; ValueError names the line, never key material.

    Lines: "id <hex>" (exactly one), "<kid> <hex>" per token key, optionally "active <kid>"
    (default: the highest kid). "#" starts a comment; blank lines are ignored.
    """
    id_key: bytes | None = None
    token_keys: dict[int, bytes] = {}
    active: tuple[int, int] | None = None  # (kid, line number)
    for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"line {number}: expected 'id <hex>', '<kid> <hex>' or 'active <kid>'")
        name, value = fields
        if name == "id":
            if id_key is not None:
                raise ValueError(f"line {number}: second 'id' line")
            id_key = _parse_secret(value, number)
        elif name == "active":
            if active is not None:
                raise ValueError(f"line {number}: second 'active' line")
            active = (_parse_kid(value, number), number)
        else:
            kid = _parse_kid(name, number)
            if kid in token_keys:
                raise ValueError(f"line {number}: key id {kid} appears twice")
            token_keys[kid] = _parse_secret(value, number)
    if id_key is None:
        raise ValueError("keyring has no 'id' line")
    if not token_keys:
        raise ValueError("keyring has no token key lines ('<kid> <hex>')")
    if active is None:
        active_kid = max(token_keys)
    else:
        active_kid, number = active
        if active_kid not in token_keys:
            raise ValueError(f"line {number}: active key id {active_kid} has no key line")
    return Keyring(token_keys=token_keys, active_kid=active_kid, id_key=id_key)


def render_keyring(keyring: Keyring) -> str:
    """Write a keyring in the format parse_keyring reads."""
    lines = [
        "# sourceauth keyring (secret). Rotate: add '<kid> <hex>' and 'active <kid>'.",
        f"id {keyring.id_key.hex()}",
        *(f"{kid} {keyring.token_keys[kid].hex()}" for kid in sorted(keyring.token_keys)),
        f"active {keyring.active_kid}",
    ]
    return "\n".join(lines) + "\n"


def generate_keyring() -> Keyring:
    """Return a new keyring with a random id key and one random token key, kid 1."""
    return Keyring(
        token_keys={1: secrets.token_bytes(GENERATED_KEY_BYTES)},
        active_kid=1,
        id_key=secrets.token_bytes(GENERATED_KEY_BYTES),
    )


def _decode(token: str) -> tuple[TokenClaims, bytes]:
    if not isinstance(token, str) or len(token) != TOKEN_LENGTH:
        raise TokenMalformed(f"token is not {TOKEN_LENGTH} characters long")
    if not set(token) <= _BASE32_CHARS:
        raise TokenMalformed("token has characters outside the base32 alphabet")
    raw = base64.b32decode(token.upper())
    kid, challenge_id, minutes = _HEADER.unpack_from(raw)
    return TokenClaims(kid, challenge_id, minutes * 60), raw[_HEADER.size :]


def _mac(key: bytes, claims: TokenClaims, sender: str, scope: str) -> bytes:
    message = b"".join(
        (
            bytes((TOKEN_VERSION,)),
            _HEADER.pack(claims.kid, claims.challenge_id, claims.expires_at // 60),
            _length_prefixed(sender),
            _length_prefixed(scope),
        )
    )
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_BYTES]


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return struct.pack(">I", len(data)) + data


def _check_secret(secret: object, name: str) -> None:
    if not isinstance(secret, bytes):
        raise ValueError(f"{name} must be bytes")
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"{name} is shorter than {MIN_KEY_BYTES} bytes")


def _parse_kid(value: str, number: int) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) > 255:
        raise ValueError(f"line {number}: key id is not an integer from 0 to 255")
    return int(value)


def _parse_secret(value: str, number: int) -> bytes:
    if len(value) % 2 or not set(value) <= _HEX_DIGITS:
        raise ValueError(f"line {number}: key is not an even number of hex digits")
    secret = bytes.fromhex(value)
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"line {number}: key is shorter than {MIN_KEY_BYTES} bytes")
    return secret
