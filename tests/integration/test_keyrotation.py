"""Encryption key rotation on a live store (issue 8, item 5): two engines share one store
(SQLite file, or a PostgreSQL schema), each reads what the other wrote under either key;
`encryption rotate` moves every original to the current key, survives a kill -9 in the
middle of a batch (resumable, nothing unreadable); a key still in use cannot be retired;
`audit verify` stays sound (event state is never rewritten: the chain covers its bytes)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.adapters.runtime import build_engine
from sourceauth.adapters.storage.audit import verify
from sourceauth.adapters.storage.encryption import (
    BLOB_MAGIC,
    EncryptedBlobStore,
    KeySet,
    blob_key_id,
)
from sourceauth.adapters.storage.rotation import KeyInUse, retire, rotate_originals, usage
from sourceauth.adapters.storage.wiring import (
    EncryptionMismatch,
    Storage,
    first_key,
    open_blobs,
    open_engine,
)
from sourceauth.engine import tokens
from sourceauth.engine.application import SourceAuth
from tests.conftest import events_since, incoming, settings_for
from tests.integration.pg import PgSchema, pg_schema_fixture, postgres
from tests.integration.test_nodes import sourceauth as cli

K1, K2, K3 = (os.urandom(32) for _ in range(3))
PROTECTED = "bob@example.test"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg() -> Iterator[PgSchema]:
    yield from pg_schema_fixture()


def sqlite_storage(tmp: Path) -> Storage:
    return Storage(sqlite_path=tmp / "sourceauth.db", blob_dir=tmp / "blobs", blob_fsync=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        yield sqlite_storage(tmp_path)
    else:
        for schema in pg_schema_fixture():
            yield schema.storage(tmp_path / "blobs")


def engine(storage: Storage, keyring: tokens.Keyring, *keys: bytes) -> SourceAuth:
    return open_engine(
        settings=settings_for(),
        keyring=keyring,
        storage=replace(storage, encryption_keys=KeySet.of(*keys)),
    )


def hold(app: SourceAuth, sender: str) -> tuple[str, bytes]:
    """A first message from `sender`, held: its original's key and bytes."""
    msg = incoming(app, sender, PROTECTED, body=f"secret from {sender}\r\n")
    app.receive(msg)
    assert app.blobs is not None
    return msg.blob.key, app.blobs.get(msg.blob.key)


def held_senders(app: SourceAuth) -> set[str]:
    app.catch_up()
    return {m.sender for m in app.quarantine()}


def raw_key_ids(storage: Storage, keys: list[str]) -> list[str | None]:
    inner = open_blobs(replace(storage, encryption_keys=None))
    try:
        return [blob_key_id(inner.get(k)) for k in keys]
    finally:
        inner.close()


def counts(storage: Storage, *keys: bytes) -> dict[str, tuple[int, int]]:
    return {u.id: (u.events, u.originals) for u in usage(storage, KeySet.of(*keys))}


def kid(secret: bytes) -> str:
    return KeySet.of(secret).current.id


def test_two_engines_rotate_a_live_store_and_read_each_other_under_either_key(
    store: Storage, keyring: tokens.Keyring
) -> None:
    a = engine(store, keyring, K1)
    key1, data1 = hold(a, "one@remote.test")
    # Stage K2 on node B (read only), then make it A's current key: A writes under K2 while
    # B still writes under K1, and each reads what the other wrote.
    b = engine(store, keyring, K1, K2)
    a.close()
    a = engine(store, keyring, K2, K1)
    key2, data2 = hold(a, "two@remote.test")
    key3, data3 = hold(b, "three@remote.test")
    assert raw_key_ids(store, [key1, key2, key3]) == [kid(K1), kid(K2), kid(K1)]
    everyone = {"one@remote.test", "two@remote.test", "three@remote.test"}
    for app in (a, b):
        assert held_senders(app) == everyone  # every event decrypted, either key
        assert app.blobs is not None
        assert [app.blobs.get(k) for k in (key1, key2, key3)] == [data1, data2, data3]
    assert counts(store, K2, K1)[kid(K1)][1] == 2
    # The sealed views are keyed from the store's first key, not the current one: a sender
    # allowed at A (current K2) is found at B (current K1) by the same sealed lookup value,
    # and a held recipient's count is one row, whichever node wrote it.
    a.authorize("friend@partner.test", actor="test")
    a.catch_up()
    b.catch_up()
    for app in (a, b):
        assert app.sender("friend@partner.test").state == "authorized"
        assert app.quarantine_full("x@remote.test", PROTECTED) is False
    assert held_senders(b) == held_senders(a)
    # A node that lacks a key the store has met is refused, naming the key.
    with pytest.raises(EncryptionMismatch, match=f"lacks key.*{kid(K2)}"):
        engine(store, keyring, K1).close()

    b.close()
    b = engine(store, keyring, K2, K1)
    blobs = open_blobs(replace(store, encryption_keys=KeySet.of(K2, K1)))
    assert isinstance(blobs, EncryptedBlobStore)
    try:
        assert rotate_originals(blobs) == 2
        assert rotate_originals(blobs) == 0  # nothing left: a second run is a no-op
    finally:
        blobs.close()
    assert raw_key_ids(store, [key1, key2, key3]) == [kid(K2)] * 3
    use = counts(store, K2, K1)
    assert use[kid(K1)][1] == 0 and use[kid(K1)][0] > 0  # its events stay (immutable log)
    assert use[kid(K2)][1] == 3
    for app in (a, b):
        assert app.blobs is not None
        assert [app.blobs.get(k) for k in (key1, key2, key3)] == [data1, data2, data3]
    # The views' derived keys follow the store's first key, whichever key is current.
    first = first_key(replace(store, encryption_keys=KeySet.of(K2, K1)))
    assert first is not None and first.id == kid(K1)
    with pytest.raises(KeyInUse, match="first key"):
        retire(store, KeySet.of(K2, K1), kid(K1))
    with pytest.raises(KeyInUse, match="current key"):
        retire(store, KeySet.of(K2, K1), kid(K2))

    # A key staged but never used can be retired; then nodes may drop it.
    c = engine(store, keyring, K2, K1, K3)
    c.close()
    with pytest.raises(EncryptionMismatch, match=kid(K3)):
        engine(store, keyring, K2, K1).close()
    retire(store, KeySet.of(K2, K1, K3), kid(K3))
    d = engine(store, keyring, K2, K1)
    fault, summary = verify(d)
    assert fault is None, fault
    assert len(events_since(d, 0)) > 0
    for app in (a, b, d):
        app.close()


KILLER = """
import json, os, signal, sys
from pathlib import Path
from sourceauth.adapters.storage.encryption import KeySet
from sourceauth.adapters.storage.rotation import rotate_originals
from sourceauth.adapters.storage.wiring import Storage, open_blobs

spec = json.loads(sys.argv[1])
path = spec.pop("sqlite_path", None)
storage = Storage(
    **spec,
    sqlite_path=Path(path) if path else None,
    blob_dir=Path(sys.argv[3]),
    encryption_keys=KeySet.parse(sys.argv[2], "argv"),
)
blobs = open_blobs(storage)
inner = blobs.inner
real = inner.replace_many
batches = []


def dying(items):
    batches.append(len(items))
    if len(batches) == 2:  # the second batch: kill -9 half way through its transaction

        class Dying(list):
            def __iter__(self):
                for n, item in enumerate(list.__iter__(self)):
                    if n == len(self) // 2:
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield item

        items = Dying(items)
    return real(items)


inner.replace_many = dying
rotate_originals(blobs)
"""


def test_a_rotation_killed_mid_batch_leaves_everything_readable_and_resumes(
    store: Storage, keyring: tokens.Keyring, tmp_path: Path
) -> None:
    a = engine(store, keyring, K1)
    originals = dict(hold(a, f"s{i}@remote.test") for i in range(450))  # 3 batches of 200
    a.close()
    keys = KeySet.of(K2, K1)
    engine(store, keyring, K2, K1).close()  # (records K2 in the store)
    spec: dict[str, Any] = {
        "kind": store.kind,
        "pg_host": store.pg_host,
        "pg_port": store.pg_port,
        "pg_user": store.pg_user,
        "pg_dbname": store.pg_dbname,
        "pg_schema": store.pg_schema,
        "blob_fsync": False,
    }
    if store.sqlite_path is not None:
        spec["sqlite_path"] = str(store.sqlite_path)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, json.dumps(spec), keys.serialise(), str(store.blob_dir)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ids = raw_key_ids(store, sorted(originals))
    # The first batch committed, the second rolled back whole: 200 under K2, the rest K1.
    assert ids.count(kid(K2)) == 200 and ids.count(kid(K1)) == 250, ids
    b = engine(store, keyring, K2, K1)
    assert b.blobs is not None
    assert all(b.blobs.get(k) == data for k, data in originals.items())
    blobs = open_blobs(replace(store, encryption_keys=keys))
    assert isinstance(blobs, EncryptedBlobStore)
    try:
        assert rotate_originals(blobs) == 250  # resumes with what is left
    finally:
        blobs.close()
    assert set(raw_key_ids(store, sorted(originals))) == {kid(K2)}
    assert all(b.blobs.get(k) == data for k, data in originals.items())
    fault, _ = verify(b)
    assert fault is None, fault
    b.close()


def new_key_file(path: Path, *secrets: bytes) -> Path:
    lines = ["# current key first", *(base64.b64encode(s).decode() for s in secrets)]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    path.chmod(0o600)
    return path


def test_cli_status_rotate_and_a_refused_retire_in_one_line(
    tmp_path: Path, keyring: tokens.Keyring
) -> None:
    key_file = new_key_file(tmp_path / "encryption.key", K1)
    path = tmp_path / "sourceauth.toml"
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path / "var"}"\nhostname = "mx.example.test"\n'
        '[policy]\nprotected = ["example.test"]\n'
        '[challenge]\nconfirm_address = "confirm@example.test"\n'
        'bounce_address = "bounces@example.test"\n'
        f'[storage]\nencryption_key_file = "{key_file}"\n',
        encoding="utf-8",
    )
    run: Callable[..., subprocess.CompletedProcess[str]] = lambda *a: cli(path, *a)  # noqa: E731
    app = build_engine(load_config(path), transports=False)  # the store, under K1
    for i in range(3):
        hold(app, f"c{i}@remote.test")
    app.close()
    new_key_file(key_file, K2, K1)
    rotated = run("encryption", "rotate", "--json")
    assert rotated.returncode == 0, rotated.stderr
    rows = {r["key"]: r for r in json.loads(rotated.stdout)}
    assert rows[kid(K2)]["current"] and rows[kid(K2)]["originals"] == 3
    assert rows[kid(K1)]["originals"] == 0 and rows[kid(K1)]["events"] > 0
    assert "re-encrypted 3 originals" in rotated.stderr
    status = run("encryption", "status")
    assert status.returncode == 0 and kid(K1) in status.stdout, status.stderr
    refused = run("encryption", "retire", kid(K1))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert f"key {kid(K1)} is the store's first key" in lines[0]
    new_key_file(key_file, K2)
    lacking = run("encryption", "status")
    assert lacking.returncode == 2 and "lacks key(s)" in lacking.stderr, lacking.stderr
    new_key_file(key_file, K2, K1)
    verified = run("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    raw = b"".join(p.read_bytes() for p in (tmp_path / "var").glob("sourceauth.db*"))
    assert b"secret from" not in raw and BLOB_MAGIC in raw
