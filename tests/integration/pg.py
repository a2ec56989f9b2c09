"""A fresh PostgreSQL schema per test, on the server the integration tests share.

    from tests.integration.pg import PgSchema, fresh_schema, pg_schema_fixture

    @pytest.fixture
    def pg() -> Iterator[PgSchema]:
        yield from pg_schema_fixture()

Each schema has a unique name and is dropped (CASCADE) afterwards; the engine is pointed at
it with Storage(pg_schema=…) or a storage URL `postgresql://user@host:port/db?schema=NAME`.
When the server is unreachable the test is skipped with the reason, or fails when CI=true.
Override the server with SOURCEAUTH_TEST_PG_HOST / _PORT / _USER / _PASSWORD / _DBNAME.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sourceauth.adapters.storage.wiring import Storage

postgres = pytest.mark.postgres

_ENV = "SOURCEAUTH_TEST_PG_"


@dataclass(frozen=True)
class PgSchema:
    """Where one test's events, views and tracking live."""

    schema: str
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = ""
    dbname: str = "test"

    def conninfo(self) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={self.dbname}"]
        parts.append(f"user={self.user}")
        if self.password:
            parts.append(f"password={self.password}")
        return " ".join(parts)

    def storage(self, blob_dir: Path, **overrides: Any) -> Storage:
        """Storage for open_engine on this schema (blobs on a local directory)."""
        return Storage(
            kind="postgresql",
            pg_host=self.host,
            pg_port=self.port,
            pg_user=self.user,
            pg_password=self.password,
            pg_dbname=self.dbname,
            pg_schema=self.schema,
            blob_dir=blob_dir,
            blob_fsync=overrides.pop("blob_fsync", False),
            **overrides,
        )

    @property
    def url(self) -> str:
        """The [storage] url an operator writes (the password, if any, comes from the env)."""
        return (
            f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}?schema={self.schema}"
        )

    def connect(self) -> Any:
        """An autocommit psycopg connection whose search_path is this schema."""
        import psycopg

        conn = psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5)
        conn.execute(f'SET search_path TO "{self.schema}"')
        return conn

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return list(conn.execute(sql, params).fetchall())


def _server() -> dict[str, Any]:
    env = os.environ
    return {
        "host": env.get(_ENV + "HOST", "127.0.0.1"),
        "port": int(env.get(_ENV + "PORT", "5432")),
        "user": env.get(_ENV + "USER", "postgres"),
        "password": env.get(_ENV + "PASSWORD", ""),
        "dbname": env.get(_ENV + "DBNAME", "test"),
    }


def unavailable(reason: str) -> None:
    """Skip (locally) or fail (CI=true): a CI run must never pass by skipping PostgreSQL."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL required under CI=true: {reason}", pytrace=False)
    print(f"skipping: {reason}")
    pytest.skip(reason)


def _admin(server: dict[str, Any]) -> Any:
    try:
        import psycopg

        probe = PgSchema(schema="public", **server)
        return psycopg.connect(probe.conninfo(), autocommit=True, connect_timeout=5)
    except Exception as exc:
        unavailable(
            f"PostgreSQL unreachable at {server['host']}:{server['port']} "
            f"(user {server['user']}, database {server['dbname']}): {' '.join(str(exc).split())}"
        )
        raise  # pragma: no cover - unavailable() always raises


@contextmanager
def fresh_schema(prefix: str = "sa_test", *, create: bool = True) -> Iterator[PgSchema]:
    """A new schema with a unique name, dropped with everything in it afterwards.

    create=False only reserves the name (to test that the engine creates the schema itself).
    """
    server = _server()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _admin(server) as admin:
        if create:
            admin.execute(f'CREATE SCHEMA "{name}"')
        try:
            yield PgSchema(schema=name, **server)
        finally:
            admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def pg_schema_fixture() -> Iterator[PgSchema]:
    """Body of a fixture: `yield from pg_schema_fixture()`."""
    with fresh_schema() as schema:
        yield schema


@pytest.fixture
def pg_schema() -> Iterator[PgSchema]:
    """A fresh schema for this test (import the fixture, or wrap pg_schema_fixture())."""
    yield from pg_schema_fixture()
