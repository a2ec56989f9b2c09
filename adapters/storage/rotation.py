"""Encryption key rotation: what each key still protects, re-encrypting the originals under
the current key, and retiring a key nothing uses any more.

Event state is never rewritten: the log is immutable and the audit chain (chain.py) is an
HMAC over each event's stored bytes, the ciphertext, so a rewritten state would break
`audit verify` and every seal an auditor keeps. A key that encrypted events therefore stays
in the key set for reading them (new events use the current key from the node's restart on);
originals are rewritten under the current key, in batches, each batch atomic (an
interrupted rotation leaves every original under its old or its new key: both readable;
running it again carries on).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from sourceauth.adapters.storage.blobs import FileBlobStore
from sourceauth.adapters.storage.encryption import (
    BLOB_MAGIC,
    EVENT_MAGIC,
    KEY_ID_BYTES,
    EncryptedBlobStore,
    KeySet,
    blob_key_id,
)
from sourceauth.adapters.storage.sqlite import BLOB_TABLE
from sourceauth.adapters.storage.views import KEYRING
from sourceauth.adapters.storage.wiring import (
    CONNECT_TIMEOUT,
    ENCRYPTION,
    ENCRYPTION_KEY,
    Storage,
    recorded_encryption,
)

log = structlog.get_logger(__name__)

LEGACY = ""  # ciphertexts from before key ids: all under the store's first key
BATCH = 200


class KeyInUse(ValueError):
    """The key cannot be retired: something still needs it (the message says what)."""


@dataclass(frozen=True)
class KeyUse:
    """One key of the store and what it protects."""

    id: str
    current: bool  # the key new writes use on this node
    first: bool  # the store's first key (events from before key ids are under it)
    held: bool  # in this node's key set
    recorded: bool  # in the store's record (nodes must hold it)
    events: int
    originals: int

    @property
    def retirable(self) -> bool:
        return not (self.current or self.first or self.events or self.originals)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.id,
            "current": self.current,
            "first": self.first,
            "held": self.held,
            "recorded": self.recorded,
            "events": self.events,
            "originals": self.originals,
            "retirable": self.retirable,
        }


@contextmanager
def _db(storage: Storage) -> Iterator[tuple[Callable[..., list[Any]], str]]:
    """A query function over the store's database and the table prefix (schema)."""
    if storage.kind == "sqlite":
        assert storage.sqlite_path is not None
        conn = sqlite3.connect(storage.sqlite_path, timeout=30.0, isolation_level=None)
        try:
            yield (lambda q, a=(): conn.execute(q, a).fetchall()), ""
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(
        storage.conninfo(), connect_timeout=CONNECT_TIMEOUT, autocommit=True
    ) as pg:

        def run(q: str, a: Sequence[Any] = ()) -> list[Any]:
            cur = pg.execute(q.replace("?", "%s"), tuple(a))
            return cur.fetchall() if cur.description else []

        yield run, f'"{storage.pg_schema or "public"}".'


def _by_key(rows: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kid, n in rows:
        name = bytes(kid).hex() if kid is not None else LEGACY
        counts[name] = counts.get(name, 0) + int(n)
    return counts


def _head_counts(
    run: Callable[..., list[Any]], table: str, column: str, magic: bytes, postgres: bool
) -> dict[str, int]:
    """How many rows of `table` are under each key id (LEGACY: no id), counted in SQL."""
    if postgres:
        head = f"substring({column} from 1 for {len(magic)})"
        kid = f"substring({column} from {len(magic) + 1} for {KEY_ID_BYTES})"
    else:
        head = f"substr({column}, 1, {len(magic)})"
        kid = f"substr({column}, {len(magic) + 1}, {KEY_ID_BYTES})"
    sql = f"SELECT CASE WHEN {head} = ? THEN {kid} END AS k, count(*) FROM {table} GROUP BY k"
    return _by_key(run(sql, (magic,)))


def _tables(run: Callable[..., list[Any]], storage: Storage) -> set[str]:
    if storage.kind == "sqlite":
        return {str(r[0]) for r in run("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {
        str(r[0])
        for r in run(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
            (storage.pg_schema or "public",),
        )
    }


def usage(storage: Storage, keys: KeySet) -> list[KeyUse]:
    """Every key this node holds or the store records, with the events and originals under
    it (those from before key ids counted under the store's first key)."""
    recorded = recorded_encryption(storage) or {}
    postgres = storage.kind == "postgresql"
    with _db(storage) as (run, prefix):
        tables = _tables(run, storage)
        events_table = "sourceauth_events" if postgres else "stored_events"
        events = (
            _head_counts(run, prefix + events_table, "state", EVENT_MAGIC, postgres)
            if events_table in tables
            else {}
        )
        if storage.blob_location == "database":
            originals = (
                _head_counts(run, prefix + BLOB_TABLE, "data", BLOB_MAGIC, postgres)
                if BLOB_TABLE in tables
                else {}
            )
        else:
            originals = _file_counts(FileBlobStore(storage.blob_dir, fsync=False))
    first = keys.by_mark(recorded.get(ENCRYPTION, ""))
    first_id = first.id if first is not None else LEGACY
    for counts in (events, originals):
        if LEGACY in counts:
            counts[first_id] = counts.get(first_id, 0) + counts.pop(LEGACY)
    recorded_ids = {n.removeprefix(ENCRYPTION_KEY) for n in recorded if n != ENCRYPTION}
    ids = list(keys.ids) + sorted((recorded_ids | set(events) | set(originals)) - set(keys.ids))
    return [
        KeyUse(
            id=kid or "(unknown first key)",
            current=kid == keys.current.id,
            first=kid == first_id,
            held=kid in keys.by_id,
            recorded=kid in recorded_ids or kid == first_id,
            events=events.get(kid, 0),
            originals=originals.get(kid, 0),
        )
        for kid in ids
    ]


def _file_counts(files: FileBlobStore) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in files.keys():
        try:
            with open(files.path_of(key), "rb") as fh:
                head = fh.read(len(BLOB_MAGIC) + KEY_ID_BYTES)
        except FileNotFoundError:
            continue
        kid = blob_key_id(head) or LEGACY
        counts[kid] = counts.get(kid, 0) + 1
    return counts


def rotate_originals(
    blobs: EncryptedBlobStore, on_batch: Callable[[int, int], None] | None = None
) -> int:
    """Re-encrypt every original not under the current key, BATCH per transaction; how many
    were rewritten. `on_batch(seen, rewritten)` after each batch."""
    keys = list(blobs.keys())
    done = 0
    for start in range(0, len(keys), BATCH):
        batch = keys[start : start + BATCH]
        n = blobs.rekey(batch)
        done += n
        log.info("originals_rekeyed", batch=len(batch), rewritten=n, total=done)
        if on_batch is not None:
            on_batch(start + len(batch), done)
    return done


def retire(storage: Storage, keys: KeySet, kid: str) -> KeyUse:
    """Remove a key from the store's record (nodes may then drop it from their key files),
    or KeyInUse naming what still needs it."""
    found = {u.id: u for u in usage(storage, keys)}
    use = found.get(kid)
    if use is None:
        raise KeyInUse(f"no key {kid} in this store or in this node's key set")
    if use.current:
        raise KeyInUse(
            f"key {kid} is the current key (first in the key file): put the new key first, "
            "restart every node, run 'sourceauth encryption rotate', then retire it"
        )
    if use.first:
        raise KeyInUse(
            f"key {kid} is the store's first key: the events written before key ids and the "
            "views' lookup keys depend on it; it stays in every node's key set"
        )
    if use.events or use.originals:
        raise KeyInUse(
            f"key {kid} still encrypts {use.events} event(s) and {use.originals} original(s): "
            "originals move with 'sourceauth encryption rotate'; events are never rewritten "
            "(the audit chain covers their stored bytes), so a key that encrypted events "
            "stays in the key set"
        )
    with _db(storage) as (run, prefix):
        run(f"DELETE FROM {prefix}{KEYRING} WHERE name = ?", (ENCRYPTION_KEY + kid,))
    log.info("encryption_key_retired", key=kid)
    return use
