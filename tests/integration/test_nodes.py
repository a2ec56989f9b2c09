"""Several nodes on one PostgreSQL, as an operator runs them (DESIGN.md §8): the `sourceauth`
command as a real process, each node with its own data directory, one fresh schema per test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.engine import tokens
from tests.integration.pg import PgSchema, pg_schema_fixture, postgres
from tests.integration.smtp_harness import RunningFilter, free_port, message, write_config
from tests.support.smtp_sink import Sink
from tests.support.tcp_proxy import FreezableProxy

pytestmark = [postgres, pytest.mark.timeout(180)]


@pytest.fixture
def pg() -> Iterator[PgSchema]:
    yield from pg_schema_fixture()


def node_config(root: Path, url: str) -> Path:
    """One node's configuration: its own data directory (keyring, logs), the shared database."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "sourceauth.toml"
    path.write_text(
        f'[server]\ndata_dir = "{root / "var"}"\nhostname = "mx.example.test"\nlisten = "127.0.0.1:{free_port()}"\n'
        '[policy]\nprotected = ["example.test"]\n'
        '[challenge]\nconfirm_address = "confirm@example.test"\nbounce_address = "bounces@example.test"\n'
        f'[storage]\nurl = "{url}"\n',
        encoding="utf-8",
    )
    return path


def sourceauth(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sourceauth.adapters.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_a_node_with_another_keyring_refuses_to_start_and_a_rotated_one_is_welcome(
    tmp_path: Path, pg: PgSchema
) -> None:
    a, b = node_config(tmp_path / "a", pg.url), node_config(tmp_path / "b", pg.url)
    first = sourceauth(a, "senders", "allow", "friend@remote.test")
    assert first.returncode == 0, first.stderr

    for command in (("senders", "list", "--json"), ("serve",)):
        refused = sourceauth(b, *command)
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert "keyring differs" in lines[0] and "id key" in lines[0]
        assert (
            f"copy the keyring file of a running node to {tmp_path / 'b' / 'var' / 'secret'}"
            in lines[0]
        )
    secret_b = (tmp_path / "b" / "var" / "secret").read_text()
    key_material = [w for w in secret_b.split() if len(w) >= 32]
    assert key_material and not any(k in refused.stderr for k in key_material)  # never a key

    shutil.copy2(tmp_path / "a" / "var" / "secret", tmp_path / "b" / "var" / "secret")
    listed = sourceauth(b, "senders", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"friend@remote.test"' in listed.stdout

    # rotation: node b adds a token key and mints with it; both nodes keep starting
    keyring = tokens.parse_keyring((tmp_path / "a" / "var" / "secret").read_text())
    rotated = tokens.Keyring(
        token_keys={**keyring.token_keys, 9: b"r" * 32}, active_kid=9, id_key=keyring.id_key
    )
    (tmp_path / "b" / "var" / "secret").write_text(tokens.render_keyring(rotated))
    for config in (b, a):
        again = sourceauth(config, "senders", "list", "--json")
        assert again.returncode == 0, again.stderr
    # but a node whose key 9 is another key is refused
    other = tokens.Keyring(
        token_keys={**keyring.token_keys, 9: b"s" * 32}, active_kid=9, id_key=keyring.id_key
    )
    (tmp_path / "a" / "var" / "secret").write_text(tokens.render_keyring(other))
    clash = sourceauth(a, "senders", "list")
    assert clash.returncode == 2 and "(differing: token key 9)" in clash.stderr, clash.stderr


def test_an_unreachable_or_missing_database_is_one_line_naming_host_database_and_reason(
    tmp_path: Path, pg: PgSchema
) -> None:
    started = time.monotonic()
    baseline = sourceauth(node_config(tmp_path / "ok", pg.url), "diagram")
    startup = time.monotonic() - started  # the interpreter and imports, on this machine now
    assert baseline.returncode == 0, baseline.stderr
    refused = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    missing = f"postgresql://{pg.user}@{pg.host}:{pg.port}/sa_no_such_db_{pg.schema}"
    for url, host, reason in (
        (refused, "127.0.0.1", "Connection refused"),
        (missing, pg.host, "does not exist"),
    ):
        config = node_config(tmp_path / reason.split()[0], url)
        for command in (("senders", "list"), ("serve",)):
            started = time.monotonic()
            out = sourceauth(config, *command)
            elapsed = time.monotonic() - started
            assert out.returncode == 1, (command, out.stderr)
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1, out.stderr
            assert lines[0].startswith(f"sourceauth: error: cannot use PostgreSQL at {host}:")
            assert "database 'test'" in lines[0] or "database 'sa_no_such_db_" in lines[0]
            assert reason in lines[0], lines[0]
            assert elapsed - startup < 5.0, (command, elapsed, startup)


@pytest.mark.parametrize("outage", ["refused", "hung"])
def test_a_database_lost_right_after_the_probe_is_one_error_too_not_a_traceback(
    tmp_path: Path, pg: PgSchema, monkeypatch: pytest.MonkeyPatch, outage: str
) -> None:
    """The probe answered, then the server went (or hung) before the engine's pool, schema and
    marks were read: a child process starting then must see StorageUnreachable, which it
    logs as one line and retries (a CI run on 2026-12-01 caught a traceback there)."""
    from sourceauth.adapters.runtime import build_engine
    from sourceauth.adapters.storage import wiring

    with FreezableProxy((pg.host, pg.port)) as proxy:
        url = f"postgresql://{pg.user}@127.0.0.1:{proxy.port}/{pg.dbname}?schema={pg.schema}"
        cfg = load_config(node_config(tmp_path, url))
        real_probe = wiring.probe_postgres

        def probe_then_lose(storage: wiring.Storage) -> None:
            real_probe(storage)
            proxy.close() if outage == "refused" else proxy.freeze()

        monkeypatch.setattr(wiring, "probe_postgres", probe_then_lose)
        started = time.monotonic()
        with pytest.raises(
            wiring.StorageUnreachable, match=r"cannot use PostgreSQL at 127\.0\.0\.1:"
        ):
            build_engine(cfg)
        assert time.monotonic() - started < 40


def test_smtp_clients_get_4xx_within_5_s_when_the_database_stops_answering(
    tmp_path: Path, pg: PgSchema
) -> None:
    stranger, protected = "alice@remote.test", "bob@example.test"
    with FreezableProxy((pg.host, pg.port)) as proxy, Sink() as relay, Sink() as next_hop:
        path = write_config(tmp_path, relay=relay.url, next_hop=next_hop.url)
        url = f"postgresql://{pg.user}@127.0.0.1:{proxy.port}/{pg.dbname}?schema={pg.schema}"
        path.write_text(path.read_text() + f'\n[storage]\nurl = "{url}"\n', encoding="utf-8")
        flt = RunningFilter(load_config(path))
        try:
            code, _ = flt.sendmail_reply(stranger, [protected], message(stranger, protected))
            assert code == 250
            proxy.freeze()
            started = time.monotonic()
            code, text = flt.sendmail_reply(
                stranger, [protected], message(stranger, protected, subject="while frozen")
            )
            elapsed = time.monotonic() - started
            assert code == 451 and b"4.3.0" in text, (code, text)
            assert elapsed < 5.0, elapsed
        finally:
            proxy.close()  # the database gone for good: what hung now fails, and stops
            # Stopping gives up on a database that does not answer (no 10 retries of 5 s per
            # call): what cannot commit got no 250, so nothing accepted is lost.
            started = time.monotonic()
            flt.stop(timeout=60)
            stopped_in = time.monotonic() - started
    assert stopped_in <= 10.0, stopped_in
    # nothing accepted was lost: the first message is held; the second, if its commit landed
    # after the 451, is held too (the client's retry would be a second copy, not a loss)
    assert pg.query("SELECT count(*) FROM sa_blob_data")[0][0] >= 1
    assert pg.query("SELECT count(*) FROM sourceauth_events")[0][0] >= 2
