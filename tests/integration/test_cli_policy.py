"""Issue 10 as an operator meets it: two policies on one message over real SMTP, then
`maintain --dry-run` (nothing recorded: files byte-identical), the quarantine commands, the
--scope check and read-only commands on a data directory without a store. Real SQLite files,
the real command."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from sourceauth.adapters.config import load_config
from tests.integration.smtp_harness import RunningFilter, message, write_config
from tests.integration.test_cli import run
from tests.support.smtp_sink import Sink
from tests.support.waiting import wait_until

ALICE = "alice@example.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"
GONE = "gone@far.test"
TWO_POLICIES = f"""
[policy.mailboxes."{ALICE}"]
failed_action = "purge"
hold_lifetime = "1h"

[policy.mailboxes."{BOB}"]
failed_action = "keep"
hold_lifetime = "7d"
"""


def _relay_reply(address: str) -> str:
    return "550 5.1.1 no such user" if address.startswith("gone@") else "250 OK"


def _files(root: Path) -> dict[str, str]:
    """Every file and directory under root but the SQLite store, with each file's SHA-256."""
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        )
        for path in sorted(root.rglob("*"))
        if not path.name.startswith("sourceauth.db")
    }


def _tables(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table (events, views, chain, originals), read-only."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: sorted(conn.execute(f"SELECT * FROM {n}"), key=repr) for n in sorted(names)}
    finally:
        conn.close()


def _cli(config: Path, *args: str) -> str:
    out = run(*args, "--config", str(config))
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


@pytest.fixture
def two_policies_day(tmp_path: Path) -> tuple[Path, bytes]:
    """One message from a sender whose challenge the relay refuses, to alice (purge, 1 h)
    and bob (keep, 7 d), over SMTP; the filter stopped once alice's copy expired."""
    raw = message(GONE, f"{ALICE}, {BOB}", "for both")
    with Sink(rcpt_reply=_relay_reply) as relay, Sink() as next_hop:
        config = write_config(
            tmp_path,
            relay=f"smtp://127.0.0.1:{relay.port}",
            next_hop=f"smtp://127.0.0.1:{next_hop.port}",
            extra=TWO_POLICIES,
        )
        flt = RunningFilter(load_config(config))
        try:
            assert flt.send(GONE, [ALICE, BOB], raw) == {}
            app = flt.app
            wait_until(
                lambda: [m.state for m in app.quarantine(recipient=ALICE)] == ["expired"],
                message="the refused challenge to expire alice's copy",
            )
        finally:
            flt.stop()
    return config, raw


def test_one_message_two_policies_over_smtp_dry_run_then_maintain(
    two_policies_day: tuple[Path, bytes],
) -> None:
    config, raw = two_policies_day
    data = config.parent / "var"
    seal = _cli(config, "audit", "seal")
    before = _files(data), _tables(data / "sourceauth.db")

    plan = json.loads(_cli(config, "maintain", "--dry-run", "--json"))
    text = _cli(config, "maintain", "--dry-run")

    # Every row of the store, and every other file, byte for byte (SQLite's -wal/-shm files
    # come and go with connections: compared by content, through the rows).
    assert (_files(data), _tables(data / "sourceauth.db")) == before
    assert _cli(config, "audit", "seal") == seal  # same last event, same chain head
    assert set(plan) >= {"lapse", "expire", "purge", "send_challenges", "retry_deliveries"}
    assert [(i["address"], i["recipients"]) for i in plan["purge"]] == [(GONE, [ALICE])]
    assert plan["purge"][0]["reason"].startswith("challenge_failed (failed_action purge")
    assert "dry run: nothing was recorded" in text and "purge: 1" in text

    held = json.loads(_cli(config, "quarantine", "list", "--json"))
    assert [(m["recipient"], m["state"]) for m in held] == [(BOB, "challenged")]
    every = json.loads(_cli(config, "quarantine", "list", "--all", "--json"))
    assert sorted((m["recipient"], m["state"]) for m in every) == [
        (ALICE, "expired"),
        (BOB, "challenged"),
    ]

    report = json.loads(_cli(config, "maintain", "--json"))
    assert report["purged"] == 1
    every = json.loads(_cli(config, "quarantine", "list", "--all", "--json"))
    states = {m["recipient"]: (m["state"], m["reason"]) for m in every}
    assert states[ALICE][0] == "purged" and "original kept for another copy" in states[ALICE][1]
    assert states[BOB][0] == "challenged"  # kept: its policy says keep until 7 d
    bob_id = next(m["id"] for m in every if m["recipient"] == BOB)
    explained = _cli(config, "audit", "explain", bob_id)
    assert f"Policy mailbox:{BOB} applied" in explained and "failed_action keep" in explained

    original = run("quarantine", "show", bob_id, "--raw", "--config", str(config))
    assert original.returncode == 0
    assert original.stdout.encode().endswith(raw.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    headers = _cli(config, "quarantine", "show", bob_id, "--headers")
    assert "Subject: for both" in headers and "this is a message body" not in headers


def test_quarantine_pages_filters_by_recipient_and_checks_scope(tmp_path: Path) -> None:
    with Sink() as relay, Sink() as next_hop:
        config = write_config(
            tmp_path,
            relay=f"smtp://127.0.0.1:{relay.port}",
            next_hop=f"smtp://127.0.0.1:{next_hop.port}",
        )
        flt = RunningFilter(load_config(config))
        try:
            for n in range(5):
                flt.send("x@remote.test", [BOB], message("x@remote.test", BOB, f"m{n}"))
            flt.send("y@remote.test", [CAROL], message("y@remote.test", CAROL, "\x1b[2Jevil"))
        finally:
            flt.stop()

    page1 = _cli(config, "quarantine", "list", "--limit", "2").splitlines()
    assert page1[0].split()[:4] == ["ID", "RECIPIENT", "SENDER", "STATE"]
    assert len(page1) == 1 + 2 + 1 and page1[-1] == "more: showing 1-2; next page: --page 2"
    page3 = _cli(config, "quarantine", "list", "--limit", "2", "--page", "3").splitlines()
    assert len(page3) == 1 + 2 and not page3[-1].startswith("more")
    ids = [line.split()[0] for line in page1[1:3] + page3[1:]]
    assert len(set(ids)) == 4
    carol = _cli(config, "quarantine", "list", "--recipient", CAROL)
    assert CAROL in carol and BOB not in carol and "\x1b" not in carol
    carol_id = carol.splitlines()[1].split()[0]
    headers = _cli(config, "quarantine", "show", carol_id, "--headers")
    assert "Subject: \\u001b[2Jevil" in headers and "\x1b" not in headers
    assert len(json.loads(_cli(config, "quarantine", "list", "--json"))) == 6  # all, by default
    paged = run("quarantine", "list", "--json", "--limit", "5", "--config", str(config))
    assert len(json.loads(paged.stdout)) == 5 and "next page: --page 2" in paged.stderr

    outside = run(
        "senders", "allow", "x@remote.test", "--scope", "d@other.test", "--config", str(config)
    )
    assert outside.returncode == 2 and "not a protected mailbox" in outside.stderr
    shared = run("senders", "allow", "x@remote.test", "--scope", BOB, "--config", str(config))
    assert shared.returncode == 2 and "global whitelist" in shared.stderr


READ_ONLY = [
    ["senders", "list"],
    ["quarantine", "list"],
    ["quarantine", "show", "0123abcd"],
    ["quarantine", "show", "0123abcd", "--raw"],
    ["audit", "history", "a@b.example"],
    ["audit", "explain", "0123abcd"],
    ["audit", "state", "--at", "2026-01-01"],
    ["audit", "verify"],
    ["audit", "seal"],
    ["audit", "export"],
    ["status"],
    ["maintain", "--dry-run"],
    ["rules", "list"],
    ["senders", "export", "--format", "plain"],
]


@pytest.mark.parametrize("args", READ_ONLY, ids=[" ".join(a) for a in READ_ONLY])
@pytest.mark.parametrize("data_dir_exists", [False, True])
def test_read_only_commands_without_a_store_say_so_and_create_nothing(
    tmp_path: Path, args: list[str], data_dir_exists: bool
) -> None:
    config = write_config(tmp_path, relay="smtp://127.0.0.1:9", next_hop="smtp://127.0.0.1:9")
    if data_dir_exists:
        (tmp_path / "var").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = run(*args, "--config", str(config))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("sourceauth: error: no store at ") and out.stderr.count("\n") == 1
    assert out.stdout == ""
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
