"""`sourceauth status` as an operator runs it, after a scripted day: real SMTP over loopback,
a relay and a next hop that refuse some recipients, a real SQLite file, the real command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from sourceauth.adapters.config import load_config
from sourceauth.engine import projections as p
from tests.integration.pg import PgSchema, pg_schema_fixture, postgres
from tests.integration.smtp_harness import RunningFilter, message, write_config
from tests.integration.test_cli import run
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

BOB = "bob@example.test"


def _relay_reply(address: str) -> str:
    return "550 5.1.1 no such user" if address.startswith("gone@") else "250 OK"


def _next_hop_reply(address: str) -> str:
    if address.startswith("refuse@"):
        return "550 5.1.1 unknown user"
    if address.startswith("later@"):
        return "451 4.3.0 try again later"
    return "250 OK"


def _scripted_day(tmp_path: Path) -> Path:
    """Two held from a challenged sender, one held whose challenge the relay refused, one copy
    the next hop refused, one it defers (still queued) and one it took."""
    with Sink(rcpt_reply=_relay_reply) as relay, Sink(rcpt_reply=_next_hop_reply) as next_hop:
        path = write_config(
            tmp_path,
            relay=f"smtp://127.0.0.1:{relay.port}",
            next_hop=f"smtp://127.0.0.1:{next_hop.port}",
        )
        flt = RunningFilter(load_config(path))
        try:
            for subject in ("one", "two"):
                flt.send("alice@remote.test", [BOB], message("alice@remote.test", BOB, subject))
            flt.send("gone@far.test", [BOB], message("gone@far.test", BOB))
            for rcpt in ("refuse@other.test", "later@other.test", "ok@other.test"):
                flt.send("carol@remote.test", [rcpt], message("carol@remote.test", rcpt))
            relay.wait_for(1)
            next_hop.wait_for(1)
            app = flt.app
            wait_until(
                lambda: (
                    app.quarantine(state=p.FAILED_COPY)
                    and [m.state for m in app.quarantine(sender="gone@far.test")] == ["expired"]
                ),
                message="the refused challenge and the refused copy to be recorded",
            )
        finally:
            flt.stop()
    return path


def test_status_figures_match_a_scripted_scenario(tmp_path: Path) -> None:
    config = _scripted_day(tmp_path)
    maintained = run("maintain", "--json", "--config", str(config))
    assert maintained.returncode == 0, maintained.stderr
    out = run("status", "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)

    assert status["held"] == 2
    assert status["pending_challenges"] == 1
    assert status["delivery_queue"]["depth"] == 1
    assert 0 <= status["delivery_queue"]["oldest_age_seconds"] < 600
    assert status["failures_last_hour"] == {"challenges": 1, "deliveries": 1}
    last = status["last_maintenance"]
    assert last["result"] == "ok" and last["error"] is None
    assert last["report"] == json.loads(maintained.stdout)
    assert last["report"]["purged"] == 1  # the held copy whose challenge was refused
    assert status["version"] == metadata.version("sourceauth")
    assert status["config"] == str(config)
    assert status["store"]["events"] > 0 and status["store"]["size_bytes"] > 0

    text = run("status", "--config", str(config))
    assert text.returncode == 0, text.stderr
    lines = dict(line.strip().split(": ", 1) for line in text.stdout.splitlines())
    assert lines["held"] == "2" and lines["pending challenges"] == "1"
    assert lines["failures last hour"] == "1 challenges, 1 deliveries"
    assert lines["last maintenance"].split()[1] == "ok"


def test_status_without_a_store_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
    out = run("status", "--config", str(config))
    assert out.returncode == 2
    assert "no store at" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "var").exists()


def test_status_refuses_a_store_whose_secret_file_is_missing(tmp_path: Path) -> None:
    config = write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
    assert run("senders", "allow", "a@b.example", "--config", str(config)).returncode == 0
    (tmp_path / "var" / "secret").unlink()
    out = run("status", "--config", str(config))
    assert out.returncode == 1 and "secret file" in out.stderr
    assert not (tmp_path / "var" / "secret").exists()


@pytest.fixture
def pg() -> Iterator[PgSchema]:
    yield from pg_schema_fixture()


@postgres
def test_status_on_postgresql_and_backup_points_to_pg_dump(tmp_path: Path, pg: PgSchema) -> None:
    config = write_config(
        tmp_path,
        relay="smtp://127.0.0.1:9",
        next_hop="smtp://127.0.0.1:9",
        extra=f'[storage]\nurl = "{pg.url}"\n',
    )
    missing = run("status", "--config", str(config))
    assert missing.returncode == 2 and "no sourceauth store" in missing.stderr
    assert run("senders", "allow", "a@b.example", "--config", str(config)).returncode == 0
    out = run("status", "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["held"] == 0 and status["pending_challenges"] == 0
    assert status["delivery_queue"] == {"depth": 0, "oldest": None, "oldest_age_seconds": None}
    assert status["store"]["url"] == pg.url and status["store"]["size_bytes"] > 0
    assert status["store"]["events"] == 1
    refused = run("backup", str(tmp_path / "b.sqlite"), "--config", str(config))
    assert refused.returncode == 2 and "pg_dump" in refused.stderr


@pytest.mark.parametrize("command", ["status", "backup", "restore"])
def test_operations_commands_have_help(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0 and "--config" in out.stdout and "Usage:" in out.stdout
