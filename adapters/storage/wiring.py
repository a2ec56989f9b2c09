"""Persistence wiring: the eventsourcing settings, views and blob store for one engine,
on the embedded SQLite file (default) or a PostgreSQL database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, Mapper

from sourceauth.adapters.storage.blobs import FileBlobStore
from sourceauth.adapters.storage.dbblobs import DatabaseBlobStore
from sourceauth.adapters.storage.encryption import (
    NOT_ENCRYPTED,
    EncryptedBlobStore,
    Key,
    KeySet,
    cipher_env,
)
from sourceauth.adapters.storage.modes import FileModes
from sourceauth.adapters.storage.postgres import PostgresBlobStore
from sourceauth.adapters.storage.viewcrypt import ViewSealer
from sourceauth.adapters.storage.views import KEYRING as KEYRING_TABLE
from sourceauth.adapters.storage.views import (
    Dialect,
    PostgresDialect,
    SqlViews,
    postgres_connector,
    sqlite_connector,
)
from sourceauth.engine import tokens
from sourceauth.engine.application import SourceAuth, system_clock
from sourceauth.engine.ports import BlobStore, ChallengeTransport, Clock, DeliveryTransport
from sourceauth.engine.settings import EngineSettings

TRANSCODER = "sourceauth.adapters.storage.transcoder:MsgpackTranscoder"
CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL before an error names the reason


@dataclass(frozen=True)
class Storage:
    """Where events, views and blobs live."""

    kind: str = "sqlite"  # or "postgresql"
    sqlite_path: Path | None = None
    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_user: str = "postgres"
    pg_password: str = ""
    pg_dbname: str = "test"
    pg_schema: str = ""
    blob_dir: Path = Path("./var/blobs")
    sqlite_synchronous: str = "FULL"
    blob_fsync: bool = True
    blobs: str = ""  # "database" (originals in the event transaction; the default) or "files"
    # AES keys (current first) for event state and originals at rest; None: not encrypted.
    encryption_keys: KeySet | None = None
    group: str = ""  # [storage] group: store files 0640 in this group (else 0600)

    @property
    def modes(self) -> FileModes:
        return FileModes.for_group(self.group)

    @property
    def blob_location(self) -> str:
        return self.blobs or "database"

    def conninfo(self) -> str:
        parts = [
            f"host={self.pg_host}",
            f"port={self.pg_port}",
            f"dbname={self.pg_dbname}",
            f"user={self.pg_user}",
        ]
        if self.pg_password:
            parts.append(f"password={self.pg_password}")
        return " ".join(parts)


def create_sqlite_file(path: Path, modes: FileModes) -> None:
    """Create the SQLite file 0600, or 0640 in `[storage] group` (its -wal and -shm files take
    its mode and, as root, its owner and group), before SQLite does: left to itself SQLite
    creates 0644 less the umask, readable by every local user when the data directory already
    existed with mode 0755. An existing file (and its -wal, -shm) wider than that is tightened."""
    modes.create_file(path)
    for suffix in ("-wal", "-shm"):
        modes.tighten(path.with_name(path.name + suffix))


def eventsourcing_env(storage: Storage) -> dict[str, str]:
    """The eventsourcing settings for this storage (the application name is the prefix)."""
    env = {"TRANSCODER_TOPIC": TRANSCODER, "AGGREGATE_CACHE_MAXSIZE": ""}
    env.update(cipher_env(storage.encryption_keys))
    if storage.kind == "sqlite":
        assert storage.sqlite_path is not None
        create_sqlite_file(storage.sqlite_path, storage.modes)
        env.update(
            PERSISTENCE_MODULE="sourceauth.adapters.storage.sqlite:TunedSQLiteFactory",
            SQLITE_DBNAME=str(storage.sqlite_path),
            SQLITE_SYNCHRONOUS=storage.sqlite_synchronous,
        )
    elif storage.kind == "postgresql":
        env.update(
            PERSISTENCE_MODULE="sourceauth.adapters.storage.postgres:ChainedPostgresFactory",
            POSTGRES_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT),
            POSTGRES_DBNAME=storage.pg_dbname,
            POSTGRES_HOST=storage.pg_host,
            POSTGRES_PORT=str(storage.pg_port),
            POSTGRES_USER=storage.pg_user,
            POSTGRES_PASSWORD=storage.pg_password,
        )
        if storage.pg_schema:
            env["POSTGRES_SCHEMA"] = storage.pg_schema
    else:
        raise ValueError(f"unknown storage kind {storage.kind!r}")
    return env


def views_factory(storage: Storage) -> Callable[[ApplicationRecorder, Mapper[UUID]], SqlViews]:
    def build(recorder: ApplicationRecorder, mapper: Mapper[UUID]) -> SqlViews:
        dialect: Dialect
        if storage.kind == "sqlite":
            assert storage.sqlite_path is not None
            connect: Callable[[], Any] = sqlite_connector(str(storage.sqlite_path))
            dialect = Dialect()
        else:
            connect = postgres_connector(storage.conninfo(), storage.pg_schema or None)
            dialect = PostgresDialect()
        # From the store's FIRST key, not the current one: sealed lookup values stay the same
        # through every rotation and on every node during a rolling one (docs/security.md).
        key = first_key(storage)
        sealer = None if key is None else ViewSealer(key.secret)
        if sealer is not None and getattr(recorder, "cap_counter", None) is not None:
            recorder.cap_counter.seal = sealer.lookup  # type: ignore[attr-defined]
        return SqlViews(connect, dialect, recorder, mapper, sealer)

    return build


AnyBlobStore = FileBlobStore | DatabaseBlobStore | PostgresBlobStore | EncryptedBlobStore


def open_blobs(storage: Storage) -> AnyBlobStore:
    """The blob store this storage uses for message originals (encrypted with a key)."""
    inner = _open_blobs(storage)
    if storage.encryption_keys is None:
        return inner
    return EncryptedBlobStore(inner, storage.encryption_keys)


def _open_blobs(storage: Storage) -> FileBlobStore | DatabaseBlobStore | PostgresBlobStore:
    if storage.blob_location == "database":
        if storage.kind == "postgresql":
            return PostgresBlobStore(storage.conninfo(), storage.pg_schema)
        assert storage.sqlite_path is not None
        create_sqlite_file(storage.sqlite_path, storage.modes)
        return DatabaseBlobStore(storage.sqlite_path, synchronous=storage.sqlite_synchronous)
    return FileBlobStore(storage.blob_dir, fsync=storage.blob_fsync)


class StorageUnreachable(OSError):
    """The database cannot be reached or refuses this node: the message names the host, the
    database and the server's reason, in one line."""


def probe_postgres(storage: Storage) -> None:
    """Connect once, within CONNECT_TIMEOUT seconds, so a bad URL, a server down or a missing
    database is one clear error at start instead of a pool's retries and a traceback."""
    import psycopg

    try:
        psycopg.connect(storage.conninfo(), connect_timeout=CONNECT_TIMEOUT).close()
    except psycopg.Error as exc:
        raise unreachable(storage, exc) from None


def unreachable(storage: Storage, exc: BaseException) -> StorageUnreachable:
    """The one-line error for a PostgreSQL store that cannot be used, with the server's reason."""
    reason = " ".join(str(exc).split())
    return StorageUnreachable(
        f"cannot use PostgreSQL at {storage.pg_host}:{storage.pg_port}, database "
        f"{storage.pg_dbname!r}, user {storage.pg_user!r}: {reason}"
    )


class KeyringMismatch(ValueError):
    """This node's keyring is not the one the store was first started with: it would derive
    other sender ids and mint tokens the other nodes cannot verify."""


class EncryptionMismatch(ValueError):
    """The encryption key given (or its absence) is not what this store was first started
    with: its events and originals could not be read, or would be written two ways."""


ENCRYPTION = "encryption"  # the mark of the store's first encryption key (or NOT_ENCRYPTED)
ENCRYPTION_KEY = "encryption:"  # + key id: the mark of each key the store has met


def recorded_encryption(storage: Storage) -> dict[str, str] | None:
    """The encryption marks this store holds: ENCRYPTION (its first key's, NOT_ENCRYPTED for
    a store started without a key or from before encryption existed) and ENCRYPTION_KEY + id
    for every key a node has brought since (retired keys removed); None for a new store."""
    if storage.kind == "sqlite":
        import sqlite3

        assert storage.sqlite_path is not None
        if not storage.sqlite_path.exists():
            return None
        with sqlite3.connect(f"file:{storage.sqlite_path}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            return _marks_in(tables, "", "stored_events", lambda q, a: db.execute(q, a).fetchall())
    import psycopg

    schema = storage.pg_schema or "public"
    with psycopg.connect(storage.conninfo(), connect_timeout=CONNECT_TIMEOUT) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        }
        return _marks_in(
            tables,
            f'"{schema}".',
            "sourceauth_events",
            lambda q, a: conn.execute(q.replace("?", "%s"), a).fetchall(),
        )


def _marks_in(
    tables: set[str], prefix: str, events: str, rows: Callable[[str, tuple[Any, ...]], Any]
) -> dict[str, str] | None:
    if KEYRING_TABLE in tables:
        marks = {
            str(name): str(mark)
            for name, mark in rows(
                f"SELECT name, fingerprint FROM {prefix}{KEYRING_TABLE} "
                "WHERE name = ? OR name LIKE ?",
                (ENCRYPTION, ENCRYPTION_KEY + "%"),
            )
        }
        if marks:
            return marks
    if events in tables and rows(f"SELECT 1 FROM {prefix}{events} LIMIT 1", ()):
        return {ENCRYPTION: NOT_ENCRYPTED}
    return None


def first_key(storage: Storage) -> Key | None:
    """The store's first encryption key (its mark is the ENCRYPTION record; None for a store
    not encrypted, or new): what keys derived for the views should come from, so that their
    deterministic lookup values stay the same through every rotation and on every node,
    whichever key is current there. It is never retired (rotation.retire refuses it)."""
    keys = storage.encryption_keys
    if keys is None:
        return None
    recorded = recorded_encryption(storage) or {}
    mark = recorded.get(ENCRYPTION)
    return keys.current if mark is None else keys.by_mark(mark)


def encryption_marks(keys: KeySet | None) -> dict[str, str]:
    """What a node records of its key set: the first key's mark at the store's first start
    (ENCRYPTION; insert-if-absent keeps the first one), and each key's mark by id."""
    if keys is None:
        return {ENCRYPTION: NOT_ENCRYPTED}
    return {ENCRYPTION: keys.current.mark} | {ENCRYPTION_KEY + k.id: k.mark for k in keys.keys}


def check_encryption(storage: Storage, recorded: dict[str, str] | None = None) -> None:
    """Refuse a key set that lacks a key the store has recorded (before anything is read with
    it): every node must hold every key until `sourceauth encryption retire` removes one."""
    found = recorded_encryption(storage) if recorded is None else recorded
    keys = storage.encryption_keys
    if not found:
        return
    if found.get(ENCRYPTION) == NOT_ENCRYPTED:
        if keys is not None:
            raise EncryptionMismatch(
                "this store is not encrypted, but an encryption key is given: remove "
                "[storage] encryption_key_file and SOURCEAUTH_ENCRYPTION_KEY, or start a new store"
            )
        return
    if keys is None:
        raise EncryptionMismatch(
            "this store is encrypted: set [storage] encryption_key_file (or "
            "SOURCEAUTH_ENCRYPTION_KEY) to the key it was first started with"
        )
    ours = {k.mark for k in keys.keys}
    missing = sorted(name for name, mark in found.items() if mark not in ours)
    if not missing:
        return
    if len(missing) == len(found):
        raise EncryptionMismatch(
            "the encryption key differs from the one this store was first started with: "
            "use that key (every node the same)"
        )
    named = [
        name.removeprefix(ENCRYPTION_KEY) if name != ENCRYPTION else "its first key"
        for name in missing
    ]
    raise EncryptionMismatch(
        f"the encryption key set lacks key(s) this store uses ({', '.join(named)}): list "
        "every key in [storage] encryption_key_file, on every node, until "
        "'sourceauth encryption retire' has retired it"
    )


def check_keyring(
    app: SourceAuth, keyring: tokens.Keyring, encryption: dict[str, str] | None = None
) -> None:
    """Record this keyring's fingerprints at the first start; refuse a keyring that differs
    from the recorded one in its id key or in a key id both have (a new key id is fine).
    `encryption` (the key set's marks) is recorded beside them; a node that lost the race to
    a store's first start with another key is refused here."""
    if not isinstance(app.views, SqlViews):
        return
    ours = tokens.fingerprints(keyring)
    stored = app.views.record_keyring({**ours, **(encryption or {})})
    differ = sorted(name for name, mark in ours.items() if stored.get(name, mark) != mark)
    if differ:
        raise KeyringMismatch(
            f"keyring differs from the one this store was first started with "
            f"(differing: {', '.join(differ)}); every node must use the same keyring"
        )
    if encryption:
        check_encryption_marks(encryption, stored)


def check_encryption_marks(ours: dict[str, str], stored: dict[str, str]) -> None:
    """After recording: the store's first key must be one of ours."""
    first = stored.get(ENCRYPTION)
    if first is not None and first not in ours.values():
        raise EncryptionMismatch(
            "the encryption key differs from the one this store was first started with: "
            "use that key (every node the same)"
        )


def open_engine(
    *,
    settings: EngineSettings,
    keyring: tokens.Keyring,
    storage: Storage,
    clock: Clock = system_clock,
    challenges: ChallengeTransport | None = None,
    deliveries: DeliveryTransport | None = None,
    blobs: BlobStore | None = None,
) -> SourceAuth:
    """One engine over this storage (blobs: its own store unless given); the caller closes it.
    A PostgreSQL server that stops answering while the engine starts (after the probe: its
    pool, the schema, the marks) is StorageUnreachable too, as when the probe fails."""
    if storage.kind != "postgresql":
        return _open_engine(settings, keyring, storage, clock, challenges, deliveries, blobs)
    import psycopg
    from eventsourcing.persistence import OperationalError

    try:
        return _open_engine(settings, keyring, storage, clock, challenges, deliveries, blobs)
    except (psycopg.OperationalError, OperationalError) as exc:
        raise unreachable(storage, exc) from None


def _open_engine(
    settings: EngineSettings,
    keyring: tokens.Keyring,
    storage: Storage,
    clock: Clock,
    challenges: ChallengeTransport | None,
    deliveries: DeliveryTransport | None,
    blobs: BlobStore | None,
) -> SourceAuth:
    if blobs is None:
        blobs = open_blobs(storage)
    if storage.kind == "postgresql":
        probe_postgres(storage)
        if storage.pg_schema:
            # eventsourcing creates its tables but not the schema they live in.
            postgres_connector(storage.conninfo(), storage.pg_schema)().close()
    check_encryption(storage)
    # eventsourcing merges os.environ first; these explicit settings win over stray variables.
    env = eventsourcing_env(storage)
    app = SourceAuth(
        settings=settings,
        keyring=keyring,
        views_factory=views_factory(storage),
        blobs=blobs,
        challenges=challenges,
        deliveries=deliveries,
        clock=clock,
        env=env,
    )
    # The audit chain's key comes from the keyring, never from the database: chain every
    # event from here on (and any this store holds from before the chain existed).
    try:
        check_keyring(app, keyring, encryption_marks(storage.encryption_keys))
        app.recorder.attach_chain(tokens.audit_chain_key(keyring))  # type: ignore[attr-defined]
    except BaseException:
        app.close()
        raise
    return app
