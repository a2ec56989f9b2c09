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
from sourceauth.adapters.storage.modes import FileModes
from sourceauth.adapters.storage.postgres import PostgresBlobStore
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
        return SqlViews(connect, dialect, recorder, mapper)

    return build


def open_blobs(storage: Storage) -> FileBlobStore | DatabaseBlobStore | PostgresBlobStore:
    """The blob store this storage uses for message originals."""
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
        reason = " ".join(str(exc).split())
        raise StorageUnreachable(
            f"cannot use PostgreSQL at {storage.pg_host}:{storage.pg_port}, database "
            f"{storage.pg_dbname!r}, user {storage.pg_user!r}: {reason}"
        ) from None


class KeyringMismatch(ValueError):
    """This node's keyring is not the one the store was first started with: it would derive
    other sender ids and mint tokens the other nodes cannot verify."""


def check_keyring(app: SourceAuth, keyring: tokens.Keyring) -> None:
    """Record this keyring's fingerprints at the first start; refuse a keyring that differs
    from the recorded one in its id key or in a key id both have (a new key id is fine)."""
    if not isinstance(app.views, SqlViews):
        return
    ours = tokens.fingerprints(keyring)
    stored = app.views.record_keyring(ours)
    differ = sorted(name for name, mark in ours.items() if stored.get(name, mark) != mark)
    if differ:
        raise KeyringMismatch(
            f"keyring differs from the one this store was first started with "
            f"(differing: {', '.join(differ)}); every node must use the same keyring"
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
    """One engine over this storage (blobs: its own store unless given); the caller closes it."""
    if blobs is None:
        blobs = open_blobs(storage)
    if storage.kind == "postgresql":
        probe_postgres(storage)
        if storage.pg_schema:
            # eventsourcing creates its tables but not the schema they live in.
            postgres_connector(storage.conninfo(), storage.pg_schema)().close()
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
        check_keyring(app, keyring)
        app.recorder.attach_chain(tokens.audit_chain_key(keyring))  # type: ignore[attr-defined]
    except BaseException:
        app.close()
        raise
    return app
