"""Encryption at rest (issue 8, item 5): with a key, event state and originals are AES-GCM
ciphertext in the SQLite file, in PostgreSQL and in blob files; the filter works as before
(challenge, confirmation, delivery of the plaintext), `audit verify` passes, and a wrong or
missing key is refused in one line, exit 2."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from sourceauth.adapters.config import load_config
from tests.integration.pg import PgSchema, pg_schema_fixture, postgres
from tests.integration.smtp_harness import RunningFilter, message, parsed, token_of, write_config
from tests.integration.test_nodes import sourceauth as cli
from tests.support.smtp_sink import Sink

STRANGER = "zebra.marker@remote-secret.test"
PROTECTED = "bob@example.test"
SUBJECT = "Subject Marker XYZZY"
BODY = "Body marker PLUGH, the secret lunch plan.\r\n"
MARKERS = (b"zebra.marker", b"remote-secret", b"XYZZY", b"PLUGH", b"secret lunch")


@pytest.fixture
def pg() -> Iterator[PgSchema]:
    yield from pg_schema_fixture()


def new_key(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n", encoding="ascii")
    path.chmod(0o600)
    return path


def config(tmp: Path, relay: Sink, next_hop: Sink, storage: str) -> Path:
    path = write_config(tmp, relay=relay.url, next_hop=next_hop.url)
    path.write_text(path.read_text() + f"\n[storage]\n{storage}\n", encoding="utf-8")
    return path


def assert_no_plaintext(name: str, raw: bytes) -> None:
    found = [m.decode() for m in MARKERS if m in raw]
    assert not found, f"{name}: {found} readable at rest"


def run_flow(tmp_path: Path, storage: str) -> Path:
    with Sink() as relay, Sink() as next_hop:
        path = config(tmp_path, relay, next_hop, storage)
        flt = RunningFilter(load_config(path))
        try:
            flt.send(STRANGER, [PROTECTED], message(STRANGER, PROTECTED, SUBJECT, BODY))
            token = token_of(relay.wait_for(1, timeout=30)[0])
            confirm = f"confirm+{token}@example.test"
            flt.send(STRANGER, [confirm], message(STRANGER, confirm, "Re: " + SUBJECT, BODY))
            [delivered] = next_hop.wait_for(1, timeout=30)
            assert parsed(delivered)["Subject"] == SUBJECT
            assert b"PLUGH" in delivered.data  # the next hop gets the plaintext
        finally:
            flt.stop()
    verified = cli(path, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return path


@pytest.mark.parametrize("blobs", ["database", "files"])
def test_sqlite_events_and_originals_are_ciphertext_at_rest(tmp_path: Path, blobs: str) -> None:
    key = new_key(tmp_path / "encryption.key")
    run_flow(tmp_path, f'encryption_key_file = "{key}"\nblobs = "{blobs}"')
    db = tmp_path / "var" / "sourceauth.db"
    with sqlite3.connect(db) as conn:
        states = b"".join(bytes(r[0]) for r in conn.execute("SELECT state FROM stored_events"))
        originals = [bytes(r[0]) for r in conn.execute("SELECT data FROM sa_blob_data")]
    assert len(states) > 1000
    assert_no_plaintext("stored_events.state", states)
    files = [p.read_bytes() for p in (tmp_path / "var" / "blobs").rglob("*") if p.is_file()]
    stored = originals if blobs == "database" else files
    assert len(stored) == 2, (len(originals), len(files))  # the held original and the reply
    for data in stored:
        assert_no_plaintext(f"original ({blobs})", data)


@postgres
def test_postgresql_events_and_originals_are_ciphertext_at_rest(
    tmp_path: Path, pg: PgSchema
) -> None:
    key = new_key(tmp_path / "encryption.key")
    run_flow(tmp_path, f'url = "{pg.url}"\nencryption_key_file = "{key}"')
    states = b"".join(bytes(r[0]) for r in pg.query("SELECT state FROM sourceauth_events"))
    originals = [bytes(r[0]) for r in pg.query("SELECT data FROM sa_blob_data")]
    assert len(states) > 1000 and len(originals) == 2
    assert_no_plaintext("sourceauth_events.state", states)
    for data in originals:
        assert_no_plaintext("sa_blob_data.data", data)


def test_a_wrong_missing_or_loose_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    key = new_key(tmp_path / "encryption.key")
    path = write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
    base = path.read_text()
    path.write_text(base + f'\n[storage]\nencryption_key_file = "{key}"\n', encoding="utf-8")
    first = cli(path, "senders", "allow", STRANGER)
    assert first.returncode == 0, first.stderr
    env = {k: v for k, v in os.environ.items() if k != "SOURCEAUTH_ENCRYPTION_KEY"}

    def refused(expect: str, *, with_env: dict[str, str] | None = None) -> None:
        for command in (("senders", "list"), ("serve",)):
            out = cli(path, *command, env=with_env or env)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1, (command, out.stderr)
            assert expect in lines[0], lines[0]

    good = key.read_text()
    new_key(key)
    refused("the encryption key differs from the one this store was first started with")
    key.write_text(good)
    key.chmod(0o644)
    refused("readable by others (mode 0644); chmod 600 it")
    key.chmod(0o600)
    path.write_text(base, encoding="utf-8")  # no key at all
    refused("this store is encrypted: set [storage] encryption_key_file")
    # the same key from the environment works
    listed = cli(path, "senders", "list", env={**env, "SOURCEAUTH_ENCRYPTION_KEY": good.strip()})
    assert listed.returncode == 0 and STRANGER in listed.stdout, listed.stderr
    refused(
        "SOURCEAUTH_ENCRYPTION_KEY: not base64",
        with_env={**env, "SOURCEAUTH_ENCRYPTION_KEY": "%%%"},
    )


def test_a_key_given_to_a_store_that_is_not_encrypted_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
    assert cli(path, "senders", "allow", STRANGER).returncode == 0  # no key: plaintext store
    key = new_key(tmp_path / "encryption.key")
    path.write_text(path.read_text() + f'\n[storage]\nencryption_key_file = "{key}"\n')
    out = cli(path, "senders", "list")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "this store is not encrypted, but an encryption key is given" in lines[0]


# ---------------------------------------------------------------- the views (issue 8, item 5)
# A scenario that leaves a row in every view and cap table: a held message and its pending
# challenge, a confirmed sender whose release is delivered to one recipient and deferred for
# another (a delivery queue row), caps counted, an operator's allow and a rule.
SECOND = "yak.marker2@other-secret.test"
SECOND_SUBJECT = "Subject Marker2 FOOBAR"
DEFERRED = "carol.deferred@example.test"
FRIEND = "friend.marker@allowed-secret.test"
RULE = "*@rule-secret.test"
VIEW_MARKERS = (
    *MARKERS,
    b"yak.marker2",
    b"other-secret",
    b"FOOBAR",
    b"carol.deferred",
    b"friend.marker",
    b"allowed-secret",
    b"rule-secret",
    b"RULE-REASON-QUUX",
    b"bob@",
    b"example.test",
)


def assert_no_view_plaintext(name: str, raw: bytes) -> None:
    found = [m.decode() for m in VIEW_MARKERS if m in raw]
    assert not found, f"{name}: {found} readable at rest"


def run_view_flow(tmp_path: Path, storage: str) -> Path:
    """Through the real SMTP listener and the CLI; returns the config path (filter stopped)."""
    defer = lambda rcpt: "450 4.2.0 try later" if rcpt == DEFERRED else "250 OK"  # noqa: E731
    with Sink() as relay, Sink(rcpt_reply=defer) as next_hop:
        path = config(tmp_path, relay, next_hop, storage)
        assert cli(path, "senders", "allow", FRIEND).returncode == 0
        added = cli(path, "rules", "add", "block", RULE, "--reason", "RULE-REASON-QUUX")
        assert added.returncode == 0, added.stderr
        flt = RunningFilter(load_config(path))
        try:
            flt.send(STRANGER, [PROTECTED, DEFERRED], message(STRANGER, PROTECTED, SUBJECT, BODY))
            token = token_of(relay.wait_for(1, timeout=30)[0])
            confirm = f"confirm+{token}@example.test"
            flt.send(STRANGER, [confirm], message(STRANGER, confirm, "Re: " + SUBJECT, BODY))
            [delivered] = next_hop.wait_for(1, timeout=30)
            assert delivered.rcpt_tos == [PROTECTED]
            flt.send(SECOND, [PROTECTED], message(SECOND, PROTECTED, SECOND_SUBJECT, BODY))
            relay.wait_for(2, timeout=30)
        finally:
            flt.stop()
    return path


def check_cli_shows_plaintext(path: Path) -> None:
    senders = json.loads(cli(path, "senders", "list", "--json").stdout)
    states = {s["address"]: s["state"] for s in senders}
    assert states == {FRIEND: "authorized", STRANGER: "authorized", SECOND: "challenged"}
    assert [s["address"] for s in senders] == sorted(states)  # still ordered by address
    held = json.loads(cli(path, "quarantine", "list", "--json").stdout)
    assert [(m["sender"], m["recipients"], m["subject"]) for m in held] == [
        (SECOND, [PROTECTED], SECOND_SUBJECT)
    ]
    shown = cli(path, "quarantine", "show", held[0]["id"])
    assert shown.returncode == 0 and SECOND_SUBJECT in shown.stdout, shown.stderr
    everything = json.loads(cli(path, "quarantine", "list", "--all", "--json").stdout)
    mine = [m for m in everything if m["sender"] == STRANGER]
    assert mine and mine[0]["subject"] == SUBJECT
    assert sorted(mine[0]["recipients"]) == sorted([PROTECTED, DEFERRED])
    rules = json.loads(cli(path, "rules", "list", "--json").stdout)
    assert [(r["action"], r["pattern"]) for r in rules] == [("block", RULE)]
    status = cli(path, "status", "--json")
    assert status.returncode == 0, status.stderr
    figures = json.loads(status.stdout)
    assert "1" in json.dumps(figures)  # one held, one pending, one queued: figures read
    for command in (("audit", "verify"), ("projections", "rebuild"), ("audit", "verify")):
        out = cli(path, *command)
        assert out.returncode == 0, (command, out.stdout + out.stderr)
    again = json.loads(cli(path, "senders", "list", "--json").stdout)
    assert again == senders  # the rebuilt (sealed) views read the same


def sqlite_tables(db: Path) -> dict[str, bytes]:
    with sqlite3.connect(db) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            name: repr(conn.execute(f'SELECT * FROM "{name}"').fetchall()).encode()
            + b"".join(
                v if isinstance(v, bytes) else b""
                for row in conn.execute(f'SELECT * FROM "{name}"')
                for v in row
            )
            for name in names
        }


@pytest.mark.parametrize("blobs", ["database", "files"])
def test_sqlite_views_hold_no_address_subject_or_body_at_rest(tmp_path: Path, blobs: str) -> None:
    key = new_key(tmp_path / "encryption.key")
    path = run_view_flow(tmp_path, f'encryption_key_file = "{key}"\nblobs = "{blobs}"')
    db = tmp_path / "var" / "sourceauth.db"
    tables = sqlite_tables(db)
    for table in (
        "sa_whitelist", "sa_challenges", "sa_quarantine", "sa_delivery", "sa_held_counts",
        "sa_rules", "sa_cap_counts", "sa_cap_mailboxes",
    ):  # fmt: skip
        assert len(tables[table]) > 40, (table, tables[table])  # the scenario left rows there
    for name, raw in tables.items():
        assert_no_view_plaintext(f"table {name}", raw)
    check_cli_shows_plaintext(path)
    # Every byte of every file in the data directory: the database with its indexes, free
    # pages and WAL, the blob files, anything else written there.
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    files = [p for p in (tmp_path / "var").rglob("*") if p.is_file()]
    assert db in files
    for file in files:
        assert_no_view_plaintext(str(file.relative_to(tmp_path)), file.read_bytes())


def test_sqlite_views_without_a_key_stay_plaintext_as_before(tmp_path: Path) -> None:
    path = run_view_flow(tmp_path, "")
    tables = sqlite_tables(tmp_path / "var" / "sourceauth.db")
    assert STRANGER.encode() in tables["sa_whitelist"]
    assert SECOND_SUBJECT.encode() in tables["sa_quarantine"]
    assert DEFERRED.encode() in tables["sa_delivery"]
    assert b"remote-secret.test" in tables["sa_cap_counts"]
    check_cli_shows_plaintext(path)


@postgres
def test_postgresql_views_hold_no_address_subject_or_body_at_rest(
    tmp_path: Path, pg: PgSchema
) -> None:
    key = new_key(tmp_path / "encryption.key")
    path = run_view_flow(tmp_path, f'url = "{pg.url}"\nencryption_key_file = "{key}"')
    names = [
        r[0]
        for r in pg.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (pg.schema,),
        )
    ]
    assert {"sa_whitelist", "sa_cap_counts", "sa_cap_mailboxes", "sa_delivery"} <= set(names)
    for name in names:
        rows = pg.query(f'SELECT * FROM "{pg.schema}"."{name}"')
        raw = repr(rows).encode() + b"".join(
            bytes(v) for row in rows for v in row if isinstance(v, (bytes, memoryview))
        )
        assert_no_view_plaintext(f"table {name}", raw)
    check_cli_shows_plaintext(path)
    # The relations' files (tables, their indexes and TOAST) when this host's server keeps
    # them readable here: what a stolen disk holds.
    with pg.connect() as conn:
        conn.execute("CHECKPOINT")
    [(datadir,)] = pg.query("SHOW data_directory")
    files = pg.query(
        "SELECT pg_relation_filepath(c.oid) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'i', 't')",
        (pg.schema,),
    )
    readable = [Path(datadir) / f for (f,) in files if f and (Path(datadir) / f).exists()]
    if pg.host in ("127.0.0.1", "localhost") and os.access(datadir, os.R_OK):
        assert len(readable) > 20, files
    for file in readable:
        assert_no_view_plaintext(str(file), file.read_bytes())


def test_an_encrypted_store_whose_views_are_plaintext_has_them_sealed_at_its_next_start(
    tmp_path: Path,
) -> None:
    """A store encrypted before the views were sealed: its views and cap rows are sealed once,
    at the next start, and read as before."""
    key = new_key(tmp_path / "encryption.key")
    path = write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
    path.write_text(path.read_text() + f'\n[storage]\nencryption_key_file = "{key}"\n')
    assert cli(path, "senders", "allow", FRIEND).returncode == 0
    assert cli(path, "senders", "list").returncode == 0  # the views caught up
    db = tmp_path / "var" / "sourceauth.db"
    with sqlite3.connect(db) as conn:  # what the code before sealing left in such a store
        conn.execute("UPDATE sa_whitelist SET address = ?, via = 'cli', reason = ''", (FRIEND,))
        conn.execute("DELETE FROM sa_tracking WHERE name = 'views:sealed'")
        conn.execute("INSERT INTO sa_cap_counts VALUES ('allowed-secret.test', 99999999, 3)")
        conn.execute("INSERT INTO sa_cap_mailboxes VALUES (?, 'id', 'c', 1e12)", (FRIEND,))
    assert FRIEND.encode() in sqlite_tables(db)["sa_whitelist"]
    listed = cli(path, "senders", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [s["address"] for s in json.loads(listed.stdout)] == [FRIEND]
    tables = sqlite_tables(db)
    for name, raw in tables.items():
        assert_no_view_plaintext(f"table {name}", raw)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT SUM(n) FROM sa_cap_counts").fetchone()[0] == 3
        assert conn.execute("SELECT COUNT(*) FROM sa_cap_mailboxes").fetchone()[0] == 1
    verified = cli(path, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
