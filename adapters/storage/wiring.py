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
    blobs: str = (
        ""  # "database" (SQLite: originals in the event transaction) or "files"; "" = per kind
    )

    @property
    def blob_location(self) -> str:
        return self.blobs or ("database" if self.kind == "sqlite" else "files")

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


def eventsourcing_env(storage: Storage) -> dict[str, str]:
    """The eventsourcing settings for this storage (the application name is the prefix)."""
    env = {"TRANSCODER_TOPIC": TRANSCODER, "AGGREGATE_CACHE_MAXSIZE": ""}
    if storage.kind == "sqlite":
        assert storage.sqlite_path is not None
        storage.sqlite_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        env.update(
            PERSISTENCE_MODULE="sourceauth.adapters.storage.sqlite:TunedSQLiteFactory",
            SQLITE_DBNAME=str(storage.sqlite_path),
            SQLITE_SYNCHRONOUS=storage.sqlite_synchronous,
        )
    elif storage.kind == "postgresql":
        env.update(
            PERSISTENCE_MODULE="sourceauth.adapters.storage.postgres:ChainedPostgresFactory",
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


def open_blobs(storage: Storage) -> FileBlobStore | DatabaseBlobStore:
    """The blob store this storage uses for message originals."""
    if storage.blob_location == "database":
        if storage.kind != "sqlite":
            raise ValueError('blobs in the database need SQLite; use blobs="files"')
        assert storage.sqlite_path is not None
        storage.sqlite_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return DatabaseBlobStore(storage.sqlite_path, synchronous=storage.sqlite_synchronous)
    return FileBlobStore(storage.blob_dir, fsync=storage.blob_fsync)


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
    if storage.kind == "postgresql" and storage.pg_schema:
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
        app.recorder.attach_chain(tokens.audit_chain_key(keyring))  # type: ignore[attr-defined]
    except BaseException:
        app.close()
        raise
    return app
