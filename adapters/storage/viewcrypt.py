"""The view tables sealed at rest (with `[storage] encryption_key_file`): every column that
holds an address, a domain, a subject or other text of the mail is AES-GCM ciphertext.

Sealing is deterministic (SIV-style: the nonce is an HMAC of the context and the plaintext),
so a rebuilt view equals the live one byte for byte and a value can be found by equality:
- LOOKUP columns (an address or a domain searched by equality, or a key) are sealed under a
  context shared by every row of that kind: equal plaintexts give equal ciphertexts, so
  `WHERE sender = ?`, primary keys and ON CONFLICT keep working on the sealed value;
- ROW columns (only displayed) are bound to their row's key and column: equal subjects in
  two rows do not look equal, and a value moved to another row does not open;
- LIST columns (newline-joined recipients) seal each address as LOOKUP, so a recipient is
  still found by a LIKE on its whole line;
- REASON columns are ROW, except that a cap's deferral prefix stays readable (maintenance
  selects the copies held over a cap by it).
Plaintext is padded to a multiple of 16 bytes before sealing: lengths leak only roughly.
The key is derived from the encryption key (HKDF, its own label); what a reader of the
tables still learns (equality of LOOKUP values, row counts, states, times) is in
docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sourceauth.adapters.storage.chain import keyed
from sourceauth.adapters.storage.encryption import derive_key
from sourceauth.engine import projections as p
from sourceauth.engine.service.caps import DEFERRED_PREFIXES

LOOKUP, ROW, LIST, REASON = "lookup", "row", "list", "reason"
ADDRESS, DOMAIN = "address", "domain"  # the LOOKUP contexts
LABEL = "sourceauth views v1"
NONCE = 12
CACHE = 65_536  # sealed LOOKUP values (and opened ones) remembered: recipients repeat

# table -> column -> (kind, LOOKUP context); every other column is stored as it is
# (ids are random or keyed hashes already; states, times, counts are not the mail's).
COLUMNS: dict[str, dict[str, tuple[str, str]]] = {
    p.WHITELIST: {
        "address": (LOOKUP, ADDRESS),
        "scope": (ROW, ""),
        "via": (ROW, ""),
        "reason": (REASON, ""),
    },
    p.CHALLENGES: {
        "address": (ROW, ""),
        "domain": (ROW, ""),
        "scope": (ROW, ""),
        "diagnostic": (ROW, ""),
        "subject": (ROW, ""),
        "in_reply_to": (ROW, ""),
        "recipient": (ROW, ""),
    },
    p.QUARANTINE: {
        "sender": (LOOKUP, ADDRESS),
        "recipients": (LIST, ADDRESS),
        "subject": (ROW, ""),
        "reason": (REASON, ""),
    },
    p.DELIVERY: {  # sender and recipients are copied from the quarantine row in SQL
        "sender": (LOOKUP, ADDRESS),
        "recipients": (LIST, ADDRESS),
    },
    p.HELD_COUNTS: {"recipient": (LOOKUP, ADDRESS)},
    p.RULES: {
        "pattern": (ROW, ""),
        "scope": (ROW, ""),
        "reason": (ROW, ""),
        "actor": (ROW, ""),
    },
}


class SealBroken(ValueError):
    """A sealed view value does not open with this key (altered, moved, or another key)."""


Plan = tuple[int, tuple[tuple[int, str, str, str], ...]]  # key index, (index, kind, ctx, column)


def _cached(
    cache: dict[tuple[str, str], str], context: str, text: str, fn: Callable[[str, str], str]
) -> str:
    if not text:
        return text
    found = cache.get((context, text))
    if found is None:
        if len(cache) >= CACHE:
            cache.clear()
        found = cache[(context, text)] = fn(context, text)
    return found


def _cell(
    kind: str,
    context: str,
    column: str,
    key: Any,
    value: Any,
    lookup: Callable[[str, str], str],
    bound: Callable[[str, str], str],
) -> Any:
    """One cell sealed or opened (`lookup` and `bound` do one or the other)."""
    if not value or not isinstance(value, str):
        return value  # '' and None stay as they are (SQL writes '' for unset text)
    if kind == LOOKUP:
        return lookup(context, value)
    if kind == LIST:
        return "\n".join(lookup(context, v) for v in value.split("\n") if v)
    row_context = f"{column}\0{key}"
    if kind == REASON:
        for prefix in DEFERRED_PREFIXES:
            if value.startswith(prefix):
                rest = value[len(prefix) :]
                return prefix + (bound(row_context, rest) if rest else "")
    return bound(row_context, value)


class ViewSealer:
    """Seals and opens view values under a key derived from the encryption key."""

    def __init__(self, key: bytes) -> None:
        sub = derive_key(key, LABEL)
        self._aead = AESGCM(derive_key(sub, "aead"))
        self._nonce = keyed(derive_key(sub, "nonce"))  # HMAC-SHA256, its keyed states hashed once
        self._sealed: dict[tuple[str, str], str] = {}
        self._opened: dict[tuple[str, str], str] = {}
        self._plans: dict[tuple[str, tuple[str, ...]], Plan] = {}

    # ---------------------------------------------------------------- one value

    def _seal(self, context: str, text: str) -> str:
        data = text.encode()
        data += b"\x80" + bytes(-(len(data) + 1) % 16)
        aad = context.encode()
        nonce = self._nonce.digest(len(aad).to_bytes(4, "big") + aad + data)[:NONCE]
        return base64.b64encode(nonce + self._aead.encrypt(nonce, data, aad)).decode()

    def _open(self, context: str, sealed: str) -> str:
        try:
            raw = base64.b64decode(sealed, validate=True)
            data = self._aead.decrypt(raw[:NONCE], raw[NONCE:], context.encode())
        except (binascii.Error, ValueError, InvalidTag):
            where = context.split("\0")[0]
            raise SealBroken(f"a sealed view value does not open ({where})") from None
        return data.rstrip(b"\0")[:-1].decode()

    def lookup(self, context: str, text: str) -> str:
        """The sealed form of `text` every LOOKUP column of this context holds ('' stays '')."""
        return _cached(self._sealed, context, text, self._seal)

    def open_lookup(self, context: str, sealed: str) -> str:
        return _cached(self._opened, context, sealed, self._open)

    def address(self, text: str) -> str:
        return self.lookup(ADDRESS, text)

    def domain(self, text: str) -> str:
        return self.lookup(DOMAIN, text)

    def seal(self, kind: str, context: str, column: str, key: Any, value: Any) -> Any:
        return _cell(kind, context, column, key, value, self.lookup, self._seal)

    def open(self, kind: str, context: str, column: str, key: Any, value: Any) -> Any:
        return _cell(kind, context, column, key, value, self.open_lookup, self._open)

    # ---------------------------------------------------------------- rows and row operations

    def values(self, table: str, key: Any, values: dict[str, Any]) -> dict[str, Any]:
        """An upsert's or update's column values, sealed (a new dict; None: nothing to seal)."""
        policy = COLUMNS.get(table)
        if not policy or not any(c in policy for c in values):
            return values
        out = dict(values)
        for column, value in values.items():
            rule = policy.get(column)
            if rule is not None:
                out[column] = self.seal(rule[0], rule[1], column, key, value)
        return out

    def value(self, table: str, column: str, key: Any, value: Any) -> Any:
        kind, context = COLUMNS[table][column]
        return self.seal(kind, context, column, key, value)

    def _plan(self, table: str, columns: tuple[str, ...]) -> Plan:
        found = self._plans.get((table, columns))
        if found is None:
            policy = COLUMNS.get(table, {})
            pk = p.TABLES[table][0][0]
            found = (
                columns.index(pk) if pk in columns else -1,
                tuple((i, *policy[c], c) for i, c in enumerate(columns) if c in policy),
            )
            self._plans[(table, columns)] = found
        return found

    def _map_row(
        self,
        fn: Callable[[str, str, str, Any, Any], Any],
        table: str,
        columns: tuple[str, ...],
        row: Sequence[Any],
    ) -> tuple[Any, ...]:
        key_at, cells = self._plan(table, columns)
        if not cells:
            return tuple(row)
        out = list(row)
        key = row[key_at] if key_at >= 0 else None
        for i, kind, context, column in cells:
            if kind in (ROW, REASON) and key_at < 0:
                raise ValueError(f"{table}.{column} opens only with the row's key selected")
            out[i] = fn(kind, context, column, key, row[i])
        return tuple(out)

    def seal_row(self, table: str, columns: tuple[str, ...], row: Sequence[Any]) -> tuple[Any, ...]:
        return self._map_row(self.seal, table, columns, row)

    def open_row(self, table: str, columns: tuple[str, ...], row: Sequence[Any]) -> tuple[Any, ...]:
        return self._map_row(self.open, table, columns, row)
